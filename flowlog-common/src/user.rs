//! User-space side: Pod impls and checked decoding of ring-buffer records.

use alloc::borrow::Cow;

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
    /// length yields one error and nothing else. Events are read in place
    /// (ring-buffer records are 8-byte aligned, as a FlowEvent is): copying
    /// each 200-byte event out was ~5% of the reader's CPU.
    pub fn decode_record(bytes: &[u8]) -> impl Iterator<Item = Result<Cow<'_, FlowEvent>, DecodeError>> + '_ {
        let n = bytes.len() / FLOW_EVENT_SIZE;
        let bad = !bytes.len().is_multiple_of(FLOW_EVENT_SIZE) || n == 0 || n > STAGE_EVENTS;
        let err = bad.then_some(Err(DecodeError::Length { got: bytes.len() }));
        let events = if bad { &[][..] } else { bytes };
        err.into_iter().chain(events.chunks_exact(FLOW_EVENT_SIZE).map(FlowEvent::decode))
    }

    /// One event, checking its length, kind and family: borrowed where
    /// `bytes` is aligned for it, else copied (a parked event's bytes).
    pub fn decode(bytes: &[u8]) -> Result<Cow<'_, FlowEvent>, DecodeError> {
        if bytes.len() != FLOW_EVENT_SIZE {
            return Err(DecodeError::Length { got: bytes.len() });
        }
        let ptr = bytes.as_ptr().cast::<FlowEvent>();
        let ev = if ptr.is_aligned() {
            // SAFETY: length and alignment checked; FlowEvent is Pod, so any
            // bit pattern is a valid one.
            Cow::Borrowed(unsafe { &*ptr })
        } else {
            // SAFETY: length checked; Pod as above; read_unaligned because
            // the bytes may be anywhere.
            Cow::Owned(unsafe { core::ptr::read_unaligned(ptr) })
        };
        ev.check()?;
        Ok(ev)
    }

    fn check(&self) -> Result<(), DecodeError> {
        if self.kind != FLOW_EVENT_KIND_V2 {
            return Err(DecodeError::Kind(self.kind));
        }
        if self.family != crate::AF_INET && self.family != crate::AF_INET6 {
            return Err(DecodeError::Family(self.family));
        }
        Ok(())
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
        assert_eq!(FlowEvent::decode(ev.as_bytes()).map(|e| *e), Ok(ev));
    }

    #[test]
    fn rejects_bad_records() {
        let ev = sample();
        assert_eq!(
            FlowEvent::decode(&ev.as_bytes()[..100]).map(|e| *e),
            Err(DecodeError::Length { got: 100 })
        );
        let mut bad = ev;
        bad.kind = 9;
        assert_eq!(FlowEvent::decode(bad.as_bytes()).map(|e| *e), Err(DecodeError::Kind(9)));
        let mut bad = ev;
        bad.family = 1;
        assert_eq!(FlowEvent::decode(bad.as_bytes()).map(|e| *e), Err(DecodeError::Family(1)));
    }

    fn bytemuck_bytes(words: &mut [u64]) -> &mut [u8] {
        // SAFETY: u64s seen as their bytes.
        unsafe { core::slice::from_raw_parts_mut(words.as_mut_ptr().cast(), words.len() * 8) }
    }

    #[test]
    fn staged_records_decode_in_order() {
        let mut events = [sample(); 3];
        for (i, e) in events.iter_mut().enumerate() {
            e.sk = i as u64 + 1;
        }
        events[1].family = 1;
        let bytes: Vec<u8> = events.iter().flat_map(|e| e.as_bytes().to_vec()).collect();
        let decode = |bytes: &[u8]| -> Vec<_> { FlowEvent::decode_record(bytes).map(|r| r.map(|e| *e)).collect() };
        assert_eq!(decode(&bytes), vec![Ok(events[0]), Err(DecodeError::Family(1)), Ok(events[2])]);
        assert_eq!(decode(events[0].as_bytes()), vec![Ok(events[0])]);
        // Aligned bytes are read in place, others copied: the same events.
        let mut words = vec![0u64; bytes.len() / 8 + 1];
        let aligned: &mut [u8] = bytemuck_bytes(&mut words);
        aligned[..bytes.len()].copy_from_slice(&bytes);
        assert!(matches!(FlowEvent::decode(&aligned[..FLOW_EVENT_SIZE]), Ok(Cow::Borrowed(_))));
        assert_eq!(decode(&aligned[..bytes.len()]), decode(&bytes));
        let shifted = &mut aligned[1..bytes.len() + 1];
        shifted.copy_from_slice(&bytes);
        assert!(matches!(FlowEvent::decode(&shifted[..FLOW_EVENT_SIZE]), Ok(Cow::Owned(_))));
        assert_eq!(decode(shifted), decode(&bytes));
        // Torn, empty or longer than a stage: one error, nothing decoded.
        for len in [0, 100, FLOW_EVENT_SIZE + 1, FLOW_EVENT_SIZE * (STAGE_EVENTS + 1)] {
            let bytes = vec![0u8; len];
            assert_eq!(decode(&bytes), vec![Err(DecodeError::Length { got: len })], "{len} bytes");
        }
    }
}
