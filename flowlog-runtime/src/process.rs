//! A process's CPU time and memory, from /proc, and the two gauges each
//! binary exports about itself.

use procfs::process::Process;

/// CPU time and memory of one process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Usage {
    /// CPU seconds in user mode, all threads.
    pub user_seconds: f64,
    /// CPU seconds in the kernel on the process's behalf, all threads.
    pub system_seconds: f64,
    /// Resident memory now.
    pub rss_bytes: u64,
    /// Peak resident memory (VmHWM); 0 where the kernel does not report it.
    pub peak_rss_bytes: u64,
}

impl Usage {
    /// Of the process `pid`.
    pub fn of(pid: u32) -> procfs::ProcResult<Usage> {
        let pid = i32::try_from(pid).map_err(|_| procfs::ProcError::NotFound(None))?;
        Usage::read(&Process::new(pid)?)
    }

    /// Of this process.
    pub fn own() -> procfs::ProcResult<Usage> {
        Usage::read(&Process::myself()?)
    }

    fn read(p: &Process) -> procfs::ProcResult<Usage> {
        let stat = p.stat()?;
        let hz = procfs::ticks_per_second() as f64;
        Ok(Usage {
            user_seconds: stat.utime as f64 / hz,
            system_seconds: stat.stime as f64 / hz,
            rss_bytes: stat.rss * procfs::page_size(),
            peak_rss_bytes: p.status()?.vmhwm.unwrap_or(0) * 1024,
        })
    }
}

/// `{prefix}_process_cpu_seconds_total`: user+system CPU seconds.
pub fn cpu_seconds_name(prefix: &str) -> String {
    format!("{prefix}_process_cpu_seconds_total")
}

/// `{prefix}_process_resident_memory_bytes`: resident memory.
pub fn resident_memory_name(prefix: &str) -> String {
    format!("{prefix}_process_resident_memory_bytes")
}

/// HELP text of the two process gauges; `who` names the binary.
pub fn describe(prefix: &str, who: &str) {
    metrics::describe_gauge!(
        cpu_seconds_name(prefix),
        metrics::Unit::Seconds,
        format!("{who} user+system CPU time.")
    );
    metrics::describe_gauge!(
        resident_memory_name(prefix),
        metrics::Unit::Bytes,
        format!("{who} resident memory.")
    );
}

/// Sets the two process gauges from this process's /proc entry. CPU time is
/// a gauge of fractional seconds because `metrics` counters are integers; it
/// only grows, so dashboards take its rate like a counter's.
pub fn record(prefix: &str) {
    if let Ok(u) = Usage::own() {
        metrics::gauge!(cpu_seconds_name(prefix)).set(u.user_seconds + u.system_seconds);
        metrics::gauge!(resident_memory_name(prefix)).set(u.rss_bytes as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Burns CPU until this process has used at least `secs` of it.
    fn spin_until(secs: f64) {
        let mut x = 0u64;
        while {
            let u = Usage::own().unwrap();
            u.user_seconds + u.system_seconds < secs
        } {
            for i in 0..100_000u64 {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
        }
    }

    #[test]
    fn own_usage_is_plausible() {
        spin_until(0.05);
        let u = Usage::own().unwrap();
        assert!(u.user_seconds + u.system_seconds >= 0.05, "{u:?}");
        // A test binary is resident in at least a megabyte and well under a
        // gigabyte; the peak is never below the current figure.
        assert!((1 << 20..1 << 30).contains(&u.rss_bytes), "{u:?}");
        assert!(u.peak_rss_bytes >= u.rss_bytes, "{u:?}");
        assert!(Usage::of(std::process::id()).unwrap().rss_bytes > 0);
    }

    #[test]
    fn touched_memory_shows_in_rss() {
        let before = Usage::own().unwrap().rss_bytes;
        let block = vec![1u8; 64 << 20];
        let after = Usage::own().unwrap().rss_bytes;
        std::hint::black_box(&block);
        assert!(after >= before + (48 << 20), "{before} -> {after}");
    }

    #[test]
    fn no_such_process_is_an_error() {
        assert!(Usage::of(u32::MAX).is_err());
    }

    #[test]
    fn gauges_carry_the_prefix() {
        spin_until(0.02);
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe("flowlog_test", "Test");
            record("flowlog_test");
        });
        let body = handle.render();
        let value = |name: &str| -> f64 {
            body.lines()
                .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {body}"))
        };
        assert!(value("flowlog_test_process_cpu_seconds_total") > 0.0);
        assert!(value("flowlog_test_process_resident_memory_bytes") >= (1 << 20) as f64);
        assert!(
            body.contains(
                "# HELP flowlog_test_process_resident_memory_bytes Test resident memory."
            ),
            "{body}"
        );
    }
}
