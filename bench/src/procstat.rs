//! CPU time and peak RSS of a process, from /proc.

/// (user, system) CPU seconds of `pid`.
pub fn cpu_seconds(pid: u32) -> std::io::Result<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised comm; utime and stime are fields 14/15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: plain sysconf call.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0) / hz;
    // rest starts at field 3 (state), so utime (14) is index 11, stime index 12.
    Ok((get(11), get(12)))
}

/// Peak resident set size of `pid` in bytes (VmHWM).
pub fn peak_rss_bytes(pid: u32) -> std::io::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024)
}

/// Nanoseconds `pid` has run on a CPU, user and system together
/// (/proc/PID/schedstat: exact, where /proc/PID/stat counts 10 ms ticks).
pub fn run_ns(pid: u32) -> std::io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/schedstat"))?;
    s.split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("/proc/{pid}/schedstat: {s:?}")))
}
