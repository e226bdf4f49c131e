//! `bench-capture`: the capture path's cost, measured in one run.
//!
//! Alternates rounds without and with the sidecar attached (release build,
//! `--output null`) under the same loopback load, and reports:
//! - connection rate with / without the sidecar (ratio, median of rounds);
//! - kernel time per flow and per connection (kernel.bpf_stats_enabled:
//!   run_time_ns / flows);
//! - sidecar CPU per 1 000 connections/s and user CPU per flow;
//! - sidecar peak RSS; ring-buffer and map drops.
//!
//! Prints the figures and writes them to bench/results/capture.json.
use std::{path::PathBuf, time::Duration};

use anyhow::{bail, Context};
use clap::Parser;
use flowlog_bench::{
    loadgen::{self, LoadResult, LoadSpec},
    sidecar,
};
use flowlog_runtime::process::Usage;
use serde::Serialize;
use serde_json::Value;

#[derive(Parser)]
struct Args {
    /// The sidecar binary (release build).
    #[arg(long, default_value = "target/release/flowlog-sidecar")]
    sidecar: PathBuf,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 4)]
    clients: usize,
    #[arg(long, default_value_t = 4)]
    servers: usize,
    #[arg(long, default_value = "bench/results/capture.json")]
    out: PathBuf,
}

#[derive(Serialize, Default)]
struct Round {
    without: Option<LoadResult>,
    with: Option<LoadResult>,
    sidecar_user_s: f64,
    sidecar_sys_s: f64,
    sidecar_peak_rss_bytes: u64,
    flows: u64,
    prog_run_time_ns: u64,
    prog_run_count: u64,
    ringbuf_full: u64,
    sock_map_full: u64,
    decode_errors: u64,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    load: String,
    rounds: Vec<Round>,
    rate_without_per_s: f64,
    rate_with_per_s: f64,
    rate_ratio: f64,
    kernel_ns_per_flow: f64,
    kernel_ns_per_connection_both_ends: f64,
    kernel_ns_per_transition: f64,
    sidecar_user_ns_per_flow: f64,
    sidecar_cpu_percent_per_1000_conn_per_s: f64,
    sidecar_peak_rss_mb: f64,
    drops: u64,
    targets: Value,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-capture needs root (it loads eBPF and sets kernel.bpf_stats_enabled)");
    }
    if !a.sidecar.exists() {
        bail!("{} not found: build it with `cargo build --release -p flowlog-sidecar`", a.sidecar.display());
    }
    let stats_sysctl = "/proc/sys/kernel/bpf_stats_enabled";
    let old_stats = std::fs::read_to_string(stats_sysctl).unwrap_or_else(|_| "0".into());
    std::fs::write(stats_sysctl, "1").context("enabling kernel.bpf_stats_enabled")?;
    let spec = LoadSpec {
        client_threads: a.clients,
        server_threads: a.servers,
        duration: Duration::from_secs_f64(a.seconds),
        ..LoadSpec::default()
    };
    // Warm-up so both arms start from the same state.
    loadgen::run(LoadSpec { duration: Duration::from_secs(1), ..spec })?;
    let mut rounds = Vec::new();
    for i in 0..a.rounds {
        // Alternate the order (ABBA) so that drift and leftover TIME_WAIT
        // state from the previous arm do not favour either arm.
        let mut r = Round::default();
        if i % 2 == 0 {
            r.without = Some(loadgen::run(spec)?);
            std::thread::sleep(Duration::from_secs(1));
            measure_with(&a, spec, &mut r)?;
        } else {
            measure_with(&a, spec, &mut r)?;
            std::thread::sleep(Duration::from_secs(1));
            r.without = Some(loadgen::run(spec)?);
        }
        std::thread::sleep(Duration::from_secs(1));
        eprintln!(
            "round {}: without {:.0}/s, with {:.0}/s",
            i + 1,
            r.without.unwrap().connections_per_sec,
            r.with.unwrap().connections_per_sec
        );
        rounds.push(r);
    }
    let _ = std::fs::write(stats_sysctl, old_stats.trim());

    let rate_without = median(rounds.iter().map(|r| r.without.unwrap().connections_per_sec).collect());
    let rate_with = median(rounds.iter().map(|r| r.with.unwrap().connections_per_sec).collect());
    let flows: u64 = rounds.iter().map(|r| r.flows).sum();
    let conns: u64 = rounds.iter().map(|r| r.with.unwrap().connections).sum();
    let run_ns: u64 = rounds.iter().map(|r| r.prog_run_time_ns).sum();
    let run_cnt: u64 = rounds.iter().map(|r| r.prog_run_count).sum();
    let user_s: f64 = rounds.iter().map(|r| r.sidecar_user_s).sum();
    let cpu_s: f64 = rounds.iter().map(|r| r.sidecar_user_s + r.sidecar_sys_s).sum();
    let secs: f64 = rounds.iter().map(|r| r.with.unwrap().seconds).sum();
    let drops: u64 = rounds.iter().map(|r| r.ringbuf_full + r.sock_map_full + r.decode_errors).sum();
    let avg_rate = conns as f64 / secs;
    let report = Report {
        benchmark: "capture",
        load: format!(
            "loopback, {} client / {} server threads, {} B request, {} B reply, {} x {} s rounds",
            a.clients, a.servers, spec.request_bytes, spec.response_bytes, a.rounds, a.seconds
        ),
        rate_without_per_s: rate_without,
        rate_with_per_s: rate_with,
        rate_ratio: rate_with / rate_without,
        kernel_ns_per_flow: run_ns as f64 / flows.max(1) as f64,
        kernel_ns_per_connection_both_ends: run_ns as f64 / conns.max(1) as f64,
        kernel_ns_per_transition: run_ns as f64 / run_cnt.max(1) as f64,
        sidecar_user_ns_per_flow: user_s * 1e9 / flows.max(1) as f64,
        sidecar_cpu_percent_per_1000_conn_per_s: (cpu_s / secs * 100.0) / (avg_rate / 1000.0),
        sidecar_peak_rss_mb: rounds.iter().map(|r| r.sidecar_peak_rss_bytes).max().unwrap_or(0) as f64 / 1048576.0,
        drops,
        targets: serde_json::json!({
            "kernel_ns_per_flow_max": 1500,
            "sidecar_user_ns_per_flow_max": 500,
            "rate_ratio_min": 0.95,
            "drops": 0,
            "sidecar_peak_rss_mb_max": 40
        }),
        rounds,
    };
    println!("capture benchmark ({})", report.load);
    println!("  connections/s without sidecar  {:>10.0}", report.rate_without_per_s);
    println!("  connections/s with sidecar     {:>10.0}  (ratio {:.3}, target >= 0.95)", report.rate_with_per_s, report.rate_ratio);
    println!("  kernel ns per flow (one socket) {:>9.0}  (target <= 1500)", report.kernel_ns_per_flow);
    println!("  kernel ns per connection (both ends on loopback) {:.0}", report.kernel_ns_per_connection_both_ends);
    println!("  kernel ns per transition        {:>9.0}", report.kernel_ns_per_transition);
    println!("  sidecar user ns per flow        {:>9.0}  (target <= 500)", report.sidecar_user_ns_per_flow);
    println!("  sidecar CPU % per 1000 conn/s   {:>9.3}", report.sidecar_cpu_percent_per_1000_conn_per_s);
    println!("  sidecar peak RSS MB             {:>9.1}  (target <= 40)", report.sidecar_peak_rss_mb);
    println!("  drops                           {:>9}  (target 0)", report.drops);
    if let Some(dir) = a.out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&a.out, serde_json::to_vec_pretty(&report)?)?;
    println!("  written to {}", a.out.display());
    Ok(())
}

fn measure_with(a: &Args, spec: LoadSpec, r: &mut Round) -> anyhow::Result<()> {
    let sc = sidecar::start(&a.sidecar, &["--output", "null"])?;
    let pid = sc.pid;
    let u0 = Usage::of(pid)?;
    r.with = Some(loadgen::run(spec)?);
    // Let the last drain happen, then read CPU and memory before stopping.
    std::thread::sleep(Duration::from_millis(200));
    let u1 = Usage::of(pid)?;
    r.sidecar_user_s = u1.user_seconds - u0.user_seconds;
    r.sidecar_sys_s = u1.system_seconds - u0.system_seconds;
    r.sidecar_peak_rss_bytes = u1.peak_rss_bytes;
    let stats = sc.stop()?;
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    r.flows = n(&stats["user"]["events_read"]);
    r.prog_run_time_ns = n(&stats["program_run_time_ns"]);
    r.prog_run_count = n(&stats["program_run_count"]);
    r.ringbuf_full = n(&stats["kernel"]["ringbuf_full"]);
    r.sock_map_full = n(&stats["kernel"]["sock_map_full"]);
    r.decode_errors = n(&stats["user"]["decode_errors"]);
    Ok(())
}
