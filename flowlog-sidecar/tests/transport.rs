//! The sidecar producing to a real local Kafka-protocol broker: exact record
//! contents, gap-free sequences, and no loss when the broker is away.

mod common;

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use apache_avro::types::Value;
use flowlog_schema::schemas;
use common::{broker::*, *};
use flowlog_runtime::testkit::{free_port, sample, Broker};


fn ready() -> bool {
    have_root() && have_broker()
}

/// What each test names after itself: a spool folder, a metrics address and
/// a host id; None (skip) without root or the broker.
struct Setup {
    spool: PathBuf,
    metrics_addr: String,
    host_id: String,
}

fn setup(name: &str) -> Option<Setup> {
    ready().then(|| Setup {
        spool: temp_dir(&format!("spool-{name}")),
        metrics_addr: format!("127.0.0.1:{}", free_port()),
        host_id: format!("{name}-{}", std::process::id()),
    })
}

fn temp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("flowlog-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn host(v: &Value) -> &Value {
    field(v, "host")
}

fn is_host(c: &Consumed, id: &str) -> bool {
    field(host(&c.value), "host_id") == &Value::String(id.into())
}

fn ports(v: &Value) -> (i64, i64) {
    (long(v, "local_port"), long(v, "remote_port"))
}

/// Every sequence of `epoch` from 0 to `expected - 1` exactly once.
fn assert_gap_free(records: &[&Value], epoch: i64, expected: Option<i64>) -> i64 {
    let seqs: Vec<i64> = records.iter().filter(|v| long(v, "sequence_epoch") == epoch).map(|v| long(v, "sequence")).collect();
    let set: BTreeSet<i64> = seqs.iter().copied().collect();
    assert_eq!(set.len(), seqs.len(), "duplicate sequence numbers");
    let max = set.iter().next_back().copied().unwrap_or(-1);
    assert_eq!(set, (0..=max).collect::<BTreeSet<_>>(), "gap in sequence numbers");
    if let Some(n) = expected {
        assert_eq!(max + 1, n, "records produced vs seen");
    }
    max + 1
}

/// This host's identity heartbeats, read until its STOP heartbeat is there.
fn heartbeats_to_stop(brokers: &str, host_id: &str) -> Vec<Consumed> {
    let ids = consume(brokers, IDENTITY, schemas::IDENTITY.json, Duration::from_secs(30), |r| {
        r.iter().any(|c| is_host(c, host_id) && enum_sym(&c.value, "reason") == "STOP")
    });
    ids.into_iter().filter(|c| is_host(c, host_id)).collect()
}

/// This host's flow records, read until there are as many as its STOP
/// heartbeat `stop` says it produced; asserts that they are exactly the
/// sequences 0 to that count - 1 of its epoch.
fn all_produced(brokers: &str, host_id: &str, stop: &Value) -> Vec<Consumed> {
    let epoch = long(stop, "sequence_epoch");
    let produced = long(stop, "next_sequence");
    let all = consume(brokers, FLOWS, schemas::FLOW.json, Duration::from_secs(30), |r| {
        r.iter().filter(|c| is_host(c, host_id)).count() as i64 >= produced
    });
    let all: Vec<Consumed> = all.into_iter().filter(|c| is_host(c, host_id)).collect();
    assert_gap_free(&all.iter().map(|c| &c.value).collect::<Vec<_>>(), epoch, Some(produced));
    all
}

fn kafka_args<'a>(brokers: &'a str, spool: &'a str, metrics: &'a str, host_id: &'a str) -> Vec<&'a str> {
    vec![
        "--output", "kafka", "--kafka-brokers", brokers, "--spool-dir", spool, "--metrics-listen", metrics,
        "--host-id", host_id, "--workload", "test-workload", "--shutdown-timeout-secs", "3",
    ]
}

#[test]
fn flows_reach_the_broker_exactly() {
    let Some(Setup { spool, metrics_addr, host_id }) = setup("e2e") else { return };
    let broker = Broker::start(&spec("e2e")).expect("start the broker");
    let brokers = broker.addr.clone();
    let sc = Sidecar::start(&kafka_args(&brokers, spool.to_str().unwrap(), &metrics_addr, &host_id));

    // One exchange with odd sizes both ways.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sp = l.local_addr().unwrap().port();
    let srv = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = l.accept().unwrap();
        let mut b = vec![0u8; 12_345];
        s.read_exact(&mut b).unwrap();
        s.write_all(&vec![7u8; 1_000_003]).unwrap();
    });
    let cp = {
        use std::io::{Read, Write};
        let mut c = std::net::TcpStream::connect(("127.0.0.1", sp)).unwrap();
        c.write_all(&vec![1u8; 12_345]).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 1_000_003);
        c.local_addr().unwrap().port()
    };
    srv.join().unwrap();
    let (sp, cp) = (sp as i64, cp as i64);
    let mine = |r: &[Consumed]| r.iter().filter(|c| is_host(c, &host_id) && (ports(&c.value) == (cp, sp) || ports(&c.value) == (sp, cp))).count();
    let got = consume(&brokers, FLOWS, schemas::FLOW.json, Duration::from_secs(30), |r| mine(r) >= 2);
    assert_eq!(mine(&got), 2, "both sides of the connection in the topic");

    let body = scrape(&metrics_addr);
    assert!(sample(&body, "flowlog_sidecar_flows_delivered_total") >= 2.0, "{body}");
    assert_eq!(sample(&body, "flowlog_sidecar_broker_up"), 1.0);
    assert!(body.contains("flowlog_sidecar_delivery_latency_seconds_bucket"));
    assert!(body.contains("flowlog_sidecar_process_resident_memory_bytes"));
    assert!(body.contains("flowlog_sidecar_bpf_runs_total"), "{body}");

    let (_, stats) = sc.stop();
    assert_eq!(stats["kernel"]["ringbuf_full"], 0);

    // The STOP heartbeat says how many records this run produced; all of them
    // are in the topic, each sequence exactly once.
    let ids = heartbeats_to_stop(&brokers, &host_id);
    let reasons: Vec<String> = ids.iter().map(|c| enum_sym(&c.value, "reason")).collect();
    assert_eq!(reasons.first().map(String::as_str), Some("START"));
    assert_eq!(reasons.last().map(String::as_str), Some("STOP"));
    let all = all_produced(&brokers, &host_id, &ids.last().unwrap().value);

    // Exact record contents, message key and fingerprint header.
    let fp_hex = schemas::FLOW.fingerprint_hex();
    let both: Vec<&Consumed> = all.iter().filter(|c| is_host(c, &host_id) && (ports(&c.value) == (cp, sp) || ports(&c.value) == (sp, cp))).collect();
    assert_eq!(both.len(), 2);
    for c in both {
        let v = &c.value;
        assert_eq!(c.key, host_id);
        assert_eq!(c.fingerprint_header, fp_hex);
        assert_eq!(field(host(v), "workload"), &Value::Union(1, Box::new(Value::String("test-workload".into()))));
        assert_eq!(enum_sym(v, "record_type"), "FINAL");
        assert_eq!(enum_sym(v, "family"), "IPV4");
        assert_eq!(field(v, "local_addr"), &Value::Bytes(vec![127, 0, 0, 1]));
        assert_eq!(field(v, "remote_addr"), &Value::Bytes(vec![127, 0, 0, 1]));
        assert_eq!(enum_sym(v, "end_reason"), "NORMAL");
        assert_eq!(long(v, "pid"), std::process::id() as i64);
        if ports(v) == (cp, sp) {
            assert_eq!(enum_sym(v, "direction"), "CLIENT");
            assert_eq!((long(v, "bytes_sent"), long(v, "bytes_received")), (12_345, 1_000_003));
        } else {
            assert_eq!(enum_sym(v, "direction"), "SERVER");
            assert_eq!((long(v, "bytes_sent"), long(v, "bytes_received")), (1_000_003, 12_345));
        }
    }
}

/// The broker is not there when flows happen; they wait (memory, then the
/// spool) and all arrive, in sequence order, once it starts.
#[test]
fn broker_outage_loses_nothing() {
    let Some(Setup { spool, metrics_addr, host_id }) = setup("outage") else { return };
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let cfg = spool.join("sidecar.toml");
    // Short delivery timeout so records move to the spool within the test.
    std::fs::write(&cfg, "[kafka]\nmessage_timeout_ms = 2000\n").unwrap();
    let mut args = kafka_args(&brokers, spool.to_str().unwrap(), &metrics_addr, &host_id);
    args.extend(["--config", cfg.to_str().unwrap()]);
    let sc = Sidecar::start(&args);
    let (sp, cps) = short_connections(50);
    // Wait until the records are on disk.
    let t0 = std::time::Instant::now();
    while sample(&scrape(&metrics_addr), "flowlog_sidecar_spool_records") < 100.0 {
        assert!(t0.elapsed() < Duration::from_secs(30), "records never reached the spool: {}", scrape(&metrics_addr));
        std::thread::sleep(Duration::from_millis(200));
    }
    let body = scrape(&metrics_addr);
    assert_eq!(sample(&body, "flowlog_sidecar_broker_up"), 0.0);

    let _broker = Broker::start_on(port, &spec("outage")).expect("start the broker");
    let t0 = std::time::Instant::now();
    while sample(&scrape(&metrics_addr), "flowlog_sidecar_spool_records") > 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(60), "spool never drained: {}", scrape(&metrics_addr));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, stats) = sc.stop();
    assert_eq!(stats["kernel"]["ringbuf_full"], 0);

    let ids = heartbeats_to_stop(&brokers, &host_id);
    let all = all_produced(&brokers, &host_id, &ids.last().expect("STOP heartbeat").value);
    let values: Vec<&Value> = all.iter().map(|c| &c.value).collect();
    // Spooled records were replayed in order: the topic holds them by sequence.
    let seqs: Vec<i64> = values.iter().map(|v| long(v, "sequence")).collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(seqs, sorted, "replayed out of order");
    for cp in cps {
        let n = values.iter().filter(|v| ports(v) == (cp as i64, sp as i64) || ports(v) == (sp as i64, cp as i64)).count();
        assert_eq!(n, 2, "connection from port {cp}");
    }
}

/// SIGTERM while the broker is down spools what is pending; the next run
/// replays it.
#[test]
fn spool_survives_restart() {
    let Some(Setup { spool, metrics_addr: m1, host_id }) = setup("restart") else { return };
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let sc = Sidecar::start(&kafka_args(&brokers, spool.to_str().unwrap(), &m1, &host_id));
    let (sp, cps) = short_connections(20);
    std::thread::sleep(Duration::from_millis(300));
    sc.stop();
    let on_disk: u64 = std::fs::read_dir(&spool).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("seg-")).map(|e| e.metadata().unwrap().len()).sum();
    assert!(on_disk > 0, "nothing spooled at shutdown");

    let _broker = Broker::start_on(port, &spec("restart")).expect("start the broker");
    let m2 = format!("127.0.0.1:{}", free_port());
    let sc = Sidecar::start(&kafka_args(&brokers, spool.to_str().unwrap(), &m2, &host_id));
    let want = |r: &[Consumed]| {
        cps.iter().all(|cp| {
            r.iter().filter(|c| is_host(c, &host_id)).filter(|c| ports(&c.value) == (*cp as i64, sp as i64) || ports(&c.value) == (sp as i64, *cp as i64)).count() >= 2
        })
    };
    let all = consume(&brokers, FLOWS, schemas::FLOW.json, Duration::from_secs(60), want);
    sc.stop();
    assert!(want(&all), "replayed records missing");
    // The first run's records keep their own epoch and have no gaps.
    let values: Vec<&Value> = all.iter().filter(|c| is_host(c, &host_id)).map(|c| &c.value).collect();
    let first_epoch = values.iter().map(|v| long(v, "sequence_epoch")).min().unwrap();
    let n = assert_gap_free(&values, first_epoch, None);
    assert!(n >= 40, "first run produced {n} records");
}
