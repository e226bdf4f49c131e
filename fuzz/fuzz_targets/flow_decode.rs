//! Any bytes as a message of the flow topic, split into its records as the
//! enricher splits a FlowBatch (`flow_messages`, and `records_in` as the
//! sidecar counts one), each decoded as the enricher's `Decoder::item`
//! decodes one it has not cached the host of, and as the whole Flow
//! message it stands for (what the dead-letter topic gets), alike: header, host
//! block (`HostIdentity::decode`, `Host::new`), the fields of any schema
//! version, checks. A flow or an error, never a panic or an allocation the
//! input does not pay for; a flow it accepts, written again, reads back the
//! same.
#![no_main]

use flowlog_schema::{decode_flow, flow_messages, records_in, FlowItem, Host, HostIdentity};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|msg: &[u8]| {
    assert!(records_in(msg) >= 1);
    let Ok(records) = flow_messages(msg) else { return };
    for record in records {
        check(record);
    }
});

fn check(record: FlowItem) {
    let decoded = record.decode(|block| HostIdentity::decode(block).map(Host::new));
    // A record of a batch is the whole Flow message it stands for: the two
    // decode alike.
    let whole = decode_flow(&record.message(), |block| HostIdentity::decode(block).map(Host::new));
    assert_eq!(decoded.as_ref().map(|(h, f)| (&h.identity, f)), whole.as_ref().map(|(h, f)| (&h.identity, f)));
    let Ok((host, flow)) = decoded else {
        return;
    };
    let mut again = Vec::new();
    flow.to_message(&host.identity.encode(), &mut again);
    let (host_again, flow_again) = decode_flow(&again, HostIdentity::decode).expect("a flow written again decodes");
    assert_eq!(host_again, host.identity);
    assert_eq!(flow_again, flow);
}
