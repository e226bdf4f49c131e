//! Any bytes as a spool segment file, read as the sidecar reads one at
//! replay: never a panic, never a copy of a length the bytes do not hold.
//! The records found are exactly the segment's leading whole frames, and
//! the torn-tail flag says whether anything follows them.
#![no_main]

use libfuzzer_sys::fuzz_target;

// The sidecar is a binary crate: its framing module is compiled in here.
#[path = "../../flowlog-sidecar/src/transport/spool/frames.rs"]
mod frames;

fuzz_target!(|segment: &[u8]| {
    let (records, torn) = frames::records(segment);
    let mut again = Vec::new();
    for r in &records {
        frames::frame(&mut again, r);
    }
    assert_eq!(again.len(), records.iter().map(|r| r.len() + frames::HEADER).sum::<usize>());
    assert!(segment.starts_with(&again));
    assert_eq!(torn, again.len() != segment.len());
    assert_eq!(frames::records(&again), (records, false));
});
