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
        _ if n % 2 == 0 => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
        _ => Some(v[n / 2]),
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
    use super::median;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[0.9, 1.0, 0.95, 1.05]), Some(0.975));
    }
}
