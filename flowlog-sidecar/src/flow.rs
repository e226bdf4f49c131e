//! Turns a kernel [`FlowEvent`] into a [`FlowRecord`]: payload byte counts
//! without TCP sequence units, how the connection ended, wall-clock times.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flowlog_common::{direction, flags, tcp_state, FlowEvent, AF_INET6};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Client,
    Server,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// FIN handshake (either side first).
    Normal,
    /// connect() never reached ESTABLISHED (refused, timed out, unreachable, aborted).
    FailedConnect,
    /// The peer sent a reset.
    ResetReceived,
    /// This side aborted the connection (close with unread data, SO_LINGER 0,
    /// or a reset sent for another reason).
    ResetSent,
    /// Retransmissions or keepalives gave up.
    Timeout,
    /// Any other socket error (see `error`).
    Error,
}

/// Where pid/comm/cgroup came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OwnerSource {
    /// connect() or the listener's listen(), in process context.
    Open,
    /// The process that called close()/shutdown().
    Close,
    Unknown,
}

/// One TCP connection, seen from one side.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FlowRecord {
    /// Names the connection on this host (salted hash of the socket and its
    /// start), shared by its interim and final records.
    pub connection_id: u64,
    pub family: &'static str,
    pub direction: Direction,
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    /// Unix time of the open (ns), absent when the open was not seen.
    pub start_time_ns: Option<u64>,
    /// Unix time of the close (ns).
    pub end_time_ns: u64,
    pub duration_ns: Option<u64>,
    /// Payload bytes sent and acknowledged by the peer.
    pub bytes_sent: u64,
    /// Payload bytes received in order.
    pub bytes_received: u64,
    pub segs_in: u32,
    pub segs_out: u32,
    pub retransmits: u32,
    pub srtt_us: u32,
    pub rtt_min_us: u32,
    pub end_reason: EndReason,
    /// errno name of the socket error at close, if any (ECONNREFUSED, ...).
    pub error: Option<String>,
    /// TCP states in order, e.g. ["CLOSE","SYN_SENT","ESTABLISHED","FIN_WAIT1","FIN_WAIT2","CLOSE"].
    pub state_path: Vec<&'static str>,
    pub state_path_truncated: bool,
    pub pid: u32,
    pub tid: u32,
    pub comm: String,
    pub owner_source: OwnerSource,
    pub cgroup_id: u64,
    pub netns_ino: u32,
}

/// Converts CLOCK_MONOTONIC (the kernel's bpf_ktime_get_ns) to Unix time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, ns.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let rt = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        Clock { offset_ns: rt - mono }
    }

    #[cfg(test)]
    pub fn fixed(offset_ns: i128) -> Clock {
        Clock { offset_ns }
    }

    pub fn to_unix_ns(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).max(0) as u64
    }
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

pub fn state_name(s: u8) -> &'static str {
    match s {
        tcp_state::ESTABLISHED => "ESTABLISHED",
        tcp_state::SYN_SENT => "SYN_SENT",
        tcp_state::SYN_RECV => "SYN_RECV",
        tcp_state::FIN_WAIT1 => "FIN_WAIT1",
        tcp_state::FIN_WAIT2 => "FIN_WAIT2",
        tcp_state::TIME_WAIT => "TIME_WAIT",
        tcp_state::CLOSE => "CLOSE",
        tcp_state::CLOSE_WAIT => "CLOSE_WAIT",
        tcp_state::LAST_ACK => "LAST_ACK",
        tcp_state::LISTEN => "LISTEN",
        tcp_state::CLOSING => "CLOSING",
        tcp_state::NEW_SYN_RECV => "NEW_SYN_RECV",
        _ => "UNKNOWN",
    }
}

pub fn errno_name(e: u32) -> String {
    match e as i32 {
        libc::ECONNREFUSED => "ECONNREFUSED".into(),
        libc::ECONNRESET => "ECONNRESET".into(),
        libc::ETIMEDOUT => "ETIMEDOUT".into(),
        libc::EPIPE => "EPIPE".into(),
        libc::EHOSTUNREACH => "EHOSTUNREACH".into(),
        libc::ENETUNREACH => "ENETUNREACH".into(),
        libc::ECONNABORTED => "ECONNABORTED".into(),
        libc::EPROTO => "EPROTO".into(),
        other => format!("errno {other}"),
    }
}

fn unpack_path(path: u64) -> Vec<&'static str> {
    // One nibble per state, the oldest in the most significant non-zero
    // nibble. No TCP state is 0, so there are no ambiguous zero nibbles.
    let n = (64 - path.leading_zeros() as usize).div_ceil(4);
    (0..n).rev().map(|i| state_name(((path >> (4 * i)) & 0xf) as u8)).collect()
}

/// A 64-bit mix (splitmix64 finaliser) of the socket address, its start time
/// and a per-run salt.
pub fn connection_id(salt: u64, sk: u64, start_ns: u64) -> u64 {
    let mut z = salt ^ sk.rotate_left(17) ^ start_ns.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Classifies the end of a connection from the state it left and the socket
/// error the kernel recorded.
pub fn end_reason(old_state: u8, sk_err: u32) -> EndReason {
    let err = sk_err as i32;
    if old_state == tcp_state::SYN_SENT {
        return EndReason::FailedConnect;
    }
    match err {
        libc::ECONNRESET | libc::EPIPE => return EndReason::ResetReceived,
        libc::ETIMEDOUT => return EndReason::Timeout,
        0 => {}
        _ => return EndReason::Error,
    }
    match old_state {
        tcp_state::FIN_WAIT2 | tcp_state::LAST_ACK | tcp_state::CLOSING => EndReason::Normal,
        // Straight from an open state to CLOSE with no error: this side sent
        // a reset (tcp_close with unread data, SO_LINGER 0, tcp_abort).
        _ => EndReason::ResetSent,
    }
}

impl FlowRecord {
    /// `salt` is random per sidecar run so kernel addresses never leave the host.
    pub fn from_event(ev: &FlowEvent, clock: &Clock, salt: u64) -> FlowRecord {
        let v6 = ev.family == AF_INET6;
        let addr = |b: &[u8; 16]| -> IpAddr {
            if v6 {
                IpAddr::V6(Ipv6Addr::from(*b))
            } else {
                IpAddr::V4(Ipv4Addr::new(b[0], b[1], b[2], b[3]))
            }
        };
        // Byte counters are TCP sequence space: SYN and FIN take one unit each.
        let syn_acked = ev.flags & flags::SYN_ACKED != 0;
        let fin_sent_states = [tcp_state::FIN_WAIT1, tcp_state::FIN_WAIT2, tcp_state::CLOSING, tcp_state::LAST_ACK];
        let fin_acked = ev.flags & flags::SND_ALL_ACKED != 0 && fin_sent_states.contains(&ev.old_state);
        let fin_received = ev.flags & flags::FIN_RECEIVED != 0;
        let open_seen = ev.flags & flags::OPEN_SEEN != 0 && ev.start_ns != 0;
        let owner_source = if ev.tgid == 0 {
            OwnerSource::Unknown
        } else if ev.flags & flags::OWNER_AT_OPEN != 0 {
            OwnerSource::Open
        } else {
            OwnerSource::Close
        };
        let comm_len = ev.comm.iter().position(|&c| c == 0).unwrap_or(ev.comm.len());
        FlowRecord {
            connection_id: connection_id(salt, ev.sk, ev.start_ns),
            family: if v6 { "ipv6" } else { "ipv4" },
            direction: match ev.direction {
                direction::CLIENT => Direction::Client,
                direction::SERVER => Direction::Server,
                _ => Direction::Unknown,
            },
            local_addr: addr(&ev.local_addr),
            local_port: ev.local_port,
            remote_addr: addr(&ev.remote_addr),
            remote_port: ev.remote_port,
            start_time_ns: open_seen.then(|| clock.to_unix_ns(ev.start_ns)),
            end_time_ns: clock.to_unix_ns(ev.end_ns),
            duration_ns: open_seen.then(|| ev.end_ns.saturating_sub(ev.start_ns)),
            bytes_sent: ev.bytes_acked.saturating_sub(syn_acked as u64 + fin_acked as u64),
            bytes_received: ev.bytes_received.saturating_sub(fin_received as u64),
            segs_in: ev.segs_in,
            segs_out: ev.segs_out,
            retransmits: ev.total_retrans,
            srtt_us: ev.srtt_us,
            rtt_min_us: if ev.rtt_min_us == u32::MAX { 0 } else { ev.rtt_min_us },
            end_reason: end_reason(ev.old_state, ev.sk_err),
            error: (ev.sk_err != 0).then(|| errno_name(ev.sk_err)),
            state_path: unpack_path(ev.state_path),
            state_path_truncated: ev.flags & flags::PATH_TRUNCATED != 0,
            pid: ev.tgid,
            tid: ev.tid,
            comm: String::from_utf8_lossy(&ev.comm[..comm_len]).into_owned(),
            owner_source,
            cgroup_id: ev.cgroup_id,
            netns_ino: ev.netns_ino,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlog_common::{FLOW_EVENT_KIND_V1, AF_INET};

    fn event() -> FlowEvent {
        FlowEvent {
            kind: FLOW_EVENT_KIND_V1,
            family: AF_INET,
            direction: direction::CLIENT,
            old_state: tcp_state::FIN_WAIT2,
            flags: flags::OPEN_SEEN | flags::OWNER_AT_OPEN | flags::SND_ALL_ACKED | flags::SYN_ACKED,
            local_port: 40000,
            remote_port: 8080,
            sk_err: 0,
            local_addr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            remote_addr: [10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            start_ns: 1_000,
            end_ns: 5_000,
            bytes_acked: 12_347,
            bytes_received: 1_000_003,
            cgroup_id: 9,
            state_path: 0x721457,
            segs_in: 10,
            segs_out: 11,
            total_retrans: 2,
            srtt_us: 40,
            rtt_min_us: 20,
            tgid: 77,
            tid: 78,
            netns_ino: 4026531840,
            comm: *b"fl-client\0\0\0\0\0\0\0",
            sk: 0xffff_8880_0000_2000,
        }
    }

    #[test]
    fn active_close_subtracts_acked_fin_only() {
        let r = FlowRecord::from_event(&event(), &Clock::fixed(1_000_000), 1);
        assert_eq!(r.bytes_sent, 12_345);
        // The full socket left FIN_WAIT2 before the peer's FIN (time-wait took over).
        assert_eq!(r.bytes_received, 1_000_003);
        assert_eq!(r.end_reason, EndReason::Normal);
        assert_eq!(r.state_path, vec!["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]);
        assert_eq!(r.start_time_ns, Some(1_001_000));
        assert_eq!(r.duration_ns, Some(4_000));
        assert_eq!(r.local_addr.to_string(), "127.0.0.1");
        assert_eq!(r.remote_addr.to_string(), "10.1.2.3");
        assert_eq!(r.comm, "fl-client");
        assert_eq!(r.owner_source, OwnerSource::Open);
    }

    #[test]
    fn passive_close_subtracts_both_fins() {
        let mut ev = event();
        ev.old_state = tcp_state::LAST_ACK;
        ev.direction = direction::SERVER;
        ev.flags = flags::OPEN_SEEN | flags::SND_ALL_ACKED | flags::FIN_RECEIVED;
        ev.bytes_acked = 12_346;
        let r = FlowRecord::from_event(&ev, &Clock::fixed(0), 1);
        assert_eq!((r.bytes_sent, r.bytes_received), (12_345, 1_000_002));
    }

    #[test]
    fn unacked_fin_is_not_subtracted() {
        let mut ev = event();
        ev.old_state = tcp_state::FIN_WAIT1;
        ev.flags &= !flags::SND_ALL_ACKED;
        ev.sk_err = libc::ECONNRESET as u32;
        let r = FlowRecord::from_event(&ev, &Clock::fixed(0), 1);
        assert_eq!(r.bytes_sent, 12_346);
        assert_eq!(r.end_reason, EndReason::ResetReceived);
        assert_eq!(r.error.as_deref(), Some("ECONNRESET"));
    }

    #[test]
    fn end_reasons() {
        assert_eq!(end_reason(tcp_state::SYN_SENT, libc::ECONNREFUSED as u32), EndReason::FailedConnect);
        assert_eq!(end_reason(tcp_state::SYN_SENT, 0), EndReason::FailedConnect);
        assert_eq!(end_reason(tcp_state::ESTABLISHED, 0), EndReason::ResetSent);
        assert_eq!(end_reason(tcp_state::ESTABLISHED, libc::ECONNRESET as u32), EndReason::ResetReceived);
        assert_eq!(end_reason(tcp_state::CLOSE_WAIT, libc::EPIPE as u32), EndReason::ResetReceived);
        assert_eq!(end_reason(tcp_state::ESTABLISHED, libc::ETIMEDOUT as u32), EndReason::Timeout);
        assert_eq!(end_reason(tcp_state::LAST_ACK, 0), EndReason::Normal);
    }

    #[test]
    fn unseen_open_has_no_start() {
        let mut ev = event();
        ev.flags = flags::MAP_FULL;
        ev.start_ns = 0;
        ev.tgid = 0;
        ev.direction = direction::UNKNOWN;
        let r = FlowRecord::from_event(&ev, &Clock::fixed(0), 1);
        assert_eq!((r.start_time_ns, r.duration_ns, r.direction), (None, None, Direction::Unknown));
        assert_eq!(r.owner_source, OwnerSource::Unknown);
    }
}
