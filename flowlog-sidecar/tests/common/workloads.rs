//! Real cgroups, processes and network namespaces named as kubelet, the
//! container runtimes and systemd name them, for the workload tests
//! (tests/workload.rs, tests/kube.rs).

use std::{
    io::{BufRead, BufReader, Write},
    path::PathBuf,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use apache_avro::types::Value as AvroValue;
use serde_json::{json, Value};

use super::{broker, by_ports, cgroup2_mount, have_root, inode};

/// The tests here create cgroups at the top of the tree (kubepods.slice,
/// system.slice, ...) and remove them after: one test at a time.
pub static TOP_LEVEL_CGROUPS: Mutex<()> = Mutex::new(());

pub const WAIT: Duration = Duration::from_secs(15);

/// None (skip) without root; else holds the others off until dropped.
pub fn cgroup_test() -> Option<MutexGuard<'static, ()>> {
    have_root().then(|| TOP_LEVEL_CGROUPS.lock().unwrap_or_else(|e| e.into_inner()))
}

/// Cgroups a test made, under the cgroup v2 mount; removed (deepest first,
/// after moving anything left in them to the root) when dropped.
pub struct Cgroups {
    root: PathBuf,
    made: Vec<PathBuf>,
}

impl Cgroups {
    pub fn new() -> Cgroups {
        Cgroups {
            root: cgroup2_mount(),
            made: Vec::new(),
        }
    }

    /// Creates `rel` and its missing parents; returns its cgroup id.
    pub fn make(&mut self, rel: &str) -> u64 {
        let mut dir = self.root.clone();
        for seg in rel.split('/') {
            dir.push(seg);
            match std::fs::create_dir(&dir) {
                Ok(()) => self.made.push(dir.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("mkdir {}: {e}", dir.display()),
            }
        }
        inode(dir.to_str().unwrap())
    }

    /// Moves process `pid` into `rel` ("" is the root).
    pub fn enter(&self, rel: &str, pid: u32) {
        let procs = self.root.join(rel).join("cgroup.procs");
        std::fs::write(&procs, pid.to_string())
            .unwrap_or_else(|e| panic!("writing {}: {e}", procs.display()));
    }

    pub fn remove(&mut self, rel: &str) {
        let dir = self.root.join(rel);
        std::fs::remove_dir(&dir).unwrap_or_else(|e| panic!("rmdir {}: {e}", dir.display()));
        self.made.retain(|d| *d != dir);
    }

    /// Removes `rel` once the processes just killed in it have left.
    pub fn remove_when_empty(&mut self, rel: &str) {
        let procs = self.root.join(rel).join("cgroup.procs");
        let t0 = Instant::now();
        while !std::fs::read_to_string(&procs).unwrap().trim().is_empty() {
            assert!(t0.elapsed() < WAIT, "{rel} still has processes");
            std::thread::sleep(Duration::from_millis(10));
        }
        self.remove(rel);
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        for dir in self.made.iter().rev() {
            for pid in std::fs::read_to_string(dir.join("cgroup.procs"))
                .unwrap_or_default()
                .lines()
            {
                let _ = std::fs::write(self.root.join("cgroup.procs"), pid);
            }
            // A process just killed may take a moment to leave its cgroup.
            let t0 = Instant::now();
            while let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() == std::io::ErrorKind::NotFound || t0.elapsed() > Duration::from_secs(5)
                {
                    eprintln!("cgroup {} not removed: {e}", dir.display());
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A network namespace with loopback up, deleted when dropped.
pub struct Netns(pub String);

impl Netns {
    pub fn new(name: String) -> Netns {
        let ip = |args: &[&str]| {
            assert!(
                Command::new("ip").args(args).status().unwrap().success(),
                "ip {args:?}"
            )
        };
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }

    /// Runs `f` on a thread inside the namespace. setns() changes only the
    /// calling thread; threads `f` spawns inherit the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path).unwrap();
            // SAFETY: valid fd of a netns file.
            assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0, "setns");
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Runs `ip` with `args`; panics if it fails.
pub fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().unwrap();
    assert!(status.success(), "ip {args:?}");
}

/// A pod's network as a CNI plugin makes it: a namespace whose `eth0` is
/// one end of a veth pair (the other end, `host_if`, stays in the root
/// namespace), holding `addr` (with its prefix length). Deleting the
/// namespace deletes the pair.
pub fn pod_network(name: String, host_if: &str, addr: &str) -> Netns {
    let ns = Netns::new(name);
    ip(&["link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", &ns.0]);
    ip(&["link", "set", host_if, "up"]);
    ip(&["-n", &ns.0, "addr", "add", addr, "dev", "eth0"]);
    ip(&["-n", &ns.0, "link", "set", "eth0", "up"]);
    ns
}

/// A Python process that does nothing until told (a line on its stdin), so
/// that the test can first place it in its cgroup; it answers with lines.
pub struct Proc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    pub fn start(netns: Option<&Netns>, script: &str, args: &[&str]) -> Proc {
        let mut cmd = match netns {
            // `ip netns exec` execs in place: the pid stays the same.
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.0, "python3"]);
                c
            }
            None => Command::new("python3"),
        };
        let mut child = cmd
            .arg("-c")
            .arg(format!("{PRELUDE}{script}"))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Proc {
            child,
            stdin,
            stdout,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn go(&mut self) {
        self.stdin
            .write_all(b"\n")
            .and_then(|_| self.stdin.flush())
            .expect("tell the process to go on");
    }

    pub fn line(&mut self) -> String {
        let mut l = String::new();
        assert!(
            self.stdout.read_line(&mut l).unwrap() > 0,
            "the process exited early"
        );
        l.trim().to_string()
    }

    pub fn port(&mut self) -> u16 {
        self.line().parse().expect("a port")
    }

    pub fn wait_success(mut self) {
        assert!(self.child.wait().unwrap().success(), "the process failed");
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every script below starts with: wait for the test's go, read a
/// connection to its end.
pub const PRELUDE: &str = r#"
import socket, sys
def wait():
    sys.stdin.readline()
def drain(c):
    n = 0
    while True:
        b = c.recv(65536)
        if not b:
            return n
        n += len(b)
"#;

/// Connects to port argv[1], sends 1 000 bytes, half-closes, expects 2 000
/// back. With argv[2], waits for another line before sending.
pub const CLIENT: &str = r#"
wait()
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(s.getsockname()[1], flush=True)
if len(sys.argv) > 2:
    wait()
s.sendall(b"c" * 1000)
s.shutdown(socket.SHUT_WR)
n = drain(s)
assert n == 2000, n
"#;

/// Listens (once told), prints its port, answers each connection with
/// twice what it read.
pub const SERVER: &str = r#"
wait()
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(128)
print(l.getsockname()[1], flush=True)
while True:
    c, _ = l.accept()
    c.sendall(b"s" * (2 * drain(c)))
    c.close()
"#;

/// Random-looking hex from a seed (splitmix64), unique per test run.
pub fn hex(seed: u64, n: usize) -> String {
    let mut x = seed ^ ((std::process::id() as u64) << 32);
    (0..n)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            char::from_digit(((z ^ (z >> 31)) & 0xf) as u32, 16).unwrap()
        })
        .collect()
}

/// A container id as runtimes make them: 64 hex digits.
pub fn container_id(seed: u64) -> String {
    hex(seed, 64)
}

/// A pod UID (with dashes) and kubelet's systemd spelling of it (with _).
pub fn pod_uid(seed: u64) -> (String, String) {
    let h = hex(seed + 1000, 32);
    let uid = format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    );
    let underscored = uid.replace('-', "_");
    (uid, underscored)
}

/// A record's expected `workload`: `kind` and the given fields, the rest null.
pub fn wl(kind: &str, fields: &[(&str, &str)]) -> Value {
    let mut v = json!({
        "kind": kind, "reason": null, "name": null, "namespace": null, "pod_uid": null, "container_id": null,
        "runtime": null, "qos_class": null, "unit": null, "cgroup_path": null,
        "container_name": null, "owner_kind": null, "owner_name": null, "labels": {},
    });
    for (k, val) in fields {
        assert!(v.get(k).is_some(), "no field {k}");
        v[k] = json!(val);
    }
    v
}

pub fn one(records: &[Value], local: u16, remote: u16) -> Value {
    let r = by_ports(records, local, remote);
    assert_eq!(r.len(), 1, "records {local} -> {remote}: {r:#?}");
    r[0].clone()
}


/// Identity.workloads as (workload as JSON, ips).
pub type Listed = Vec<(Value, Vec<String>)>;

/// One identity heartbeat of a host, as the broker has it.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub reason: String,
    pub time_ns: i64,
    pub workloads: Listed,
}

/// The identity heartbeats host `host_id` produced to the broker at
/// `brokers`, in order, read until `until` holds over them (or `WAIT`
/// passes).
pub fn heartbeats(brokers: &str, host_id: &str, until: impl Fn(&[Heartbeat]) -> bool) -> Vec<Heartbeat> {
    let mine = |all: &[broker::Consumed]| -> Vec<Heartbeat> {
        all.iter()
            .filter(|c| broker::field(broker::field(&c.value, "host"), "host_id") == &AvroValue::String(host_id.into()))
            .map(|c| Heartbeat {
                reason: broker::enum_sym(&c.value, "reason"),
                time_ns: broker::long(&c.value, "time_ns"),
                workloads: listed(&c.value),
            })
            .collect()
    };
    let schema = flowlog_schema::schemas::IDENTITY.json;
    mine(&broker::consume(brokers, broker::IDENTITY, schema, WAIT, |all| until(&mine(all))))
}

/// An identity record's `workloads`.
pub fn listed(identity: &AvroValue) -> Listed {
    let AvroValue::Array(items) = broker::field(identity, "workloads") else {
        panic!("workloads is not an array")
    };
    items
        .iter()
        .map(|w| {
            let workload = Value::try_from(broker::field(w, "workload").clone()).unwrap();
            let AvroValue::Array(ips) = broker::field(w, "ips") else { panic!("ips is not an array") };
            let ips = ips
                .iter()
                .map(|ip| match ip {
                    AvroValue::String(s) => s.clone(),
                    other => panic!("ip {other:?}"),
                })
                .collect();
            (workload, ips)
        })
        .collect()
}

/// A workload as the identity record spells it (enum symbols upper case).
pub fn avro_wl(kind: &str, fields: &[(&str, &str)]) -> Value {
    let mut v = wl(&kind.to_lowercase(), fields);
    v["kind"] = json!(kind);
    v
}

/// `l` sorted (by workload), to compare listings whatever their order.
pub fn sorted(mut l: Listed) -> Listed {
    l.sort_by_key(|(w, _)| w.to_string());
    l
}
