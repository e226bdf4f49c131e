//! The sidecar producing to a real local Kafka-protocol broker: exact record
//! contents, gap-free sequences, and no loss when the broker is away.

mod common;

use std::{collections::BTreeSet, path::PathBuf, time::Duration};

use apache_avro::types::Value;
use flowlog_schema::schemas;
use common::{broker::*, workloads::Netns, *};
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

    // Exact record contents, message key, the schema's fingerprint in the
    // payload and no Kafka headers (per-message cost; the payload names its schema).
    let fp = schemas::FLOW.fingerprint();
    let both: Vec<&Consumed> = all.iter().filter(|c| is_host(c, &host_id) && (ports(&c.value) == (cp, sp) || ports(&c.value) == (sp, cp))).collect();
    assert_eq!(both.len(), 2);
    for c in both {
        let v = &c.value;
        assert_eq!(c.key, host_id);
        assert_eq!(c.fingerprint, fp);
        assert_eq!(c.headers, 0);
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
    let Some(setup) = setup("outage") else { return };
    let (port, brokers, sc) = start_before_the_broker(&setup);
    let Setup { metrics_addr, host_id, .. } = setup;
    let (sp, cps) = short_connections(50);
    // Wait until the records are on disk.
    wait_metric(&metrics_addr, "flowlog_sidecar_spool_records", Duration::from_secs(30), |v| v >= 100.0);
    let body = scrape(&metrics_addr);
    assert_eq!(sample(&body, "flowlog_sidecar_broker_up"), 0.0);

    let _broker = Broker::start_on(port, &spec("outage")).expect("start the broker");
    // Drains at the broker's pace (everything this machine does is captured
    // and spooled behind): fails only when the spool stops shrinking.
    let (mut least, mut since) = (f64::MAX, std::time::Instant::now());
    loop {
        let left = sample(&scrape(&metrics_addr), "flowlog_sidecar_spool_records");
        if left == 0.0 {
            break;
        }
        if left < least {
            (least, since) = (left, std::time::Instant::now());
        }
        assert!(since.elapsed() < Duration::from_secs(60), "spool stopped draining at {left}: {}", scrape(&metrics_addr));
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, stats) = sc.stop();
    assert_eq!(stats["kernel"]["ringbuf_full"], 0);

    let ids = heartbeats_to_stop(&brokers, &host_id);
    let all = all_produced(&brokers, &host_id, &ids.last().expect("STOP heartbeat").value);
    // Spooled records were replayed in order: the topic holds them by sequence.
    assert_in_sequence_order(&all);
    // Each drain's records went out together, as FlowBatch messages.
    assert!(all.iter().any(|c| c.in_message > 1), "no FlowBatch message");
    let values: Vec<&Value> = all.iter().map(|c| &c.value).collect();
    for cp in cps {
        let n = values.iter().filter(|v| ports(v) == (cp as i64, sp as i64) || ports(v) == (sp as i64, cp as i64)).count();
        assert_eq!(n, 2, "connection from port {cp}");
    }
}

/// Traffic that never stops, through an outage and after it: once the
/// spool is replayed the sidecar produces live again (before, every record
/// kept going to the spool behind the segment being replayed, and the spool
/// never emptied while records came faster than one replay round trip).
#[test]
fn after_an_outage_records_go_live_again() {
    let Some(setup) = setup("live-again") else { return };
    let (port, brokers, sc) = start_before_the_broker(&setup);
    let Setup { metrics_addr, host_id, .. } = setup;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut n = 0;
            // About 200 connections/s: faster than one replay round trip.
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                short_connections(5);
                n += 5;
                std::thread::sleep(Duration::from_millis(25));
            }
            n
        })
    };
    wait_metric(&metrics_addr, "flowlog_sidecar_spool_records", Duration::from_secs(30), |v| v >= 100.0);
    let _broker = Broker::start_on(port, &spec("live-again")).expect("start the broker");
    // Traffic goes on: the spool still empties, and stays empty.
    wait_metric(&metrics_addr, "flowlog_sidecar_spool_records", Duration::from_secs(90), |v| v == 0.0);
    let body = scrape(&metrics_addr);
    let (spooled, produced) = (total(&body, "flowlog_sidecar_flows_spooled_total"), sample(&body, "flowlog_sidecar_flows_produced_total"));
    wait_metric(&metrics_addr, "flowlog_sidecar_flows_produced_total", Duration::from_secs(30), |v| v >= produced + 200.0);
    let body = scrape(&metrics_addr);
    assert_eq!(total(&body, "flowlog_sidecar_flows_spooled_total"), spooled, "records still spooled with the broker up:\n{body}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let connections = traffic.join().unwrap();
    assert!(connections >= 100, "{connections}");
    let (_, stats) = sc.stop();
    assert_eq!(stats["kernel"]["ringbuf_full"], 0);
    // Every record once, in sequence order (the spool's first, then live ones).
    let ids = heartbeats_to_stop(&brokers, &host_id);
    let all = all_produced(&brokers, &host_id, &ids.last().expect("STOP heartbeat").value);
    assert_in_sequence_order(&all);
}

/// A sidecar whose broker (port, address) is not there yet, with a short
/// delivery timeout so records move to the spool within a test.
fn start_before_the_broker(s: &Setup) -> (u16, String, Sidecar) {
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let cfg = s.spool.join("sidecar.toml");
    std::fs::write(&cfg, "[kafka]\nmessage_timeout_ms = 2000\n").unwrap();
    let mut args = kafka_args(&brokers, s.spool.to_str().unwrap(), &s.metrics_addr, &s.host_id);
    args.extend(["--config", cfg.to_str().unwrap()]);
    let sc = Sidecar::start(&args);
    (port, brokers, sc)
}

/// The records are in the topic in sequence order.
fn assert_in_sequence_order(all: &[Consumed]) {
    let seqs: Vec<i64> = all.iter().map(|c| long(&c.value, "sequence")).collect();
    let mut sorted = seqs.clone();
    sorted.sort();
    assert_eq!(seqs, sorted, "out of order");
}

/// The sum of a counter over its label sets.
fn total(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && (l[name.len()..].starts_with('{') || l[name.len()..].starts_with(' ')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
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
    // Both sides of each read from the kernel before the stop.
    wait_metric(&m1, "flowlog_sidecar_events_read_total", Duration::from_secs(30), |n| n >= 40.0);
    sc.stop();
    let on_disk: u64 = std::fs::read_dir(&spool).unwrap().filter_map(|e| e.ok()).filter(|e| e.file_name().to_string_lossy().starts_with("seg-")).map(|e| e.metadata().unwrap().len()).sum();
    assert!(on_disk > 0, "nothing spooled at shutdown");

    let _broker = Broker::start_on(port, &spec("restart")).expect("start the broker");
    let m2 = format!("127.0.0.1:{}", free_port());
    // This run sends one record per message; it replays the first run's
    // FlowBatch messages as they were: both forms in one topic.
    let mut args = kafka_args(&brokers, spool.to_str().unwrap(), &m2, &host_id);
    args.extend(["--kafka-records-per-message", "1"]);
    let sc = Sidecar::start(&args);
    let (sp2, cps2) = short_connections(5);
    let want = |r: &[Consumed]| {
        cps2.iter().all(|cp| {
            r.iter().filter(|c| is_host(c, &host_id)).filter(|c| ports(&c.value) == (*cp as i64, sp2 as i64) || ports(&c.value) == (sp2 as i64, *cp as i64)).count() >= 2
        }) && cps.iter().all(|cp| {
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
    let mine: Vec<&Consumed> = all.iter().filter(|c| is_host(c, &host_id)).collect();
    let first = |c: &&&Consumed| long(&c.value, "sequence_epoch") == first_epoch;
    assert!(mine.iter().filter(first).any(|c| c.in_message > 1), "the first run spooled FlowBatch messages");
    assert!(mine.iter().filter(|c| !first(c)).all(|c| c.in_message == 1), "the second run sent plain Flow messages");
    assert!(mine.iter().any(|c| !first(&c)), "the second run sent records");
}

/// Waits until `series` on the sidecar's metrics endpoint satisfies `ok`;
/// returns its value.
fn wait_metric(addr: &str, series: &str, timeout: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let t0 = std::time::Instant::now();
    loop {
        let body = scrape(addr);
        let v = sample(&body, series);
        if ok(v) {
            return v;
        }
        assert!(t0.elapsed() < timeout, "{series} stuck at {v} after {timeout:?}:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `[1, 2, 3, 7]` as `[(1, 3), (7, 7)]`.
fn ranges(v: &[i64]) -> Vec<(i64, i64)> {
    let mut out: Vec<(i64, i64)> = Vec::new();
    for &x in v {
        match out.last_mut() {
            Some((_, hi)) if *hi + 1 == x => *hi = x,
            _ => out.push((x, x)),
        }
    }
    out
}

fn segment_files(spool: &std::path::Path) -> Vec<PathBuf> {
    std::fs::read_dir(spool)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("seg-"))
        .collect()
}

/// kill -9 of the sidecar in the middle of replaying a multi-segment
/// outage, then a restart on the same spool: every record of the first run
/// reaches the topic (those acknowledged before the kill may come twice),
/// none is lost. The segment being replayed stays on disk until the broker
/// has acknowledged all of it.
#[test]
fn kill_9_during_replay_loses_nothing() {
    let Some(Setup { spool, metrics_addr, host_id }) = setup("kill9") else { return };
    // Only this test's flows are in scope: the first run's records are
    // exactly those of its connections.
    let ns = Netns::new(format!("flowlog-k9-{}", std::process::id()));
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let cfg = spool.join("sidecar.toml");
    // Small segments, so the outage spans several; a small producer queue,
    // so replay goes in small batches and the kill lands inside a segment.
    std::fs::write(&cfg, "[kafka]\nmessage_timeout_ms = 2000\nqueue_max_messages = 100\n[spool]\nsegment_bytes = 262144\n").unwrap();
    let ns_path = ns.path();
    let args = |metrics: &str| {
        let mut a: Vec<String> = kafka_args(&brokers, spool.to_str().unwrap(), metrics, &host_id).into_iter().map(String::from).collect();
        a.extend(["--config".into(), cfg.to_str().unwrap().into(), "--scope-netns".into(), ns_path.clone()]);
        a
    };
    let a1 = args(&metrics_addr);
    let sc = Sidecar::start(&a1.iter().map(String::as_str).collect::<Vec<_>>());

    // The outage: the broker is not there; both ends of each connection spooled.
    const CONNS: usize = 3000;
    let n = 2 * CONNS as i64;
    ns.run(|| short_connections(CONNS));
    let spooled = wait_metric(&metrics_addr, "flowlog_sidecar_spool_records", Duration::from_secs(60), |v| v >= n as f64);
    assert_eq!(spooled, n as f64, "only the test's connections are in scope");
    // Handed to the spool is in its files (written after each batch; the
    // fsync is what `fsync_interval_ms` delays, and kill -9 does not need it).
    let on_disk = || segment_files(&spool).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum::<u64>() as f64;
    let spool_bytes = sample(&scrape(&metrics_addr), "flowlog_sidecar_spool_bytes");
    assert_eq!(on_disk(), spool_bytes, "spooled records still in the process's buffer");
    let segments = segment_files(&spool).len();
    assert!(segments >= 3, "the outage spans {segments} segments");

    // The broker comes back; kill -9 once the broker has acknowledged a
    // third of the records (past the first segment) but not all. Counted in
    // records (the spool holds FlowBatch messages of several).
    let _broker = Broker::start_on(port, &spec("kill9")).expect("start the broker");
    let t0 = std::time::Instant::now();
    let killed_at = loop {
        let delivered = sample(&scrape(&metrics_addr), "flowlog_sidecar_flows_delivered_total") as i64;
        if delivered >= n / 3 {
            assert!(delivered < n, "replay finished before the kill could land");
            break delivered;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "replay never started");
        std::thread::sleep(Duration::from_millis(2));
    };
    sc.kill9();
    let left_on_disk = segment_files(&spool).len();

    // The restart replays what the broker had not acknowledged.
    let m2 = format!("127.0.0.1:{}", free_port());
    let a2 = args(&m2);
    let sc = Sidecar::start(&a2.iter().map(String::as_str).collect::<Vec<_>>());
    // Done when no segment is left on disk (each is deleted once delivered).
    let t0 = std::time::Instant::now();
    while !segment_files(&spool).is_empty() {
        assert!(t0.elapsed() < Duration::from_secs(120), "spool never drained: {}", scrape(&m2));
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_metric(&m2, "flowlog_sidecar_spool_records", Duration::from_secs(10), |v| v == 0.0);
    let body = scrape(&m2);
    let replayed = sample(&body, "flowlog_sidecar_flows_replayed_total") as i64;
    sc.stop();

    // The first run's epoch: every sequence 0..n on the topic, at least once.
    let seen = std::cell::RefCell::new((0usize, BTreeSet::new()));
    let all = consume(&brokers, FLOWS, schemas::FLOW.json, Duration::from_secs(60), |r| {
        let (done, set) = &mut *seen.borrow_mut();
        set.extend(r[*done..].iter().filter(|c| is_host(c, &host_id)).map(|c| (long(&c.value, "sequence_epoch"), long(&c.value, "sequence"))));
        *done = r.len();
        set.len() as i64 >= n
    });
    let mine: Vec<&Value> = all.iter().filter(|c| is_host(c, &host_id)).map(|c| &c.value).collect();
    let epoch = mine.iter().map(|v| long(v, "sequence_epoch")).min().expect("records on the topic");
    let seqs: Vec<i64> = mine.iter().filter(|v| long(v, "sequence_epoch") == epoch).map(|v| long(v, "sequence")).collect();
    let set: BTreeSet<i64> = seqs.iter().copied().collect();
    let missing: Vec<i64> = (0..n).filter(|s| !set.contains(s)).collect();
    let lost = missing.len();
    let duplicates = seqs.len() - set.len();
    eprintln!(
        "kill -9 during replay: {n} records spooled in {segments} segments; killed with {killed_at} delivered \
         ({left_on_disk} segment files left); {replayed} replayed after the restart; {duplicates} duplicates; {lost} lost"
    );
    assert!(missing.is_empty(), "{lost} records of the first run never reached the topic: {:?}", ranges(&missing));
    assert_eq!(set, (0..n).collect::<BTreeSet<_>>());
    assert!(replayed >= n - killed_at, "the restart replayed {replayed}, fewer than the {} unacknowledged", n - killed_at);
    assert_eq!(sample(&body, "flowlog_sidecar_flows_dropped_total{reason=\"spool_corrupt\"}"), 0.0);
}

/// Records that can never be delivered (here: their topic does not exist)
/// are dropped and counted by reason, not spooled and retried for ever.
#[test]
fn undeliverable_records_are_counted_not_retried() {
    let Some(Setup { spool, metrics_addr, host_id }) = setup("undeliverable") else { return };
    let ns = Netns::new(format!("flowlog-ud-{}", std::process::id()));
    let broker = Broker::start(&spec("undeliverable")).expect("start the broker");
    let cfg = spool.join("sidecar.toml");
    // librdkafka calls a topic unknown once its metadata has said so for
    // topic.metadata.propagation.max.ms.
    std::fs::write(
        &cfg,
        "[kafka]\nflow_topic = \"flowlog.no-such-topic\"\n[kafka.properties]\n\"topic.metadata.propagation.max.ms\" = \"500\"\n",
    )
    .unwrap();
    let ns_path = ns.path();
    let mut args = kafka_args(&broker.addr, spool.to_str().unwrap(), &metrics_addr, &host_id);
    args.extend(["--config", cfg.to_str().unwrap(), "--scope-netns", &ns_path]);
    let sc = Sidecar::start(&args);
    const CONNS: usize = 20;
    let n = 2.0 * CONNS as f64;
    ns.run(|| short_connections(CONNS));
    let series = "flowlog_sidecar_flows_dropped_total{reason=\"unknown_topic\"}";
    wait_metric(&metrics_addr, series, Duration::from_secs(60), |v| v >= n);
    let body = scrape(&metrics_addr);
    assert_eq!(sample(&body, series), n, "{body}");
    assert_eq!(sample(&body, "flowlog_sidecar_spool_records"), 0.0, "{body}");
    assert_eq!(sample(&body, "flowlog_sidecar_flows_delivered_total"), 0.0, "{body}");
    sc.stop();
    // Nothing left for the next run to retry.
    let left: u64 = segment_files(&spool).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    assert_eq!(left, 0, "records left in the spool");
}

/// A second sidecar on the same spool directory (a manual run, a DaemonSet
/// rollout with `maxSurge`) exits at start with an error naming the
/// directory and the pid of the sidecar that holds it; the first goes on.
#[test]
fn a_second_sidecar_on_the_same_spool_is_refused() {
    let Some(Setup { spool, metrics_addr, host_id }) = setup("lock") else { return };
    // No broker: records go to the spool, which is what is locked.
    let first = Sidecar::start(&kafka_args("127.0.0.1:1", spool.to_str().unwrap(), &metrics_addr, &host_id));
    let lock = spool.join("sidecar.lock");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&lock).unwrap_or_default().trim() != first.pid().to_string() {
        assert!(t0.elapsed() < Duration::from_secs(30), "the first sidecar never locked {}", spool.display());
        std::thread::sleep(Duration::from_millis(20));
    }
    let m2 = format!("127.0.0.1:{}", free_port());
    let mut second = std::process::Command::new(env!("CARGO_BIN_EXE_flowlog-sidecar"))
        .args(kafka_args("127.0.0.1:1", spool.to_str().unwrap(), &m2, &host_id))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(st) = second.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = second.kill();
            panic!("the second sidecar kept running on a locked spool");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{status}: {stderr}");
    assert!(stderr.contains(&spool.display().to_string()), "{stderr}");
    assert!(stderr.contains(&format!("pid {}", first.pid())), "{stderr}");
    first.stop();
    let _ = std::fs::remove_dir_all(&spool);
}

/// A large spool left by a previous run is opened (every segment read)
/// before the program is attached: while it is read, nothing drains the
/// ring buffer, so closes during that time would overflow it. Connections
/// churn from before the start until the sidecar has captured for a while;
/// no flow is lost to a full ring. No broker: the spool stays as it is.
#[test]
fn a_large_spool_at_start_loses_no_flows() {
    if !have_root() {
        return;
    }
    let spool = temp_dir("spool-large");
    // 64 MiB of 200-byte records in 8 MiB segments (a debug build reads
    // them in seconds); frames as the spool writes them: length, CRC-32, payload.
    let payload = [7u8; 200];
    let mut segment = Vec::new();
    while segment.len() + 208 <= 8 << 20 {
        segment.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        segment.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        segment.extend_from_slice(&payload);
    }
    for i in 0..8u64 {
        std::fs::write(spool.join(format!("seg-{:016}.log", (1u64 << 40) + i)), &segment).unwrap();
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                short_connections(50);
            }
        })
    };
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let sc = Sidecar::start(&[
        "--output", "kafka", "--kafka-brokers", "127.0.0.1:1", "--spool-dir", spool.to_str().unwrap(),
        "--metrics-listen", &metrics_addr, "--host-id", "large-spool", "--shutdown-timeout-secs", "1",
        // A small ring, so that a second without drains overflows it.
        "--ring-buffer-bytes", "262144", "--wakeup-bytes", "65536",
    ]);
    wait_metric(&metrics_addr, "flowlog_sidecar_events_read_total", Duration::from_secs(30), |v| v >= 2_000.0);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    churn.join().unwrap();
    let (_, stats) = sc.stop();
    assert_eq!(stats["kernel"]["ringbuf_full"], 0, "{stats:#}");
    let _ = std::fs::remove_dir_all(&spool);
}
