//! eBPF side of flowlog: one program on `sock:inet_sock_set_state`, loaded as
//! a BTF tracepoint when the kernel allows it and as a classic tracepoint
//! otherwise. Both entry points feed the same handler.
//!
//! Per live socket the kernel keeps a small [`SockState`] (start time, owner,
//! direction, state path); when the socket reaches CLOSE the handler reads the
//! socket's own counters once and sends one [`FlowEvent`] to the ring buffer.
//! Nothing runs per packet.
//!
//! The two entry points differ in how they read the socket. Under tp_btf the
//! socket pointer is typed (BTF): its fields are plain loads that the
//! verifier checks against the kernel's own layout, with no helper call and
//! no copy. The classic tracepoint (and the snapshot program) only have an
//! address and go through bpf_probe_read_kernel.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    cty::c_void,
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_probe_read_kernel_buf, generated as gen,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, PerCpuArray, Queue, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use flowlog_common::{
    socktable::{self, Inserted, SockBucket, SockSlot, BUCKET_SLOTS},
    direction, flags, skipped_from, snapshot, stat, tcp_state, FlowEvent, KernelOffsets, KernelSettings,
    ListenKey, Owner, Scratch, SockState, Stage, StageHead, AF_INET, AF_INET6, COMM_LEN, FLOW_EVENT_KIND_V2,
    FLOW_EVENT_SIZE, SCRATCH_BYTES, STAGE_EVENTS, STATE_PATH_MAX,
};

const IPPROTO_TCP: u16 = 6;
/// BPF_RB_AVAIL_DATA and BPF_RB_RING_SIZE for bpf_ringbuf_query.
const BPF_RB_AVAIL_DATA: u64 = 0;
const BPF_RB_RING_SIZE: u64 = 1;

/// Filled in by the sidecar from BTF before load.
#[unsafe(no_mangle)]
static FLOWLOG_OFFSETS: KernelOffsets = KernelOffsets {
    skc_family: 0,
    skc_daddr: 0,
    skc_rcv_saddr: 0,
    skc_dport: 0,
    skc_num: 0,
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
    skc_state: 0,
    sk_protocol: 0,
    sk_err: 0,
    sk_flags: 0,
    inet_sport: 0,
    bytes_acked: 0,
    bytes_received: 0,
    segs_in: 0,
    segs_out: 0,
    total_retrans: 0,
    srtt_us: 0,
    rtt_min: 0,
    snd_una: 0,
    write_seq: 0,
    chrono_start: 0,
    chrono_stat: 0,
    chrono_type_byte: 0,
    chrono_type_shift: 0,
    rate_delivered: 0,
    rate_interval_us: 0,
    mss_cache: 0,
    bytes_retrans: 0,
    reordering: 0,
    reord_seen: 0,
    total_rto: 0,
    total_rto_recoveries: 0,
    total_rto_time: 0,
    net_ns_inum: 0,
    task_comm: 0,
    sock_done_bit: 0,
    sk_protocol_u16: 0,
    tp_skaddr: 0,
    tp_oldstate: 0,
    tp_newstate: 0,
    tp_protocol: 0,
    sock_read_len: 0,
};

#[unsafe(no_mangle)]
static FLOWLOG_SETTINGS: KernelSettings = KernelSettings { wakeup_bytes: 256 * 1024, sock_bucket_mask: 0 };

/// Sized by the sidecar (`--ring-buffer-bytes`).
#[map(name = "FLOWLOG_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Live sockets ([`socktable`]): the buckets of socket addresses, and the
/// sockets' states beside them; sized by the sidecar (`--max-sockets`).
#[map(name = "FLOWLOG_SOCK_BUCKETS")]
static SOCK_BUCKETS: Array<SockBucket> = Array::with_max_entries(16384, 0);
#[map(name = "FLOWLOG_SOCK_SLOTS")]
static SOCK_SLOTS: Array<SockSlot> = Array::with_max_entries(16384 * BUCKET_SLOTS as u32, 0);

/// The socket table in the two maps above.
struct Socks;

impl socktable::Memory for Socks {
    #[inline(always)]
    fn mask(&self) -> u32 {
        unsafe { core::ptr::read_volatile(&FLOWLOG_SETTINGS.sock_bucket_mask) as u32 }
    }

    #[inline(always)]
    fn bucket(&self, i: u32) -> Option<*mut SockBucket> {
        SOCK_BUCKETS.get_ptr_mut(i)
    }

    #[inline(always)]
    fn slot(&self, bucket: u32, slot: usize) -> Option<*mut SockSlot> {
        SOCK_SLOTS.get_ptr_mut(socktable::slot_index(bucket, slot))
    }
}

/// Listening ports and the process that called listen().
#[map(name = "FLOWLOG_LISTENERS")]
static LISTENERS: HashMap<ListenKey, Owner> = HashMap::with_max_entries(16384, 0);

/// A copy of the socket per CPU: slot [`SLOT_CLOSE`] for the classic
/// tracepoint, [`SLOT_SNAPSHOT`] for the snapshot program. Each its own: a
/// snapshot runs in process context, where a softirq closing a socket on
/// the same CPU can run the tracepoint program in the middle of it.
#[map(name = "FLOWLOG_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(2, 0);
const SLOT_CLOSE: u32 = 0;
const SLOT_SNAPSHOT: u32 = 1;

/// Final events that found the ring buffer full wait here, in order, for
/// user space to pop them (a burst of closes faster than the reader, e.g.
/// 50 000 connections closed at once); sized by the sidecar (`--max-parked`).
/// Interim events are never parked: their pass waits for room instead.
#[map(name = "FLOWLOG_PARKED")]
static PARKED: Queue<FlowEvent> = Queue::with_max_entries(65536, 0);

/// One final event per CPU, assembled here when the ring buffer is full.
#[map(name = "FLOWLOG_PARKING")]
static PARKING: PerCpuArray<FlowEvent> = PerCpuArray::with_max_entries(1, 0);

/// Final events staged per CPU ([`Stage`]), sent to the ring buffer
/// [`STAGE_EVENTS`] at a time, and by user space's flush before each timed drain
/// (the snapshot program run with [`snapshot::FLUSH`] on each CPU holding
/// any). Their count and the in-use flag are in [`STAGE_HEAD`].
#[map(name = "FLOWLOG_STAGE")]
static STAGE: PerCpuArray<Stage> = PerCpuArray::with_max_entries(1, 0);
#[map(name = "FLOWLOG_STAGE_HEAD")]
static STAGE_HEAD: PerCpuArray<StageHead> = PerCpuArray::with_max_entries(1, 0);

/// Two u64s per CPU that turn a typed pointer into a plain number
/// ([`address`]): slot [`SLOT_TRANSITION`] for the state-change program,
/// [`SLOT_DESTROY`] for [`flowlog_destroy`], which a softirq can run in the
/// middle of it.
#[map(name = "FLOWLOG_ADDRESS")]
static ADDRESS: PerCpuArray<u64> = PerCpuArray::with_max_entries(2, 0);
const SLOT_TRANSITION: u32 = 0;
const SLOT_DESTROY: u32 = 1;

#[map(name = "FLOWLOG_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Reads one offset from the loader-filled global. Volatile so the compiler
/// cannot fold the build-time zeros into the code.
macro_rules! off {
    ($field:ident) => {
        {
            #[allow(unused_unsafe)]
            let v = unsafe { core::ptr::read_volatile(&FLOWLOG_OFFSETS.$field) } as usize;
            v
        }
    };
}

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        // Per-CPU slot: no other writer while this program runs on this CPU.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn read<T: Copy + Default>(base: u64, offset: usize) -> T {
    match unsafe { bpf_probe_read_kernel((base as usize + offset) as *const T) } {
        Ok(v) => v,
        Err(_) => {
            count(stat::READ_ERRORS);
            T::default()
        }
    }
}

/// Socket fields at the byte offsets user space resolved from BTF.
trait Fields {
    /// The field at `offset` into the socket.
    fn get<T: Copy + Default>(&self, offset: usize) -> T;
    /// A u32 behind a pointer read from the socket (net.ns.inum).
    fn deref_u32(&self, ptr: u64, offset: usize) -> u32;
    /// The current task's comm, written in place (NUL-padded).
    #[inline(always)]
    fn current_comm(&self, dst: &mut [u8; COMM_LEN]) {
        // The helper NUL-pads it, and zeroes it on failure.
        unsafe { gen::bpf_get_current_comm(dst.as_mut_ptr() as *mut c_void, COMM_LEN as u32) };
    }
}

/// tp_btf: the `struct tcp_sock *` bpf_skc_to_tcp_sock returned. Its fields
/// are plain loads; the verifier checks each against the kernel's BTF, to
/// which the offsets are constants (they come from a read-only global that
/// the loader freezes).
#[derive(Clone, Copy)]
struct Typed(u64);

impl Fields for Typed {
    #[inline(always)]
    fn get<T: Copy + Default>(&self, offset: usize) -> T {
        unsafe { core::ptr::read((self.0 as usize + offset) as *const T) }
    }

    #[inline(always)]
    fn deref_u32(&self, ptr: u64, offset: usize) -> u32 {
        unsafe { core::ptr::read((ptr as usize + offset) as *const u32) }
    }

    /// Two loads from the typed current task: the helper's string copy
    /// (strscpy and a memset) cost about 120 ns. The kernel keeps comm
    /// NUL-terminated and pads it with NULs when it sets it; user space
    /// reads up to the first NUL either way.
    #[inline(always)]
    fn current_comm(&self, dst: &mut [u8; COMM_LEN]) {
        let task = unsafe { gen::bpf_get_current_task_btf() } as usize + off!(task_comm);
        // SAFETY: a trusted task pointer (BTF); the verifier checks both
        // loads against task_struct.comm.
        let w = unsafe { [core::ptr::read(task as *const u64), core::ptr::read((task + 8) as *const u64)] };
        set_words(dst, w);
    }
}

/// Classic tracepoint: the socket's address only; one kernel read per field.
struct Probed(u64);

impl Fields for Probed {
    #[inline(always)]
    fn get<T: Copy + Default>(&self, offset: usize) -> T {
        read(self.0, offset)
    }

    #[inline(always)]
    fn deref_u32(&self, ptr: u64, offset: usize) -> u32 {
        read(ptr, offset)
    }
}

/// Classic tracepoint and snapshots at close: the socket copied into the
/// per-CPU scratch buffer with one kernel read (~20 separate reads cost
/// about 1 us here, this a tenth of it), then plain loads from the copy.
struct Copied(*const [u8; SCRATCH_BYTES + 16]);

impl Fields for Copied {
    /// The offset is masked and aligned so the verifier can bound the
    /// access; real offsets are naturally aligned and below SCRATCH_BYTES
    /// (checked in user space).
    #[inline(always)]
    fn get<T: Copy + Default>(&self, offset: usize) -> T {
        let size = core::mem::size_of::<T>();
        let align = if size >= 8 { 8 } else { size };
        let at = (offset & (SCRATCH_BYTES - 1)) & !(align - 1);
        unsafe { core::ptr::read((self.0 as *const u8).add(at) as *const T) }
    }

    #[inline(always)]
    fn deref_u32(&self, ptr: u64, offset: usize) -> u32 {
        read(ptr, offset)
    }
}

/// Copies the first `sock_read_len` bytes of the socket into scratch `slot`.
#[inline(always)]
fn copy_socket(sk: u64, slot: u32) -> Option<Copied> {
    let scratch = SCRATCH.get_ptr_mut(slot)?;
    let buf = unsafe { &mut (*scratch).buf };
    let len = off!(sock_read_len) & (SCRATCH_BYTES - 1);
    if unsafe { bpf_probe_read_kernel_buf(sk as *const u8, &mut buf[..len]) }.is_err() {
        count(stat::READ_ERRORS);
    }
    Some(Copied(buf))
}

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn flowlog_tp_btf(ctx: BtfTracePointContext) -> i32 {
    // btf_trace_inet_sock_set_state(void *, const struct sock *sk, int oldstate, int newstate)
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    if skipped(old as u8, new as u8) {
        return 0;
    }
    // NULL unless a full TCP socket: the protocol filter and the typed
    // pointer the fields are read through, in one helper call, made only
    // where a transition needs either.
    let tcp = || match unsafe { gen::bpf_skc_to_tcp_sock(sk as *mut c_void) } as u64 {
        0 => None,
        tcp => Some(Typed(tcp)),
    };
    // Opens and mid-life transitions need no tcp_sock field, only the
    // protocol (and a passive open its local port): plain loads from the
    // typed `struct sock *`, which spare those transitions the helper call
    // (~45 ns, two opens a connection).
    let sock = || {
        let s = Typed(sk);
        let protocol: u16 = if off!(sk_protocol_u16) != 0 { s.get(off!(sk_protocol)) } else { s.get::<u8>(off!(sk_protocol)) as u16 };
        (protocol == IPPROTO_TCP).then_some(s)
    };
    let Some(addr) = address(sk, SLOT_TRANSITION) else { return 0 };
    on_transition(addr, old as u8, new as u8, sock, tcp, |f: &Typed| Some(*f));
    0
}

/// `tcp:tcp_destroy_sock`: the closes [`flowlog_tp_btf`] missed. The kernel
/// does not nest a program in itself: a softirq that interrupts a run in
/// process context (a connect, a close, a socket's backlog processed as its
/// owner releases it) and closes another socket on that CPU is not given to
/// it, only counted as a recursion miss. With packets steered between CPUs
/// (RPS/RFS, an IPI per batch) that is ~1 close in 300 here. Every TCP
/// socket is destroyed after its CLOSE, its counters intact; one still in
/// the socket table then is one whose CLOSE no run removed: reported here,
/// with the state path up to the last state recorded. Otherwise one lookup
/// of a bucket the CLOSE just touched.
#[btf_tracepoint(function = "tcp_destroy_sock")]
pub fn flowlog_destroy(ctx: BtfTracePointContext) -> i32 {
    let sk: u64 = ctx.arg(0);
    let Some(addr) = address(sk, SLOT_DESTROY) else { return 0 };
    let Some(found) = socktable::find(&Socks, addr) else { return 0 };
    let tcp = match unsafe { gen::bpf_skc_to_tcp_sock(sk as *mut c_void) } as u64 {
        0 => return 0,
        tcp => Typed(tcp),
    };
    // The state it left for CLOSE is unknown: the last one recorded.
    let old = unsafe { (*found.state).last_state() };
    let _ = emit(addr, old, Some(found.state as *const SockState), false, || Some(tcp));
    socktable::remove(&found);
    count(stat::CLOSED_AT_DESTROY);
    0
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn flowlog_tracepoint(ctx: TracePointContext) -> i32 {
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(off!(tp_skaddr)) }) else { return 0 };
    let Ok(old) = (unsafe { ctx.read_at::<i32>(off!(tp_oldstate)) }) else { return 0 };
    let Ok(new) = (unsafe { ctx.read_at::<i32>(off!(tp_newstate)) }) else { return 0 };
    if skipped(old as u8, new as u8) {
        return 0;
    }
    let tcp = || match unsafe { ctx.read_at::<u16>(off!(tp_protocol)) } {
        Ok(IPPROTO_TCP) => Some(Probed(sk)),
        _ => None,
    };
    on_transition(sk, old as u8, new as u8, tcp, tcp, |_: &Probed| copy_socket(sk, SLOT_CLOSE));
    0
}

/// A typed pointer's address as a plain number, for the socket table to hash:
/// the verifier refuses arithmetic other than field offsets on a typed
/// pointer, and does not keep the type of what is stored in a map value
/// (it lets a privileged program store it there). ~2 loads and a store.
#[inline(always)]
fn address(sk: u64, slot: u32) -> Option<u64> {
    let p = ADDRESS.get_ptr_mut(slot)?;
    // Volatile: the compiler must not forward the value past the map.
    unsafe {
        p.write_volatile(sk);
        Some(p.read_volatile())
    }
}

/// A transition with nothing to look up (for any protocol): the socket's
/// next transition, its close or a snapshot fills it into the path
/// ([`SockState::catch_up`]). Checked first, before even the protocol.
#[inline(always)]
fn skipped(old: u8, new: u8) -> bool {
    skipped_from(old) == Some(new)
}

/// The state machine shared by both entry points, for the transitions
/// [`skipped`] left out. `tcp` is None unless the socket is a full TCP
/// socket, and then reads a few of its fields; `at_close` makes all of them
/// readable. `sock` is None unless the socket is TCP, and then reads the
/// fields of `struct sock` (its protocol and `skc_num`).
#[inline(always)]
fn on_transition<S: Fields, F: Fields, C: Fields>(
    sk: u64,
    old: u8,
    new: u8,
    sock: impl FnOnce() -> Option<S>,
    tcp: impl FnOnce() -> Option<F>,
    at_close: impl FnOnce(&F) -> Option<C>,
) {
    // An open starts a socket's life: there is nothing to look up first
    // (and the insert below searches the bucket anyway).
    let opens = (old == tcp_state::CLOSE && new == tcp_state::SYN_SENT)
        || (old == tcp_state::LISTEN && new == tcp_state::SYN_RECV);
    // A transition in mid-life is looked up before the socket's protocol is
    // checked: only TCP sockets have entries, and no other socket can have
    // this one's address while it lives.
    if !opens && new != tcp_state::LISTEN && new != tcp_state::CLOSE {
        if let Some(found) = socktable::find(&Socks, sk) {
            let st = unsafe { &mut *found.state };
            // An entry whose recorded path cannot lead to `old` is not this
            // socket's: an earlier socket at this address left it (its close
            // and destroy never ran the programs) and this one's open went
            // unseen. Continuing it would give this socket the other's
            // direction, start and owner; it is replaced below instead.
            if st.catch_up(old) {
                st.push_state(new);
                // close()/shutdown() run in the owner's process context: if the open
                // was not attributable, the closer is the best owner we can name.
                if st.tgid == 0 && closes_in_process(old, new) {
                    if let Some(f) = sock() {
                        set_current_owner(st, &f);
                        st.flags |= flags::OWNER_AT_CLOSE;
                    }
                }
                return;
            }
        }
    }
    if new == tcp_state::LISTEN || new == tcp_state::CLOSE {
        let Some(fields) = tcp() else { return };
        if new == tcp_state::LISTEN {
            on_listen(sk, &fields);
        } else if old == tcp_state::LISTEN {
            // Removes only an entry this very socket registered.
            on_listener_close(sk, &fields);
        } else {
            on_close(sk, old, || at_close(&fields));
        }
        return;
    }
    let Some(fields) = sock() else { return };
    let now = unsafe { bpf_ktime_get_ns() };
    let net: u64 = fields.get(off!(skc_net));
    let mut st = SockState {
        start_ns: 0,
        cgroup_id: 0,
        state_path: 0,
        tgid: 0,
        tid: 0,
        comm: [0; COMM_LEN],
        direction: direction::UNKNOWN,
        transitions: 0,
        flags: 0,
        netns_ino: netns_ino(&fields, net),
    };
    if old == tcp_state::CLOSE && new == tcp_state::SYN_SENT {
        // connect(): process context, the caller owns the socket.
        st.start_ns = now;
        st.direction = direction::CLIENT;
        st.flags = flags::OPEN_SEEN | flags::OWNER_AT_OPEN;
        set_current_owner(&mut st, &fields);
    } else if old == tcp_state::LISTEN && new == tcp_state::SYN_RECV {
        // A child socket born in softirq: the current task is whoever the
        // packet interrupted. Name the listener's owner instead.
        st.start_ns = now;
        st.direction = direction::SERVER;
        st.flags = flags::OPEN_SEEN;
        // The child's local port, copied from its listener (inet_sport is
        // in inet_sock, beyond what a `struct sock *` may read).
        let key = ListenKey { net, port: fields.get::<u16>(off!(skc_num)) as u64 };
        if let Some(owner) = unsafe { LISTENERS.get(&key) } {
            st.tgid = owner.tgid;
            st.tid = owner.tid;
            set_words(&mut st.comm, words(&owner.comm));
            st.cgroup_id = owner.cgroup_id;
            st.flags |= flags::OWNER_AT_OPEN;
        }
    } else if old == tcp_state::CLOSE_WAIT && new == tcp_state::LAST_ACK {
        // A connection open before the sidecar, first seen as its owner
        // closes it (ESTABLISHED -> CLOSE_WAIT is skipped): the closer, in
        // process context, is the best owner we can name, as above.
        set_current_owner(&mut st, &fields);
        st.flags = flags::OWNER_AT_CLOSE;
    }
    st.push_state(old);
    st.push_state(new);
    // A state left under this address (a socket freed unseen) is replaced,
    // not continued.
    match socktable::insert(&Socks, sk, &st) {
        Inserted::Added => {}
        Inserted::Replaced => count(stat::STALE_SOCKETS),
        Inserted::Full => count(stat::SOCK_MAP_FULL),
    }
}

/// The transitions close() and shutdown() make, in the owner's process
/// context.
#[inline(always)]
fn closes_in_process(old: u8, new: u8) -> bool {
    (old == tcp_state::ESTABLISHED && new == tcp_state::FIN_WAIT1) || (old == tcp_state::CLOSE_WAIT && new == tcp_state::LAST_ACK)
}

#[inline(always)]
fn set_current_owner(st: &mut SockState, fields: &impl Fields) {
    let pid_tgid = bpf_get_current_pid_tgid();
    st.tgid = (pid_tgid >> 32) as u32;
    st.tid = pid_tgid as u32;
    fields.current_comm(&mut st.comm);
    st.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
}

/// A 16-byte field (comm, address) as two words. `[u8; 16]` has alignment
/// 1, so a plain copy or fill goes a byte at a time (or, with bpf-linker's
/// defaults, through a memcpy/memset subprogram that loops per byte); every
/// such field is 8-byte aligned in its struct, so two words are exact.
#[inline(always)]
fn words(src: &[u8; 16]) -> [u64; 2] {
    let p = src.as_ptr() as *const u64;
    // SAFETY: 16 readable bytes, 8-byte aligned (see above).
    unsafe { [p.read(), p.add(1).read()] }
}

#[inline(always)]
fn set_words(dst: &mut [u8; 16], w: [u64; 2]) {
    let p = dst.as_mut_ptr() as *mut u64;
    // SAFETY: 16 writable bytes, 8-byte aligned (see above).
    unsafe {
        p.write(w[0]);
        p.add(1).write(w[1]);
    }
}

/// A listener's key, from inet_sport: skc_num is already 0 when a listener
/// closes. A passive open looks it up by its skc_num, the same port.
#[inline(always)]
fn listen_key(fields: &impl Fields) -> ListenKey {
    let sport: u16 = fields.get(off!(inet_sport));
    ListenKey { net: fields.get(off!(skc_net)), port: u16::from_be(sport) as u64 }
}

fn on_listen(sk: u64, fields: &impl Fields) {
    // listen() runs in process context: remember who listens on this port.
    let key = listen_key(fields);
    let pid_tgid = bpf_get_current_pid_tgid();
    let mut owner = Owner {
        sk,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: [0; COMM_LEN],
    };
    fields.current_comm(&mut owner.comm);
    if LISTENERS.insert(key, owner, 0).is_err() {
        count(stat::LISTEN_MAP_FULL);
    }
}

fn on_listener_close(sk: u64, fields: &impl Fields) {
    let key = listen_key(fields);
    // With SO_REUSEPORT several sockets share the port: only the one that
    // registered removes the entry.
    if let Some(owner) = unsafe { LISTENERS.get(&key) } {
        if owner.sk == sk {
            let _ = LISTENERS.remove(&key);
        }
    }
}

fn on_close<C: Fields>(sk: u64, old: u8, at_close: impl FnOnce() -> Option<C>) {
    let found = socktable::find(&Socks, sk);
    if let Some(f) = &found {
        unsafe { (*f.state).catch_up(old) };
    }
    let _ = emit(sk, old, found.map(|f| f.state as *const SockState), false, at_close);
    if let Some(f) = &found {
        socktable::remove(f);
    }
}

/// Not attached: user space runs it (BPF_PROG_TEST_RUN, ctx = [sk,
/// born_by]) for every live socket started by `born_by` (monotonic ns:
/// older than the interim interval), to send an INTERIM
/// event with the counters so far. Nothing runs per packet for this either.
/// Returns a [`flowlog_common::snapshot`] code, which user space reads as
/// the test run's return value. Written out by hand rather than with
/// `#[raw_tracepoint]`, whose wrapper always returns 0: the same no_mangle
/// function in the section the loader reads as a raw tracepoint.
#[unsafe(no_mangle)]
#[unsafe(link_section = "raw_tp/inet_sock_set_state")]
pub fn flowlog_snapshot(ctx: *mut core::ffi::c_void) -> u32 {
    let ctx = RawTracePointContext::new(ctx);
    let sk: u64 = unsafe { *(ctx.as_ptr() as *const u64) };
    if sk == snapshot::FLUSH {
        return flush();
    }
    // Only sockets still tracked: their CLOSE transition (which removes the
    // entry) has not happened, so the socket is alive.
    let Some(found) = socktable::find(&Socks, sk) else { return snapshot::GONE };
    // Finals parked while the ring was full go first: the reader pops them
    // once the ring is empty, which a pass refilling it (passes run back to
    // back at 100 000 sockets) would otherwise put off for ever.
    if matches!(PARKED.peek(), Ok(Some(_))) {
        return snapshot::BUSY;
    }
    // A pass over many sockets must not crowd out closes: past half the
    // ring, user space waits for its next drain and asks again.
    if EVENTS.query(BPF_RB_AVAIL_DATA) * 2 > EVENTS.query(BPF_RB_RING_SIZE) {
        return snapshot::BUSY;
    }
    // The path up to the state the socket is in (transitions skipped since
    // the last one recorded filled in), on a copy: the entry is the
    // tracepoint program's, which may be running on another CPU.
    let mut so_far = unsafe { *found.state };
    // Copied whole before its socket closed and a new one took the slot?
    if !found.holds(sk) {
        return snapshot::GONE;
    }
    // Listed as old enough, but closed since, and its address taken by a
    // socket younger than the pass's cut-off (ctx[1]): not due.
    let born_by: u64 = unsafe { *(ctx.as_ptr() as *const u64).add(1) };
    if so_far.start_ns > born_by {
        return snapshot::GONE;
    }
    // A path that cannot lead to the socket's state is not this socket's
    // (see on_transition): an entry an earlier socket at this address left
    // when the kernel ran no program for its close or destroy, the socket
    // since freed or unseen. No interim from it. (A change racing the pass
    // can also fail this; the socket is then sent on the next pass.)
    let state: u8 = read(sk, off!(skc_state));
    if !so_far.catch_up(state) {
        return snapshot::GONE;
    }
    if emit(sk, state, Some(&so_far as *const SockState), true, || copy_socket(sk, SLOT_SNAPSHOT)) {
        snapshot::SENT
    } else {
        snapshot::BUSY
    }
}

/// Sends one event from the socket (and its entry, if tracked). `old` is
/// the state left at close, or the current state for snapshots. A final
/// event is staged on its CPU ([`STAGE`]) unless a flush it interrupted
/// holds the stage, or user space has not enabled it; then, like an
/// interim one, it goes to the ring buffer alone. A final event that finds
/// the ring buffer full is parked instead ([`PARKED`]); an interim one is
/// not sent, and false tells its pass to wait for room and ask again.
#[inline(always)]
fn emit<C: Fields>(sk: u64, old: u8, tracked: Option<*const SockState>, interim: bool, at_close: impl FnOnce() -> Option<C>) -> bool {
    if !interim {
        if let (Some(head), Some(stage)) = (STAGE_HEAD.get_ptr_mut(0), STAGE.get_ptr_mut(0)) {
            let head = unsafe { &mut *head };
            if unsafe { core::ptr::read_volatile(&head.enabled) } != 0 && claim(head) {
                let i = head.count as usize;
                if i < STAGE_EVENTS {
                    let e = unsafe { &mut (*stage).events[i] };
                    if fill(e, sk, old, tracked, false, at_close) {
                        head.count += 1;
                        count(stat::EVENTS);
                    }
                } else {
                    // Never: a stage that fills is sent or parked at once.
                    // Counted rather than lost silently.
                    count(stat::RINGBUF_FULL);
                }
                if head.count as usize >= STAGE_EVENTS && !send_stage(head, unsafe { &*stage }) {
                    park_stage(head, unsafe { &*stage });
                }
                release(head);
                return true;
            }
        }
    }
    let Some(mut ev) = EVENTS.reserve::<FlowEvent>(0) else {
        if interim {
            return false;
        }
        // User space pops the queue on its next drain (the ring is full, so
        // one is due).
        let Some(p) = PARKING.get_ptr_mut(0) else {
            count(stat::RINGBUF_FULL);
            return true;
        };
        let e = unsafe { &mut *p };
        if fill(e, sk, old, tracked, false, at_close) && park(e) {
            count(stat::EVENTS);
        }
        return true;
    };
    if !fill(unsafe { &mut *ev.as_mut_ptr() }, sk, old, tracked, interim, at_close) {
        ev.discard(0);
        return true;
    }
    // The reservation already counts as waiting data.
    ev.submit(wake_flag(0));
    count(stat::EVENTS);
    true
}

/// Marks this CPU's stage in use; false when a program this one interrupted
/// holds it. Only programs on this CPU touch it, one at a time unless one
/// interrupts another, so a plain flag is enough; the fences keep the
/// compiler from moving the stage's writes outside it.
#[inline(always)]
fn claim(head: &mut StageHead) -> bool {
    if unsafe { core::ptr::read_volatile(&head.busy) } != 0 {
        return false;
    }
    unsafe { core::ptr::write_volatile(&mut head.busy, 1) };
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    true
}

#[inline(always)]
fn release(head: &mut StageHead) {
    core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
    unsafe { core::ptr::write_volatile(&mut head.busy, 0) };
}

/// Wake the reader only when enough data is waiting (plus `adding` bytes
/// about to be written): user space drains on a timer, and is woken early
/// only past `wakeup_bytes`.
#[inline(always)]
fn wake_flag(adding: u64) -> u64 {
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA) + adding;
    let threshold = unsafe { core::ptr::read_volatile(&FLOWLOG_SETTINGS.wakeup_bytes) };
    (if waiting >= threshold { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP }) as u64
}

/// Sends the staged events to the ring buffer as one record; false (all
/// still staged) when it has no room.
#[inline(always)]
fn send_stage(head: &mut StageHead, stage: &Stage) -> bool {
    let n = (head.count as usize).min(STAGE_EVENTS);
    if n == 0 {
        return true;
    }
    let events = &stage.events[..n];
    if EVENTS.output::<[FlowEvent]>(events, wake_flag((n * FLOW_EVENT_SIZE) as u64)).is_err() {
        return false;
    }
    head.count = 0;
    true
}

/// The ring buffer is full and the stage too: its events wait in the
/// parking queue (or, when that is full too, are counted as lost).
#[inline(always)]
fn park_stage(head: &mut StageHead, stage: &Stage) {
    let n = (head.count as usize).min(STAGE_EVENTS);
    for i in 0..STAGE_EVENTS {
        if i >= n {
            break;
        }
        let _ = park(&stage.events[i]);
    }
    head.count = 0;
}

/// Parks a final event; false (counted as lost) when the queue is full.
#[inline(always)]
fn park(e: &FlowEvent) -> bool {
    if PARKED.push(e, 0).is_ok() {
        count(stat::PARKED);
        true
    } else {
        count(stat::RINGBUF_FULL);
        false
    }
}

/// User space's flush of this CPU's stage (before each timed drain): SENT, or
/// BUSY when the stage is in use (this run interrupted a program writing
/// it) or the ring buffer has no room; the events then stay staged.
#[inline(always)]
fn flush() -> u32 {
    let (Some(head), Some(stage)) = (STAGE_HEAD.get_ptr_mut(0), STAGE.get_ptr_mut(0)) else {
        return snapshot::BUSY;
    };
    let head = unsafe { &mut *head };
    if !claim(head) {
        return snapshot::BUSY;
    }
    let sent = send_stage(head, unsafe { &*stage });
    release(head);
    if sent { snapshot::SENT } else { snapshot::BUSY }
}

/// Fills an event from the socket (and its entry, if tracked); false when
/// the socket cannot be read (`at_close` found nothing).
#[inline(always)]
fn fill<C: Fields>(e: &mut FlowEvent, sk: u64, old: u8, tracked: Option<*const SockState>, interim: bool, at_close: impl FnOnce() -> Option<C>) -> bool {
    let now = unsafe { bpf_ktime_get_ns() };
    e.kind = FLOW_EVENT_KIND_V2;
    e.sk = sk;
    e.old_state = old;
    e.end_ns = now;
    match tracked {
        Some(st) => {
            let st = unsafe { &*st };
            e.direction = st.direction;
            e.flags = st.flags;
            e.start_ns = st.start_ns;
            e.cgroup_id = st.cgroup_id;
            e.tgid = st.tgid;
            e.tid = st.tid;
            set_words(&mut e.comm, words(&st.comm));
            let mut path = st.state_path;
            if st.transitions as u32 >= STATE_PATH_MAX {
                e.flags |= flags::PATH_TRUNCATED;
            }
            if interim {
                e.flags |= flags::INTERIM;
            } else {
                path = (path << 4) | tcp_state::CLOSE as u64;
            }
            e.state_path = path;
        }
        None => {
            e.direction = direction::UNKNOWN;
            e.flags = flags::MAP_FULL;
            e.start_ns = 0;
            e.cgroup_id = 0;
            e.tgid = 0;
            e.tid = 0;
            set_words(&mut e.comm, [0, 0]);
            e.state_path = ((old as u64) << 4) | tcp_state::CLOSE as u64;
        }
    }
    let Some(f) = at_close() else { return false };
    let family: u16 = f.get(off!(skc_family));
    e.family = family;
    set_words(&mut e.local_addr, [0, 0]);
    set_words(&mut e.remote_addr, [0, 0]);
    // Addresses are read and written 4 bytes at a time: in6_addr is only
    // 4-byte aligned, and both fields are 8-byte aligned in the event.
    if family == AF_INET6 {
        for i in 0..4 {
            put_u32(&mut e.local_addr, i, f.get(off!(skc_v6_rcv_saddr) + 4 * i));
            put_u32(&mut e.remote_addr, i, f.get(off!(skc_v6_daddr) + 4 * i));
        }
    } else if family == AF_INET {
        put_u32(&mut e.local_addr, 0, f.get(off!(skc_rcv_saddr)));
        put_u32(&mut e.remote_addr, 0, f.get(off!(skc_daddr)));
    }
    // skc_num is already 0 at CLOSE (the port was released); inet_sport is not.
    e.local_port = u16::from_be(f.get(off!(inet_sport)));
    e.remote_port = u16::from_be(f.get(off!(skc_dport)));
    let sk_err: i32 = f.get(off!(sk_err));
    e.sk_err = sk_err as u32;
    let sk_flags: u64 = f.get(off!(sk_flags));
    if sk_flags & (1u64 << (off!(sock_done_bit) & 63)) != 0 {
        e.flags |= flags::FIN_RECEIVED;
    }
    let snd_una: u32 = f.get(off!(snd_una));
    let write_seq: u32 = f.get(off!(write_seq));
    if snd_una == write_seq {
        e.flags |= flags::SND_ALL_ACKED;
    }
    e.bytes_acked = f.get(off!(bytes_acked));
    e.bytes_received = f.get(off!(bytes_received));
    e.segs_in = f.get(off!(segs_in));
    e.segs_out = f.get(off!(segs_out));
    e.total_retrans = f.get(off!(total_retrans));
    let srtt8: u32 = f.get(off!(srtt_us));
    e.srtt_us = srtt8 >> 3; // stored as 8 x microseconds
    e.rtt_min_us = f.get(off!(rtt_min));
    e.netns_ino = match tracked {
        Some(st) if unsafe { (*st).netns_ino } != 0 => unsafe { (*st).netns_ino },
        _ => netns_ino(&f, f.get(off!(skc_net))),
    };
    read_limits(&f, e);

    true
}

/// The inode number of the network namespace at `net` (the socket's
/// skc_net; 0 if unreadable).
#[inline(always)]
fn netns_ino(f: &impl Fields, net: u64) -> u32 {
    if net == 0 { 0 } else { f.deref_u32(net, off!(net_ns_inum)) }
}

/// What held the connection back ([`flowlog_common::Limits`]): the socket's
/// chronographs (the running one up to now, as TCP_INFO adds it), its last
/// delivery-rate sample, retransmitted bytes, reordering and RTO totals.
#[inline(always)]
fn read_limits<C: Fields>(f: &C, e: &mut FlowEvent) {
    let l = &mut e.limits;
    let stat = off!(chrono_stat);
    l.busy_jiffies = f.get(stat);
    l.rwnd_limited_jiffies = f.get(stat + 4);
    l.sndbuf_limited_jiffies = f.get(stat + 8);
    let chrono: u8 = f.get(off!(chrono_type_byte));
    // enum tcp_chrono: 0 none, 1 busy, 2 rwnd limited, 3 sndbuf limited.
    let running = (chrono >> (off!(chrono_type_shift) & 7)) & 3;
    if running != 0 {
        let start: u32 = f.get(off!(chrono_start));
        // tcp_jiffies32: the low 32 bits of jiffies.
        let since = (unsafe { gen::bpf_jiffies64() } as u32).wrapping_sub(start);
        match running {
            1 => l.busy_jiffies = l.busy_jiffies.wrapping_add(since),
            2 => l.rwnd_limited_jiffies = l.rwnd_limited_jiffies.wrapping_add(since),
            _ => l.sndbuf_limited_jiffies = l.sndbuf_limited_jiffies.wrapping_add(since),
        }
    }
    l.rate_delivered = f.get(off!(rate_delivered));
    l.rate_interval_us = f.get(off!(rate_interval_us));
    l.mss_cache = f.get(off!(mss_cache));
    l.bytes_retrans = f.get(off!(bytes_retrans));
    l.reordering = f.get(off!(reordering));
    l.reord_seen = f.get(off!(reord_seen));
    if off!(total_rto) != 0 {
        l.total_rto = f.get(off!(total_rto));
        l.total_rto_recoveries = f.get(off!(total_rto_recoveries));
        l.total_rto_time_ms = f.get(off!(total_rto_time));
        e.flags |= flags::RTO_COUNTED;
    } else {
        // Ring-buffer slots are not zeroed: write the absent fields too.
        l.total_rto = 0;
        l.total_rto_recoveries = 0;
        l.total_rto_time_ms = 0;
    }
}

/// Writes the `i`th 4 bytes of a 16-byte address field.
#[inline(always)]
fn put_u32(dst: &mut [u8; 16], i: usize, v: u32) {
    // SAFETY: i < 4, and the address fields are 8-byte aligned in FlowEvent.
    unsafe { (dst.as_mut_ptr() as *mut u32).add(i & 3).write(v) }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
