//! Writes the seed corpus of every fuzz target into corpus/<target>/: valid
//! inputs built from flowlog-schema's fixtures and the deployed config
//! files, so that fuzzing starts from messages that get past the headers.
//! Built with the targets (`cargo +nightly fuzz build`), run as
//! `$CARGO_TARGET_DIR/x86_64-unknown-linux-gnu/release/seed-corpus`; the
//! output is committed.

use std::{fs, path::Path, sync::Arc};

// Linked for the coverage callbacks the fuzz build instruments this with.
use libfuzzer_sys as _;

use flowlog_schema::{
    fixtures,
    schemas::{FLOW_V1, FLOW_V2, FLOW_V3},
    Family, Flow, IdentityReason, WorkloadIps,
};

// The sidecar's own framing, as the spool_segment target reads it.
#[path = "../../../flowlog-sidecar/src/transport/spool/frames.rs"]
mod frames;

fn write(target: &str, name: &str, bytes: &[u8]) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus").join(target);
    fs::create_dir_all(&dir).expect("corpus directory");
    fs::write(dir.join(name), bytes).expect("seed file");
}

/// A message of an older schema version: the current datum without its
/// last `n` fields, each a null (one byte), to go under an older header.
fn without_last_nulls(msg: &[u8], n: usize) -> &[u8] {
    assert!(msg.ends_with(&vec![0; n]), "the flow ends with {n} nulls");
    &msg[10..msg.len() - n]
}

fn main() {
    let host = fixtures::host();
    let flow = fixtures::flow();
    let v6 = Flow {
        family: Family::Ipv6,
        local_addr: "fd00::1".parse().unwrap(),
        remote_addr: "fd00::2".parse().unwrap(),
        start_time_ns: None,
        error: Some("ECONNRESET".into()),
        workload: Some(Arc::new(fixtures::named_pod_workload())),
        ..flow.clone()
    };
    let pod = Flow { workload: Some(Arc::new(fixtures::pod_workload())), ..flow.clone() };
    let bare = Flow { workload: None, limits: None, ..flow.clone() };
    let flows = [
        ("v4-pod", fixtures::flow_message(&host, &pod)),
        ("v4-ipv6-named-pod", fixtures::flow_message(&fixtures::host_with("h2", "api", &["fd00::1", "10.0.0.9"]), &v6)),
        ("v4-no-workload", fixtures::flow_message(&host, &bare)),
    ];
    for (name, msg) in &flows {
        write("flow_decode", name, msg);
    }
    // The three in one FlowBatch, as the sidecar sends them.
    let mut batch = flowlog_schema::BatchWriter::new(host.encode());
    [&pod, &v6, &bare].into_iter().for_each(|f| batch.push(f));
    let mut msg = Vec::new();
    batch.finish(&mut msg);
    write("flow_decode", "batch-of-3", &msg);
    // A version-1 batch (whole Flow messages as items), as older sidecars'
    // spools still hold them.
    let mut v1 = flowlog_schema::schemas::FLOW_BATCH_V1.header().to_vec();
    flowlog_schema::Writer(&mut v1).block(flows.iter(), |w, (_, m)| w.bytes(m));
    write("flow_decode", "batch-v1-of-3", &v1);
    // v3 had no limits; v2 wrote a null workload the same way; v1 had no
    // such field.
    let bare_datum = without_last_nulls(&flows[2].1, 2);
    write("flow_decode", "v3-no-workload", &[&FLOW_V3.header()[..], bare_datum, &[0]].concat());
    write("flow_decode", "v2-no-workload", &[&FLOW_V2.header()[..], bare_datum, &[0]].concat());
    write("flow_decode", "v1", &[&FLOW_V1.header()[..], bare_datum].concat());

    let mut with_workloads = fixtures::identity(&host, 1_000, IdentityReason::Heartbeat);
    with_workloads.workloads = vec![
        WorkloadIps { workload: Arc::new(fixtures::pod_workload()), ips: vec!["10.0.0.7".into()] },
        WorkloadIps { workload: Arc::new(fixtures::named_pod_workload()), ips: vec!["10.0.0.8".into(), "fd00::8".into()] },
    ];
    write("identity_decode", "heartbeat-workloads", &with_workloads.to_message());
    for (name, reason) in [("start", IdentityReason::Start), ("ip-change", IdentityReason::IpChange), ("stop", IdentityReason::Stop)] {
        write("identity_decode", name, &fixtures::identity_message(&host, 2_000, reason));
    }

    let mut segment = Vec::new();
    for (_, msg) in &flows {
        frames::frame(&mut segment, msg);
    }
    assert_eq!(segment.len(), flows.iter().map(|(_, m)| m.len() + frames::HEADER).sum::<usize>());
    write("spool_segment", "three-flows", &segment);
    let torn = &segment[..segment.len() - 5];
    assert_eq!(frames::records(torn), (vec![&flows[0].1[..], &flows[1].1[..]], true));
    write("spool_segment", "torn-tail", torn);
    let mut empty_record = Vec::new();
    frames::frame(&mut empty_record, b"");
    write("spool_segment", "empty-record", &empty_record);

    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config");
    for name in ["enricher.toml", "cidrs.toml", "sidecar.toml"] {
        write("config_toml", name, &fs::read(deploy.join(name)).expect("deploy/config file"));
    }
    write(
        "config_toml",
        "enricher-s3-kubernetes.toml",
        b"output = \"s3://lake/flows\"\noutput_formats = [\"avro\", \"parquet\"]\nstatic_partitions = [0, 1]\n\
          [s3]\nendpoint_url = \"http://127.0.0.1:5000\"\nregion = \"eu-west-1\"\n\
          [kubernetes]\nservices = true\napi_url = \"http://127.0.0.1:8001\"\n",
    );
    write(
        "config_toml",
        "cidrs-v6-labels.toml",
        b"[[entry]]\ncidr = \"fd00::/8\"\nworkload = \"v6\"\nlabels = { a = \"b\" }\n\n[[entry]]\ncidr = \"10.0.0.1\"\nhost_id = \"h1\"\n",
    );
}
