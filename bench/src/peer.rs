//! Running a tool beside the load and reading its output as a log shipper
//! would: the sidecar in printing mode, and a peer, bpftrace running the
//! tcplife-style script `bench/peers/tcplife.bt` on the same tracepoint
//! (bench-capture compares the two on the same load, in the same round).

use std::{
    io::{BufRead, BufReader, Read},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{bail, Context};

use crate::fdinfo_field;

/// Reads a process's standard output to its end in a thread, counting lines.
pub struct Lines {
    count: Arc<AtomicU64>,
    reader: JoinHandle<std::io::Result<()>>,
}

impl Lines {
    pub fn read(out: impl Read + Send + 'static) -> Lines {
        let count = Arc::new(AtomicU64::new(0));
        let n = count.clone();
        let reader = std::thread::spawn(move || {
            let mut out = BufReader::with_capacity(256 * 1024, out);
            loop {
                let buf = out.fill_buf()?;
                if buf.is_empty() {
                    return Ok(());
                }
                let len = buf.len();
                n.fetch_add(buf.iter().filter(|&&b| b == b'\n').count() as u64, Ordering::Relaxed);
                out.consume(len);
            }
        });
        Lines { count, reader }
    }

    /// Lines read so far.
    pub fn so_far(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Every line, once the process has closed its output.
    pub fn finish(self) -> anyhow::Result<u64> {
        self.reader.join().map_err(|_| anyhow::anyhow!("the line reader panicked"))??;
        Ok(self.count.load(Ordering::Relaxed))
    }
}

/// The bpftrace that runs the peer script: the version line, or None where
/// bpftrace is not installed.
pub fn bpftrace_version() -> Option<String> {
    let out = Command::new("bpftrace").arg("--version").output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// bpftrace running a script, attached (its BEGIN probe, which runs once
/// every probe is attached, has printed its line).
pub struct Bpftrace {
    child: Child,
    pub pid: u32,
    lines: Option<Lines>,
}

impl Bpftrace {
    pub fn start(script: &Path) -> anyhow::Result<Bpftrace> {
        let mut child = Command::new("bpftrace")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting bpftrace")?;
        let pid = child.id();
        let mut out = BufReader::new(child.stdout.take().context("bpftrace's stdout")?);
        let mut peer = Bpftrace { child, pid, lines: None };
        // "Attaching N probes...", then the BEGIN probe's line.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut line = String::new();
        while line.trim() != "attached" {
            line.clear();
            if out.read_line(&mut line)? == 0 || Instant::now() > deadline {
                bail!("bpftrace {} exited or did not attach (last line {line:?})", script.display());
            }
        }
        peer.lines = Some(Lines::read(out));
        Ok(peer)
    }

    /// Lines it has printed so far.
    pub fn lines_so_far(&self) -> u64 {
        self.lines.as_ref().map_or(0, Lines::so_far)
    }

    /// Run time and runs of its tracepoint programs (kernel.bpf_stats_enabled=1).
    pub fn program_stats(&self) -> (u64, u64) {
        program_stats(self.pid, |info| fdinfo_field(info, "prog_type:") == Some(5)) // BPF_PROG_TYPE_TRACEPOINT
    }

    /// Stops it (SIGINT, as at a terminal) and returns the lines it printed.
    pub fn stop(mut self) -> anyhow::Result<u64> {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.pid as i32, libc::SIGINT) };
        // bpftrace notices the signal only when its wait for events returns,
        // and once the load is over none comes (a round hung there): one
        // loopback connection, an event for its program, wakes it; again
        // until it has exited.
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            if Instant::now() > deadline {
                bail!("bpftrace did not exit within 60 s of SIGINT");
            }
            wake_tracepoint()?;
            std::thread::sleep(Duration::from_millis(100));
        };
        let lines = self.lines.take().context("bpftrace's output")?.finish()?;
        if !status.success() {
            bail!("bpftrace exited with {status}");
        }
        Ok(lines)
    }
}

/// One loopback connection: a state change for every tracepoint program.
fn wake_tracepoint() -> std::io::Result<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let _client = std::net::TcpStream::connect(listener.local_addr()?)?;
    let _server = listener.accept()?;
    Ok(())
}

impl Drop for Bpftrace {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Sum of run_time_ns and run_cnt over the BPF programs `pid` holds fds of
/// that `keep` selects, from /proc/PID/fdinfo; each program once, however
/// many fds name it.
pub fn program_stats(pid: u32, keep: impl Fn(&str) -> bool) -> (u64, u64) {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else { return (0, 0) };
    let mut seen = std::collections::BTreeMap::new();
    for fd in fds.filter_map(Result::ok) {
        let info = std::fs::read_to_string(fd.path()).unwrap_or_default();
        if let (true, Some(id), Some(t), Some(c)) =
            (keep(&info), fdinfo_field(&info, "prog_id:"), fdinfo_field(&info, "run_time_ns:"), fdinfo_field(&info, "run_cnt:"))
        {
            seen.insert(id, (t, c));
        }
    }
    seen.values().fold((0, 0), |(ns, runs), (t, c)| (ns + t, runs + c))
}
