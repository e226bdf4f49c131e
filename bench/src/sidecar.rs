//! Starting and stopping the real sidecar binary for a benchmark.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, ChildStdout, Command, Stdio},
};

use anyhow::{bail, Context};
use serde_json::Value;

/// A started sidecar. Dropped without [`Running::stop`] (a benchmark that
/// failed half-way), it is killed and reaped: a sidecar left running would
/// keep its programs attached under every later measurement.
pub struct Running {
    child: Child,
    pub pid: u32,
    stats_file: std::path::PathBuf,
    stopped: bool,
}

/// Starts the sidecar with `args` (plus a stats file) and waits until it is attached.
pub fn start(bin: &Path, args: &[&str]) -> anyhow::Result<Running> {
    spawn(bin, args, Stdio::null()).map(|(r, _)| r)
}

/// The same, with its standard output (the records, with `--output json`).
pub fn start_piped(bin: &Path, args: &[&str]) -> anyhow::Result<(Running, ChildStdout)> {
    let (r, out) = spawn(bin, args, Stdio::piped())?;
    Ok((r, out.context("the sidecar's stdout")?))
}

fn spawn(bin: &Path, args: &[&str], stdout: Stdio) -> anyhow::Result<(Running, Option<ChildStdout>)> {
    let stats_file = std::env::temp_dir().join(format!("flowlog-bench-{}-{}.json", std::process::id(), rand()));
    let mut child = Command::new(bin)
        .args(["--metrics-listen", ""])
        .args(args)
        .arg("--stats-file")
        .arg(&stats_file)
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("capturing TCP flows") => break,
            Some(Ok(l)) => {
                if l.contains("error") {
                    eprintln!("[sidecar] {l}");
                }
            }
            _ => bail!("sidecar exited before attaching"),
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let out = child.stdout.take();
    Ok((Running { child, pid, stats_file, stopped: false }, out))
}

fn rand() -> u32 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos()
}

impl Running {
    /// SIGTERM, wait, return the final stats JSON.
    pub fn stop(mut self) -> anyhow::Result<Value> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        self.stopped = true;
        if !status.success() {
            bail!("sidecar exited with {status}");
        }
        Ok(serde_json::from_slice(&std::fs::read(&self.stats_file)?)?)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !self.stopped {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_file(&self.stats_file);
    }
}

/// Nanoseconds all of `pid`'s threads have run on a CPU, user and system
/// together, from each thread's /proc/PID/task/TID/schedstat: exact, where
/// utime and stime count 10 ms ticks. (/proc/PID/schedstat alone is the
/// main thread's.) A thread that has exited is not counted: the sidecar's
/// threads live as long as it does.
pub fn on_cpu_ns(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may exit between the listing and the read.
        let Ok(s) = std::fs::read_to_string(&path) else { continue };
        total += s.split_whitespace().next().and_then(|v| v.parse::<u64>().ok()).with_context(|| format!("{}: {s:?}", path.display()))?;
    }
    Ok(total)
}
