//! Any bytes as a message of the flow topic, split into its records as the
//! enricher splits a FlowBatch (`flow_messages`, and `records_in` as the
//! sidecar counts one), each decoded as the enricher's `Decoder::flow`
//! decodes one it has not cached the host of: header, host
//! block (`HostIdentity::decode`, `Host::new`), the fields of any schema
//! version, checks. A flow or an error, never a panic or an allocation the
//! input does not pay for; a flow it accepts, written again, reads back the
//! same.
#![no_main]

use flowlog_schema::{decode_flow, flow_messages, records_in, Host, HostIdentity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|msg: &[u8]| {
    assert!(records_in(msg) >= 1);
    let Ok(records) = flow_messages(msg) else { return };
    for record in records {
        check(record);
    }
});

fn check(msg: &[u8]) {
    let Ok((host, flow)) = decode_flow(msg, |block| HostIdentity::decode(block).map(Host::new)) else {
        return;
    };
    let mut again = Vec::new();
    flow.to_message(&host.identity.encode(), &mut again);
    let (host_again, flow_again) = decode_flow(&again, HostIdentity::decode).expect("a flow written again decodes");
    assert_eq!(host_again, host.identity);
    assert_eq!(flow_again, flow);
}
