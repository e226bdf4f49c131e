//! Runs the real sidecar binary against the real kernel and collects the JSON
//! flow records it prints. Needs root (CAP_BPF + CAP_PERFMON); without it the
//! tests skip, unless FLOWLOG_REQUIRE_ROOT_TESTS=1 (set by `make test`), in
//! which case they fail.
#![allow(dead_code)]

pub mod broker;
pub mod workloads;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::{mpsc, Arc, Mutex},
    time::{Duration, Instant},
};

use serde_json::Value;

pub fn have_root() -> bool {
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        if std::env::var("FLOWLOG_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            panic!("FLOWLOG_REQUIRE_ROOT_TESTS=1 but the tests are not running as root");
        }
        eprintln!("skipping: needs root to load eBPF (run `make test`)");
    }
    root
}

pub struct Sidecar {
    child: Child,
    records: Arc<Mutex<Vec<Value>>>,
    stdout: Option<std::thread::JoinHandle<()>>,
    pub stats_file: std::path::PathBuf,
}

impl Sidecar {
    /// Starts the sidecar with JSON output and waits until it is attached.
    pub fn start(extra: &[&str]) -> Sidecar {
        Sidecar::start_under(&[], extra)
    }

    /// The same, run by `wrapper` (a command and its arguments that execs
    /// the sidecar's, e.g. `setpriv` dropping capabilities); none: as is.
    pub fn start_under(wrapper: &[&str], extra: &[&str]) -> Sidecar {
        Sidecar::start_with(wrapper, extra, |line| Some(serde_json::from_str(line).unwrap_or_else(|e| panic!("bad JSON {line:?}: {e}"))))
    }

    /// The same, keeping what `keep` makes of each record's JSON line (None:
    /// nothing), so that a run of a million records can keep (and parse)
    /// only what it checks.
    pub fn start_with(wrapper: &[&str], extra: &[&str], keep: impl Fn(&str) -> Option<Value> + Send + 'static) -> Sidecar {
        let stats_file = std::env::temp_dir().join(format!(
            "flowlog-test-stats-{}-{}.json",
            std::process::id(),
            rand_suffix()
        ));
        let bin = env!("CARGO_BIN_EXE_flowlog-sidecar");
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut c = Command::new(program);
                c.args(args).arg(bin);
                c
            }
            None => Command::new(bin),
        };
        let mut child = command
            .args(["--output", "json", "--metrics-listen", "", "--drain-interval-ms", "20", "--stats-file"])
            .arg(&stats_file)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sidecar");
        let records = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = records.clone();
        let stdout = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let line = line.expect("read sidecar stdout");
                if let Some(v) = keep(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        let (ready_tx, ready_rx) = mpsc::channel();
        let err = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[sidecar] {line}");
                if line.contains("capturing TCP flows") {
                    let _ = ready_tx.send(());
                }
            }
        });
        if ready_rx.recv_timeout(Duration::from_secs(30)).is_err() {
            let _ = child.kill();
            panic!("sidecar did not attach within 30 s");
        }
        Sidecar { child, records, stdout: Some(stdout), stats_file }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `pred` holds over the records seen so far.
    pub fn wait_for(&self, what: &str, timeout: Duration, pred: impl Fn(&[Value]) -> bool) {
        let t0 = Instant::now();
        loop {
            if pred(&self.records.lock().unwrap()) {
                return;
            }
            if t0.elapsed() > timeout {
                panic!("timed out after {timeout:?} waiting for {what}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `f` of the records seen so far.
    pub fn records<T>(&self, f: impl FnOnce(&[Value]) -> T) -> T {
        f(&self.records.lock().unwrap())
    }

    /// SIGTERM, wait for a clean exit, return every record and the final stats.
    pub fn stop(mut self) -> (Vec<Value>, Value) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().expect("wait sidecar");
        assert!(status.success(), "sidecar exited with {status}");
        self.stdout.take().unwrap().join().unwrap();
        let stats: Value = serde_json::from_slice(&std::fs::read(&self.stats_file).expect("stats file")).unwrap();
        let _ = std::fs::remove_file(&self.stats_file);
        let records = std::mem::take(&mut *self.records.lock().unwrap());
        (records, stats)
    }
}

impl Sidecar {
    /// SIGKILL, as the OOM killer or a crash would: nothing is flushed.
    /// Returns once the process is gone.
    pub fn kill9(mut self) {
        self.child.kill().expect("SIGKILL the sidecar");
        let _ = self.child.wait();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.child.kill();
    }
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64
}

/// Records whose local/remote ports are exactly these.
pub fn by_ports(records: &[Value], local: u16, remote: u16) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["local_port"] == local && r["remote_port"] == remote)
        .cloned()
        .collect()
}

/// How many records of each side [`short_connections`] may have.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PerSide {
    /// One per connection: none lost, none twice.
    Exactly,
    /// At most one per connection (some may be lost, none twice).
    AtMost,
}

/// Checks the records of [`short_connections`] to `server_port` from
/// `clients`: per client port, one record per side per connection that used
/// it (`per_side`), each with its exact bytes (the client sent 10 and
/// received 20). A client port can come round again within a burst (the
/// server closes first, so the client's side leaves no TIME_WAIT to keep
/// it). Returns how many connections reused a port.
pub fn check_short_records(records: &[Value], server_port: u16, clients: &[u16], per_side: PerSide, what: &str) -> usize {
    let mut uses = std::collections::BTreeMap::<u16, usize>::new();
    for &cp in clients {
        *uses.entry(cp).or_default() += 1;
    }
    for (&cp, &k) in &uses {
        let (c, s) = (by_ports(records, cp, server_port), by_ports(records, server_port, cp));
        match per_side {
            PerSide::Exactly => assert_eq!((c.len(), s.len()), (k, k), "{what}: port {cp}, used by {k} connection(s)"),
            PerSide::AtMost => assert!(c.len() <= k && s.len() <= k, "{what}: port {cp}: {} client and {} server records for {k} connection(s)", c.len(), s.len()),
        }
        for r in &c {
            assert_eq!((r["bytes_sent"].as_u64(), r["bytes_received"].as_u64()), (Some(10), Some(20)), "{what}: {r}");
        }
        for r in &s {
            assert_eq!((r["bytes_sent"].as_u64(), r["bytes_received"].as_u64()), (Some(20), Some(10)), "{what}: {r}");
        }
    }
    clients.len() - uses.len()
}

pub fn gettid() -> u32 {
    // SAFETY: plain syscall.
    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
}

/// Inode of a namespace or file.
pub fn inode(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("stat {path}: {e}")).ino()
}

/// Where the cgroup v2 tree is mounted (`/sys/fs/cgroup`, or
/// `/sys/fs/cgroup/unified` on the hybrid layout), from /proc/self/mountinfo.
pub fn cgroup2_mount() -> std::path::PathBuf {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| l.split_once(" - ").filter(|(_, fs)| fs.starts_with("cgroup2 ")).map(|(pre, _)| pre))
        .map(|pre| pre.split(' ').collect::<Vec<_>>())
        .find(|f| f.get(3) == Some(&"/"))
        .map(|f| f[4].into())
        .expect("a cgroup v2 mount")
}

/// cgroup v2 id of this process: the inode of its cgroup directory.
pub fn own_cgroup_id() -> u64 {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let path = text.lines().find_map(|l| l.strip_prefix("0::")).expect("cgroup v2 entry");
    inode(&format!("{}{path}", cgroup2_mount().display()))
}

/// Raises RLIMIT_NOFILE to its hard limit (the 2 000-connection test needs
/// ~4 000 descriptors).
pub fn raise_nofile() {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: valid struct pointers.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut r);
        r.rlim_cur = r.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &r);
    }
}

/// Reads the Prometheus endpoint.
pub fn scrape(addr: &str) -> String {
    flowlog_runtime::testkit::scrape(addr).expect("metrics endpoint")
}

/// Opens `n` short connections to a local server; returns (server port, client ports).
pub fn short_connections(n: usize) -> (u16, Vec<u16>) {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let sp = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        for _ in 0..n {
            let (mut s, _) = l.accept().unwrap();
            let mut b = [0u8; 10];
            s.read_exact(&mut b).unwrap();
            s.write_all(&[9u8; 20]).unwrap();
        }
    });
    let mut ports = Vec::new();
    for _ in 0..n {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", sp)).unwrap();
        ports.push(c.local_addr().unwrap().port());
        c.write_all(&[1u8; 10]).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).unwrap();
        assert_eq!(got.len(), 20);
    }
    server.join().unwrap();
    (sp, ports)
}
