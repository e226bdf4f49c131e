//! `bench-transport`: the sidecar end to end into a real local broker at the
//! highest connection rate the load generator reaches.
//!
//! Reports loss (records read from the kernel vs records in the topic), user
//! CPU per flow including Avro encoding and producing, peak RSS with default
//! queue bounds, and the latency from a connection's close (its end_time_ns)
//! to the record being readable from the broker (a consumer polling the topic
//! during the run; an upper bound of close -> in broker); and, before the
//! load, the sidecar's CPU at rest (all its threads, exact on-CPU time).
//! Writes bench/results/transport.json.
//!
//! `--sweep`: the same run for each producer setting of [`VARIANTS`]
//! (compression, linger), in alternating rounds, each with a broker of its
//! own; writes bench/results/transport_sweep.json (median per variant).
use std::{
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::bail;
use flowlog_schema::flow_messages;
use clap::Parser;
use flowlog_bench::{
    loadgen::{self, LoadSpec},
    sidecar,
};
use flowlog_runtime::{
    process::Usage,
    testkit::{free_port, sample_at, Broker, BrokerSpec},
};
use rdkafka::Message;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value = "target/release/flowlog-sidecar")]
    sidecar: PathBuf,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value_t = 4)]
    clients: usize,
    #[arg(long, default_value_t = 4)]
    servers: usize,
    /// Seconds the sidecar's CPU is measured at rest, connected to the
    /// broker, before the load starts.
    #[arg(long, default_value_t = 5.0)]
    idle_seconds: f64,
    /// Runs of the default settings, each with a broker of its own; the
    /// report is the median run by user CPU per flow (a single run here
    /// ranged 534-667 ns for one binary), with every run's figure.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "bench/results/transport.json")]
    out: PathBuf,
    /// Run every producer setting of the sweep instead (see the module doc).
    #[arg(long)]
    sweep: bool,
    #[arg(long, default_value_t = 3)]
    sweep_rounds: usize,
    #[arg(long, default_value = "bench/results/transport_sweep.json")]
    sweep_out: PathBuf,
}

/// Producer settings compared by `--sweep`: (kafka.compression,
/// kafka.linger_ms, kafka.records_per_message); the first is the default.
/// Linger measured little (10 / 50 / 200 ms within 4 %), so the sweep
/// compares records per message and compression.
const VARIANTS: [(&str, u32, u32); 5] = [("lz4", 50, 512), ("lz4", 50, 1), ("lz4", 50, 128), ("zstd", 50, 512), ("none", 50, 512)];

fn now_ns() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-transport needs root (it loads eBPF)");
    }
    if a.sweep {
        return sweep(&a);
    }
    let mut runs = Vec::new();
    for round in 0..a.rounds.max(1) {
        println!("round {} of {}", round + 1, a.rounds.max(1));
        runs.push(with_broker(&a, None)?);
    }
    let user = |r: &serde_json::Value| r["sidecar_user_ns_per_flow"].as_f64().unwrap_or(f64::NAN);
    let all: Vec<f64> = runs.iter().map(user).collect();
    let lost: i64 = runs.iter().map(|r| r["lost"].as_i64().unwrap_or(-1)).sum();
    runs.sort_by(|x, y| user(x).total_cmp(&user(y)));
    let mut report = runs.swap_remove(runs.len() / 2);
    report["rounds_sidecar_user_ns_per_flow"] = serde_json::json!(all);
    report["rounds_lost_total"] = serde_json::json!(lost);
    println!("median of {} runs: sidecar user ns per flow {:.0} (runs {all:.0?}), {lost} lost in all", all.len(), user(&report));
    flowlog_bench::write_report(&a.out, &report)?;
    Ok(())
}

/// One run against a broker of its own, the sidecar with `config` (a TOML
/// text) if given.
fn with_broker(a: &Args, config: Option<&str>) -> anyhow::Result<serde_json::Value> {
    let work = std::env::temp_dir().join(format!("flowlog-bench-transport-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let broker = Broker::start(&BrokerSpec {
        name: "bench-transport",
        topics: &["flowlog.flows", "flowlog.identity"],
        memory: true,
        ..BrokerSpec::default()
    })?;
    let result = run(a, &broker.addr, &work, config);
    drop(broker);
    let _ = std::fs::remove_dir_all(&work);
    result
}

/// Every variant per round, rounds alternating; the median of each figure.
fn sweep(a: &Args) -> anyhow::Result<()> {
    let mut runs: Vec<Vec<serde_json::Value>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..a.sweep_rounds {
        for (i, (compression, linger, per_message)) in VARIANTS.iter().enumerate() {
            println!("round {} of {}: compression {compression}, linger {linger} ms, {per_message} records per message", round + 1, a.sweep_rounds);
            let config = format!("[kafka]\ncompression = \"{compression}\"\nlinger_ms = {linger}\nrecords_per_message = {per_message}\n");
            runs[i].push(with_broker(a, Some(&config))?);
        }
    }
    let median = |rs: &[serde_json::Value], key: &str| {
        let v: Vec<f64> = rs.iter().map(|r| r[key].as_f64().unwrap_or(f64::NAN)).collect();
        flowlog_bench::median(&v).unwrap_or(f64::NAN)
    };
    let mut variants = Vec::new();
    println!("transport sweep ({} rounds, medians)", a.sweep_rounds);
    println!("  {:<12} {:>8} {:>12} {:>14} {:>14} {:>10} {:>6}", "compression", "linger", "per message", "user ns/flow", "cpu ns/flow", "p99 ms", "lost");
    for ((compression, linger, per_message), rs) in VARIANTS.iter().zip(&runs) {
        let lost: i64 = rs.iter().map(|r| r["lost"].as_i64().unwrap_or(-1)).sum();
        let (user, cpu, p99) = (median(rs, "sidecar_user_ns_per_flow"), median(rs, "sidecar_cpu_ns_per_flow"), median(rs, "close_to_readable_ms_p99"));
        println!("  {compression:<12} {linger:>8} {per_message:>12} {user:>14.0} {cpu:>14.0} {p99:>10.1} {lost:>6}");
        variants.push(serde_json::json!({
            "compression": compression, "linger_ms": linger, "records_per_message": per_message,
            "sidecar_user_ns_per_flow_median": user, "sidecar_cpu_ns_per_flow_median": cpu,
            "close_to_readable_ms_p99_median": p99, "lost_total": lost, "runs": rs,
        }));
    }
    let report = serde_json::json!({"benchmark": "transport_sweep", "rounds": a.sweep_rounds, "variants": variants});
    flowlog_bench::write_report(&a.sweep_out, &report)?;
    Ok(())
}

fn run(a: &Args, brokers: &str, work: &std::path::Path, config: Option<&str>) -> anyhow::Result<serde_json::Value> {
    // Consumer: counts every record and samples close -> readable latency.
    let consumed = Arc::new(AtomicU64::new(0));
    let latencies = Arc::new(Mutex::new(Vec::<f64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let consumer_thread = {
        let (consumed, latencies, stop, brokers) = (consumed.clone(), latencies.clone(), stop.clone(), brokers.to_string());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let c = flowlog_bench::flow_topic_consumer(&brokers, "bench")?;
            while !stop.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    let received = now_ns();
                    // A FlowBatch message holds several records: each counts.
                    for record in flow_messages(m.payload().unwrap_or_default())? {
                        let n = consumed.fetch_add(1, Ordering::Relaxed);
                        if n % 10 == 0 {
                            if let Ok((_, f)) = record.decode(|_| Ok(())) {
                                latencies.lock().unwrap().push((received - f.end_time_ns) as f64 / 1e6);
                            }
                        }
                    }
                }
            }
            Ok(())
        })
    };

    let metrics = format!("127.0.0.1:{}", free_port());
    let spool = work.join("spool");
    let config_file = work.join("sidecar.toml");
    std::fs::write(&config_file, config.unwrap_or(""))?;
    let sc = sidecar::start(
        &a.sidecar,
        &["--config", config_file.to_str().unwrap(), "--output", "kafka", "--kafka-brokers", brokers, "--spool-dir",
          spool.to_str().unwrap(), "--host-id", "bench", "--metrics-listen", &metrics],
    )?;
    let pid = sc.pid;
    // At rest: no connections but the broker's; the figure is the cost of
    // the sidecar's own timers and threads.
    // Measured for the default settings only (not per sweep variant).
    let idle_ms_per_s = if config.is_none() && a.idle_seconds > 0.0 {
        let idle0 = sidecar::on_cpu_ns(pid)?;
        std::thread::sleep(Duration::from_secs_f64(a.idle_seconds));
        Some((sidecar::on_cpu_ns(pid)? - idle0) as f64 / 1e6 / a.idle_seconds)
    } else {
        None
    };
    let u0 = Usage::of(pid)?;
    let load = loadgen::run(LoadSpec {
        client_threads: a.clients,
        server_threads: a.servers,
        duration: Duration::from_secs_f64(a.seconds),
        ..LoadSpec::default()
    })?;
    // Wait for the sidecar to settle: everything read has been delivered.
    let t0 = Instant::now();
    loop {
        let read = sample_at(&metrics, "flowlog_sidecar_events_read_total");
        let delivered = sample_at(&metrics, "flowlog_sidecar_flows_delivered_total");
        if (read > 0.0 && delivered >= read) || t0.elapsed() > Duration::from_secs(120) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let u1 = Usage::of(pid)?;
    let (user, sys) = (u1.user_seconds - u0.user_seconds, u1.system_seconds - u0.system_seconds);
    let rss = u1.peak_rss_bytes;
    let spooled = sample_at(&metrics, "flowlog_sidecar_spool_records");
    let stats = sc.stop()?;
    let flows = stats["user"]["events_read"].as_u64().unwrap_or(0);
    let t0 = Instant::now();
    while consumed.load(Ordering::Relaxed) < flows && t0.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    consumer_thread.join().unwrap()?;
    let in_topic = consumed.load(Ordering::Relaxed);
    let mut lat = latencies.lock().unwrap().clone();
    lat.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let kernel_drops = stats["kernel"]["ringbuf_full"].as_u64().unwrap_or(0)
        + stats["kernel"]["sock_map_full"].as_u64().unwrap_or(0)
        + flowlog_bench::misses_not_recovered(&stats);
    let report = serde_json::json!({
        "benchmark": "transport",
        "load": format!(
            "loopback, {} client / {} server threads, {} s, sidecar --output kafka with {}, tansu broker (memory engine)",
            a.clients,
            a.servers,
            a.seconds,
            config.map_or("default settings".to_string(), |c| format!("settings {:?}", c.trim()))
        ),
        "connections_per_sec": load.connections_per_sec,
        "flows_read": flows,
        "records_in_topic": in_topic,
        "lost": flows as i64 - in_topic as i64,
        "kernel_drops": kernel_drops,
        "spooled_at_end": spooled,
        "sidecar_user_ns_per_flow": user * 1e9 / flows.max(1) as f64,
        "sidecar_cpu_ns_per_flow": (user + sys) * 1e9 / flows.max(1) as f64,
        "sidecar_peak_rss_mb": rss as f64 / 1048576.0,
        "sidecar_idle_cpu_ms_per_s": idle_ms_per_s,
        "close_to_readable_ms_p50": pct(&lat, 0.5),
        "close_to_readable_ms_p99": pct(&lat, 0.99),
        "latency_samples": lat.len(),
        "targets": {"lost": 0, "sidecar_user_ns_per_flow_max": 600, "sidecar_peak_rss_mb_max": 48, "close_to_broker_ms_p99_max": 250},
    });
    println!("transport benchmark ({})", report["load"].as_str().unwrap());
    println!("  connections/s                  {:>10.0}", load.connections_per_sec);
    println!("  flows read / in topic / lost   {flows} / {in_topic} / {}  (target: 0 lost)", report["lost"]);
    println!("  sidecar user ns per flow       {:>10.0}  (target <= 600)", report["sidecar_user_ns_per_flow"].as_f64().unwrap());
    println!("  sidecar user+sys ns per flow   {:>10.0}", report["sidecar_cpu_ns_per_flow"].as_f64().unwrap());
    println!("  sidecar peak RSS MB            {:>10.1}  (target <= 48)", report["sidecar_peak_rss_mb"].as_f64().unwrap());
    if let Some(idle) = idle_ms_per_s {
        println!("  sidecar CPU at rest ms/s       {idle:>10.2}  ({:.2}% of one core)", idle / 10.0);
    }
    println!("  close -> readable p50 / p99 ms {:>7.1} / {:.1}  (target p99 <= 250)", pct(&lat, 0.5), pct(&lat, 0.99));
    Ok(report)
}
