//! Two sidecar builds' kernel time, compared in one run: both attached at
//! once to the same load, so each program runs on every transition of the
//! same connections at the same moment, and their ratio does not move with
//! the machine's speed (runs one after the other vary by ~8% here from one
//! minute to the next, more than most changes to the program are worth).
//!
//! The program that runs first on a transition pays the cache misses on the
//! socket both read (~15-20% of its time here), so the rounds alternate
//! which build attaches first and the figure is the geometric mean of the
//! rounds' ratios, where that cancels: a build against a copy of itself
//! read 1.001 here, and repeated runs of one pair agree within ~0.02.
//!
//! Prints each round and B/A; writes `bench/results/ab.json`. Not part of
//! `make bench` (it compares two builds); `make bench-ab A=... B=...`.

use std::{path::PathBuf, time::Duration};

use anyhow::bail;
use clap::Parser;
use flowlog_bench::{
    loadgen::{self, LoadSpec},
    peer::program_stats,
    sidecar, BpfStats,
};
use serde::Serialize;

#[derive(Parser)]
struct Args {
    /// The build compared against (e.g. a copy of main's release binary).
    #[arg(long)]
    a: PathBuf,
    /// The build under test.
    #[arg(long)]
    b: PathBuf,
    /// An even number: half the rounds attach A first, half B.
    #[arg(long, default_value_t = 6)]
    rounds: usize,
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    #[arg(long, default_value = "null")]
    output: String,
    #[arg(long, default_value = "bench/results/ab.json")]
    out: PathBuf,
}

#[derive(Serialize)]
struct Round {
    first: &'static str,
    connections: u64,
    a_ns_per_run: f64,
    b_ns_per_run: f64,
    a_runs: u64,
    b_runs: u64,
    ratio: f64,
}

#[derive(Serialize)]
struct Report {
    benchmark: &'static str,
    a: String,
    b: String,
    load: String,
    rounds: Vec<Round>,
    /// Geometric mean over the rounds of B's kernel ns per program run over A's.
    ratio_b_over_a: f64,
    ratio_min_max: [f64; 2],
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if unsafe { libc::geteuid() } != 0 {
        bail!("bench-ab needs root (it loads eBPF and sets kernel.bpf_stats_enabled)");
    }
    if a.rounds == 0 || !a.rounds.is_multiple_of(2) {
        bail!("--rounds must be even and above 0, so that each build attaches first as often ({} given)", a.rounds);
    }
    for bin in [&a.a, &a.b] {
        if !bin.exists() {
            bail!("{} not found", bin.display());
        }
    }
    let spec = LoadSpec { duration: Duration::from_secs_f64(a.seconds), ..LoadSpec::default() };
    let stats = BpfStats::new();
    stats.set(true)?;
    let args = ["--output", a.output.as_str()];
    let mut rounds = Vec::new();
    for i in 0..a.rounds {
        let a_first = i % 2 == 0;
        let (first, second) = if a_first { (&a.a, &a.b) } else { (&a.b, &a.a) };
        let first = sidecar::start(first, &args)?;
        let second = sidecar::start(second, &args)?;
        let (pa, pb) = if a_first { (first.pid, second.pid) } else { (second.pid, first.pid) };
        let all = |_: &str| true;
        let (a0, b0) = (program_stats(pa, all), program_stats(pb, all));
        let load = loadgen::run(spec)?;
        let (a1, b1) = (program_stats(pa, all), program_stats(pb, all));
        first.stop()?;
        second.stop()?;
        let per_run = |t0: (u64, u64), t1: (u64, u64)| (t1.0 - t0.0) as f64 / (t1.1 - t0.1).max(1) as f64;
        let (a_ns, b_ns) = (per_run(a0, a1), per_run(b0, b1));
        // Both saw the same connections: their total times compare even
        // when one runs more programs (e.g. one more per socket destroyed).
        let (a_total, b_total) = ((a1.0 - a0.0) as f64, (b1.0 - b0.0) as f64);
        let r = Round {
            first: if a_first { "a" } else { "b" },
            connections: load.connections,
            a_ns_per_run: a_ns,
            b_ns_per_run: b_ns,
            a_runs: a1.1 - a0.1,
            b_runs: b1.1 - b0.1,
            ratio: b_total / a_total.max(1.0),
        };
        println!(
            "round {} ({} first): A {:.1} ns/run, B {:.1} ns/run, B/A (total time) {:.3}, {} connections",
            i + 1,
            r.first.to_uppercase(),
            r.a_ns_per_run,
            r.b_ns_per_run,
            r.ratio,
            r.connections
        );
        rounds.push(r);
    }
    drop(stats);
    let ratios: Vec<f64> = rounds.iter().map(|r| r.ratio).collect();
    let geo = (ratios.iter().map(|r| r.ln()).sum::<f64>() / ratios.len() as f64).exp();
    let report = Report {
        benchmark: "ab",
        a: a.a.display().to_string(),
        b: a.b.display().to_string(),
        load: format!(
            "loopback, {} client / {} server threads, {} x {} s rounds, both sidecars --output {}",
            spec.client_threads, spec.server_threads, a.rounds, a.seconds, a.output
        ),
        ratio_b_over_a: geo,
        ratio_min_max: [ratios.iter().copied().fold(f64::INFINITY, f64::min), ratios.iter().copied().fold(0.0, f64::max)],
        rounds,
    };
    println!("kernel time per program run, B / A: {geo:.3} (geometric mean of {} rounds)", report.rounds.len());
    flowlog_bench::write_report(&a.out, &report)
}
