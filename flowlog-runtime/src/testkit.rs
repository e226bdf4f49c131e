//! For test suites and benchmarks: the tools `make setup` installs, a real
//! local Kafka-protocol broker (tansu, through `scripts/broker.sh`, the same
//! script the demo uses), the local Kubernetes API fixture ([`kube_api`]),
//! reading a Prometheus endpoint, and many long-lived loopback connections
//! whose flow records must add up exactly ([`long_lived`]).

pub mod kube_api;
pub mod long_lived;
pub mod s3;
pub mod script_server;

use std::{
    io,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

/// The broker binary, relative to [`tools_dir`].
pub const TANSU: &str = "tansu-0.6.0/bin/tansu";
/// The Python with the test readers (fastavro, moto), relative to [`tools_dir`].
pub const PYTHON: &str = "venv-py-1/bin/python";

/// Where `make setup` installs the tools: `$FLOWLOG_TOOLS`, else
/// `~/.cache/flowlog/tools`.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("FLOWLOG_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/flowlog/tools")
        })
}

/// One installed tool, e.g. `tool(PYTHON)`.
pub fn tool(relative: &str) -> PathBuf {
    tools_dir().join(relative)
}

/// True when every tool is installed. When one is missing the test skips
/// (false), unless FLOWLOG_REQUIRE_ROOT_TESTS=1 (`make test`): then it fails.
pub fn have_tools(relative: &[&str]) -> bool {
    let missing: Vec<&str> = relative
        .iter()
        .copied()
        .filter(|t| !tool(t).exists())
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("FLOWLOG_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
        panic!(
            "missing {missing:?} in {}: run `make setup`",
            tools_dir().display()
        );
    }
    eprintln!("skipping: missing {missing:?} (run `make setup`)");
    false
}

/// A port on 127.0.0.1 that was free a moment ago, and that this process
/// has not handed out before. Whoever binds it later may still find it
/// taken by another process: [`Broker::start`] retries on another port
/// then. Without the second rule, tests of one binary running in parallel
/// collided: the kernel gives a port just released to the next bind(0), so
/// one test's broker took the port another test had named for its
/// sidecar's metrics endpoint, and that sidecar could not start.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("binding a port on 127.0.0.1");
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/broker.sh")
}

/// broker.sh's exit status when the port was taken before the broker bound it.
const PORT_TAKEN: i32 = 3;

/// What broker to start.
#[derive(Debug, Clone)]
pub struct BrokerSpec<'a> {
    /// Names its data folder (unique per test in one process).
    pub name: &'a str,
    /// Topics created before `start` returns.
    pub topics: &'a [&'a str],
    pub partitions: u32,
    /// The in-memory storage engine (faster; benchmarks) instead of sqlite.
    pub memory: bool,
}

impl Default for BrokerSpec<'_> {
    fn default() -> Self {
        BrokerSpec {
            name: "test",
            topics: &[],
            partitions: 1,
            memory: false,
        }
    }
}

/// A running broker on 127.0.0.1, stopped (and its data removed) on drop.
#[derive(Debug)]
pub struct Broker {
    pub dir: PathBuf,
    pub port: u16,
    /// `127.0.0.1:PORT`, for `bootstrap.servers`.
    pub addr: String,
}

impl Broker {
    /// Starts a broker on a free port. The port can be taken by someone else
    /// between choosing it and the broker binding it; the script notices (the
    /// listener must be the broker's own) and this retries on another port.
    pub fn start(spec: &BrokerSpec) -> io::Result<Broker> {
        let mut attempts = 0;
        loop {
            match Broker::launch(free_port(), spec) {
                Err(Taken(port)) if attempts < 5 => {
                    attempts += 1;
                    eprintln!("broker port {port} was taken; trying another");
                }
                r => return r.map_err(io::Error::from),
            }
        }
    }

    /// Starts a broker on `port`, for a test that named the port to its
    /// clients before the broker existed. Fails if the port is taken.
    pub fn start_on(port: u16, spec: &BrokerSpec) -> io::Result<Broker> {
        Broker::launch(port, spec).map_err(io::Error::from)
    }

    fn launch(port: u16, spec: &BrokerSpec) -> Result<Broker, LaunchError> {
        let dir = std::env::temp_dir().join(format!(
            "flowlog-broker-{}-{}",
            spec.name,
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let status = Command::new("bash")
            .arg(script())
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .args(spec.topics)
            .env("PARTITIONS", spec.partitions.to_string())
            .env("STORAGE", if spec.memory { "memory" } else { "sqlite" })
            .env("FLOWLOG_TOOLS", tools_dir())
            .status()
            .map_err(|e| LaunchError::Other(format!("running {}: {e}", script().display())))?;
        match status.code() {
            Some(0) => Ok(Broker {
                dir,
                port,
                addr: format!("127.0.0.1:{port}"),
            }),
            Some(PORT_TAKEN) => Err(Taken(port)),
            _ => Err(LaunchError::Other(format!(
                "the broker did not start on port {port} ({status})"
            ))),
        }
    }
}

enum LaunchError {
    Taken(u16),
    Other(String),
}
use LaunchError::Taken;

impl From<LaunchError> for io::Error {
    fn from(e: LaunchError) -> io::Error {
        match e {
            Taken(port) => {
                io::Error::new(io::ErrorKind::AddrInUse, format!("port {port} is taken"))
            }
            LaunchError::Other(m) => io::Error::other(m),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        // broker.sh stop waits for the broker to exit (SIGKILL after a grace period).
        let _ = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&self.dir)
            .status();
        // A failing test shows what the broker said (its directory goes).
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.dir.join("broker.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!("broker on {} ({}), last lines of broker.log:", self.addr, self.dir.display());
            for line in tail.iter().rev() {
                eprintln!("  {line}");
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The text of a Prometheus endpoint's `GET /metrics`.
pub fn scrape(addr: &str) -> io::Result<String> {
    http(addr, "GET", "/metrics", "").map(|(_, body)| body)
}

/// One sample of the endpoint at `addr` now, by its exact series ([`sample`]);
/// 0 when absent or when the endpoint does not answer (a busy process's may
/// time out: to a poller, no progress yet).
pub fn sample_at(addr: &str, series: &str) -> f64 {
    scrape(addr).map_or(0.0, |body| sample(&body, series))
}

/// One HTTP/1.0 request to `addr` (`host:port`); the status code and body.
pub fn http(addr: &str, method: &str, path: &str, body: &str) -> io::Result<(u16, String)> {
    http_with(addr, method, path, &[("Content-Type", "application/json")], body)
}

/// [`http`] with the given request headers (besides Host and Content-Length).
pub fn http_with(addr: &str, method: &str, path: &str, headers: &[(&str, &str)], body: &str) -> io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    let head = format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{extra}Content-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let bad = || io::Error::new(io::ErrorKind::InvalidData, format!("{method} {path}: not an HTTP answer"));
    let code = text.split(' ').nth(1).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
    let (_, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    Ok((code, body.to_string()))
}

/// The value of one sample, by its exact series (`name` or `name{labels}`);
/// 0 when absent, as for a counter that has not been touched yet.
pub fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_found_by_exact_series() {
        let body = "# TYPE x_total counter\nx_total{side=\"a\"} 3\nx_total 7\nx_total_more 9\n";
        assert_eq!(sample(body, "x_total"), 7.0);
        assert_eq!(sample(body, "x_total{side=\"a\"}"), 3.0);
        assert_eq!(sample(body, "x"), 0.0);
    }

    /// 3 000 ports from bind(0) repeat one another dozens of times (the
    /// kernel hands a released port out again); free_port's never do, also
    /// when threads ask at once.
    #[test]
    fn free_ports_are_never_handed_out_twice() {
        let ports: Vec<u16> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3).map(|_| s.spawn(|| (0..1_000).map(|_| free_port()).collect::<Vec<u16>>())).collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let mut unique = ports.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), ports.len());
    }

    #[test]
    fn missing_tools_skip_without_the_require_flag() {
        if std::env::var("FLOWLOG_REQUIRE_ROOT_TESTS").as_deref() == Ok("1") {
            return; // there a missing tool is (rightly) a failure
        }
        assert!(!have_tools(&["no-such-tool/bin/x"]));
    }

    /// A real broker: start, reachable, topics made, stopped and gone on drop;
    /// a second start on a taken port is refused.
    #[test]
    fn broker_starts_and_stops() {
        if !have_tools(&[TANSU]) {
            return;
        }
        let b = Broker::start(&BrokerSpec {
            name: "testkit",
            topics: &["t1"],
            ..BrokerSpec::default()
        })
        .unwrap();
        let pid: i32 = std::fs::read_to_string(b.dir.join("broker.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(std::net::TcpStream::connect(&b.addr).is_ok());
        let taken = Broker::start_on(
            b.port,
            &BrokerSpec {
                name: "testkit-taken",
                ..BrokerSpec::default()
            },
        )
        .unwrap_err();
        assert_eq!(taken.kind(), io::ErrorKind::AddrInUse, "{taken}");
        let dir = b.dir.clone();
        drop(b);
        // Gone, or a zombie its new parent has not reaped yet.
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let running = state
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| !rest.starts_with('Z'));
        assert!(!running, "broker {pid} still running after stop: {state}");
        assert!(!dir.exists());
    }

    /// tansu can ignore SIGTERM for many seconds while busy: `broker.sh stop`
    /// must not return while it runs (it SIGKILLs after the grace period), or
    /// a stray broker keeps its port and a core. A process named `tansu` that
    /// ignores SIGTERM (the disposition survives exec) stands in for it.
    #[test]
    fn stop_kills_a_broker_that_ignores_sigterm() {
        use std::os::unix::process::ExitStatusExt;
        let dir = std::env::temp_dir().join(format!("flowlog-broker-deaf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut deaf = Command::new("bash")
            .args(["-c", "trap '' TERM; exec -a tansu sleep 600"])
            .spawn()
            .unwrap();
        std::fs::write(dir.join("broker.pid"), deaf.id().to_string()).unwrap();
        // Wait until bash has exec'd: the stop only touches a process named tansu.
        let cmdline = format!("/proc/{}/cmdline", deaf.id());
        while !std::fs::read(&cmdline).unwrap_or_default().starts_with(b"tansu") {
            std::thread::yield_now();
        }
        let status = Command::new("bash")
            .arg(script())
            .arg("stop")
            .arg(&dir)
            .env("STOP_GRACE_SECS", "1")
            .status()
            .unwrap();
        // broker.sh has returned: the broker must have exited by then (our
        // child, so a zombie until reaped here, never still running).
        let exited = deaf.try_wait().unwrap();
        if exited.is_none() {
            let _ = deaf.kill();
            let _ = deaf.wait();
        }
        let pid_file_left = dir.join("broker.pid").exists();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(status.success(), "broker.sh stop: {status}");
        assert_eq!(exited.and_then(|s| s.signal()), Some(9), "not SIGKILLed: {exited:?}");
        assert!(!pid_file_left);
    }
}
