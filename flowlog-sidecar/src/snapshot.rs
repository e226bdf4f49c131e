//! Interim records for long-lived connections.
//!
//! Every interim interval, user space lists the live sockets the kernel
//! tracks (the socket table, [`flowlog_common::socktable`]) and, for each open longer than the interval, runs
//! the `flowlog_snapshot` program once through BPF_PROG_TEST_RUN with the
//! socket as its argument. The program reads the socket's counters exactly
//! like the close path and sends an INTERIM event through the same ring
//! buffer. No per-packet hook, no kprobes, and nothing at all for short flows.
//!
//! A pass is one syscall per socket (100 000 sockets: a fraction of a
//! second), so it runs on a blocking thread of its own ([`Passes`]) while
//! the capture loop keeps draining the ring. It is paced by the ring itself:
//! the program refuses ([`snapshot::BUSY`]) once the ring is half full, and
//! the pass then waits for the capture loop's next drain ([`Drains`]) and
//! asks again, so a pass never fills the ring and closes always find room.
//! It also waits while final events are parked (the ring was full at
//! close): the reader pops those once it has emptied the ring, which a pass
//! refilling it would otherwise put off for as long as passes run.

use std::{
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc, Condvar, Mutex, PoisonError,
    },
    time::Duration,
};

use std::os::fd::{AsFd, AsRawFd};

use aya::{
    maps::{Array, Map, MapData},
    programs::{RawTracePoint, RawTracePointRunOptions, TestRun},
    Ebpf,
};
use flowlog_common::{
    snapshot,
    socktable::{is_live, slot_index, SockBucket, SockSlot, BUCKET_SLOTS},
    PROG_SNAPSHOT, SOCK_BUCKETS_MAP, SOCK_SLOTS_MAP,
};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

/// How long a pass waits for a drain before giving up: the capture loop
/// drains every `drain_interval_ms` (at most 10 s), so only a stuck loop
/// takes this long.
const DRAIN_WAIT: Duration = Duration::from_secs(30);

/// How many times the capture loop has drained the ring buffer: a pass that
/// found the ring half full waits for this to move.
#[derive(Default)]
pub struct Drains {
    count: Mutex<u64>,
    moved: Condvar,
    /// Sockets the running pass is about to snapshot, once it has listed
    /// them (0: none announced since the loop last looked).
    due: AtomicUsize,
}

impl Drains {
    /// Called by the capture loop after each drain.
    pub fn bump(&self) {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
        self.moved.notify_all();
    }

    /// The running pass's socket count, once (see [`Passes::take_due`]).
    fn take_due(&self) -> Option<usize> {
        Some(self.due.swap(0, Ordering::Relaxed)).filter(|n| *n > 0)
    }

    fn current(&self) -> u64 {
        *self.count.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until a drain after `seen` has happened; false on timeout.
    fn wait_past(&self, seen: u64, timeout: Duration) -> bool {
        let count = self.count.lock().unwrap_or_else(PoisonError::into_inner);
        let (count, waited) = self
            .moved
            .wait_timeout_while(count, timeout, |c| *c <= seen)
            .unwrap_or_else(PoisonError::into_inner);
        drop(count);
        !waited.timed_out()
    }
}

/// The socket table's two arrays.
pub struct Socks {
    buckets: Map,
    slots: Map,
    /// How many buckets.
    len: u32,
}

impl Socks {
    fn data(map: &Map) -> std::io::Result<&MapData> {
        match map {
            Map::Array(d) => Ok(d),
            _ => Err(std::io::Error::other("the socket table is not an array")),
        }
    }
}

/// Runs snapshot passes: owns the socket table and shares the loaded program.
pub struct Snapshotter {
    socks: Socks,
    /// Where the snapshot program lives (loaded, never attached).
    ebpf: Arc<Ebpf>,
    drains: Arc<Drains>,
    /// Interim records go to connections open at least this long.
    interval_ns: u64,
}

/// CLOCK_MONOTONIC in ns (the kernel's bpf_ktime_get_ns clock).
fn monotonic_ns() -> u64 {
    // CLOCK_MONOTONIC cannot fail on Linux; 0 would only make every socket look new.
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .map_or(0, |ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
}

/// The BPF_MAP_*_BATCH part of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

/// Buckets read per batch: 32 KB of addresses and 224 KB of states at a
/// time, so a pass never holds the whole table (16 MB at 131 072 sockets).
const CHUNK_BUCKETS: u32 = 512;

/// Entries `first..first + out.len()` of an array map, with one
/// BPF_MAP_LOOKUP_BATCH (aya has no wrapper for it); fewer at its end.
fn read_batch<V: Copy>(map: &MapData, first: u32, out: &mut [V]) -> std::io::Result<usize> {
    let fd = map.fd().as_fd().as_raw_fd();
    let mut keys = vec![0u32; out.len()];
    // The kernel's cursor is the last key read: it reads on from the key
    // after it (none: from index 0).
    let (cursor_in, mut cursor_out) = (first.wrapping_sub(1), 0u32);
    let mut attr = BatchAttr {
        in_batch: if first == 0 { 0 } else { &cursor_in as *const u32 as u64 },
        out_batch: &mut cursor_out as *mut u32 as u64,
        keys: keys.as_mut_ptr() as u64,
        values: out.as_mut_ptr() as u64,
        count: out.len() as u32,
        map_fd: fd as u32,
        ..Default::default()
    };
    // SAFETY: attr names buffers for `count` u32 keys and `count` values of
    // the map's value type (V is that type, Copy and plain data) and two u32
    // cursors, all alive across the call; the kernel writes at most `count`
    // of each and the count.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, std::mem::size_of::<BatchAttr>())
    };
    let n = (attr.count as usize).min(out.len());
    match (rc < 0).then(std::io::Error::last_os_error) {
        None => Ok(n),
        // The end of the array.
        Some(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(n),
        Some(e) => Err(e),
    }
}

/// Every tracked socket and its start time, a chunk of buckets at a time.
fn list(socks: &Socks) -> std::io::Result<Vec<(u64, u64)>> {
    let total = socks.len;
    let mut buckets = vec![SockBucket::default(); CHUNK_BUCKETS as usize];
    let mut slots: Vec<SockSlot> = Vec::with_capacity(CHUNK_BUCKETS as usize * BUCKET_SLOTS);
    let mut listed = Vec::new();
    let mut first = 0u32;
    while first < total {
        let want = CHUNK_BUCKETS.min(total - first) as usize;
        let got = read_batch(Socks::data(&socks.buckets)?, first, &mut buckets[..want])?;
        let live = |b: &SockBucket| b.keys.iter().any(|k| is_live(*k));
        if buckets[..got].iter().any(live) {
            // SAFETY: SockSlot is plain data; every byte is written by the
            // kernel before it is read (read_batch returns how many).
            slots.resize(got * BUCKET_SLOTS, unsafe { std::mem::zeroed() });
            let n = read_batch(Socks::data(&socks.slots)?, slot_index(first, 0), &mut slots[..])?;
            let read = &slots[..n];
            for (b, bucket) in (0..).zip(&buckets[..got]) {
                for (i, &sk) in bucket.keys.iter().enumerate() {
                    if let (true, Some(slot)) = (is_live(sk), read.get(slot_index(b, i) as usize)) {
                        listed.push((sk, slot.state.start_ns));
                    }
                }
            }
        }
        if got < want {
            break;
        }
        first += got as u32;
    }
    Ok(listed)
}

/// Loads the snapshot program (never attached) and takes the socket map;
/// [`Snapshotter::new`] gets them once `ebpf` is shared.
pub fn prepare(ebpf: &mut Ebpf) -> anyhow::Result<Socks> {
    let prog: &mut RawTracePoint = ebpf
        .program_mut(PROG_SNAPSHOT)
        .ok_or_else(|| anyhow::anyhow!("program {PROG_SNAPSHOT} missing"))?
        .try_into()?;
    prog.load()?;
    let mut take = |name: &str| ebpf.take_map(name).ok_or_else(|| anyhow::anyhow!("map {name} missing"));
    let (buckets, slots) = (take(SOCK_BUCKETS_MAP)?, take(SOCK_SLOTS_MAP)?);
    let len = Array::<_, SockBucket>::try_from(&buckets)?.len();
    Array::<_, SockSlot>::try_from(&slots)?;
    Ok(Socks { buckets, slots, len })
}

impl Snapshotter {
    pub fn new(socks: Socks, ebpf: Arc<Ebpf>, interval_ns: u64) -> Snapshotter {
        Snapshotter { socks, ebpf, drains: Arc::default(), interval_ns }
    }

    /// Tracked sockets started at or before `born_by` (monotonic ns;
    /// unknown start: always).
    fn due(&self, born_by: u64) -> Vec<u64> {
        let listed = list(&self.socks).unwrap_or_else(|e| {
            debug!("batched listing unavailable ({e}): listing one by one");
            self.list_one_by_one()
        });
        let mut due: Vec<u64> = listed
            .into_iter()
            .filter(|&(_, start_ns)| start_ns <= born_by)
            .map(|(sk, _)| sk)
            .collect();
        due.sort_unstable();
        due.dedup();
        due
    }

    /// The fallback (kernels before 5.6, without batched lookups): one
    /// lookup per bucket, and per tracked socket.
    fn list_one_by_one(&self) -> Vec<(u64, u64)> {
        let mut listed = Vec::new();
        let (Ok(buckets), Ok(slots)) =
            (Array::<_, SockBucket>::try_from(&self.socks.buckets), Array::<_, SockSlot>::try_from(&self.socks.slots))
        else {
            return listed;
        };
        for b in 0..self.socks.len {
            let Ok(bucket) = buckets.get(&b, 0) else { continue };
            for (i, &sk) in bucket.keys.iter().enumerate() {
                if let (true, Ok(slot)) = (is_live(sk), slots.get(&slot_index(b, i), 0)) {
                    listed.push((sk, slot.state.start_ns));
                }
            }
        }
        listed
    }

    /// One pass: an interim event for every socket open longer than the
    /// interval (every socket when `all`). Blocks: run it off the capture
    /// loop, which must keep draining meanwhile. Returns the events sent.
    pub fn pass(&self, all: bool) -> Pass {
        let prog: &RawTracePoint = match self.ebpf.program(PROG_SNAPSHOT).map(TryInto::try_into) {
            Some(Ok(p)) => p,
            _ => {
                warn!("program {PROG_SNAPSHOT} missing: no interim records");
                return Pass::default();
            }
        };
        // The program checks the age again: a listed socket may close
        // during the pass and a new one take its address.
        let born_by = if all { u64::MAX } else { monotonic_ns().saturating_sub(self.interval_ns) };
        let due = self.due(born_by);
        self.drains.due.store(due.len(), Ordering::Relaxed);
        let (mut sent, mut waits) = (0, 0u64);
        for sk in due {
            loop {
                // Read before the run: a drain that ends after the ring was
                // found busy moves the count past this.
                let seen = self.drains.current();
                let mut opts = RawTracePointRunOptions::new();
                opts.args[0] = sk;
                opts.args[1] = born_by;
                match prog.test_run(opts).map(|r| r.return_value) {
                    Ok(snapshot::SENT) => sent += 1,
                    Ok(snapshot::BUSY) => {
                        waits += 1;
                        if self.drains.wait_past(seen, DRAIN_WAIT) {
                            continue;
                        }
                        warn!(sent, "interim pass stopped: the ring buffer was not drained for {DRAIN_WAIT:?}");
                        return Pass { sent, complete: false };
                    }
                    Ok(_) => {} // closed meanwhile: its final record tells all
                    Err(e) => {
                        warn!(sent, "interim pass stopped: snapshot of a live socket failed: {e}");
                        return Pass { sent, complete: false };
                    }
                }
                break;
            }
        }
        debug!(sent, waits, all, "interim pass done");
        Pass { sent, complete: true }
    }
}

/// What a pass did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Pass {
    /// Interim events sent.
    pub sent: u64,
    /// Every due socket was snapshotted (a pass can stop early: the ring not
    /// drained in time, a failed run).
    pub complete: bool,
}

/// The snapshot passes as the capture loop drives them: at most one at a
/// time, each on a blocking thread.
pub struct Passes {
    idle: Option<Snapshotter>,
    running: Option<JoinHandle<(Snapshotter, Pass)>>,
    drains: Arc<Drains>,
}

impl Passes {
    pub fn new(snapshotter: Snapshotter) -> Passes {
        Passes { drains: snapshotter.drains.clone(), idle: Some(snapshotter), running: None }
    }

    /// Starts a pass (every socket when `all`), unless one is running;
    /// true when it started.
    pub fn start(&mut self, all: bool) -> bool {
        let Some(s) = self.idle.take() else {
            debug!("interim pass still running: this tick is skipped");
            return false;
        };
        self.running = Some(tokio::task::spawn_blocking(move || {
            let n = s.pass(all);
            (s, n)
        }));
        true
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Tells a waiting pass that the ring was drained. Only while a pass
    /// runs: the condition variable's wake-up is a futex call even with no
    /// one waiting, and drains are frequent.
    pub fn drained(&self) {
        if self.running.is_some() {
            self.drains.bump();
        }
    }

    /// How many sockets the running pass is about to snapshot, once it has
    /// listed them: the capture loop sizes its interim baselines for them
    /// in one step before their records come (growing step by step held
    /// the old and new table at once: ~5 MB more at 200 000 sockets).
    pub fn take_due(&self) -> Option<usize> {
        self.drains.take_due()
    }

    /// What the running pass did, once it ends; never while none runs.
    pub async fn finished(&mut self) -> Pass {
        let Some(running) = self.running.as_mut() else { return std::future::pending().await };
        let done = running.await;
        self.running = None;
        match done {
            Ok((s, n)) => {
                self.idle = Some(s);
                n
            }
            Err(e) => {
                // The snapshotter is lost with its thread: no more passes.
                warn!("interim pass failed: {e}; no more interim records");
                Pass::default()
            }
        }
    }
}
