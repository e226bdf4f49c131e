//! Turns a kernel [`FlowEvent`] into a [`Flow`] record: payload byte counts
//! without TCP sequence units, how the connection ended, wall-clock times.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use flowlog_common::{direction, flags, tcp_state, FlowEvent, AF_INET6, COMM_LEN};
use flowlog_schema::{Direction, EndReason, Family, Flow, Limits, OwnerSource, RecordType, SmolStr, StatePath};

/// Converts CLOCK_MONOTONIC (the kernel's bpf_ktime_get_ns) to Unix time,
/// and jiffies to microseconds.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, ns.
    offset_ns: i128,
    /// Microseconds per jiffy at the kernel's CONFIG_HZ; None: unknown, and
    /// records carry no limits.
    tick: Option<Tick>,
}

/// Microseconds per jiffy, `us / per` in lowest terms: for the usual rates
/// (100, 250, 1000) `per` is 1 and a conversion is one multiplication
/// (three divisions per record, and a u128 one for the delivery rate,
/// were ~3% of the capture's CPU).
#[derive(Debug, Clone, Copy)]
struct Tick {
    us: u64,
    per: u64,
}

impl Tick {
    fn of(hz: u32) -> Option<Tick> {
        let hz = u64::from(hz);
        if hz == 0 {
            return None;
        }
        let (mut a, mut b) = (1_000_000, hz);
        while b != 0 {
            (a, b) = (b, a % b);
        }
        Some(Tick { us: 1_000_000 / a, per: hz / a })
    }

    /// `jiffies` (at most 2^34: three u32s summed) in microseconds, as
    /// `jiffies * 10^6 / hz` rounds.
    #[inline]
    fn us(&self, jiffies: u64) -> i64 {
        let scaled = jiffies * self.us;
        (if self.per == 1 { scaled } else { scaled / self.per }) as i64
    }
}

impl Clock {
    pub fn now() -> Clock {
        let rt = clock_ns(libc::CLOCK_REALTIME);
        let mono = clock_ns(libc::CLOCK_MONOTONIC);
        Clock { offset_ns: rt - mono, tick: None }
    }

    #[cfg(test)]
    pub fn fixed(offset_ns: i128) -> Clock {
        Clock { offset_ns, tick: Tick::of(250) }
    }

    /// The kernel's CONFIG_HZ ([`crate::offsets::kernel_hz`]); None (or 0):
    /// unknown, and records carry no limits.
    pub fn set_hz(&mut self, hz: Option<u32>) {
        self.tick = hz.and_then(Tick::of);
    }

    pub fn to_unix_ns(&self, mono_ns: u64) -> i64 {
        (mono_ns as i128 + self.offset_ns).clamp(0, i64::MAX as i128) as i64
    }
}

fn clock_ns(id: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(id, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
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

/// The owner's name of the last event, as read and as a string: the
/// events of a drain mostly come from a few processes, and checking and
/// copying each name anew was ~7% of the capture's CPU.
#[derive(Default)]
pub struct Comms {
    raw: [u8; COMM_LEN],
    name: SmolStr,
}

impl Comms {
    /// `raw`'s text, up to its first NUL.
    #[inline]
    pub fn name(&mut self, raw: &[u8; COMM_LEN]) -> SmolStr {
        if *raw != self.raw {
            let len = raw.iter().position(|&c| c == 0).unwrap_or(raw.len());
            self.name = match std::str::from_utf8(&raw[..len]) {
                Ok(name) => SmolStr::new(name),
                // A task can name itself anything (prctl PR_SET_NAME).
                Err(_) => SmolStr::new(String::from_utf8_lossy(&raw[..len])),
            };
            self.raw = *raw;
        }
        self.name.clone()
    }
}

/// The record of one kernel event. `salt` is random per sidecar run so
/// kernel addresses never leave the host. The sequence fields are the
/// transport's to fill in.
#[inline]
pub fn flow_from_event(ev: &FlowEvent, clock: &Clock, salt: u64, comms: &mut Comms) -> Flow {
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
    let interim = ev.flags & flags::INTERIM != 0;
    let owner_source = if ev.tgid == 0 {
        OwnerSource::Unknown
    } else if ev.flags & flags::OWNER_AT_OPEN != 0 {
        OwnerSource::Open
    } else {
        OwnerSource::Close
    };
    Flow {
        sequence_epoch: 0,
        sequence: 0,
        connection_id: connection_id(salt, ev.sk, ev.start_ns) as i64,
        record_type: if interim { RecordType::Interim } else { RecordType::Final },
        family: if v6 { Family::Ipv6 } else { Family::Ipv4 },
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
        bytes_sent: ev.bytes_acked.saturating_sub(syn_acked as u64 + fin_acked as u64) as i64,
        bytes_received: ev.bytes_received.saturating_sub(fin_received as u64) as i64,
        segs_in: ev.segs_in as i64,
        segs_out: ev.segs_out as i64,
        retransmits: ev.total_retrans as i64,
        srtt_us: ev.srtt_us as i32,
        rtt_min_us: if ev.rtt_min_us == u32::MAX { 0 } else { ev.rtt_min_us as i32 },
        end_reason: if interim { EndReason::Open } else { end_reason(ev.old_state, ev.sk_err) },
        error: (ev.sk_err != 0).then(|| errno_name(ev.sk_err)),
        state_path: StatePath(ev.state_path),
        pid: ev.tgid as i32,
        tid: ev.tid as i32,
        comm: comms.name(&ev.comm),
        owner_source,
        cgroup_id: ev.cgroup_id as i64,
        netns_ino: ev.netns_ino as i64,
        // The capture loop's workload resolver fills it in.
        workload: None,
        limits: clock.tick.map(|tick| limits(ev, tick)),
    }
}

/// The event's limits in the schema's units (as TCP_INFO reports them:
/// busy time includes the limited times).
#[inline]
fn limits(ev: &FlowEvent, tick: Tick) -> Limits {
    let l = &ev.limits;
    let rto = ev.flags & flags::RTO_COUNTED != 0;
    let delivery_rate = match l.rate_interval_us {
        0 => 0,
        interval => {
            // Two u32s from the kernel times 10^6 can pass u64: then in u128
            // (a library call; the u64 division is an instruction).
            let delivered = u64::from(l.rate_delivered) * u64::from(l.mss_cache);
            match delivered.checked_mul(1_000_000) {
                Some(scaled) => u128::from(scaled / u64::from(interval)),
                None => u128::from(delivered) * 1_000_000 / u128::from(interval),
            }
        }
    };
    Limits {
        busy_us: tick.us(u64::from(l.busy_jiffies) + u64::from(l.rwnd_limited_jiffies) + u64::from(l.sndbuf_limited_jiffies)),
        rwnd_limited_us: tick.us(l.rwnd_limited_jiffies.into()),
        sndbuf_limited_us: tick.us(l.sndbuf_limited_jiffies.into()),
        delivery_rate_bytes_per_s: delivery_rate.min(i64::MAX as u128) as i64,
        bytes_retrans: l.bytes_retrans.min(i64::MAX as u64) as i64,
        reordering: l.reordering.into(),
        reord_seen: l.reord_seen.into(),
        rto_count: rto.then_some(l.total_rto.into()),
        rto_recoveries: rto.then_some(l.total_rto_recoveries.into()),
        rto_time_ms: rto.then_some(l.total_rto_time_ms.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlog_common::{FLOW_EVENT_KIND_V2, AF_INET};

    fn event() -> FlowEvent {
        FlowEvent {
            kind: FLOW_EVENT_KIND_V2,
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
            limits: Default::default(),
        }
    }

    #[test]
    fn active_close_subtracts_acked_fin_only() {
        let r = flow_from_event(&event(), &Clock::fixed(1_000_000), 1, &mut Comms::default());
        assert_eq!(r.bytes_sent, 12_345);
        // The full socket left FIN_WAIT2 before the peer's FIN (time-wait took over).
        assert_eq!(r.bytes_received, 1_000_003);
        assert_eq!(r.end_reason, EndReason::Normal);
        assert_eq!(r.state_path.iter().collect::<Vec<_>>(), ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]);
        assert_eq!(r.start_time_ns, Some(1_001_000));
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
        let r = flow_from_event(&ev, &Clock::fixed(0), 1, &mut Comms::default());
        assert_eq!((r.bytes_sent, r.bytes_received), (12_345, 1_000_002));
    }

    #[test]
    fn unacked_fin_is_not_subtracted() {
        let mut ev = event();
        ev.old_state = tcp_state::FIN_WAIT1;
        ev.flags &= !flags::SND_ALL_ACKED;
        ev.sk_err = libc::ECONNRESET as u32;
        let r = flow_from_event(&ev, &Clock::fixed(0), 1, &mut Comms::default());
        assert_eq!(r.bytes_sent, 12_346);
        assert_eq!(r.end_reason, EndReason::ResetReceived);
        assert_eq!(r.error.as_deref(), Some("ECONNRESET"));
    }

    /// Jiffies to microseconds at the kernel's rate; busy time includes the
    /// limited times (as TCP_INFO's does); RTO totals only where counted.
    #[test]
    fn limits_in_schema_units() {
        let mut ev = event();
        ev.limits = flowlog_common::Limits {
            busy_jiffies: 10,
            rwnd_limited_jiffies: 250,
            sndbuf_limited_jiffies: 5,
            rate_delivered: 10,
            rate_interval_us: 2_000,
            mss_cache: 1_448,
            bytes_retrans: 2_896,
            reordering: 3,
            reord_seen: 1,
            total_rto: 2,
            total_rto_recoveries: 1,
            total_rto_time_ms: 600,
        };
        let l = flow_from_event(&ev, &Clock::fixed(0), 1, &mut Comms::default()).limits.unwrap();
        assert_eq!((l.busy_us, l.rwnd_limited_us, l.sndbuf_limited_us), (1_060_000, 1_000_000, 20_000));
        assert_eq!(l.delivery_rate_bytes_per_s, 7_240_000);
        assert_eq!((l.bytes_retrans, l.reordering, l.reord_seen), (2_896, 3, 1));
        assert_eq!((l.rto_count, l.rto_recoveries, l.rto_time_ms), (None, None, None));
        ev.flags |= flags::RTO_COUNTED;
        let l = flow_from_event(&ev, &Clock::fixed(0), 1, &mut Comms::default()).limits.unwrap();
        assert_eq!((l.rto_count, l.rto_recoveries, l.rto_time_ms), (Some(2), Some(1), Some(600)));
        ev.limits.rate_interval_us = 0;
        assert_eq!(flow_from_event(&ev, &Clock::fixed(0), 1, &mut Comms::default()).limits.unwrap().delivery_rate_bytes_per_s, 0);
        // Extreme kernel values saturate instead of overflowing.
        (ev.limits.rate_delivered, ev.limits.mss_cache, ev.limits.rate_interval_us) = (u32::MAX, u32::MAX, 1);
        assert_eq!(flow_from_event(&ev, &Clock::fixed(0), 1, &mut Comms::default()).limits.unwrap().delivery_rate_bytes_per_s, i64::MAX);
        let mut unknown_hz = Clock::fixed(0);
        for hz in [None, Some(0)] {
            unknown_hz.set_hz(hz);
            assert_eq!(flow_from_event(&ev, &unknown_hz, 1, &mut Comms::default()).limits, None);
        }
    }

    /// The conversions without a division agree with the plain formulas
    /// (`jiffies * 10^6 / hz`, the delivery rate in u128) at every kernel
    /// rate and at the extremes of the kernel's values.
    #[test]
    fn limits_agree_with_the_plain_formulas() {
        let mut ev = event();
        let jiffies = [0u32, 1, 2, 3, 7, 299, 1_000, 123_457, u32::MAX - 1, u32::MAX];
        let small = [0u32, 1, 3, 1_448, 65_535, 1 << 20, u32::MAX];
        for hz in [24u32, 100, 250, 300, 1000, 1024, 1200, 999_999, 1_000_000, 4_000_000] {
            let mut clock = Clock::fixed(0);
            clock.set_hz(Some(hz));
            for (i, &busy) in jiffies.iter().enumerate() {
                let (rwnd, sndbuf) = (jiffies[(i + 3) % jiffies.len()], jiffies[(i + 7) % jiffies.len()]);
                ev.limits.busy_jiffies = busy;
                ev.limits.rwnd_limited_jiffies = rwnd;
                ev.limits.sndbuf_limited_jiffies = sndbuf;
                for &delivered in &small {
                    for &mss in &small {
                        for interval in [1u32, 3, 1_000, u32::MAX] {
                            (ev.limits.rate_delivered, ev.limits.mss_cache, ev.limits.rate_interval_us) = (delivered, mss, interval);
                            let l = flow_from_event(&ev, &clock, 1, &mut Comms::default()).limits.unwrap();
                            let us = |j: u64| (u128::from(j) * 1_000_000 / u128::from(hz)) as i64;
                            let total = u64::from(busy) + u64::from(rwnd) + u64::from(sndbuf);
                            assert_eq!(
                                (l.busy_us, l.rwnd_limited_us, l.sndbuf_limited_us),
                                (us(total), us(rwnd.into()), us(sndbuf.into())),
                                "hz {hz}"
                            );
                            let rate = u128::from(delivered) * u128::from(mss) * 1_000_000 / u128::from(interval);
                            assert_eq!(l.delivery_rate_bytes_per_s, rate.min(i64::MAX as u128) as i64);
                        }
                    }
                }
            }
        }
    }

    /// A process can name itself any bytes: invalid UTF-8 is replaced, not refused.
    #[test]
    fn comm_that_is_not_utf8() {
        let mut ev = event();
        ev.comm = *b"ok\xff\xfename\0\0\0\0\0\0\0\0";
        assert_eq!(flow_from_event(&ev, &Clock::fixed(0), 1, &mut Comms::default()).comm, "ok\u{fffd}\u{fffd}name");
    }

    /// One cache across events: each record names its own owner, however
    /// the names before it went (empty, the same, another, invalid UTF-8).
    #[test]
    fn each_record_names_its_own_owner() {
        let mut comms = Comms::default();
        let mut ev = event();
        for comm in [
            *b"\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0",
            *b"fl-client\0\0\0\0\0\0\0",
            *b"fl-client\0\0\0\0\0\0\0",
            *b"fl-server\0\0\0\0\0\0\0",
            *b"ok\xff\xfename\0\0\0\0\0\0\0\0",
            *b"fifteen-bytes-x\0",
            *b"fl-client\0\0\0\0\0\0\0",
            // A name the kernel did not end with a NUL: all 16 bytes.
            *b"sixteen-bytes-xy",
        ] {
            ev.comm = comm;
            let alone = flow_from_event(&ev, &Clock::fixed(0), 1, &mut Comms::default()).comm;
            assert_eq!(flow_from_event(&ev, &Clock::fixed(0), 1, &mut comms).comm, alone);
            let len = comm.iter().position(|&c| c == 0).unwrap_or(16);
            assert_eq!(alone.as_str(), String::from_utf8_lossy(&comm[..len]));
        }
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
        let r = flow_from_event(&ev, &Clock::fixed(0), 1, &mut Comms::default());
        assert_eq!((r.start_time_ns, r.direction), (None, Direction::Unknown));
        assert_eq!(r.owner_source, OwnerSource::Unknown);
    }
}
