//! The ring-buffer record: one per TCP connection, written when it closes.

/// Version of [`FlowEvent`]'s layout; bump when the layout changes and never
/// reuse a retired value (1: without [`Limits`]).
pub const FLOW_EVENT_KIND_V2: u16 = 2;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;

/// Who opened the connection, seen from this socket.
pub mod direction {
    /// The open was not seen (the socket predates the sidecar, or the
    /// per-socket map was full when it opened).
    pub const UNKNOWN: u8 = 0;
    /// Active open: this side called connect().
    pub const CLIENT: u8 = 1;
    /// Passive open: this side accepted from a listener.
    pub const SERVER: u8 = 2;
}

/// Kernel TCP states (include/net/tcp_states.h); values are kernel ABI.
pub mod tcp_state {
    macro_rules! states {
        ($($name:ident = $v:literal),+ $(,)?) => {
            $(pub const $name: u8 = $v;)+

            /// The kernel's name of a state (`UNKNOWN` for anything else).
            pub const fn name(state: u8) -> &'static str {
                match state {
                    $($v => stringify!($name),)+
                    _ => "UNKNOWN",
                }
            }

            /// The state of a kernel name.
            pub fn from_name(name: &str) -> Option<u8> {
                match name {
                    $(stringify!($name) => Some($v),)+
                    _ => None,
                }
            }
        };
    }

    states!(
        ESTABLISHED = 1, SYN_SENT = 2, SYN_RECV = 3, FIN_WAIT1 = 4, FIN_WAIT2 = 5, TIME_WAIT = 6,
        CLOSE = 7, CLOSE_WAIT = 8, LAST_ACK = 9, LISTEN = 10, CLOSING = 11, NEW_SYN_RECV = 12,
    );
}

/// Bits of [`FlowEvent::flags`].
pub mod flags {
    /// The open transition (connect or accept) was seen: start time and
    /// direction are real.
    pub const OPEN_SEEN: u16 = 1 << 0;
    /// pid/comm/cgroup were taken in process context at connect() or from the
    /// listener's listen() call.
    pub const OWNER_AT_OPEN: u16 = 1 << 1;
    /// pid/comm/cgroup were taken when the owner called close()/shutdown()
    /// (the open was not attributable).
    pub const OWNER_AT_CLOSE: u16 = 1 << 2;
    /// The socket processed the peer's FIN (SOCK_DONE): `bytes_received`
    /// includes one sequence unit for it.
    pub const FIN_RECEIVED: u16 = 1 << 3;
    /// Everything written was acknowledged (snd_una == write_seq) when the
    /// socket closed.
    pub const SND_ALL_ACKED: u16 = 1 << 4;
    /// The per-socket map was full at open; the record still carries exact
    /// counters but no start time or owner.
    pub const MAP_FULL: u16 = 1 << 5;
    /// More than [`super::STATE_PATH_MAX`] transitions; the oldest were shifted out.
    pub const PATH_TRUNCATED: u16 = 1 << 6;
    /// The socket went SYN_SENT -> ESTABLISHED: the active opener counts the
    /// acknowledgement of its own SYN in `bytes_acked`.
    pub const SYN_ACKED: u16 = 1 << 7;
    /// A snapshot of a connection that is still open (interim record), not its close.
    pub const INTERIM: u16 = 1 << 8;
    /// The kernel counts RTOs (tcp_sock.total_rto*, Linux 6.7+): the
    /// [`super::Limits`] RTO fields are real, not absent.
    pub const RTO_COUNTED: u16 = 1 << 9;
}

/// What the snapshot program (`flowlog_snapshot`, run by user space with
/// BPF_PROG_TEST_RUN for one live socket) returns.
pub mod snapshot {
    /// An INTERIM event for the socket is in the ring buffer.
    pub const SENT: u32 = 0;
    /// The socket is no longer tracked (it closed meanwhile): nothing to send.
    pub const GONE: u32 = 1;
    /// The ring buffer is more than half full: nothing was sent; ask again
    /// once user space has drained it (the other half is kept for closes).
    pub const BUSY: u32 = 2;
    /// The program's first argument when user space asks it to flush the
    /// CPU's staged final events ([`crate::Stage`]) instead: no socket has
    /// address 0. The run returns SENT, or BUSY when the stage was in use
    /// or the ring buffer had no room (the events stay staged).
    pub const FLUSH: u64 = 0;
}

/// Final events staged per CPU before they go to the ring buffer together,
/// as one record of up to this many: a ring-buffer reservation (a lock with
/// interrupts off, the positions shared with the other CPUs and the reader)
/// cost ~300 ns per event here, more than the rest of the close.
pub const STAGE_EVENTS: usize = 16;

/// One CPU's staged final events ([`STAGE_EVENTS`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Stage {
    pub events: [FlowEvent; STAGE_EVENTS],
}

/// How many events a CPU's [`Stage`] holds, whether a program is writing
/// it, and whether closes may use it. Apart from the stage so that user
/// space reads only this (each timed drain, to flush the CPUs holding any).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StageHead {
    pub count: u32,
    /// Set while a program writes or flushes the stage: one that interrupts
    /// it on the same CPU (a softirq close, a flush by interrupt) leaves the
    /// stage alone.
    pub busy: u32,
    /// Set by user space once it has flushed this CPU's stage (a kernel that
    /// cannot run a program on a chosen CPU, before 5.10, never gets it):
    /// until then each close goes to the ring buffer alone.
    pub enabled: u32,
    pub _pad: u32,
}

/// How many transitions [`FlowEvent::state_path`] keeps (4 bits each).
pub const STATE_PATH_MAX: u32 = 16;

pub const COMM_LEN: usize = 16;

/// One closed TCP connection as the kernel saw it. Counters are the socket's
/// own (`struct tcp_sock`), read once at the transition to CLOSE, so they are
/// exact and cost nothing per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// [`FLOW_EVENT_KIND_V2`].
    pub kind: u16,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// [`direction`].
    pub direction: u8,
    /// The state the socket left when it moved to CLOSE ([`tcp_state`]).
    pub old_state: u8,
    /// [`flags`].
    pub flags: u16,
    /// Local port, host byte order.
    pub local_port: u16,
    /// Remote port, host byte order.
    pub remote_port: u16,
    /// The socket's error (errno) at close: ECONNREFUSED, ECONNRESET, ETIMEDOUT, ...
    pub sk_err: u32,
    /// Local address; IPv4 uses the first 4 bytes.
    pub local_addr: [u8; 16],
    /// Remote address; IPv4 uses the first 4 bytes.
    pub remote_addr: [u8; 16],
    /// CLOCK_MONOTONIC ns of the open transition (0 when not seen).
    pub start_ns: u64,
    /// CLOCK_MONOTONIC ns of the transition to CLOSE.
    pub end_ns: u64,
    /// tcp_sock.bytes_acked: sequence space acknowledged by the peer (payload,
    /// plus one for our SYN on active opens and one for our FIN when they were
    /// acknowledged).
    pub bytes_acked: u64,
    /// tcp_sock.bytes_received: sequence space received in order (payload,
    /// plus one for the peer's FIN when processed).
    pub bytes_received: u64,
    /// Cgroup (v2) id of the owner.
    pub cgroup_id: u64,
    /// The transitions seen, oldest first, 4 bits each, newest in the low nibble.
    pub state_path: u64,
    pub segs_in: u32,
    pub segs_out: u32,
    pub total_retrans: u32,
    /// Smoothed RTT in microseconds.
    pub srtt_us: u32,
    /// Minimum RTT seen, microseconds.
    pub rtt_min_us: u32,
    /// Owner process (thread group id), 0 when unknown.
    pub tgid: u32,
    /// Owner thread id, 0 when unknown.
    pub tid: u32,
    /// Inode of the socket's network namespace.
    pub netns_ino: u32,
    /// Owner thread's comm, NUL padded.
    pub comm: [u8; COMM_LEN],
    /// The socket's kernel address: with `start_ns` it names the connection.
    /// User space only ever exports a salted hash of it.
    pub sk: u64,
    pub limits: Limits,
}

pub const FLOW_EVENT_SIZE: usize = core::mem::size_of::<FlowEvent>();
const _: () = assert!(FLOW_EVENT_SIZE == 200);

/// What held the connection back, read with the counters from the socket's
/// own bookkeeping (what `ss -i` / TCP_INFO report as busy, rwnd_limited,
/// sndbuf_limited, delivery_rate, bytes_retrans, reordering, reord_seen and
/// the RTO totals). Cumulative over the connection's life.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Limits {
    /// Jiffies with data outstanding (tcp_sock.chrono_stat, busy), the
    /// running period included.
    pub busy_jiffies: u32,
    /// Jiffies the peer's receive window stopped sending.
    pub rwnd_limited_jiffies: u32,
    /// Jiffies the local send buffer was full.
    pub sndbuf_limited_jiffies: u32,
    /// The last delivery-rate sample: segments delivered in an interval,
    /// and the MSS then (tcp_sock.rate_delivered, rate_interval_us, mss_cache).
    pub rate_delivered: u32,
    pub rate_interval_us: u32,
    pub mss_cache: u32,
    /// Payload bytes retransmitted.
    pub bytes_retrans: u64,
    /// The kernel's reordering estimate (packets) and reorderings seen.
    pub reordering: u32,
    pub reord_seen: u32,
    /// Retransmission timeouts, the recoveries they started, and the time
    /// spent in them (ms); see [`flags::RTO_COUNTED`].
    pub total_rto: u16,
    pub total_rto_recoveries: u16,
    pub total_rto_time_ms: u32,
}
const _: () = assert!(core::mem::size_of::<Limits>() == 48);

/// What the kernel keeps per live socket (key: the socket's address).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SockState {
    pub start_ns: u64,
    pub cgroup_id: u64,
    pub state_path: u64,
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
    pub direction: u8,
    pub transitions: u8,
    pub flags: u16,
    /// The socket's network namespace (its inode number), read as the
    /// entry is made; 0 when that read failed, and the close reads it then.
    /// At the open the line holding it is in this CPU's cache: the
    /// namespace's reference count beside it was just taken for the new
    /// socket. At the close it is not, as every socket created or freed on
    /// the other CPU writes that count.
    pub netns_ino: u32,
}
const _: () = assert!(core::mem::size_of::<SockState>() == 56);

/// The transition out of `state` the program does not look the socket up
/// for: the one TCP takes on the way of nearly every connection and that
/// carries nothing but the state (the SYN's ACK, the peer's FIN, our FIN's
/// ACK). Each state has at most one, so when the socket's next transition
/// (or its close) leaves a state the recorded path did not reach, the
/// states in between are known: [`SockState::catch_up`]. Saves a hash-map
/// lookup on two of the three transitions between open and close.
#[inline(always)]
pub fn skipped_from(state: u8) -> Option<u8> {
    match state {
        tcp_state::SYN_SENT | tcp_state::SYN_RECV => Some(tcp_state::ESTABLISHED),
        tcp_state::ESTABLISHED => Some(tcp_state::CLOSE_WAIT),
        tcp_state::FIN_WAIT1 => Some(tcp_state::FIN_WAIT2),
        _ => None,
    }
}

impl SockState {
    /// Appends `state` to the path (the oldest shifted out past
    /// [`STATE_PATH_MAX`]).
    #[inline(always)]
    pub fn push_state(&mut self, state: u8) {
        if self.transitions as u32 >= STATE_PATH_MAX {
            self.flags |= flags::PATH_TRUNCATED;
        } else {
            self.transitions += 1;
        }
        self.state_path = (self.state_path << 4) | (state as u64 & 0xf);
    }

    /// The last state recorded.
    #[inline(always)]
    pub fn last_state(&self) -> u8 {
        (self.state_path & 0xf) as u8
    }

    /// Records the skipped transitions ([`skipped_from`]) that led from the
    /// last recorded state to `state`, the one the socket is now leaving (or
    /// is in). At most two follow each other (SYN_SENT or SYN_RECV ->
    /// ESTABLISHED -> CLOSE_WAIT). Returns false, recording nothing, when
    /// skipped transitions cannot lead there (a socket first seen mid-way).
    #[inline(always)]
    pub fn catch_up(&mut self, state: u8) -> bool {
        let last = self.last_state();
        if last == state {
            return true;
        }
        let Some(first) = skipped_from(last) else { return false };
        let second = skipped_from(first);
        if first != state && second != Some(state) {
            return false;
        }
        if last == tcp_state::SYN_SENT {
            self.flags |= flags::SYN_ACKED;
        }
        self.push_state(first);
        if first != state {
            self.push_state(state);
        }
        true
    }
}

/// Key of the listener map: a listening port in a network namespace,
/// named by its `struct net` address (one kernel read cheaper than the inode).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenKey {
    pub net: u64,
    /// Host byte order; a u64 so the key has no padding to zero (on BPF a
    /// padding fill compiles to a per-byte memset loop).
    pub port: u64,
}

/// The process that called listen(), captured in process context so that
/// passive opens (which happen in softirq) can be attributed to it.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Owner {
    /// The listening socket, so that only its own close removes the entry.
    pub sk: u64,
    pub cgroup_id: u64,
    pub tgid: u32,
    pub tid: u32,
    pub comm: [u8; COMM_LEN],
}
const _: () = assert!(core::mem::size_of::<Owner>() == 40);

/// Size of the per-CPU scratch buffer the close path copies the socket into
/// with one kernel read (instead of one read per field).
pub const SCRATCH_BYTES: usize = 4096;

#[repr(C)]
pub struct Scratch {
    /// `SCRATCH_BYTES` of socket plus slack so that any masked offset can be
    /// read as a u64 without running off the end.
    pub buf: [u8; SCRATCH_BYTES + 16],
}

#[cfg(test)]
mod tests {
    use super::{flags, skipped_from, tcp_state::*, SockState};

    fn state() -> SockState {
        SockState {
            start_ns: 0,
            cgroup_id: 0,
            state_path: 0,
            tgid: 0,
            tid: 0,
            comm: [0; 16],
            direction: 0,
            transitions: 0,
            flags: 0,
            netns_ino: 0,
        }
    }

    /// The path, transition count and flags with every transition recorded
    /// (the program before it skipped any), and with skipping, at close and
    /// at every state in between (as a snapshot reads it).
    fn both(path: &[u8]) {
        let (mut all, mut skipping) = (state(), state());
        for (i, w) in path.windows(2).enumerate() {
            let (old, new) = (w[0], w[1]);
            if i == 0 {
                for st in [&mut all, &mut skipping] {
                    st.push_state(old);
                    st.push_state(new);
                }
                continue;
            }
            // All recorded: what the close or snapshot saw before.
            if new != CLOSE {
                all.push_state(new);
                if old == SYN_SENT && new == ESTABLISHED {
                    all.flags |= flags::SYN_ACKED;
                }
            }
            if new == CLOSE {
                assert!(skipping.catch_up(old), "{path:?}: close from {old}");
            } else if skipped_from(old) != Some(new) {
                assert!(skipping.catch_up(old), "{path:?}: {old} -> {new}");
                skipping.push_state(new);
            } else {
                // A snapshot here reads the socket's state: `new`.
                let mut snapshot = skipping;
                assert!(snapshot.catch_up(new), "{path:?}: snapshot in {new}");
                assert_eq!(
                    (snapshot.state_path, snapshot.transitions, snapshot.flags),
                    (all.state_path, all.transitions, all.flags),
                    "{path:?}: snapshot in {new}"
                );
            }
            if new != CLOSE {
                let mut snapshot = skipping;
                assert!(snapshot.catch_up(new));
                assert_eq!(snapshot.state_path, all.state_path, "{path:?}: snapshot after {old} -> {new}");
            }
        }
        assert_eq!(
            (skipping.state_path, skipping.transitions, skipping.flags),
            (all.state_path, all.transitions, all.flags),
            "{path:?}"
        );
    }

    #[test]
    fn skipped_transitions_are_recovered_on_every_tcp_path() {
        for path in [
            &[CLOSE, SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE][..],
            &[CLOSE, SYN_SENT, ESTABLISHED, CLOSE_WAIT, LAST_ACK, CLOSE],
            &[CLOSE, SYN_SENT, CLOSE],
            &[CLOSE, SYN_SENT, ESTABLISHED, CLOSE],
            &[CLOSE, SYN_SENT, ESTABLISHED, FIN_WAIT1, CLOSING, CLOSE],
            &[CLOSE, SYN_SENT, ESTABLISHED, FIN_WAIT1, CLOSE],
            &[CLOSE, SYN_SENT, ESTABLISHED, CLOSE_WAIT, CLOSE],
            &[CLOSE, SYN_SENT, SYN_RECV, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE],
            &[CLOSE, SYN_SENT, SYN_RECV, FIN_WAIT1, CLOSING, CLOSE],
            &[LISTEN, SYN_RECV, ESTABLISHED, CLOSE_WAIT, LAST_ACK, CLOSE],
            &[LISTEN, SYN_RECV, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE],
            &[LISTEN, SYN_RECV, CLOSE],
            &[LISTEN, SYN_RECV, FIN_WAIT1, FIN_WAIT2, CLOSE],
            &[LISTEN, SYN_RECV, ESTABLISHED, CLOSE_WAIT, CLOSE],
            &[LISTEN, SYN_RECV, ESTABLISHED, CLOSE],
            // First seen mid-way (open before the sidecar started).
            &[ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE],
            &[FIN_WAIT1, FIN_WAIT2, CLOSE],
        ] {
            both(path);
        }
    }

    #[test]
    fn unexplained_gaps_record_nothing() {
        let mut st = state();
        st.push_state(CLOSE);
        st.push_state(SYN_SENT);
        let before = st.state_path;
        // FIN_WAIT2 is not reachable from SYN_SENT by skipped transitions.
        assert!(!st.catch_up(FIN_WAIT2));
        assert!(!st.catch_up(CLOSE));
        assert_eq!((st.state_path, st.transitions, st.flags), (before, 2, 0));
    }
}
