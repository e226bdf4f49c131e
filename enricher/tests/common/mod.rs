//! What the enricher's end-to-end tests share: a real local broker with
//! the enricher's topics, sample messages, the enricher binary, its files
//! read back by fastavro and its metrics scraped.
#![allow(dead_code)] // each test file uses some

use std::{
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use flowlog_runtime::testkit::{self, Broker, BrokerSpec};
use flowlog_schema::{fixtures, Flow, HostIdentity, IdentityReason};
use rdkafka::{
    producer::{BaseProducer, BaseRecord, Producer},
    ClientConfig,
};
use serde_json::Value as Json;

pub const S: i64 = 1_000_000_000;
/// 2026-01-01T00:00:00Z, so files land in a known dt=/hr= folder.
pub const T0: i64 = 1_767_225_600 * S;

pub fn ready() -> bool {
    testkit::have_tools(&[testkit::TANSU, testkit::PYTHON])
}

/// A broker with the enricher's four topics; `None` (the test is skipped)
/// without the tools.
pub fn start_broker(name: &str, partitions: u32) -> Option<Broker> {
    if !ready() {
        return None;
    }
    let topics = ["flowlog.flows", "flowlog.identity", "flowlog.dlq", "flowlog.enriched"];
    Broker::start(&BrokerSpec { name, topics: &topics, partitions, memory: false }).expect("start the broker").into()
}

/// A config file beside `out` giving partition 0 as a static assignment:
/// no group membership, the enricher starts at the committed offset at once.
pub fn static_partition_config(out: &std::path::Path) -> std::path::PathBuf {
    let cfg = out.with_extension("toml");
    std::fs::write(&cfg, "static_partitions = [0]\n").unwrap();
    cfg
}

/// An empty output directory for one test (what an earlier run left is removed).
pub fn out_dir(name: &str) -> std::path::PathBuf {
    let out = std::env::temp_dir().join(format!("flowlog-enr-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    out
}

pub fn host(host: &str, workload: &str, ips: &[&str]) -> HostIdentity {
    let mut h = fixtures::host_with(host, workload, ips);
    h.labels.insert("team".into(), format!("{workload}-team"));
    h
}

/// An identity heartbeat.
pub fn identity(host_id: &str, workload: &str, ips: &[&str], t: i64, reason: IdentityReason) -> Vec<u8> {
    fixtures::identity_message(&host(host_id, workload, ips), t, reason)
}

/// A flow from host "client-host" (10.0.0.1) to `remote`, starting at `start`.
pub fn flow(seq: i64, remote: [u8; 4], start: i64, bytes: i64) -> Vec<u8> {
    flow_message(&flow_record(seq, remote, start, bytes))
}

pub fn flow_message(f: &Flow) -> Vec<u8> {
    fixtures::flow_message(&host("client-host", "frontend", &["10.0.0.1"]), f)
}

pub fn flow_record(seq: i64, remote: [u8; 4], start: i64, bytes: i64) -> Flow {
    Flow {
        sequence_epoch: 7,
        sequence: seq,
        connection_id: seq * 11,
        local_port: 40_000 + seq as u16,
        remote_addr: remote.into(),
        start_time_ns: Some(start),
        end_time_ns: start + S,
        bytes_sent: bytes,
        bytes_received: bytes * 2 + 1,
        ..fixtures::flow()
    }
}

pub fn produce(brokers: &str, topic: &str, msgs: &[(String, Vec<u8>)]) {
    let p: BaseProducer = ClientConfig::new().set("bootstrap.servers", brokers).create().unwrap();
    for (k, v) in msgs {
        loop {
            match p.send(BaseRecord::to(topic).key(k.as_str()).payload(v.as_slice())) {
                Ok(()) => break,
                Err(_) => {
                    p.poll(Duration::from_millis(10));
                }
            }
        }
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

pub fn start_enricher(brokers: &str, out: &std::path::Path, extra: &[&str]) -> Child {
    enricher(brokers, out.to_str().unwrap(), extra).spawn().unwrap()
}

/// The enricher's command writing to `output` (a directory or an s3:// URL).
pub fn enricher(brokers: &str, output: &str, extra: &[&str]) -> Command {
    let metrics_off: &[&str] = if extra.contains(&"--metrics-listen") { &[] } else { &["--metrics-listen", ""] };
    let mut c = Command::new(env!("CARGO_BIN_EXE_flowlog-enricher"));
    c.args(["--brokers", brokers, "--output", output, "--batch-max-age-secs", "1"])
        .args(metrics_off)
        .args(extra)
        .stderr(Stdio::inherit());
    c
}

/// `scripts/s3_lake.py` against the S3 endpoint `url` (moto, or the fault proxy).
pub fn s3(url: &str, args: &[&str]) {
    let o = Command::new(testkit::tool(testkit::PYTHON))
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/s3_lake.py"))
        .args(args)
        .envs([("AWS_ENDPOINT_URL", url), ("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"), ("AWS_DEFAULT_REGION", "us-east-1")])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

/// How long a SIGTERM'd enricher may take to write its open batches and exit.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(60);

/// Waits for a child to exit (at most `timeout`).
pub fn wait_exit(c: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st;
        }
        if t0.elapsed() > timeout {
            // Where it is stuck, for the log (best effort: needs gdb).
            if let Ok(o) = Command::new("gdb").args(["-p", &c.id().to_string(), "-batch", "-ex", "thread apply all bt"]).output() {
                eprintln!("process {} stuck; its threads:\n{}", c.id(), String::from_utf8_lossy(&o.stdout));
            }
            let _ = c.kill();
            let _ = c.wait();
            panic!("process {} still running after {timeout:?}", c.id());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The offsets `first..=last` of each object's batch, from its name
/// (`dt=/hr=/{topic}-{partition}-{first}-{last}.{ext}`), per partition.
pub fn object_ranges(recs: &[Json]) -> std::collections::BTreeSet<(i32, i64, i64)> {
    recs.iter()
        .map(|r| {
            let f = r["_file"].as_str().unwrap();
            let name = f.rsplit('/').next().unwrap();
            let stem = name.rsplit_once('.').unwrap().0;
            let mut it = stem.rsplitn(4, '-');
            let last = it.next().unwrap().parse().unwrap();
            let first = it.next().unwrap().parse().unwrap();
            let p = it.next().unwrap().parse().unwrap();
            (p, first, last)
        })
        .collect()
}

/// Every record exactly once (sequences `0..n` of one host), and batches
/// that never overlap: each offset in one batch only.
pub fn assert_exactly_once(recs: &[Json], n: i64) {
    let mut seqs: Vec<i64> = recs.iter().map(|r| r["sequence"].as_i64().unwrap()).collect();
    seqs.sort();
    let total = seqs.len();
    seqs.dedup();
    assert_eq!(total, seqs.len(), "duplicated records");
    assert_eq!(seqs, (0..n).collect::<Vec<_>>(), "records missing");
    let ranges = object_ranges(recs);
    for w in ranges.iter().collect::<Vec<_>>().windows(2) {
        let ((p, _, last), (q, first, _)) = (w[0], w[1]);
        assert!(p != q || first > last, "overlapping batches {:?} and {:?}", w[0], w[1]);
    }
}

/// Every record in the output files, read by fastavro.
pub fn read_files(out: &std::path::Path) -> Vec<Json> {
    read_with("read_avro.py", out)
}

/// The JSON lines a reader script of tests/ prints for folder `out`.
pub fn read_with(script: &str, out: &std::path::Path) -> Vec<Json> {
    let o = Command::new(testkit::tool(testkit::PYTHON))
        .arg(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join(script))
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

/// Every row DuckDB reads from the Parquet files under `dir` (Hive
/// partitioning on), as JSON.
pub fn read_parquet(dir: &std::path::Path) -> Vec<Json> {
    read_with("read_parquet.py", dir)
}

pub fn wait_files(out: &std::path::Path, n: usize, timeout: Duration) -> Vec<Json> {
    let t0 = Instant::now();
    loop {
        let recs = read_files(out);
        if recs.len() >= n || t0.elapsed() > timeout {
            return recs;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The value of one Prometheus sample (exact name and labels), polled until
/// it equals `want` or 15 s pass.
pub fn wait_metric(port: u16, sample: &str, want: f64) -> f64 {
    let t0 = Instant::now();
    loop {
        let v = metric(port, sample);
        if v == want || t0.elapsed() > Duration::from_secs(15) {
            return v;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn stop(mut c: Child) {
    // SAFETY: our child.
    unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
    // Bounded: an enricher that does not stop fails its test, with its
    // threads' stacks, instead of holding up the whole run.
    let st = wait_exit(&mut c, STOP_TIMEOUT);
    assert!(st.success(), "enricher exited with {st}");
}


/// The wall clock, Unix ns.
pub fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64
}

/// The value of one Prometheus sample now (0 when absent or unreachable).
pub fn metric(port: u16, sample: &str) -> f64 {
    testkit::sample_at(&format!("127.0.0.1:{port}"), sample)
}

/// Polls `ok` until it holds; panics after `timeout`, naming `what`.
pub fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !ok() {
        assert!(t0.elapsed() < timeout, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}
