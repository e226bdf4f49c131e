//! User-space side: Pod impls and checked decoding of ring-buffer records.

use crate::{FlowEvent, KernelOffsets, KernelSettings, FLOW_EVENT_KIND_V2, FLOW_EVENT_SIZE, STAGE_EVENTS};

// SAFETY: plain #[repr(C)] integers and byte arrays, no padding-dependent invariants.
unsafe impl aya::Pod for KernelOffsets {}
unsafe impl aya::Pod for KernelSettings {}
unsafe impl aya::Pod for FlowEvent {}
unsafe impl aya::Pod for crate::SockState {}
unsafe impl aya::Pod for crate::socktable::SockBucket {}
unsafe impl aya::Pod for crate::socktable::SockSlot {}
unsafe impl aya::Pod for crate::StageHead {}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// The record is not the size of a [`FlowEvent`].
    Length { got: usize },
    /// Unknown record kind (a newer or corrupt program).
    Kind(u16),
    /// Address family is neither AF_INET nor AF_INET6.
    Family(u16),
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            DecodeError::Length { got } => {
                write!(f, "ring buffer record of {got} bytes, expected 1 to {STAGE_EVENTS} events of {FLOW_EVENT_SIZE}")
            }
            DecodeError::Kind(k) => write!(f, "unknown flow event kind {k}"),
            DecodeError::Family(a) => write!(f, "unknown address family {a}"),
        }
    }
}

impl FlowEvent {
    /// Decodes one ring-buffer record: a single event, or the final events a
    /// CPU staged ([`crate::Stage`]), oldest first. A record of the wrong
    /// length yields one error and nothing else.
    pub fn decode_record(bytes: &[u8]) -> impl Iterator<Item = Result<FlowEvent, DecodeError>> + '_ {
        let n = bytes.len() / FLOW_EVENT_SIZE;
        let bad = bytes.len() % FLOW_EVENT_SIZE != 0 || n == 0 || n > STAGE_EVENTS;
        let err = bad.then_some(Err(DecodeError::Length { got: bytes.len() }));
        let events = if bad { &[][..] } else { bytes };
        err.into_iter().chain(events.chunks_exact(FLOW_EVENT_SIZE).map(FlowEvent::decode))
    }

    /// Decodes one ring-buffer record, checking its length, kind and family.
    pub fn decode(bytes: &[u8]) -> Result<FlowEvent, DecodeError> {
        if bytes.len() != FLOW_EVENT_SIZE {
            return Err(DecodeError::Length { got: bytes.len() });
        }
        // SAFETY: length checked; FlowEvent is Pod so any bit pattern is valid;
        // read_unaligned because ring-buffer records are only 8-byte aligned.
        let ev: FlowEvent = unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) };
        if ev.kind != FLOW_EVENT_KIND_V2 {
            return Err(DecodeError::Kind(ev.kind));
        }
        if ev.family != crate::AF_INET && ev.family != crate::AF_INET6 {
            return Err(DecodeError::Family(ev.family));
        }
        Ok(ev)
    }

    /// The record as bytes (for tests and tools).
    pub fn as_bytes(&self) -> &[u8] {
        // SAFETY: Pod, size known.
        unsafe { core::slice::from_raw_parts((self as *const FlowEvent).cast(), FLOW_EVENT_SIZE) }
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    fn sample() -> FlowEvent {
        FlowEvent {
            kind: FLOW_EVENT_KIND_V2,
            family: crate::AF_INET6,
            direction: crate::direction::CLIENT,
            old_state: crate::tcp_state::FIN_WAIT2,
            flags: crate::flags::OPEN_SEEN,
            local_port: 40000,
            remote_port: 443,
            sk_err: 0,
            local_addr: [1; 16],
            remote_addr: [2; 16],
            start_ns: 1,
            end_ns: 2,
            bytes_acked: 12346,
            bytes_received: 1000004,
            cgroup_id: 7,
            state_path: 0x2145,
            segs_in: 3,
            segs_out: 4,
            total_retrans: 0,
            srtt_us: 10,
            rtt_min_us: 5,
            tgid: 100,
            tid: 101,
            netns_ino: 4026531840,
            comm: *b"client\0\0\0\0\0\0\0\0\0\0",
            sk: 0xffff_8880_0000_1000,
            limits: Default::default(),
        }
    }

    #[test]
    fn round_trip() {
        let ev = sample();
        assert_eq!(FlowEvent::decode(ev.as_bytes()), Ok(ev));
    }

    #[test]
    fn rejects_bad_records() {
        let ev = sample();
        assert_eq!(
            FlowEvent::decode(&ev.as_bytes()[..100]),
            Err(DecodeError::Length { got: 100 })
        );
        let mut bad = ev;
        bad.kind = 9;
        assert_eq!(FlowEvent::decode(bad.as_bytes()), Err(DecodeError::Kind(9)));
        let mut bad = ev;
        bad.family = 1;
        assert_eq!(FlowEvent::decode(bad.as_bytes()), Err(DecodeError::Family(1)));
    }

    #[test]
    fn staged_records_decode_in_order() {
        let mut events = [sample(); 3];
        for (i, e) in events.iter_mut().enumerate() {
            e.sk = i as u64 + 1;
        }
        events[1].family = 1;
        let bytes: Vec<u8> = events.iter().flat_map(|e| e.as_bytes().to_vec()).collect();
        let got: Vec<_> = FlowEvent::decode_record(&bytes).collect();
        assert_eq!(got, vec![Ok(events[0]), Err(DecodeError::Family(1)), Ok(events[2])]);
        assert_eq!(FlowEvent::decode_record(events[0].as_bytes()).collect::<Vec<_>>(), vec![Ok(events[0])]);
        // Torn, empty or longer than a stage: one error, nothing decoded.
        for len in [0, 100, FLOW_EVENT_SIZE + 1, FLOW_EVENT_SIZE * (STAGE_EVENTS + 1)] {
            let bytes = vec![0u8; len];
            let got: Vec<_> = FlowEvent::decode_record(&bytes).collect();
            assert_eq!(got, vec![Err(DecodeError::Length { got: len })], "{len} bytes");
        }
    }
}
