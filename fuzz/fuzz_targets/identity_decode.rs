//! Any bytes as a message of the identity topic (`Identity::decode`, as the
//! enricher's sources/heartbeats.rs reads them): an identity or an error,
//! never a panic; an identity it accepts, written again, reads back the same.
#![no_main]

use flowlog_schema::Identity;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|msg: &[u8]| {
    if let Ok(id) = Identity::decode(msg) {
        assert_eq!(Identity::decode(&id.to_message()).as_ref(), Ok(&id));
    }
});
