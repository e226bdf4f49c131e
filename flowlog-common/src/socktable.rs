//! The kernel's table of live sockets: each tracked socket's [`SockState`],
//! found by the socket's address.
//!
//! Written by hand instead of a BPF hash map, for speed: per socket the
//! program inserts once, looks up twice and deletes once, and the hash map
//! spent ~435 of the ~1 200 ns the program cost per socket on those (a
//! helper call each, a bucket lock with interrupts saved, a per-CPU free
//! list with a lock of its own, and two cache misses: bucket, then element).
//! Here a lookup is one cache line of addresses and one of state, both
//! reached by plain loads from two preallocated arrays (the verifier inlines
//! array lookups), and an insert claims its slot with one compare-and-swap.
//! `socktable_matches_a_hash_map` (below) checks it against std's HashMap.
//!
//! Layout: [`SockBucket`]s of [`BUCKET_SLOTS`] addresses (one cache line),
//! and beside them the states, slot for slot ([`SockSlot`], one cache line
//! each). A socket lives in the first free slot of its first bucket, or of
//! its second when the first is crowded and the second emptier (see
//! [`insert`]); the first bucket counts how many of its sockets live in
//! their second ([`SockBucket::spilled`]), so a lookup reads a second bucket
//! only when that count is not 0 (rare below [`buckets_for`]'s load).
//!
//! Concurrency: the kernel calls the program for one socket's transitions
//! one at a time (under the socket's lock, or in its softirq), so only
//! different sockets race, and only for free slots: a slot is claimed with a
//! compare-and-swap to [`busy`] (so that a reader never pairs the address
//! with the state of the slot's previous socket), its state written, then
//! the address published. A slot is freed by writing 0. The snapshot reader
//! copies a state and then checks that the slot still holds its socket.

use crate::SockState;

/// Addresses per bucket: with the spill count, one 64-byte cache line.
pub const BUCKET_SLOTS: usize = 7;

/// One bucket of the table: the addresses of the sockets in its slots (0:
/// free) and how many sockets whose first bucket this is live in their
/// second.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct SockBucket {
    pub keys: [u64; BUCKET_SLOTS],
    pub spilled: u64,
}
const _: () = assert!(core::mem::size_of::<SockBucket>() == 64);

/// One socket's state in the table, padded to a cache line.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockSlot {
    pub state: SockState,
    pub _pad: u64,
}
const _: () = assert!(core::mem::size_of::<SockSlot>() == 64);

/// Where slot `slot` of bucket `bucket` is in the array of states.
#[inline(always)]
pub const fn slot_index(bucket: u32, slot: usize) -> u32 {
    bucket * BUCKET_SLOTS as u32 + slot as u32
}

/// The address written while a slot's state is being filled in: matches no
/// socket (socket addresses are 8-byte aligned).
#[inline(always)]
pub const fn busy(sk: u64) -> u64 {
    sk | 1
}

/// Whether a slot's address names a socket (not free, not being filled).
#[inline(always)]
pub const fn is_live(key: u64) -> bool {
    key != 0 && key & 1 == 0
}

/// Buckets for a table that tracks up to `max_sockets` at once: a power of
/// two, one bucket (seven slots) per three sockets at least, so that with
/// `max_sockets` open a bucket holds three on average and the balanced
/// insert never finds both of a socket's buckets full
/// (`holds_max_sockets_without_refusing_one`; at four per bucket it did,
/// rarely). 64 bytes per slot and per bucket: 65 536 sockets, 32 768
/// buckets, 16.8 MB.
pub const fn buckets_for(max_sockets: u32) -> u32 {
    let want = (max_sockets as u64).div_ceil(3);
    let mut n = 1u64;
    while n < want {
        n *= 2;
    }
    if n > 1 << 24 { 1 << 24 } else { n as u32 }
}

/// The socket's two buckets, for a table of `mask + 1` buckets (a power of
/// two): two multiplicative (Fibonacci) hashes of the address, whose low
/// bits are the same for every socket (slab objects), each taking high bits
/// of its product (a product's low bits mix only the input's low bits).
#[inline(always)]
pub fn buckets_of(sk: u64, mask: u32) -> (u32, u32) {
    let a = sk >> 3;
    let first = (a.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 40) as u32 & mask;
    let mut second = (a.wrapping_mul(0xC2B2_AE3D_27D4_EB4F) >> 40) as u32 & mask;
    if second == first {
        second = (first ^ 1) & mask;
    }
    (first, second)
}

/// Where the table's memory is: the program reaches it through its two
/// array maps, the unit tests through plain vectors.
pub trait Memory {
    /// Buckets - 1 (a power of two - 1).
    fn mask(&self) -> u32;
    fn bucket(&self, i: u32) -> Option<*mut SockBucket>;
    /// The state beside `bucket`'s slot `slot`.
    fn slot(&self, bucket: u32, slot: usize) -> Option<*mut SockSlot>;
}

/// A tracked socket's place in the table.
#[derive(Clone, Copy)]
pub struct Found {
    pub state: *mut SockState,
    key: *mut u64,
    /// The first bucket's spill count, when the socket lives in its second.
    spilled: Option<*mut u64>,
}

impl Found {
    /// Whether the slot still holds `sk` (a reader that copied the state
    /// checks this after copying).
    #[inline(always)]
    pub fn holds(&self, sk: u64) -> bool {
        unsafe { self.key.read_volatile() == sk }
    }
}

/// Compare-and-swap and add on a u64 of the table. core's atomic types
/// offer neither on the BPF target (which Rust marks as without them), so
/// there they are the intrinsics, which LLVM compiles to the BPF atomic
/// instructions (cmpxchg, add; cpu v3). Plain aligned u64 loads and stores
/// are single instructions on both.
#[cfg(target_arch = "bpf")]
mod atomic {
    use core::intrinsics::{atomic_cxchg, atomic_xadd, AtomicOrdering::SeqCst};

    /// SAFETY (both): `p` is an 8-byte aligned u64 of a live table.
    #[inline(always)]
    pub unsafe fn cas(p: *mut u64, old: u64, new: u64) -> bool {
        unsafe { atomic_cxchg::<u64, { SeqCst }, { SeqCst }>(p, old, new) }.1
    }

    #[inline(always)]
    pub unsafe fn add(p: *mut u64, v: u64) {
        unsafe { atomic_xadd::<u64, u64, { SeqCst }>(p, v) };
    }
}

#[cfg(not(target_arch = "bpf"))]
mod atomic {
    use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

    /// SAFETY (both): `p` is an 8-byte aligned u64 of a live table.
    #[inline(always)]
    pub unsafe fn cas(p: *mut u64, old: u64, new: u64) -> bool {
        unsafe { AtomicU64::from_ptr(p) }.compare_exchange(old, new, SeqCst, SeqCst).is_ok()
    }

    #[inline(always)]
    pub unsafe fn add(p: *mut u64, v: u64) {
        unsafe { AtomicU64::from_ptr(p) }.fetch_add(v, SeqCst);
    }
}

/// The slot of `bucket` that holds `sk`, if any.
#[inline(always)]
fn scan<M: Memory>(m: &M, bucket: u32, sk: u64) -> Option<(*mut u64, usize)> {
    let b = m.bucket(bucket)?;
    for i in 0..BUCKET_SLOTS {
        let key = unsafe { &raw mut (*b).keys[i] };
        if unsafe { key.read_volatile() } == sk {
            return Some((key, i));
        }
    }
    None
}

/// The tracked socket `sk`, if it is in the table.
#[inline(always)]
pub fn find<M: Memory>(m: &M, sk: u64) -> Option<Found> {
    let (first, second) = buckets_of(sk, m.mask());
    if let Some((key, i)) = scan(m, first, sk) {
        return Some(Found { state: unsafe { &raw mut (*m.slot(first, i)?).state }, key, spilled: None });
    }
    let b = m.bucket(first)?;
    let spilled = unsafe { &raw mut (*b).spilled };
    if unsafe { spilled.read_volatile() } == 0 {
        return None;
    }
    let (key, i) = scan(m, second, sk)?;
    Some(Found { state: unsafe { &raw mut (*m.slot(second, i)?).state }, key, spilled: Some(spilled) })
}

/// What [`insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inserted {
    /// Took a free slot.
    Added,
    /// Replaced the state an earlier socket at this address left: a socket
    /// whose close the program never saw.
    Replaced,
    /// Both of the socket's buckets are full: not tracked.
    Full,
}

/// Puts `sk` in the table with state `st`, replacing a state left from an
/// earlier life of the socket's address (a close the program never saw).
#[inline(always)]
pub fn insert<M: Memory>(m: &M, sk: u64, st: &SockState) -> Inserted {
    if let Some(found) = find(m, sk) {
        unsafe { *found.state = *st };
        return Inserted::Replaced;
    }
    let (first, second) = buckets_of(sk, m.mask());
    // The first bucket while it is not crowded, so that most lookups read
    // one line; past BALANCE_AT sockets, the emptier of the two (two
    // choices). Always the first until full, as first written, turned
    // sockets away at ~80% of max_sockets (a Poisson tail of buckets that
    // fill while their second choices are full too); see
    // holds_max_sockets_without_refusing_one.
    let crowded = used(m, first);
    let (try1, try2) = if crowded >= BALANCE_AT && used(m, second) < crowded { (second, first) } else { (first, second) };
    for bucket in [try1, try2] {
        if claim(m, bucket, sk, st) {
            if bucket != first {
                if let Some(b) = m.bucket(first) {
                    unsafe { atomic::add(&raw mut (*b).spilled, 1) };
                }
            }
            return Inserted::Added;
        }
    }
    Inserted::Full
}

/// Slots of a bucket in use past which an insert compares its two buckets.
const BALANCE_AT: u32 = 4;

/// Slots of `bucket` in use (taken or being filled).
#[inline(always)]
fn used<M: Memory>(m: &M, bucket: u32) -> u32 {
    let Some(b) = m.bucket(bucket) else { return BUCKET_SLOTS as u32 };
    let mut n = 0;
    for i in 0..BUCKET_SLOTS {
        n += (unsafe { (&raw const (*b).keys[i]).read_volatile() } != 0) as u32;
    }
    n
}

/// Takes the first free slot of `bucket` for `sk`.
#[inline(always)]
fn claim<M: Memory>(m: &M, bucket: u32, sk: u64, st: &SockState) -> bool {
    let Some(b) = m.bucket(bucket) else { return false };
    for i in 0..BUCKET_SLOTS {
        let key = unsafe { &raw mut (*b).keys[i] };
        if unsafe { key.read_volatile() } != 0 {
            continue;
        }
        if !unsafe { atomic::cas(key, 0, busy(sk)) } {
            continue; // another CPU took it meanwhile
        }
        match m.slot(bucket, i) {
            Some(slot) => {
                unsafe {
                    (*slot).state = *st;
                    key.write_volatile(sk);
                }
                return true;
            }
            None => {
                unsafe { key.write_volatile(0) };
                return false;
            }
        }
    }
    false
}

/// Frees the slot of a socket [`find`] found.
#[inline(always)]
pub fn remove(found: &Found) {
    unsafe { found.key.write_volatile(0) };
    if let Some(spilled) = found.spilled {
        unsafe { atomic::add(spilled, 1u64.wrapping_neg()) };
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use std::{cell::UnsafeCell, collections::HashMap, vec, vec::Vec};

    use super::*;
    use crate::{direction, COMM_LEN};

    struct Table {
        buckets: UnsafeCell<Vec<SockBucket>>,
        slots: UnsafeCell<Vec<SockSlot>>,
    }

    // SAFETY: the table's own atomics order its accesses, as in the kernel.
    unsafe impl Sync for Table {}

    fn state(n: u64) -> SockState {
        SockState {
            start_ns: n,
            cgroup_id: n * 3,
            state_path: 0,
            tgid: n as u32,
            tid: 0,
            comm: [0; COMM_LEN],
            direction: direction::CLIENT,
            transitions: 0,
            flags: 0,
            netns_ino: 0,
        }
    }

    impl Table {
        fn new(buckets: u32) -> Table {
            let empty = SockSlot { state: state(0), _pad: 0 };
            Table {
                buckets: UnsafeCell::new(vec![SockBucket::default(); buckets as usize]),
                slots: UnsafeCell::new(vec![empty; buckets as usize * BUCKET_SLOTS]),
            }
        }
        fn live(&self) -> usize {
            unsafe { &*self.buckets.get() }.iter().flat_map(|b| b.keys).filter(|k| is_live(*k)).count()
        }
    }

    impl Memory for Table {
        fn mask(&self) -> u32 {
            unsafe { &*self.buckets.get() }.len() as u32 - 1
        }
        fn bucket(&self, i: u32) -> Option<*mut SockBucket> {
            unsafe { &mut *self.buckets.get() }.get_mut(i as usize).map(|b| b as *mut _)
        }
        fn slot(&self, bucket: u32, slot: usize) -> Option<*mut SockSlot> {
            unsafe { &mut *self.slots.get() }.get_mut(slot_index(bucket, slot) as usize).map(|s| s as *mut _)
        }
    }

    /// A small deterministic generator (no dependency): xorshift64*.
    fn rng(seed: &mut u64) -> u64 {
        *seed ^= *seed >> 12;
        *seed ^= *seed << 25;
        *seed ^= *seed >> 27;
        seed.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    #[test]
    fn socktable_matches_a_hash_map() {
        // Small, so that buckets fill and spill; addresses like slab objects.
        let t = Table::new(64);
        let mut model: HashMap<u64, u64> = HashMap::new();
        let mut seed = 0x1234_5678_9abc_def1u64;
        let (mut full, mut spills) = (0, 0);
        for n in 1..200_000u64 {
            let sk = 0xffff_8880_0000_0000 + (rng(&mut seed) % 600) * 2304;
            match rng(&mut seed) % 3 {
                0 | 1 => {
                    let inserted = insert(&t, sk, &state(n));
                    if inserted != Inserted::Full {
                        // Replaced exactly when an entry was left there.
                        assert_eq!(inserted == Inserted::Replaced, model.insert(sk, n).is_some());
                    } else {
                        // Refused only when both buckets are full.
                        let (a, b) = buckets_of(sk, t.mask());
                        for x in [a, b] {
                            assert!(unsafe { (*t.bucket(x).unwrap()).keys }.iter().all(|k| *k != 0));
                        }
                        assert!(!model.contains_key(&sk));
                        full += 1;
                    }
                }
                _ => {
                    if let Some(f) = find(&t, sk) {
                        spills += f.spilled.is_some() as u32;
                        remove(&f);
                    }
                    model.remove(&sk);
                }
            }
            let got = find(&t, sk).map(|f| unsafe { (*f.state).start_ns });
            assert_eq!(got, model.get(&sk).copied(), "socket {sk:#x} after op {n}");
            assert_eq!(t.live(), model.len());
        }
        for (sk, n) in &model {
            assert_eq!(find(&t, *sk).map(|f| unsafe { (*f.state).cgroup_id }), Some(n * 3));
        }
        assert!(full > 0 && spills > 0, "the test must fill buckets ({full}) and spill ({spills})");
    }

    #[test]
    fn holds_max_sockets_without_refusing_one() {
        // The table sized for max_sockets, filled to it with slab-like
        // addresses (tcp_sock objects 2 304 bytes apart in 32 KB slabs
        // scattered over the direct map), then churned at that level: no
        // socket is ever turned away.
        // 49 152: the most sockets per bucket that sizing gives (3).
        for max in [4_096u32, 49_152, 65_536, 262_144] {
            let t = Table::new(buckets_for(max));
            let mut seed = u64::from(max) | 1;
            let addr = |seed: &mut u64| {
                let slab = rng(seed) % (1 << 22);
                0xffff_8880_0000_0000 + slab * 32_768 + (rng(seed) % 14) * 2_304
            };
            let mut live = Vec::with_capacity(max as usize);
            while live.len() < max as usize {
                let sk = addr(&mut seed);
                if find(&t, sk).is_none() {
                    assert!(insert(&t, sk, &state(1)) != Inserted::Full, "socket {} of {max} refused", live.len() + 1);
                    live.push(sk);
                }
            }
            for _ in 0..2 * max {
                let i = (rng(&mut seed) % max as u64) as usize;
                remove(&find(&t, live[i]).unwrap());
                let sk = loop {
                    let sk = addr(&mut seed);
                    if find(&t, sk).is_none() {
                        break sk;
                    }
                };
                assert!(insert(&t, sk, &state(2)) != Inserted::Full, "a socket refused with {max} of {max} live");
                live[i] = sk;
            }
            assert_eq!(t.live(), max as usize);
        }
    }

    #[test]
    fn racing_inserts_never_share_a_slot() {
        // Two threads insert distinct sockets that all share their buckets'
        // pair as far as possible (a tiny table): every success is findable
        // with its own state, and successes never exceed the slots.
        let t = Table::new(2);
        let ok: Vec<Vec<u64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2u64)
                .map(|th| {
                    let t = &t;
                    s.spawn(move || (0..64u64).map(|i| 0x1000 + (th * 64 + i) * 8).filter(|sk| insert(t, *sk, &state(*sk)) != Inserted::Full).collect())
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let all: Vec<u64> = ok.concat();
        assert_eq!(all.len(), 2 * BUCKET_SLOTS, "every slot filled once");
        for sk in all {
            assert_eq!(find(&t, sk).map(|f| unsafe { (*f.state).start_ns }), Some(sk));
        }
    }

    #[test]
    fn sizing() {
        assert_eq!(buckets_for(65_536), 32_768);
        assert_eq!(buckets_for(49_152), 16_384);
        assert_eq!(buckets_for(100_000), 65_536);
        assert!(buckets_for(131_072) as usize * BUCKET_SLOTS >= 131_072 * 7 / 3);
        assert_eq!(buckets_for(1), 1);
        assert_eq!(buckets_of(0x1000, 0), (0, 0));
    }
}
