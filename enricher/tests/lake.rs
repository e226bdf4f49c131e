//! The lake's exactly-once promise under faults, against a real broker, a
//! real file system and moto's S3 server, with the objects read back by
//! fastavro: the enricher killed (SIGKILL) at every step of a roll and
//! restarted with other batch sizes; two enrichers writing the same
//! partition at once (a zombie); the same on S3.

mod common;

use std::{os::unix::process::ExitStatusExt as _, time::Duration};

use common::*;
use flowlog_runtime::testkit::s3::{Moto, S3FaultProxy};

/// `n` flows of one host, ending over about three hours (so that a batch
/// spans several `dt=/hr=` objects).
fn flows(from: i64, to: i64) -> Vec<(String, Vec<u8>)> {
    (from..to).map(|i| ("c".to_string(), flow(i, [10, 0, 0, 9], T0 + i * 20 * S, i))).collect()
}

/// Runs the enricher until the failpoint kills it; asserts it was killed there.
fn run_until_killed(brokers: &str, output: &str, step: &str, extra: &[&str], env: &[(&str, &str)]) {
    let mut c = enricher(brokers, output, extra);
    c.env("FLOWLOG_ENRICHER_FAILPOINT", format!("{step}:2"));
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().unwrap();
    let st = wait_exit(&mut child, Duration::from_secs(90));
    assert_eq!(st.signal(), Some(libc::SIGKILL), "not killed at {step}: {st}");
}

/// Killed at each step of a roll (claim made, each object, before and after
/// the commit), each time restarted with another batch size: every record
/// is in the output exactly once and no two batches overlap, in the Avro
/// objects (fastavro) and in the Parquet ones (DuckDB), which hold the same
/// records.
#[test]
fn killed_at_every_step_of_a_roll_loses_and_duplicates_nothing() {
    let Some(b) = start_broker("steps", 1) else { return };
    let out = out_dir("steps");
    let dir = out.to_str().unwrap();
    produce(&b.addr, "flowlog.flows", &flows(0, 900));
    // A static assignment: each enricher starts at the committed offset at
    // once. In a group, each would first wait for the one killed before it
    // to time out of the group, and under load the local broker once left
    // one unassigned for over 90 s; what rejoining a group after a kill
    // does is tested in enrich.rs.
    let cfg = static_partition_config(&out);
    let formats = ["--config", cfg.to_str().unwrap(), "--output-formats", "avro,parquet"];
    for (i, step) in ["claim", "object", "commit", "committed", "object"].iter().enumerate() {
        let size = (40 + 17 * i).to_string();
        run_until_killed(&b.addr, dir, step, &[&formats[..], &["--batch-max-records", &size]].concat(), &[]);
    }
    let e = start_enricher(&b.addr, &out, &[&formats[..], &["--batch-max-records", "64"]].concat());
    let recs = wait_files(&out, 900, Duration::from_secs(60));
    stop(e);
    assert_eq!(recs.len(), 900);
    let avro = read_files(&out);
    assert_exactly_once(&avro, 900);
    let mut parquet: Vec<(i64, i64)> = read_parquet(&out).iter().map(|r| (r["sequence"].as_i64().unwrap(), r["bytes_sent"].as_i64().unwrap())).collect();
    parquet.sort();
    assert_eq!(parquet, (0..900).map(|i| (i, i)).collect::<Vec<_>>(), "Parquet objects: each record once");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&cfg);
}

/// Two enrichers read the same partition at once (a static assignment
/// each: what a paused instance does after its session expired and it
/// wakes up), with different batch sizes. The claims make them write the
/// same batches: every record once, no overlapping objects, and the
/// metric says boundaries were adopted.
#[test]
fn two_enrichers_writing_one_partition_write_each_record_once() {
    let Some(b) = start_broker("zombie", 1) else { return };
    let out = out_dir("zombie");
    let cfg = static_partition_config(&out);
    let (pa, pb) = (flowlog_runtime::testkit::free_port(), flowlog_runtime::testkit::free_port());
    let (la, lb) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let c = cfg.to_str().unwrap();
    let a = start_enricher(&b.addr, &out, &["--config", c, "--batch-max-records", "70", "--metrics-listen", &la]);
    let z = start_enricher(&b.addr, &out, &["--config", c, "--batch-max-records", "110", "--metrics-listen", &lb]);
    for k in 0..4 {
        produce(&b.addr, "flowlog.flows", &flows(k * 500, (k + 1) * 500));
    }
    let recs = wait_files(&out, 2000, Duration::from_secs(90));
    assert!(recs.len() >= 2000, "only {} records", recs.len());
    let adopted = |port| metric(port, "flowlog_enricher_batch_boundaries_adopted_total");
    wait_until("both enrichers at the end", Duration::from_secs(30), || {
        metric(pa, "flowlog_enricher_records_in_total") >= 2000.0 && metric(pb, "flowlog_enricher_records_in_total") >= 2000.0
    });
    let total_adopted = adopted(pa) + adopted(pb);
    stop(a);
    stop(z);
    assert_exactly_once(&read_files(&out), 2000);
    assert!(total_adopted > 0.0, "the two never met on a batch");
    let _ = std::fs::remove_dir_all(&out);
    let _ = std::fs::remove_file(&cfg);
}

/// An S3 output on moto (through the fault proxy when `proxied`), with
/// the enricher's S3 settings and credentials.
struct S3Lake {
    moto: Moto,
    proxy: Option<S3FaultProxy>,
    local: std::path::PathBuf,
}

impl S3Lake {
    fn start(name: &str, proxied: bool) -> S3Lake {
        let moto = Moto::start().expect("moto");
        s3(&moto.url(), &["create-bucket", "flows"]);
        let proxy = proxied.then(|| S3FaultProxy::start(&moto.url()).expect("the fault proxy"));
        S3Lake { moto, proxy, local: out_dir(name) }
    }

    fn endpoint(&self) -> String {
        self.proxy.as_ref().map_or_else(|| self.moto.url(), |p| p.url())
    }

    /// The enricher writing to s3://flows/lake/v1.
    fn enricher(&self, brokers: &str, extra: &[&str]) -> std::process::Command {
        let endpoint = self.endpoint();
        let args: Vec<&str> = ["--s3-endpoint-url", endpoint.as_str(), "--s3-region", "us-east-1"].into_iter().chain(extra.iter().copied()).collect();
        let mut c = enricher(brokers, "s3://flows/lake/v1", &args);
        c.envs([("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")]);
        c
    }

    /// Every record in the bucket (copied down, read by fastavro).
    fn records(&self) -> Vec<serde_json::Value> {
        let _ = std::fs::remove_dir_all(&self.local);
        s3(&self.moto.url(), &["sync", "s3://flows/lake/v1", self.local.to_str().unwrap()]);
        read_files(&self.local)
    }
}

impl Drop for S3Lake {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.local);
    }
}

/// The same on S3 (moto): killed while writing an object and after a
/// commit, restarted; every record once in the bucket.
#[test]
fn s3_output_killed_and_restarted_writes_each_record_once() {
    let Some(b) = start_broker("s3", 1) else { return };
    let lake = S3Lake::start("s3-kill", false);
    produce(&b.addr, "flowlog.flows", &flows(0, 600));
    // A static assignment, as in the test above.
    let cfg = static_partition_config(&lake.local);
    let cfg = cfg.to_str().unwrap();
    for (step, size) in [("object", "50"), ("committed", "80")] {
        let mut c = lake.enricher(&b.addr, &["--config", cfg, "--batch-max-records", size]);
        c.env("FLOWLOG_ENRICHER_FAILPOINT", format!("{step}:2"));
        let st = wait_exit(&mut c.spawn().unwrap(), Duration::from_secs(90));
        assert_eq!(st.signal(), Some(libc::SIGKILL), "not killed at {step}: {st}");
    }
    let e = lake.enricher(&b.addr, &["--config", cfg]).spawn().unwrap();
    wait_until("600 records in the bucket", Duration::from_secs(60), || lake.records().len() >= 600);
    stop(e);
    let recs = lake.records();
    assert_exactly_once(&recs, 600);
    assert!(recs.iter().all(|r| r["_file"].as_str().unwrap().starts_with("dt=")));
    let _ = std::fs::remove_file(cfg);
}

/// The S3 endpoint throttles (503 SlowDown), fails a write after doing it
/// (the client sees a reset), then goes away entirely for a while: the
/// enricher retries with backoff, pauses the partition, stays up, and once
/// the endpoint is back every record is in the bucket exactly once.
#[test]
fn s3_throttling_and_outage_lose_and_duplicate_nothing() {
    let Some(b) = start_broker("s3-faults", 1) else { return };
    let lake = S3Lake::start("s3-faults", true);
    let proxy = lake.proxy.as_ref().unwrap();
    let cfg = lake.local.with_extension("toml");
    // Short client retries, so that the enricher's own retry (pause,
    // backoff, the same batch again) is what rides out the outage.
    std::fs::write(&cfg, "[s3]\nretry_timeout_secs = 2\nrequest_timeout_secs = 5\n").unwrap();
    let port = flowlog_runtime::testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    proxy.fault(&serde_json::json!([
        {"method": "PUT", "path": "/lake/v1/dt", "status": 503, "count": 4},
        {"method": "PUT", "path": "/lake/v1/dt", "action": "reset", "after": true, "count": 2},
        {"method": "PUT", "path": "/lake/v1/dt", "delay_ms": 8000, "count": 1},
    ])).unwrap();
    let e = lake.enricher(&b.addr, &["--config", cfg.to_str().unwrap(), "--batch-max-records", "60", "--metrics-listen", &listen]).spawn().unwrap();
    produce(&b.addr, "flowlog.flows", &flows(0, 300));
    wait_until("300 records in the bucket", Duration::from_secs(60), || lake.records().len() >= 300);
    assert_eq!(proxy.injected("error 503"), 4);
    assert_eq!(proxy.injected("reset"), 2);
    assert_eq!(proxy.injected("delay"), 1, "a write that timed out (request_timeout_secs = 5)");
    // The endpoint goes away: writes fail past the client's retries.
    let failures = || metric(port, "flowlog_enricher_roll_failures_total{stage=\"claim\"}") + metric(port, "flowlog_enricher_roll_failures_total{stage=\"write\"}");
    let before = failures();
    proxy.fault(&serde_json::json!({"action": "down", "count": null})).unwrap();
    produce(&b.addr, "flowlog.flows", &flows(300, 600));
    // Three failed tries with backoff (1 + 2 + 4 s) while it is away.
    wait_until("failed rolls", Duration::from_secs(60), || failures() >= before + 3.0);
    proxy.clear().unwrap();
    wait_until("600 records in the bucket", Duration::from_secs(90), || lake.records().len() >= 600);
    stop(e);
    assert_exactly_once(&lake.records(), 600);
    let _ = std::fs::remove_file(&cfg);
}

/// A large object goes up as an S3 multipart upload (parts of 8 MiB) and
/// reads back byte for byte; small ones in one PUT.
#[test]
fn large_objects_are_uploaded_in_parts() {
    if !ready() {
        return;
    }
    let lake = S3Lake::start("s3-multipart", true);
    let proxy = lake.proxy.as_ref().unwrap();
    let s3 = flowlog_enricher::config::S3Settings { endpoint_url: Some(proxy.url()), region: Some("us-east-1".into()), ..Default::default() };
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    let store = flowlog_enricher::sink::store::Store::open("s3://flows/big", &s3).unwrap();
    let big: Vec<u8> = (0..20 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    store.put("dt=2026-01-01/hr=00/big.avro", big.clone()).unwrap();
    store.put("small", b"tiny".to_vec()).unwrap();
    let stats = proxy.stats().unwrap();
    assert!(stats["requests"]["POST"].as_u64().unwrap_or(0) >= 2, "create and complete a multipart upload: {stats}");
    assert_eq!(store.get("dt=2026-01-01/hr=00/big.avro").unwrap().unwrap().as_ref(), &big[..]);
    assert_eq!(store.get("small").unwrap().unwrap().as_ref(), b"tiny");
    assert!(store.get("absent").unwrap().is_none());
    assert!(store.create("claim", b"1".to_vec()).unwrap());
    assert!(!store.create("claim", b"2".to_vec()).unwrap(), "conditional create: the first wins");
    assert_eq!(store.get("claim").unwrap().unwrap().as_ref(), b"1");
}
