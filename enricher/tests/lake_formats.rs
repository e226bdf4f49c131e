//! The data lake's file formats read by engines this project did not write:
//! DuckDB reads the Parquet files (Hive partitioning on) and fastavro the
//! Avro files, codec `null` and `zstandard`, and all three give the same
//! rows for the same records.

mod common;

use std::process::Command;

use flowlog_enricher::sink::parquet::{self, ParquetOptions};
use flowlog_runtime::testkit;
use flowlog_schema::{
    container::{Codec, ContainerWriter},
    fixtures,
};
use serde_json::Value as Json;

/// True when the test venv imports `modules`. When one is missing the test
/// skips, unless FLOWLOG_REQUIRE_ROOT_TESTS=1 (`make test`): then it fails.
fn python_with(modules: &[&str]) -> bool {
    let python = testkit::tool(testkit::PYTHON);
    let ok = Command::new(&python).arg("-c").arg(format!("import {}", modules.join(", "))).status().is_ok_and(|s| s.success());
    if !ok && std::env::var("FLOWLOG_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!("{} cannot import {modules:?} (run `make setup`)", python.display());
    }
    if !ok {
        eprintln!("skipped: {} cannot import {modules:?}", python.display());
    }
    ok
}

/// fastavro's rows with the Hive folder names as columns, as DuckDB gives them.
fn with_partitions(mut rows: Vec<Json>) -> Vec<Json> {
    for r in &mut rows {
        let file = r.as_object_mut().unwrap().remove("_file").unwrap();
        for part in file.as_str().unwrap().split('/') {
            if let Some((k, v)) = part.split_once('=') {
                r[k] = Json::from(v);
            }
        }
    }
    rows
}

fn by_sequence(mut rows: Vec<Json>) -> Vec<Json> {
    rows.sort_by_key(|r| r["sequence"].as_i64().unwrap());
    rows
}

#[test]
fn duckdb_and_fastavro_read_the_same_rows() {
    if !python_with(&["duckdb", "fastavro", "zstandard"]) {
        return;
    }
    let out = common::out_dir("lake-formats");
    let records = fixtures::enriched_flows(1000);
    let (first, second) = records.split_at(600);
    for (hour, part) in [("hr=00", first), ("hr=01", second)] {
        let dir = |format: &str| {
            let d = out.join(format).join("dt=2026-01-01").join(hour);
            std::fs::create_dir_all(&d).unwrap();
            d
        };
        std::fs::write(dir("parquet").join("part-0.parquet"), parquet::encode(part, &ParquetOptions::default()).unwrap()).unwrap();
        for (format, codec) in [("avro", Codec::Null), ("avro-zstd", Codec::Zstandard(3))] {
            let file = std::fs::File::create(dir(format).join("part-0.avro")).unwrap();
            let mut w = ContainerWriter::with_codec(file, codec).unwrap();
            for r in part {
                w.append(r).unwrap();
            }
            w.finish().unwrap();
        }
    }
    let duck = by_sequence(common::read_parquet(&out.join("parquet")));
    let plain = by_sequence(with_partitions(common::read_files(&out.join("avro"))));
    let zstd = by_sequence(with_partitions(common::read_files(&out.join("avro-zstd"))));
    assert_eq!(plain.len(), records.len());
    assert_eq!(plain[0].as_object().unwrap().len(), 32 + 2, "every field and dt, hr");
    assert!(plain == zstd, "fastavro reads the zstandard files differently");
    assert_eq!(duck.len(), plain.len());
    for (d, a) in duck.iter().zip(&plain) {
        assert_eq!(d, a, "DuckDB (left) and fastavro (right) differ");
    }
    std::fs::remove_dir_all(&out).unwrap();
}
