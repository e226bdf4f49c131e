//! The enricher against a real local broker, with records read back from its
//! files by fastavro: time-aware attribution (IP reuse), the static map, the
//! dead-letter topic, exactly-once files across a crash, and records a sidecar
//! sent twice written once.

mod common;

use std::{
    process::Command,
    time::{Duration, Instant},
};

use apache_avro::types::Value;
use common::*;
use flowlog_runtime::testkit::{self, free_port};
use flowlog_schema::{fixtures, Flow, IdentityReason, ENRICHED_FLOW};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Headers,
    ClientConfig, Message, TopicPartitionList,
};
use serde_json::Value as Json;

#[test]
fn attributes_by_time_with_static_map_and_dead_letters() {
    let Some(b) = start_broker("attr", 1) else { return };
    let out = out_dir("out");
    let map = out.with_extension("toml");
    std::fs::write(&map, "[[entry]]\ncidr = \"192.168.0.0/16\"\nworkload = \"legacy\"\nenv = \"prod\"\n").unwrap();

    // 10.0.0.9 belongs to billing from T0+100 s, is released at T0+200 s and
    // goes to search at T0+300 s.
    produce(&b.addr, "flowlog.identity", &[
        ("a".into(), identity("host-a", "billing", &["10.0.0.9"], T0 + 100 * S, IdentityReason::Start)),
        ("a".into(), identity("host-a", "billing", &[], T0 + 200 * S, IdentityReason::IpChange)),
        ("b".into(), identity("host-b", "search", &["10.0.0.9"], T0 + 300 * S, IdentityReason::Start)),
    ]);
    // The first flow's local workload is a pod's container, as the sidecar resolved it.
    let pod_flow = Flow { workload: Some(std::sync::Arc::new(fixtures::pod_workload())), ..flow_record(0, [10, 0, 0, 9], T0 + 150 * S, 100) };
    let flows = vec![
        ("c".to_string(), flow_message(&pod_flow)),
        ("c".to_string(), flow(1, [10, 0, 0, 9], T0 + 250 * S, 101)),
        ("c".to_string(), b"garbage, not avro".to_vec()),
        ("c".to_string(), flow(2, [10, 0, 0, 9], T0 + 350 * S, 102)),
        ("c".to_string(), { let f = flow(3, [1, 1, 1, 1], T0, 1); f[..f.len() - 4].to_vec() }),
        ("c".to_string(), flow(3, [192, 168, 4, 4], T0 + 400 * S, 103)),
        ("c".to_string(), flow(4, [8, 8, 8, 8], T0 + 400 * S, 104)),
    ];
    produce(&b.addr, "flowlog.flows", &flows);
    let e = start_enricher(&b.addr, &out, &["--static-map", map.to_str().unwrap(), "--enriched-topic", "flowlog.enriched"]);
    let recs = wait_files(&out, 5, Duration::from_secs(60));
    stop(e);
    assert_eq!(recs.len(), 5, "{recs:#?}");
    let by_seq = |s: i64| recs.iter().find(|r| r["sequence"] == s).unwrap_or_else(|| panic!("sequence {s} missing"));
    let remote = |s: i64| &by_seq(s)["remote"];
    assert_eq!(remote(0)["workload"], "billing");
    assert_eq!(remote(0)["source"], "SIDECAR");
    assert_eq!(remote(0)["confidence"], 1.0);
    assert_eq!(remote(1)["confidence"], 0.0);
    assert_eq!(remote(0)["host_id"], "host-a");
    assert_eq!(remote(0)["team"], "billing-team");
    assert_eq!(remote(1)["attributed"], false);
    assert_eq!(remote(1)["reason"], "NO_OWNER_AT_TIME");
    assert_eq!(remote(2)["workload"], "search");
    assert_eq!(remote(3)["workload"], "legacy");
    assert_eq!(remote(3)["source"], "STATIC");
    assert_eq!(remote(3)["env"], "prod");
    assert_eq!(remote(4)["reason"], "UNKNOWN_IP");
    // Carried through to the file, read by fastavro.
    let pod = fixtures::pod_workload();
    let w = &by_seq(0)["local_workload"];
    assert_eq!(w["kind"], "POD");
    assert_eq!(w["reason"], Json::Null);
    assert_eq!(w["pod_uid"], pod.pod_uid.unwrap());
    assert_eq!(w["container_id"], pod.container_id.unwrap());
    assert_eq!((w["runtime"].as_str(), w["qos_class"].as_str()), (Some("containerd"), Some("Burstable")));
    assert_eq!(w["unit"], pod.unit.unwrap());
    assert_eq!(by_seq(1)["local_workload"], Json::Null);
    for s in 0..5 {
        let r = by_seq(s);
        // The local side is the sidecar's own host.
        assert_eq!(r["local"]["workload"], "frontend");
        assert_eq!(r["host_id"], "client-host");
        assert_eq!(r["bytes_sent"], 100 + s);
        assert_eq!(r["bytes_received"], 2 * (100 + s) + 1);
        assert_eq!(r["local_ip"], "10.0.0.1");
        assert_eq!(r["direction"], "CLIENT");
        assert_eq!(r["flow_id"].as_str().unwrap().len(), 16);
        // Hive-style folder by end time: 2026-01-01, hour 0.
        assert!(r["_file"].as_str().unwrap().starts_with("dt=2026-01-01/hr=00/flowlog.flows-0-"), "{}", r["_file"]);
    }

    // The two bad messages are in the dead-letter topic with their reasons.
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &b.addr).set("group.id", "t").create().unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("flowlog.dlq", 0, rdkafka::Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let mut reasons = Vec::new();
    let t0 = Instant::now();
    while reasons.len() < 2 && t0.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let h = m.headers().unwrap();
            let reason = h.iter().find(|h| h.key == "flowlog.dlq.reason").and_then(|h| h.value).map(|v| String::from_utf8_lossy(v).into_owned());
            reasons.push(reason.unwrap_or_default());
        }
    }
    assert_eq!(reasons, vec!["not Avro single-object encoded".to_string(), "truncated".to_string()]);

    // The enriched topic holds the same five records, single-object encoded.
    let reader = apache_avro::GenericSingleObjectReader::new(ENRICHED_FLOW.parse()).unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("flowlog.enriched", 0, rdkafka::Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let mut workloads = std::collections::BTreeMap::new();
    let t0 = Instant::now();
    while workloads.len() < 5 && t0.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let Value::Record(f) = reader.read_value(&mut m.payload().unwrap()).unwrap() else { panic!() };
            let get = |n: &str| f.iter().find(|(k, _)| k == n).unwrap().1.clone();
            let Value::Long(seq) = get("sequence") else { panic!() };
            let Value::Record(remote) = get("remote") else { panic!() };
            let wl = remote.iter().find(|(k, _)| k == "workload").unwrap().1.clone();
            workloads.insert(seq, wl);
        }
    }
    assert_eq!(workloads.len(), 5);
    assert_eq!(workloads[&0], Value::Union(1, Box::new(Value::String("billing".into()))));
    assert_eq!(workloads[&1], Value::Union(0, Box::new(Value::Null)));
    assert_eq!(workloads[&2], Value::Union(1, Box::new(Value::String("search".into()))));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&map);
}

/// Two enrichers share the topic's partitions; one is killed with SIGKILL
/// mid-stream and restarted, as its supervisor would. Its partitions move
/// (to the survivor or to the restarted instance), the new owner removes the
/// files of the unfinished batch and resumes from `_state`, and the files
/// hold every input record exactly once. (The restart also makes the local
/// broker rebalance: tansu did not always hand a killed member's partitions
/// to a survivor that already held partitions.)
#[test]
fn kill_9_loses_and_duplicates_nothing() {
    let Some(b) = start_broker("kill", 4) else { return };
    let out = out_dir("kill");
    let batch = |from: i64, to: i64| -> Vec<(String, Vec<u8>)> {
        (from..to).map(|i| (format!("k{}", i % 8), flow(i, [10, 0, 0, 9], T0 + i * S, i))).collect()
    };
    produce(&b.addr, "flowlog.flows", &batch(0, 2000));
    let extra = ["--batch-max-records", "100"];
    let mut a = start_enricher(&b.addr, &out, &extra);
    let e2 = start_enricher(&b.addr, &out, &extra);
    let got = wait_files(&out, 600, Duration::from_secs(60));
    assert!(got.len() >= 600, "enrichers made no progress");
    a.kill().unwrap(); // SIGKILL: no cleanup at all
    a.wait().unwrap();
    let restarted = start_enricher(&b.addr, &out, &extra);
    produce(&b.addr, "flowlog.flows", &batch(2000, 4000));
    let recs = wait_files(&out, 4000, Duration::from_secs(120));
    stop(e2);
    stop(restarted);
    let recs_final = read_files(&out);
    assert!(recs_final.len() >= recs.len());
    let mut seqs: Vec<i64> = recs_final.iter().map(|r| r["sequence"].as_i64().unwrap()).collect();
    seqs.sort();
    let n = seqs.len();
    seqs.dedup();
    assert_eq!(n, seqs.len(), "duplicated records in the files");
    assert_eq!(seqs, (0..4000).collect::<Vec<_>>(), "records missing from the files");
    for r in &recs_final {
        let s = r["sequence"].as_i64().unwrap();
        assert_eq!(r["bytes_sent"].as_i64(), Some(s));
    }
    let _ = std::fs::remove_dir_all(&out);
}

/// A sidecar sends records again (its spool replayed after a crash) and one
/// late: the files hold each record once, and the metrics say what happened.
#[test]
fn records_sent_twice_are_written_once() {
    let Some(b) = start_broker("dup", 1) else { return };
    let out = out_dir("dup");
    let seqs = [0, 1, 3, 4, 1, 3, 4, 2, 5, 2];
    let flows: Vec<_> = seqs.iter().map(|&s| ("c".to_string(), flow(s, [10, 0, 0, 9], T0 + s * S, s))).collect();
    produce(&b.addr, "flowlog.flows", &flows);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let e = start_enricher(&b.addr, &out, &["--metrics-listen", &listen]);
    assert_eq!(wait_metric(port, "flowlog_enricher_records_in_total", 10.0), 10.0);
    assert_eq!(wait_metric(port, "flowlog_enricher_duplicates_total", 4.0), 4.0);
    assert_eq!(wait_metric(port, "flowlog_enricher_sequence_gaps_total", 1.0), 1.0);
    assert_eq!(wait_metric(port, "flowlog_enricher_sequence_late_total", 1.0), 1.0);
    let recs = wait_files(&out, 6, Duration::from_secs(30));
    stop(e);
    let mut written: Vec<i64> = read_files(&out).iter().map(|r| r["sequence"].as_i64().unwrap()).collect();
    assert_eq!(recs.len(), 6);
    written.sort();
    assert_eq!(written, (0..6).collect::<Vec<_>>());
    let _ = std::fs::remove_dir_all(&out);
}

/// A sidecar produced records 0..=11 of its epoch 7 (its last heartbeat says
/// so), records 10 and 11 never reached the topic, and it restarted (epoch
/// 8): the two are counted as gaps when its records move to epoch 8.
#[test]
fn loss_at_the_end_of_an_epoch_is_counted() {
    let Some(b) = start_broker("epoch", 1) else { return };
    let out = out_dir("epoch");
    let beat = flowlog_schema::Identity { sequence_epoch: 7, next_sequence: 12, ..fixtures::identity(&host("client-host", "frontend", &["10.0.0.1"]), T0, IdentityReason::Heartbeat) };
    produce(&b.addr, "flowlog.identity", &[("c".into(), beat.to_message())]);
    let mut flows: Vec<_> = (0..10).map(|s| ("c".to_string(), flow(s, [10, 0, 0, 9], T0 + s * S, s))).collect();
    flows.push(("c".into(), flow_message(&Flow { sequence_epoch: 8, ..flow_record(0, [10, 0, 0, 9], T0 + 20 * S, 1) })));
    produce(&b.addr, "flowlog.flows", &flows);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let e = start_enricher(&b.addr, &out, &["--metrics-listen", &listen]);
    assert_eq!(wait_metric(port, "flowlog_enricher_records_in_total", 11.0), 11.0);
    assert_eq!(wait_metric(port, "flowlog_enricher_sequence_gaps_total", 2.0), 2.0);
    assert_eq!(metric(port, "flowlog_enricher_sequence_late_total"), 0.0);
    stop(e);
    let _ = std::fs::remove_dir_all(&out);
}

/// A flow whose remote IP nobody has announced yet is held back; the owner's
/// heartbeat arrives a few seconds later (but says it owned the IP since
/// before the flow), and the flow is written attributed to it.
#[test]
fn late_metadata_still_attributes_held_flows() {
    let Some(b) = start_broker("late", 1) else { return };
    let out = out_dir("late");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
    produce(&b.addr, "flowlog.flows", &[("c".into(), flow(0, [10, 7, 7, 7], now - 2 * S, 500))]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let e = start_enricher(&b.addr, &out, &["--late-window-secs", "15", "--metrics-listen", &listen]);
    // Its batch is due (max age 1 s) but waits for the owner's heartbeat.
    assert_eq!(wait_metric(port, "flowlog_enricher_held_batches", 1.0), 1.0, "the unattributed flow was not held back");
    assert!(read_files(&out).is_empty(), "the unattributed flow was written before its owner was known");
    produce(&b.addr, "flowlog.identity", &[("z".into(), identity("host-z", "late-owner", &["10.7.7.7"], now - 60 * S, IdentityReason::Start))]);
    let recs = wait_files(&out, 1, Duration::from_secs(40));
    // Counted once, as written: attributed (late), never as unattributed.
    assert_eq!(wait_metric(port, r#"flowlog_enricher_attributed_total{side="remote",source="SIDECAR"}"#, 1.0), 1.0);
    assert_eq!(wait_metric(port, "flowlog_enricher_late_attributed_total", 1.0), 1.0);
    assert_eq!(wait_metric(port, r#"flowlog_enricher_unattributed_total{side="remote",reason="UNKNOWN_IP"}"#, 0.0), 0.0);
    assert_eq!(wait_metric(port, "flowlog_enricher_records_in_total", 1.0), 1.0);
    stop(e);
    assert_eq!(recs.len(), 1);
    assert_eq!(recs[0]["remote"]["workload"], "late-owner");
    assert_eq!(recs[0]["remote"]["attributed"], true);
    let _ = std::fs::remove_dir_all(&out);
}

/// EC2 as a source, against a real EC2-compatible HTTP endpoint (moto) seeded
/// through the EC2 API: an ENI's IP is released, then reassigned to another
/// workload; flows are attributed by their start time, even though they are
/// all processed after the reassignment.
#[test]
#[cfg_attr(not(feature = "ec2"), ignore = "needs the enricher's ec2 feature")]
fn ec2_ip_reuse_against_an_ec2_endpoint() {
    if !ready() {
        return;
    }
    let moto = testkit::s3::Moto::start().expect("moto");
    let url = moto.url();
    let py = testkit::tool(testkit::PYTHON);
    let ec2 = |args: &[&str]| -> String {
        let o = Command::new(&py).arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/moto_ec2.py")).arg(&url).args(args).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;

    let eni_a = ec2(&["create", "172.31.0.50", "billing"]);
    let Some(b) = start_broker("ec2", 1) else { return };
    let out = out_dir("ec2");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_flowlog-enricher"));
    cmd.args(["--brokers", &b.addr, "--output", out.to_str().unwrap(), "--batch-max-age-secs", "1", "--metrics-listen", &listen])
        .args(["--ec2-regions", "us-east-1", "--ec2-endpoint-url", &url, "--ec2-refresh-secs", "1", "--late-window-secs", "0"])
        .env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_EC2_METADATA_DISABLED", "true");
    let e = cmd.spawn().unwrap();
    // Each step waits until a sweep of the EC2 source has seen it.
    let interfaces = "flowlog_enricher_ec2_interfaces";
    assert_eq!(wait_metric(port, interfaces, 1.0), 1.0, "first EC2 sweep");
    let t1 = now();
    ec2(&["delete", &eni_a]);
    assert_eq!(wait_metric(port, interfaces, 0.0), 0.0, "the release seen");
    let t2 = now();
    let eni_b = ec2(&["create", "172.31.0.50", "search"]);
    assert_eq!(wait_metric(port, interfaces, 1.0), 1.0, "the new interface seen");
    let t3 = now();
    produce(&b.addr, "flowlog.flows", &[
        ("c".into(), flow(0, [172, 31, 0, 50], t1, 1)),
        ("c".into(), flow(1, [172, 31, 0, 50], t2, 2)),
        ("c".into(), flow(2, [172, 31, 0, 50], t3, 3)),
    ]);
    let recs = wait_files(&out, 3, Duration::from_secs(40));
    stop(e);
    assert_eq!(recs.len(), 3, "{recs:#?}");
    let remote = |s: i64| recs.iter().find(|r| r["sequence"] == s).unwrap()["remote"].clone();
    let a = remote(0);
    assert_eq!(a["workload"], "billing");
    assert_eq!(a["source"], "EC2");
    assert_eq!(a["team"], "billing-team");
    assert_eq!(a["region"], "us-east-1");
    assert_eq!(a["labels"]["eni_id"], eni_a.as_str());
    assert_eq!(a["eni_id"], eni_a.as_str());
    assert!(a["subnet_id"].as_str().unwrap().starts_with("subnet-"));
    assert!((a["confidence"].as_f64().unwrap() - 0.9).abs() < 1e-6);
    assert!(a["labels"]["vpc_id"].as_str().unwrap().starts_with("vpc-"));
    assert!(a["account"].as_str().is_some_and(|s| !s.is_empty()), "{a}");
    assert_eq!(remote(1)["attributed"], false);
    assert_eq!(remote(1)["reason"], "NO_OWNER_AT_TIME");
    let c = remote(2);
    assert_eq!(c["workload"], "search");
    assert_eq!(c["labels"]["eni_id"], eni_b.as_str());
    let _ = std::fs::remove_dir_all(&out);
}

/// The broker is not there when the enricher starts (a node reboot, the
/// broker rolling): it waits for it, counting the failed reads of the
/// identity topic, instead of exiting; once the broker is up it enriches.
#[test]
fn a_broker_that_is_not_up_yet_is_waited_for() {
    if !ready() {
        return;
    }
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let out = out_dir("no-broker-yet");
    let mport = free_port();
    let listen = format!("127.0.0.1:{mport}");
    let mut e = start_enricher(&brokers, &out, &["--metrics-listen", &listen]);
    wait_until("a failed read of the identity topic", Duration::from_secs(60), || {
        metric(mport, r#"flowlog_enricher_source_errors_total{source="sidecar"}"#) >= 1.0
    });
    assert!(e.try_wait().unwrap().is_none(), "the enricher exited while the broker was away");
    let topics = ["flowlog.flows", "flowlog.identity", "flowlog.dlq", "flowlog.enriched"];
    let _b = testkit::Broker::start_on(port, &testkit::BrokerSpec { name: "late-broker", topics: &topics, partitions: 1, memory: false })
        .expect("start the broker");
    let flows: Vec<_> = (0..5).map(|s| ("c".to_string(), flow(s, [10, 0, 0, 9], T0 + s * S, s))).collect();
    produce(&brokers, "flowlog.flows", &flows);
    let recs = wait_files(&out, 5, Duration::from_secs(90));
    stop(e);
    assert_eq!(recs.len(), 5);
    let _ = std::fs::remove_dir_all(&out);
}
