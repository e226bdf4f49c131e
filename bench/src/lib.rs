//! Shared pieces of the benchmarks: a loopback TCP connection-rate load
//! generator, starting the sidecar, reading the flow topic back, the median
//! of rounds and writing a report. (A process's CPU time and memory, the local broker and scraping
//! metrics: `flowlog_runtime`.)

pub mod loadgen;
pub mod peer;
pub mod sidecar;

use std::path::Path;

/// The median of `values`; None if empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        // An even count: the mean of the two middle values (the upper one
        // alone would favour a figure whose target is a minimum).
        _ if n.is_multiple_of(2) => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        _ => Some(v[n / 2]),
    }
}

/// A distribution-free confidence interval for the median of `values`:
/// the order statistics [x(k), x(n+1-k)], with the largest k whose
/// coverage, 1 - 2 P(Binomial(n, 1/2) < k), is at least `confidence`
/// (min and max when even they fall short, e.g. 5 values give 93.75%).
/// Returns (low, high, coverage); None if empty. It says what a median of
/// noisy rounds can tell: here 25 rounds of the rate ratio span ~0.05.
pub fn median_interval(values: &[f64], confidence: f64) -> Option<(f64, f64, f64)> {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return None;
    }
    // P(B < k) for B ~ Binomial(n, 1/2), accumulated term by term
    // (C(n, j) / 2^n in floating point: exact enough for any n here).
    let below = |k: usize| -> f64 {
        let mut term = 0.5f64.powi(n as i32);
        let mut sum = 0.0;
        for j in 0..k {
            sum += term;
            term *= (n - j) as f64 / (j + 1) as f64;
        }
        sum
    };
    let coverage = |k: usize| 1.0 - 2.0 * below(k);
    let mut k = 1;
    while k < n.div_ceil(2) && coverage(k + 1) >= confidence {
        k += 1;
    }
    Some((v[k - 1], v[n - k], coverage(k)))
}

/// The machine's CPU time so far, from /proc/stat's first line (USER_HZ
/// ticks): what a window of a benchmark left idle, and what the hypervisor
/// gave to other guests (steal), which a rate measured on a VM moves with.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuTicks {
    total: u64,
    idle: u64,
    steal: u64,
}

impl CpuTicks {
    pub fn now() -> CpuTicks {
        std::fs::read_to_string("/proc/stat").map(|s| CpuTicks::parse(&s)).unwrap_or_default()
    }

    /// `cpu  user nice system idle iowait irq softirq steal ...`; zeros if unreadable.
    fn parse(stat: &str) -> CpuTicks {
        let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else { return CpuTicks::default() };
        let v: Vec<u64> = line.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
        if v.len() < 8 {
            return CpuTicks::default();
        }
        CpuTicks { total: v.iter().sum(), idle: v[3] + v[4], steal: v[7] }
    }

    /// Shares of the CPU time since `earlier` that were idle and stolen.
    pub fn shares_since(&self, earlier: &CpuTicks) -> (f64, f64) {
        let total = self.total.saturating_sub(earlier.total).max(1) as f64;
        (self.idle.saturating_sub(earlier.idle) as f64 / total, self.steal.saturating_sub(earlier.steal) as f64 / total)
    }
}

/// From the sidecar's final stats: state changes the kernel skipped the
/// program for (recursion misses) that may have lost a flow, i.e. less the
/// closes the destroy program reported instead. An upper bound: a skipped
/// change that was not a close loses nothing.
pub fn misses_not_recovered(stats: &serde_json::Value) -> u64 {
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    n(&stats["program_recursion_misses"]).saturating_sub(n(&stats["kernel"]["closed_at_destroy"]))
}

/// A numeric field of a /proc/PID/fdinfo/FD text (`key` with its colon).
pub fn fdinfo_field(info: &str, key: &str) -> Option<u64> {
    info.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().parse().ok())
}

/// kernel.bpf_stats_enabled, switched for a benchmark and put back as it
/// was when dropped: the kernel then times every program run (two clock
/// reads around each), which /proc/PID/fdinfo reports per program.
pub struct BpfStats {
    was: String,
}

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    pub fn new() -> BpfStats {
        BpfStats { was: std::fs::read_to_string(BPF_STATS_SYSCTL).unwrap_or_else(|_| "0".into()) }
    }

    pub fn set(&self, on: bool) -> anyhow::Result<()> {
        use anyhow::Context;
        std::fs::write(BPF_STATS_SYSCTL, if on { "1" } else { "0" }).context("setting kernel.bpf_stats_enabled")
    }
}

impl Default for BpfStats {
    fn default() -> BpfStats {
        BpfStats::new()
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS_SYSCTL, self.was.trim());
    }
}

/// Writes a benchmark's report as pretty JSON to `path` (its folder made if
/// need be) and says where.
pub fn write_report(path: &Path, report: &impl serde::Serialize) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, serde_json::to_vec_pretty(report)?)?;
    println!("  written to {}", path.display());
    Ok(())
}

/// A consumer of the flow topic (`flowlog.flows`, partition 0) from its
/// first message, polling often: what the transport benchmarks read back.
pub fn flow_topic_consumer(brokers: &str, group: &str) -> anyhow::Result<rdkafka::consumer::BaseConsumer> {
    use rdkafka::{consumer::Consumer, ClientConfig, TopicPartitionList};
    let c: rdkafka::consumer::BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset("flowlog.flows", 0, rdkafka::Offset::Beginning)?;
    c.assign(&tpl)?;
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::{median, median_interval, CpuTicks};

    #[test]
    fn cpu_ticks_shares() {
        let a = CpuTicks::parse("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3\n");
        let b = CpuTicks::parse("cpu  250 0 100 850 50 0 0 50 0 0\n");
        // 300 ticks later: 50 idle, 50 stolen.
        assert_eq!(b.shares_since(&a), (50.0 / 300.0, 50.0 / 300.0));
        assert_eq!(CpuTicks::parse("garbage").shares_since(&a), (0.0, 0.0));
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[0.9, 1.0, 0.95, 1.05]), Some(0.975));
    }

    #[test]
    fn median_interval_from_order_statistics() {
        assert_eq!(median_interval(&[], 0.95), None);
        // 5 values: even min..max covers only 1 - 2/32.
        let five = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median_interval(&five, 0.95), Some((1.0, 5.0, 1.0 - 2.0 / 32.0)));
        // 11: [x(2), x(10)] covers 1 - 2 * 12/2048 = 98.8%; [x(3), x(9)] only 93.5%.
        let eleven: Vec<f64> = (1..=11).rev().map(f64::from).collect();
        let (lo, hi, c) = median_interval(&eleven, 0.95).unwrap();
        assert_eq!((lo, hi), (2.0, 10.0));
        assert!((c - (1.0 - 2.0 * 12.0 / 2048.0)).abs() < 1e-12);
        // 25: [x(8), x(18)], 95.7% (P(B <= 7) = 0.0216; P(B <= 8) = 0.0539).
        let many: Vec<f64> = (1..=25).map(f64::from).collect();
        let (lo, hi, c) = median_interval(&many, 0.95).unwrap();
        assert_eq!((lo, hi), (8.0, 18.0));
        assert!((c - 0.95672).abs() < 1e-4, "{c}");
        // A lower confidence narrows it, down to the median itself.
        assert_eq!(median_interval(&many, 0.0).map(|(l, h, _)| (l, h)), Some((13.0, 13.0)));
    }
}
