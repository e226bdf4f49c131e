//! The lake's exactly-once promise under faults, against a real broker, a
//! real file system and moto's S3 server, with the objects read back by
//! fastavro: the enricher killed (SIGKILL) at every step of a roll and
//! restarted with other batch sizes; two enrichers writing the same
//! partition at once (a zombie); the same on S3.

mod common;

use std::{os::unix::process::ExitStatusExt as _, time::Duration};

use common::*;

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
/// is in the output exactly once and no two batches overlap.
#[test]
fn killed_at_every_step_of_a_roll_loses_and_duplicates_nothing() {
    let Some(b) = start_broker("steps", 1) else { return };
    let out = out_dir("steps");
    let dir = out.to_str().unwrap();
    produce(&b.addr, "flowlog.flows", &flows(0, 900));
    for (i, step) in ["claim", "object", "commit", "committed", "object"].iter().enumerate() {
        let size = (40 + 17 * i).to_string();
        run_until_killed(&b.addr, dir, step, &["--batch-max-records", &size], &[]);
    }
    let e = start_enricher(&b.addr, &out, &["--batch-max-records", "64"]);
    let recs = wait_files(&out, 900, Duration::from_secs(60));
    stop(e);
    assert_eq!(recs.len(), 900);
    assert_exactly_once(&read_files(&out), 900);
    let _ = std::fs::remove_dir_all(&out);
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
    let cfg = out.with_extension("toml");
    std::fs::write(&cfg, "static_partitions = [0]\n").unwrap();
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

/// The same on S3 (moto): killed while writing an object and after a
/// commit, restarted; every record once in the bucket.
#[test]
fn s3_output_killed_and_restarted_writes_each_record_once() {
    let Some(b) = start_broker("s3", 1) else { return };
    let moto = Moto::start();
    moto.s3(&["create", "flows"]);
    let output = "s3://flows/lake/v1";
    let s3 = ["--s3-endpoint-url", moto.url.as_str(), "--s3-region", "us-east-1"];
    let env = [("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test")];
    produce(&b.addr, "flowlog.flows", &flows(0, 600));
    for (step, size) in [("object", "50"), ("committed", "80")] {
        let extra: Vec<&str> = s3.iter().copied().chain(["--batch-max-records", size]).collect();
        run_until_killed(&b.addr, output, step, &extra, &env);
    }
    let mut c = enricher(&b.addr, output, &s3);
    c.envs(env);
    let e = c.spawn().unwrap();
    let local = out_dir("s3-sync");
    let sync = || {
        let _ = std::fs::remove_dir_all(&local);
        moto.s3(&["sync", "flows", "lake/v1", local.to_str().unwrap()]);
        read_files(&local)
    };
    wait_until("600 records in the bucket", Duration::from_secs(60), || sync().len() >= 600);
    stop(e);
    let recs = sync();
    assert_exactly_once(&recs, 600);
    assert!(recs.iter().all(|r| r["_file"].as_str().unwrap().starts_with("dt=")));
    let _ = std::fs::remove_dir_all(&local);
}
