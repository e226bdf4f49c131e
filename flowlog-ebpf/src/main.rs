//! eBPF side of flowlog: one program on `sock:inet_sock_set_state`, loaded as
//! a BTF tracepoint when the kernel allows it and as a classic tracepoint
//! otherwise. Both entry points feed the same handler.
//!
//! Per live socket the kernel keeps a small [`SockState`] (start time, owner,
//! direction, state path); when the socket reaches CLOSE the handler reads the
//! socket's own counters once and sends one [`FlowEvent`] to the ring buffer.
//! Nothing runs per packet.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_ktime_get_ns, bpf_probe_read_kernel, bpf_probe_read_kernel_buf,
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, RawTracePointContext, TracePointContext},
};
use flowlog_common::{
    direction, flags, snapshot, stat, tcp_state, FlowEvent, KernelOffsets, KernelSettings, ListenKey,
    Owner, Scratch, SockState, AF_INET, AF_INET6, COMM_LEN, FLOW_EVENT_KIND_V1, SCRATCH_BYTES,
    STATE_PATH_MAX,
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
    skc_v6_daddr: 0,
    skc_v6_rcv_saddr: 0,
    skc_net: 0,
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
    net_ns_inum: 0,
    sock_done_bit: 0,
    sk_protocol_u16: 0,
    tp_skaddr: 0,
    tp_oldstate: 0,
    tp_newstate: 0,
    tp_protocol: 0,
    sock_read_len: 0,
};

#[unsafe(no_mangle)]
static FLOWLOG_SETTINGS: KernelSettings = KernelSettings { wakeup_bytes: 256 * 1024 };

/// Sized by the sidecar (`--ring-buffer-bytes`).
#[map(name = "FLOWLOG_EVENTS")]
static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Live sockets; sized by the sidecar (`--max-sockets`).
#[map(name = "FLOWLOG_SOCKS")]
static SOCKS: HashMap<u64, SockState> = HashMap::with_max_entries(65536, 0);

/// Listening ports and the process that called listen().
#[map(name = "FLOWLOG_LISTENERS")]
static LISTENERS: HashMap<ListenKey, Owner> = HashMap::with_max_entries(16384, 0);

/// One copy of the closing socket per CPU.
#[map(name = "FLOWLOG_SCRATCH")]
static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

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

#[btf_tracepoint(function = "inet_sock_set_state")]
pub fn flowlog_tp_btf(ctx: BtfTracePointContext) -> i32 {
    // btf_trace_inet_sock_set_state(void *, const struct sock *sk, int oldstate, int newstate)
    let sk: u64 = ctx.arg(0);
    let old: i32 = ctx.arg(1);
    let new: i32 = ctx.arg(2);
    // The protocol costs a kernel read here, so it is only checked where a
    // socket would start being tracked (see on_transition).
    let is_tcp = || {
        let protocol = if off!(sk_protocol_u16) != 0 {
            read::<u16>(sk, off!(sk_protocol))
        } else {
            read::<u8>(sk, off!(sk_protocol)) as u16
        };
        protocol == IPPROTO_TCP
    };
    on_transition(sk, old as u8, new as u8, is_tcp);
    0
}

#[tracepoint(category = "sock", name = "inet_sock_set_state")]
pub fn flowlog_tracepoint(ctx: TracePointContext) -> i32 {
    let Ok(sk) = (unsafe { ctx.read_at::<u64>(off!(tp_skaddr)) }) else { return 0 };
    let Ok(old) = (unsafe { ctx.read_at::<i32>(off!(tp_oldstate)) }) else { return 0 };
    let Ok(new) = (unsafe { ctx.read_at::<i32>(off!(tp_newstate)) }) else { return 0 };
    let Ok(protocol) = (unsafe { ctx.read_at::<u16>(off!(tp_protocol)) }) else { return 0 };
    on_transition(sk, old as u8, new as u8, || protocol == IPPROTO_TCP);
    0
}

/// The state machine shared by both entry points. Sockets get an entry only
/// after `is_tcp` says so; afterwards an entry's existence proves it.
#[inline(always)]
fn on_transition(sk: u64, old: u8, new: u8, is_tcp: impl Fn() -> bool) {
    if new == tcp_state::LISTEN {
        if is_tcp() {
            on_listen(sk);
        }
        return;
    }
    if old == tcp_state::LISTEN && new == tcp_state::CLOSE {
        // Removes only an entry this very socket registered.
        on_listener_close(sk);
        return;
    }
    if new == tcp_state::CLOSE {
        on_close(sk, old, is_tcp);
        return;
    }
    if let Some(st) = SOCKS.get_ptr_mut(sk) {
        let st = unsafe { &mut *st };
        push_state(st, new);
        if old == tcp_state::SYN_SENT && new == tcp_state::ESTABLISHED {
            st.flags |= flags::SYN_ACKED;
        }
        // close()/shutdown() run in the owner's process context: if the open
        // was not attributable, the closer is the best owner we can name.
        if st.tgid == 0
            && ((old == tcp_state::ESTABLISHED && new == tcp_state::FIN_WAIT1)
                || (old == tcp_state::CLOSE_WAIT && new == tcp_state::LAST_ACK))
        {
            set_current_owner(st);
            st.flags |= flags::OWNER_AT_CLOSE;
        }
        return;
    }
    if !is_tcp() {
        return;
    }
    let now = unsafe { bpf_ktime_get_ns() };
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
        _pad: 0,
    };
    if old == tcp_state::CLOSE && new == tcp_state::SYN_SENT {
        // connect(): process context, the caller owns the socket.
        st.start_ns = now;
        st.direction = direction::CLIENT;
        st.flags = flags::OPEN_SEEN | flags::OWNER_AT_OPEN;
        set_current_owner(&mut st);
    } else if old == tcp_state::LISTEN && new == tcp_state::SYN_RECV {
        // A child socket born in softirq: the current task is whoever the
        // packet interrupted. Name the listener's owner instead.
        st.start_ns = now;
        st.direction = direction::SERVER;
        st.flags = flags::OPEN_SEEN;
        let key = listen_key(sk);
        if let Some(owner) = unsafe { LISTENERS.get(&key) } {
            st.tgid = owner.tgid;
            st.tid = owner.tid;
            st.comm = owner.comm;
            st.cgroup_id = owner.cgroup_id;
            st.flags |= flags::OWNER_AT_OPEN;
        }
    }
    if old == tcp_state::SYN_SENT && new == tcp_state::ESTABLISHED {
        st.flags |= flags::SYN_ACKED;
    }
    push_state(&mut st, old);
    push_state(&mut st, new);
    if SOCKS.insert(sk, st, BPF_NOEXIST as u64).is_err() {
        count(stat::SOCK_MAP_FULL);
    }
}

#[inline(always)]
fn push_state(st: &mut SockState, state: u8) {
    if st.transitions as u32 >= STATE_PATH_MAX {
        st.flags |= flags::PATH_TRUNCATED;
    } else {
        st.transitions += 1;
    }
    st.state_path = (st.state_path << 4) | (state as u64 & 0xf);
}

#[inline(always)]
fn set_current_owner(st: &mut SockState) {
    let pid_tgid = bpf_get_current_pid_tgid();
    st.tgid = (pid_tgid >> 32) as u32;
    st.tid = pid_tgid as u32;
    st.comm = bpf_get_current_comm().unwrap_or([0; COMM_LEN]);
    st.cgroup_id = unsafe { bpf_get_current_cgroup_id() };
}

#[inline(always)]
fn listen_key(sk: u64) -> ListenKey {
    let sport: u16 = read(sk, off!(inet_sport));
    ListenKey { net: read(sk, off!(skc_net)), port: u16::from_be(sport), _pad: [0; 3] }
}

/// A field of the socket copy in the scratch buffer. The offset is masked
/// and aligned so the verifier can bound the access; real offsets are
/// naturally aligned and below SCRATCH_BYTES (checked in user space).
#[inline(always)]
fn field<T: Copy>(buf: &[u8; SCRATCH_BYTES + 16], offset: usize) -> T {
    let size = core::mem::size_of::<T>();
    let align = if size >= 8 { 8 } else { size };
    let at = (offset & (SCRATCH_BYTES - 1)) & !(align - 1);
    unsafe { core::ptr::read(buf.as_ptr().add(at) as *const T) }
}

fn on_listen(sk: u64) {
    // listen() runs in process context: remember who listens on this port.
    let key = listen_key(sk);
    let pid_tgid = bpf_get_current_pid_tgid();
    let owner = Owner {
        sk,
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (pid_tgid >> 32) as u32,
        tid: pid_tgid as u32,
        comm: bpf_get_current_comm().unwrap_or([0; COMM_LEN]),
    };
    if LISTENERS.insert(key, owner, 0).is_err() {
        count(stat::LISTEN_MAP_FULL);
    }
}

fn on_listener_close(sk: u64) {
    let key = listen_key(sk);
    // With SO_REUSEPORT several sockets share the port: only the one that
    // registered removes the entry.
    if let Some(owner) = unsafe { LISTENERS.get(&key) } {
        if owner.sk == sk {
            let _ = LISTENERS.remove(&key);
        }
    }
}

fn on_close(sk: u64, old: u8, is_tcp: impl Fn() -> bool) {
    let tracked = SOCKS.get_ptr(sk);
    if tracked.is_none() && !is_tcp() {
        return;
    }
    emit(sk, old, tracked, false);
    let _ = SOCKS.remove(sk);
}

/// Not attached: user space runs it (BPF_PROG_TEST_RUN, ctx = [sk]) for
/// every live socket older than the interim interval, to send an INTERIM
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
    // Only sockets still tracked: their CLOSE transition (which removes the
    // entry) has not happened, so the socket is alive.
    let Some(st) = SOCKS.get_ptr(sk) else { return snapshot::GONE };
    // A pass over many sockets must not crowd out closes: past half the
    // ring, user space waits for its next drain and asks again.
    if EVENTS.query(BPF_RB_AVAIL_DATA) * 2 > EVENTS.query(BPF_RB_RING_SIZE) {
        return snapshot::BUSY;
    }
    let current = (unsafe { (*st).state_path } & 0xf) as u8;
    emit(sk, current, Some(st), true);
    snapshot::SENT
}

/// Fills and submits one event from the socket (and its entry, if tracked).
/// `old` is the state left at close, or the current state for snapshots.
#[inline(always)]
fn emit(sk: u64, old: u8, tracked: Option<*const SockState>, interim: bool) {
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(mut ev) = EVENTS.reserve::<FlowEvent>(0) else {
        count(stat::RINGBUF_FULL);
        return;
    };
    let e = unsafe { &mut *ev.as_mut_ptr() };
    e.kind = FLOW_EVENT_KIND_V1;
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
            e.comm = st.comm;
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
            e.comm = [0; COMM_LEN];
            e.state_path = ((old as u64) << 4) | tcp_state::CLOSE as u64;
        }
    }
    // One kernel read of the whole socket, then plain loads from the copy:
    // ~20 separate reads cost about 1 us here, this costs a tenth of it.
    let Some(scratch) = SCRATCH.get_ptr_mut(0) else {
        ev.discard(0);
        return;
    };
    let buf = unsafe { &mut (*scratch).buf };
    let len = off!(sock_read_len) & (SCRATCH_BYTES - 1);
    if unsafe { bpf_probe_read_kernel_buf(sk as *const u8, &mut buf[..len]) }.is_err() {
        count(stat::READ_ERRORS);
    }
    let family: u16 = field(buf, off!(skc_family));
    e.family = family;
    e.local_addr = [0; 16];
    e.remote_addr = [0; 16];
    if family == AF_INET6 {
        e.local_addr = field(buf, off!(skc_v6_rcv_saddr));
        e.remote_addr = field(buf, off!(skc_v6_daddr));
    } else if family == AF_INET {
        let l: [u8; 4] = field(buf, off!(skc_rcv_saddr));
        let r: [u8; 4] = field(buf, off!(skc_daddr));
        e.local_addr[..4].copy_from_slice(&l);
        e.remote_addr[..4].copy_from_slice(&r);
    }
    // skc_num is already 0 at CLOSE (the port was released); inet_sport is not.
    e.local_port = u16::from_be(field(buf, off!(inet_sport)));
    e.remote_port = u16::from_be(field(buf, off!(skc_dport)));
    let sk_err: i32 = field(buf, off!(sk_err));
    e.sk_err = sk_err as u32;
    let sk_flags: u64 = field(buf, off!(sk_flags));
    if sk_flags & (1u64 << (off!(sock_done_bit) & 63)) != 0 {
        e.flags |= flags::FIN_RECEIVED;
    }
    let snd_una: u32 = field(buf, off!(snd_una));
    let write_seq: u32 = field(buf, off!(write_seq));
    if snd_una == write_seq {
        e.flags |= flags::SND_ALL_ACKED;
    }
    e.bytes_acked = field(buf, off!(bytes_acked));
    e.bytes_received = field(buf, off!(bytes_received));
    e.segs_in = field(buf, off!(segs_in));
    e.segs_out = field(buf, off!(segs_out));
    e.total_retrans = field(buf, off!(total_retrans));
    let srtt8: u32 = field(buf, off!(srtt_us));
    e.srtt_us = srtt8 >> 3; // stored as 8 x microseconds
    e.rtt_min_us = field(buf, off!(rtt_min));
    let net: u64 = field(buf, off!(skc_net));
    e.netns_ino = if net == 0 { 0 } else { read(net, off!(net_ns_inum)) };

    // Batch wake-ups: user space drains on a timer, and is woken early only
    // when enough data is waiting.
    let waiting = EVENTS.query(BPF_RB_AVAIL_DATA);
    let threshold = unsafe { core::ptr::read_volatile(&FLOWLOG_SETTINGS.wakeup_bytes) };
    let wake = if waiting >= threshold { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP };
    ev.submit(wake as u64);
    count(stat::EVENTS);
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
