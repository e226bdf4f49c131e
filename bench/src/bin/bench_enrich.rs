//! `bench-enrich`: the enricher's hot path in process, on one core:
//! decode -> attribute (identity history + static map) -> Avro container
//! encode (codec null and zstandard) or Parquet encode, beside the same work
//! done through apache-avro's generic `Value` path, measured in one run;
//! bytes per flow of each file format; memory per 1 M tracked IPs; and
//! DuckDB's time for the top-talkers query over Parquet files of
//! `--duckdb-flows` flows. Writes bench/results/enrich.json.
use std::{collections::HashMap, net::Ipv4Addr, ops::Range, process::Command, time::Instant};

use apache_avro::{
    types::{Record, Value},
    Schema, Writer,
};
use clap::Parser;
use flowlog_common::tcp_state;
use flowlog_enricher::{
    attribute::Attributor,
    decode,
    sink::parquet::{self, ParquetOptions},
    sources::{cidr::CidrMap, heartbeats::Heartbeats, identity::IdentityStore},
};
use flowlog_runtime::{process::Usage, testkit};
use flowlog_schema::{
    container::{Codec, ContainerWriter},
    fixtures, EnrichedFlow, Flow, IdentityReason, StatePath, ENRICHED_FLOW, FLOW,
};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 200_000)]
    flows: usize,
    #[arg(long, default_value = "bench/results/enrich.json")]
    out: std::path::PathBuf,
    /// Only the fast path, several rounds (for profiling); writes no report.
    #[arg(long)]
    profile: bool,
    /// With --profile: the Parquet path instead of the Avro one.
    #[arg(long, requires = "profile")]
    parquet: bool,
    /// zstd level of the Parquet files (default: the encoder's).
    #[arg(long, default_value_t = ParquetOptions::default().zstd_level)]
    parquet_zstd_level: i32,
    /// Records per Parquet file (the encoder sorts and writes one file at a time).
    #[arg(long, default_value_t = 500_000)]
    file_rows: usize,
    /// Flows written as Parquet files for the DuckDB top-talkers query (0: skip it).
    #[arg(long, default_value_t = 10_000_000)]
    duckdb_flows: usize,
    /// Keep the DuckDB query's Parquet files (their folder is printed).
    #[arg(long)]
    keep_files: bool,
}

/// The top-talkers query: bytes by workload pair.
const TOP_TALKERS: &str = "SELECT local.workload, remote.workload, sum(bytes_sent + bytes_received) AS bytes \
    FROM read_parquet(?, hive_partitioning = true) GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT 10";

/// Runs a query over Parquet files three times in DuckDB (the test venv's
/// Python); prints its seconds per run and rows as JSON.
const DUCKDB_TIMER: &str = r#"
import duckdb, json, sys, time
con = duckdb.connect()
times = []
for _ in range(3):
    t = time.perf_counter()
    rows = con.execute(sys.argv[1], [sys.argv[2]]).fetchall()
    times.append(time.perf_counter() - t)
print(json.dumps({"seconds": times, "rows": rows, "threads": con.execute("SELECT current_setting('threads')").fetchone()[0]}))
"#;

/// CPU time of this thread: "per core" figures do not depend on what else
/// the machine runs (wall time on a busy 2-core VM would).
fn thread_cpu() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime only writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Counts what the container writer writes.
struct Counter(u64);

impl std::io::Write for Counter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn rss_bytes() -> u64 {
    Usage::own().map_or(0, |u| u.rss_bytes)
}

fn ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(0x0a00_0000u32 + i as u32)
}

/// Flow messages `range` from 100 hosts to 100 000 remote IPs.
fn messages(range: Range<usize>) -> Vec<Vec<u8>> {
    range
        .map(|i| {
            let h = i % 100;
            let host = fixtures::host_with(&format!("host-{h}"), &format!("wl-{h}"), &[&ip(200_000 + h).to_string()]);
            let mut state_path = StatePath::default();
            state_path.push(tcp_state::CLOSE);
            state_path.push(tcp_state::SYN_SENT);
            let f = Flow {
                sequence_epoch: 1,
                sequence: i as i64,
                connection_id: i as i64,
                local_addr: ip(200_000 + h).into(),
                local_port: 40_000 + (i % 20_000) as u16,
                remote_addr: ip((i * 7919) % 150_000).into(),
                start_time_ns: Some(1_000_000_000_000 + i as i64),
                end_time_ns: 1_000_001_000_000 + i as i64,
                bytes_sent: 1000 + i as i64,
                bytes_received: 5000,
                segs_in: 10,
                segs_out: 12,
                srtt_us: 250,
                rtt_min_us: 100,
                state_path,
                pid: 4242,
                tid: 4242,
                comm: "nginx".into(),
                cgroup_id: 77,
                netns_ino: 4026531840,
                ..fixtures::flow()
            };
            fixtures::flow_message(&host, &f)
        })
        .collect()
}

fn identity_store(ips: usize, hosts: usize) -> IdentityStore {
    let (mut s, mut heartbeats) = (IdentityStore::default(), Heartbeats::default());
    let per = ips.div_ceil(hosts);
    for h in 0..hosts {
        let ips: Vec<String> = (h * per..((h + 1) * per).min(ips)).map(|i| ip(i).to_string()).collect();
        let mut host = fixtures::host_with(&format!("owner-{h}"), &format!("svc-{h}"), &[]);
        host.hostname.clear();
        host.ips = ips;
        for e in heartbeats.events(&fixtures::identity(&host, 1, IdentityReason::Start)) {
            s.apply(e);
        }
    }
    s
}

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    let Value::Record(f) = v else { panic!() };
    &f.iter().find(|(n, _)| n == name).unwrap().1
}

/// The same work through apache-avro's generic Value path.
fn generic(
    msgs: &[Vec<u8>],
    flow: &Schema,
    enriched: &Schema,
    store: &IdentityStore,
    cidr: &CidrMap,
) -> usize {
    let Schema::Record(es) = enriched else {
        panic!()
    };
    let attr_schema = &es.fields.iter().find(|f| f.name == "local").unwrap().schema;
    let mut w = Writer::new(enriched, Vec::new());
    for m in msgs {
        let v = apache_avro::from_avro_datum(flow, &mut &m[10..], None).unwrap();
        let mut r = Record::new(enriched).unwrap();
        let s = |name: &str| match field(&v, name) {
            Value::Enum(_, s) => Value::String(s.clone()),
            other => other.clone(),
        };
        let Value::Bytes(remote) = field(&v, "remote_addr") else {
            panic!()
        };
        let Value::Bytes(local) = field(&v, "local_addr") else {
            panic!()
        };
        let remote_ip = std::net::IpAddr::from(<[u8; 4]>::try_from(remote.as_slice()).unwrap());
        let local_ip = std::net::IpAddr::from(<[u8; 4]>::try_from(local.as_slice()).unwrap());
        let Value::Union(_, st) = field(&v, "start_time_ns") else {
            panic!()
        };
        let Value::Long(t) = **st else { panic!() };
        let host = field(&v, "host");
        r.put("flow_id", "0000000000000000");
        r.put("host_id", field(host, "host_id").clone());
        r.put("host_workload", field(host, "workload").clone());
        for k in [
            "sequence_epoch",
            "sequence",
            "connection_id",
            "local_port",
            "remote_port",
            "start_time_ns",
            "end_time_ns",
            "bytes_sent",
            "bytes_received",
            "segs_in",
            "segs_out",
            "retransmits",
            "srtt_us",
            "rtt_min_us",
            "error",
            "pid",
            "comm",
            "cgroup_id",
            "netns_ino",
            "record_type",
            "family",
            "direction",
            "end_reason",
        ] {
            r.put(k, s(k));
        }
        r.put("local_ip", local_ip.to_string());
        r.put("remote_ip", remote_ip.to_string());
        for (side, ipa) in [("local", local_ip), ("remote", remote_ip)] {
            let mut a = Record::new(attr_schema).unwrap();
            let owner = store
                .owner_at(ipa, t)
                .ok()
                .or_else(|| cidr.lookup(ipa))
                .cloned();
            a.put("attributed", owner.is_some());
            a.put("source", if owner.is_some() { "SIDECAR" } else { "NONE" });
            a.put("reason", Value::Union(0, Box::new(Value::Null)));
            let opt = |x: Option<String>| match x {
                Some(s) => Value::Union(1, Box::new(Value::String(s))),
                None => Value::Union(0, Box::new(Value::Null)),
            };
            let o = owner.map(|o| (*o).clone()).unwrap_or_default();
            a.put("workload", opt(o.workload));
            a.put(
                "confidence",
                Value::Float(if o.host_id.is_some() { 1.0 } else { 0.0 }),
            );
            a.put("host_id", opt(o.host_id));
            a.put("labels", Value::Map(Default::default()));
            // Every other attribute is null (the union's null branch).
            for (_, v) in a.fields.iter_mut().filter(|(_, v)| *v == Value::Null) {
                *v = Value::Union(0, Box::new(Value::Null));
            }
            r.put(side, a);
        }
        w.append(r).unwrap();
    }
    w.into_inner().unwrap().len()
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let flow_schema = FLOW.parse();
    let enriched = ENRICHED_FLOW.parse();
    eprintln!("encoding {} input messages ...", a.flows);
    let msgs = messages(0..a.flows);
    let store = identity_store(100_000, 1_000);
    let cidr = CidrMap::parse(
        &(0..1000)
            .map(|i| {
                format!(
                    "[[entry]]\ncidr = \"172.{}.{}.0/24\"\nworkload = \"static-{i}\"\n",
                    16 + i / 256,
                    i % 256
                )
            })
            .collect::<String>(),
    )
    .map_err(anyhow::Error::msg)?;

    // Fast path: decode -> attribute -> Avro container, one thread, as the
    // enricher does it (one decoder, its host cache warming up in the run).
    let no_ec2 = IdentityStore::default();
    let attributor = Attributor {
        identity: &store,
        kubernetes: &no_ec2,
        ec2: &no_ec2,
        cidr: &cidr,
    };
    // One path: decode -> attribute -> `encode` (bytes out, counted);
    // returns flows with the remote side attributed and bytes written.
    let run = |encode: &mut dyn FnMut(EnrichedFlow) -> anyhow::Result<()>| -> anyhow::Result<usize> {
        let decoder = decode::Decoder::new();
        let mut attributed = 0usize;
        for m in &msgs {
            let (host, f) = decoder.flow(m)?;
            let e = attributor.enrich(host, f);
            attributed += e.remote.attributed() as usize;
            encode(e)?;
        }
        Ok(attributed)
    };
    // Blocks go to a byte counter (the file sink's write(2) and fsync are not this path).
    let avro = |codec: Codec| -> anyhow::Result<(usize, u64)> {
        let mut w = ContainerWriter::with_codec(Counter(0), codec)?;
        let attributed = run(&mut |e| Ok(w.append(&e)?))?;
        Ok((attributed, w.finish()?.0))
    };
    let opts = ParquetOptions { zstd_level: a.parquet_zstd_level, ..ParquetOptions::default() };
    let parquet_path = || -> anyhow::Result<(usize, u64)> {
        let (mut file, mut bytes) = (Vec::with_capacity(a.file_rows), 0u64);
        let mut flush = |file: &mut Vec<EnrichedFlow>| -> anyhow::Result<()> {
            bytes += parquet::encode(file, &opts)?.len() as u64;
            file.clear();
            Ok(())
        };
        let attributed = run(&mut |e| {
            file.push(e);
            if file.len() == a.file_rows {
                flush(&mut file)?;
            }
            Ok(())
        })?;
        if !file.is_empty() {
            flush(&mut file)?;
        }
        Ok((attributed, bytes))
    };
    if a.profile {
        for _ in 0..10 {
            if a.parquet {
                parquet_path()?;
            } else {
                avro(Codec::Null)?;
            }
        }
        return Ok(());
    }
    let fast = measure(a.flows, || avro(Codec::Null))?;
    let zstd = measure(a.flows, || avro(Codec::Zstandard(3)))?;
    let columnar = measure(a.flows, parquet_path)?;
    let (attributed, fast_bytes) = (fast.attributed, fast.bytes);

    let t = thread_cpu();
    let generic_bytes = generic(&msgs, &flow_schema, &enriched, &store, &cidr);
    let slow = a.flows as f64 / (thread_cpu() - t).as_secs_f64();

    // Memory per tracked IP: 1 M IPs over 10 000 hosts.
    let before = rss_bytes();
    let big = identity_store(1_000_000, 10_000);
    let per_million = rss_bytes().saturating_sub(before);
    assert_eq!(big.tracked_ips(), 1_000_000);
    drop((big, msgs));

    let duckdb = if a.duckdb_flows > 0 { duckdb_top_talkers(&a, &attributor, &opts)? } else { serde_json::Value::Null };

    let per_flow = |bytes: u64| bytes as f64 / a.flows as f64;
    let report = serde_json::json!({
        "benchmark": "enrich",
        "flows": a.flows,
        "identity_ips": 100_000, "static_cidrs": 1000,
        "remote_attributed": attributed,
        "fast_path_flows_per_sec_one_core": fast.median,
        "fast_path_rounds_flows_per_sec": fast.rounds,
        "fast_path_flows_per_sec_wall_clock": fast.wall,
        "avro_zstd_path_flows_per_sec_one_core": zstd.median,
        "avro_zstd_path_rounds_flows_per_sec": zstd.rounds,
        "parquet_path_flows_per_sec_one_core": columnar.median,
        "parquet_path_rounds_flows_per_sec": columnar.rounds,
        "parquet_file_rows": a.file_rows,
        "parquet_options": {"row_group_rows": opts.row_group_rows, "zstd_level": opts.zstd_level},
        "measured_as": "flows per second of this thread's CPU time (CLOCK_THREAD_CPUTIME_ID), median of 5 rounds",
        "generic_value_path_flows_per_sec_one_core": slow,
        "ratio_fast_over_generic": fast.median / slow,
        "output_bytes": {"fast": fast_bytes, "generic": generic_bytes, "avro_zstd": zstd.bytes, "parquet": columnar.bytes},
        "bytes_per_flow": {"avro_null": per_flow(fast_bytes), "avro_zstd": per_flow(zstd.bytes), "parquet": per_flow(columnar.bytes)},
        "duckdb_top_talkers": duckdb,
        "memory_mb_per_million_tracked_ips": per_million as f64 / 1048576.0,
        "targets": {"fast_path_flows_per_sec_one_core_min": 500000, "parquet_path_flows_per_sec_one_core_min": 400000},
    });
    println!("enrich benchmark ({} flows, one core)", a.flows);
    for (what, r, target) in [("Avro file", &fast, " (target >= 500000)"), ("Avro+zstd file", &zstd, ""), ("Parquet file", &columnar, " (target >= 400000)")] {
        println!(
            "  decode -> attribute -> {what:<15}{:>10.0} flows/s  {:>6.1} bytes/flow{target}",
            r.median,
            per_flow(r.bytes)
        );
    }
    println!(
        "  same via apache-avro Value path        {:>10.0} flows/s  (ratio {:.2})",
        slow,
        fast.median / slow
    );
    println!(
        "  remote side attributed                 {attributed} of {}",
        a.flows
    );
    println!(
        "  memory per 1 M tracked IPs             {:>10.1} MB",
        per_million as f64 / 1048576.0
    );
    if !duckdb.is_null() {
        println!(
            "  DuckDB top talkers, {} flows   {:>10.3} s (median of 3 runs, {} threads)",
            a.duckdb_flows,
            duckdb["seconds_median"].as_f64().unwrap_or(f64::NAN),
            duckdb["threads"]
        );
    }
    flowlog_bench::write_report(&a.out, &report)?;
    Ok(())
}

/// One path's figures.
struct Rate {
    /// Flows per CPU-second: median of the rounds, and each round.
    median: f64,
    rounds: Vec<f64>,
    /// Flows per wall-clock second of the last round.
    wall: f64,
    attributed: usize,
    bytes: u64,
}

/// Five rounds of `path` over `flows` flows: this VM's neighbours make
/// single rounds noisy.
fn measure(flows: usize, mut path: impl FnMut() -> anyhow::Result<(usize, u64)>) -> anyhow::Result<Rate> {
    let mut r = Rate { median: 0.0, rounds: Vec::new(), wall: 0.0, attributed: 0, bytes: 0 };
    for _ in 0..5 {
        let (t, wall) = (thread_cpu(), Instant::now());
        (r.attributed, r.bytes) = path()?;
        r.rounds.push(flows as f64 / (thread_cpu() - t).as_secs_f64());
        r.wall = flows as f64 / wall.elapsed().as_secs_f64();
    }
    r.median = flowlog_bench::median(&r.rounds).unwrap_or(0.0);
    Ok(r)
}

/// Writes `--duckdb-flows` enriched flows as Parquet files (Hive layout,
/// `--file-rows` per file) in a temporary folder and times the top-talkers
/// query in DuckDB; checks DuckDB's answer against the sums computed here.
fn duckdb_top_talkers(a: &Args, attributor: &Attributor, opts: &ParquetOptions) -> anyhow::Result<serde_json::Value> {
    let python = testkit::tool(testkit::PYTHON);
    if !Command::new(&python).args(["-c", "import duckdb"]).status().is_ok_and(|s| s.success()) {
        eprintln!("{} cannot import duckdb: no DuckDB figure (run `make setup`)", python.display());
        return Ok(serde_json::Value::Null);
    }
    let dir = std::env::temp_dir().join(format!("flowlog-bench-duckdb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (t, decoder) = (Instant::now(), decode::Decoder::new());
    let mut sums: HashMap<(Option<String>, Option<String>), i64> = HashMap::new();
    let (mut files, mut bytes) = (0, 0u64);
    for first in (0..a.duckdb_flows).step_by(a.file_rows) {
        let mut records = Vec::with_capacity(a.file_rows);
        for m in messages(first..(first + a.file_rows).min(a.duckdb_flows)) {
            let (host, f) = decoder.flow(&m)?;
            let e = attributor.enrich(host, f);
            let workload = |side: &flowlog_schema::Attribution| side.owner.as_ref().and_then(|o| o.workload.clone());
            *sums.entry((workload(&e.local), workload(&e.remote))).or_default() += e.flow.bytes_sent + e.flow.bytes_received;
            records.push(e);
        }
        let part = dir.join(format!("dt=2026-01-01/hr={:02}", files % 24));
        std::fs::create_dir_all(&part)?;
        let file = parquet::encode(&records, opts)?;
        bytes += file.len() as u64;
        std::fs::write(part.join(format!("part-{files}.parquet")), file)?;
        files += 1;
    }
    eprintln!("wrote {} flows in {files} Parquet files ({} MB) in {:.1} s", a.duckdb_flows, bytes >> 20, t.elapsed().as_secs_f64());
    let out = Command::new(&python)
        .args(["-c", DUCKDB_TIMER, TOP_TALKERS])
        .arg(format!("{}/**/*.parquet", dir.display()))
        .output()?;
    if a.keep_files {
        eprintln!("Parquet files kept in {}", dir.display());
    } else {
        std::fs::remove_dir_all(&dir)?;
    }
    anyhow::ensure!(out.status.success(), "duckdb: {}", String::from_utf8_lossy(&out.stderr));
    let mut result: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    check_top_talkers(&result["rows"], sums)?;
    let seconds: Vec<f64> = result["seconds"].as_array().into_iter().flatten().filter_map(|s| s.as_f64()).collect();
    result["seconds_median"] = flowlog_bench::median(&seconds).into();
    result["flows"] = a.duckdb_flows.into();
    result["files"] = files.into();
    result["parquet_bytes"] = bytes.into();
    result["query"] = TOP_TALKERS.into();
    Ok(result)
}

/// DuckDB's ten rows are the ten largest sums, in order.
fn check_top_talkers(rows: &serde_json::Value, sums: HashMap<(Option<String>, Option<String>), i64>) -> anyhow::Result<()> {
    let mut want: Vec<_> = sums.into_iter().collect();
    want.sort_by(|x, y| y.1.cmp(&x.1).then(x.0.cmp(&y.0)));
    let want: Vec<serde_json::Value> = want.into_iter().take(10).map(|((l, r), b)| serde_json::json!([l, r, b])).collect();
    anyhow::ensure!(rows.as_array() == Some(&want), "DuckDB's top talkers {rows} differ from {want:?}");
    Ok(())
}
