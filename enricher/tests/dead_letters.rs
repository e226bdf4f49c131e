//! Dead letters against the real broker: each one is in the dead-letter
//! topic before the offsets that cover it are committed; one too large for
//! the producer goes as a reference; one that cannot be delivered holds its
//! batch back (no commit) and is sent again until it is delivered.

mod common;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use common::*;
use flowlog_runtime::testkit;
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::{Headers, Message},
    producer::{BaseProducer, BaseRecord, Producer},
    ClientConfig, TopicPartitionList,
};

/// One message of a topic: its headers and payload size.
#[derive(Debug)]
struct Got {
    headers: BTreeMap<String, String>,
    payload: usize,
}

/// Every message of partition 0 of `topic` (as many as its watermarks say).
fn read_topic(brokers: &str, topic: &str) -> Vec<Got> {
    let c: BaseConsumer = ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", "dlq-reader").create().unwrap();
    let (low, high) = c.fetch_watermarks(topic, 0, Duration::from_secs(10)).unwrap();
    let n = (high - low) as usize;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    c.assign(&tpl).unwrap();
    let mut got = Vec::new();
    let t0 = Instant::now();
    while got.len() < n && t0.elapsed() < Duration::from_secs(30) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            let headers = m.headers().map_or_else(BTreeMap::new, |h| {
                h.iter().map(|h| (h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned())).collect()
            });
            got.push(Got { headers, payload: m.payload().map_or(0, <[u8]>::len) });
        }
    }
    got
}

/// Produces `msgs` with room for messages up to 4 MB.
fn produce_large(brokers: &str, topic: &str, msgs: &[Vec<u8>]) {
    let p: BaseProducer = ClientConfig::new().set("bootstrap.servers", brokers).set("message.max.bytes", "4000000").create().unwrap();
    for v in msgs {
        p.send(BaseRecord::to(topic).key("c").payload(v.as_slice())).unwrap();
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// A broker, an output folder and an enricher settings file holding `toml`.
fn setup(name: &str, toml: &str) -> Option<(testkit::Broker, std::path::PathBuf, std::path::PathBuf)> {
    let b = start_broker(name, 1)?;
    let out = out_dir(name);
    let cfg = out.with_extension("toml");
    std::fs::write(&cfg, toml).unwrap();
    Some((b, out, cfg))
}

/// A 1.5 MB garbage message (the producer's limit is 1 MB): before, the
/// refused send stopped the process (and every restart again); now it goes
/// to the dead-letter topic as a reference (origin, reason, size; no
/// payload), counted, and the good records around it are written.
#[test]
fn an_oversized_dead_letter_is_sent_as_a_reference() {
    let Some(b) = start_broker("dlq-large", 1) else { return };
    let out = out_dir("dlq-large");
    produce_large(&b.addr, "flowlog.flows", &[flow(0, [10, 9, 9, 9], T0, 100), vec![0x55; 1_500_000], flow(1, [10, 9, 9, 9], T0, 101)]);
    let port = testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut e = start_enricher(&b.addr, &out, &["--metrics-listen", &listen]);
    let recs = wait_files(&out, 2, Duration::from_secs(60));
    let running = e.try_wait().unwrap();
    assert!(running.is_none(), "the enricher stopped: {running:?}");
    assert_eq!(recs.len(), 2, "{recs:#?}");
    let dlq = read_topic(&b.addr, "flowlog.dlq");
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    let h = &dlq[0].headers;
    assert_eq!(dlq[0].payload, 0, "a reference carries no payload");
    assert_eq!(h["flowlog.dlq.source"], "flowlog.flows/0/1");
    assert_eq!(h["flowlog.dlq.reason"], "not Avro single-object encoded");
    assert_eq!(h["flowlog.dlq.omitted_bytes"], "1500000");
    assert_eq!(wait_metric(port, "flowlog_enricher_dlq_omitted_total", 1.0), 1.0);
    assert_eq!(wait_metric(port, r#"flowlog_enricher_dlq_total{reason="schema"}"#, 1.0), 1.0);
    stop(e);
    let _ = std::fs::remove_dir_all(&out);
}

/// The dead-letter topic does not exist: the dead letter is never
/// acknowledged, so the batch that covers it is neither written nor
/// committed; the roll is tried again (with backoff) and the letter sent
/// again each time, the process staying up. Once the topic exists, the
/// letter is delivered and the batch written: nothing lost, nothing twice.
#[test]
fn an_undeliverable_dead_letter_is_not_committed() {
    // Unknown topics fail after 1 s instead of 30.
    let toml = "dlq_topic = \"flowlog.nodlq\"\n[kafka_properties]\n\"topic.metadata.propagation.max.ms\" = \"1000\"\n";
    let Some((b, out, cfg)) = setup("dlq-missing", toml) else { return };
    produce(&b.addr, "flowlog.flows", &[
        ("c".into(), flow(0, [10, 9, 9, 9], T0, 100)),
        ("c".into(), b"garbage, not avro".to_vec()),
        ("c".into(), flow(1, [10, 9, 9, 9], T0, 101)),
    ]);
    let port = testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut e = start_enricher(&b.addr, &out, &["--config", cfg.to_str().unwrap(), "--metrics-listen", &listen]);
    let failures = r#"flowlog_enricher_roll_failures_total{stage="write"}"#;
    wait_until("the roll tried again", Duration::from_secs(60), || metric(port, failures) >= 2.0);
    assert!(e.try_wait().unwrap().is_none(), "the enricher stopped");
    assert_eq!(read_files(&out).len(), 0, "nothing written past an undelivered dead letter");
    assert_eq!(metric(port, r#"flowlog_enricher_dlq_total{reason="schema"}"#), 0.0, "not counted before delivered");

    let created = std::process::Command::new(testkit::tool(testkit::TANSU))
        .args(["topic", "create", "--broker", &format!("tcp://{}", b.addr), "--partitions", "1", "flowlog.nodlq"])
        .output()
        .unwrap();
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let recs = wait_files(&out, 2, Duration::from_secs(90));
    assert_eq!(wait_metric(port, r#"flowlog_enricher_dlq_total{reason="schema"}"#, 1.0), 1.0);
    stop(e);
    let mut seqs: Vec<i64> = recs.iter().map(|r| r["sequence"].as_i64().unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, [0, 1]);
    let dlq = read_topic(&b.addr, "flowlog.nodlq");
    assert_eq!(dlq.len(), 1, "once: {dlq:?}");
    assert_eq!(dlq[0].headers["flowlog.dlq.source"], "flowlog.flows/0/1");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&cfg);
}

/// A flood of bad input with room for one record in the producer's queue:
/// each dead letter waits for room (backing off) instead of stopping the
/// process; all of them arrive, once, and are counted once delivered.
#[test]
fn a_flood_of_dead_letters_waits_for_room() {
    let Some((b, out, cfg)) = setup("dlq-flood", "[kafka_properties]\n\"queue.buffering.max.messages\" = \"1\"\n") else { return };
    let mut msgs: Vec<(String, Vec<u8>)> = (0..300).map(|i| ("c".to_string(), format!("garbage {i}").into_bytes())).collect();
    msgs.push(("c".into(), flow(0, [10, 9, 9, 9], T0, 100)));
    produce(&b.addr, "flowlog.flows", &msgs);
    let port = testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut e = start_enricher(&b.addr, &out, &["--config", cfg.to_str().unwrap(), "--metrics-listen", &listen]);
    let recs = wait_files(&out, 1, Duration::from_secs(60));
    assert_eq!(recs.len(), 1);
    assert_eq!(wait_metric(port, r#"flowlog_enricher_dlq_total{reason="schema"}"#, 300.0), 300.0);
    assert!(e.try_wait().unwrap().is_none(), "still running");
    stop(e);
    let dlq = read_topic(&b.addr, "flowlog.dlq");
    assert_eq!(dlq.len(), 300);
    assert!(dlq.iter().enumerate().all(|(i, m)| m.headers["flowlog.dlq.source"] == format!("flowlog.flows/0/{i}")));
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&cfg);
}
