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
    use super::{median, CpuTicks};

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
}
