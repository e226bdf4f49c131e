//! Many long-lived loopback connections, for the interim-record tests and
//! benchmark: open them, exchange known byte counts over them, close some,
//! and check that the flow records of each socket add up to exactly what
//! was sent and received.
//!
//! Both ends of 100 000 connections are 200 000 descriptors, where a process
//! may be held to far fewer (RLIMIT_NOFILE, and raising the hard limit needs
//! CAP_SYS_RESOURCE). So the connections are spread over worker threads
//! that each have a descriptor table of their own (`unshare(CLONE_FILES)`:
//! the limit applies per table), at most [`PER_WORKER`] connections each.
//! A worker's sockets are opened, used and closed by that worker only.
//!
//! Each worker's server listens on its own address, 127.0.0.2 and up, so
//! the connections' 4-tuples never meet other loopback traffic (which uses
//! 127.0.0.1) and the ephemeral ports suffice: a client port is unique per
//! destination, not per host.

use std::{
    collections::HashMap,
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    sync::mpsc,
    thread,
};

/// Connections per worker: both ends, below the usual 20 000 descriptors.
pub const PER_WORKER: usize = 9_000;

/// One connection as the checks see it: its ends and what each sent.
#[derive(Debug, Clone, Copy)]
pub struct Conn {
    pub client_addr: SocketAddr,
    pub server_addr: SocketAddr,
    /// Payload bytes client -> server and server -> client.
    pub up: u64,
    pub down: u64,
    pub open: bool,
}

/// One connection with both of its sockets.
struct Pair {
    client: Option<TcpStream>,
    server: Option<TcpStream>,
    conn: Conn,
}

impl Pair {
    /// One request/response: `up` bytes to the server, `down` back.
    fn exchange(&mut self, up: usize, down: usize) -> io::Result<()> {
        let (Some(c), Some(s)) = (self.client.as_mut(), self.server.as_mut()) else { return Ok(()) };
        c.write_all(&vec![b'u'; up])?;
        s.read_exact(&mut vec![0; up])?;
        s.write_all(&vec![b'd'; down])?;
        c.read_exact(&mut vec![0; down])?;
        self.conn.up += up as u64;
        self.conn.down += down as u64;
        Ok(())
    }

    /// Closes both ends (the client first), after which both sockets reach CLOSE.
    fn close(&mut self) {
        self.client = None;
        self.server = None;
        self.conn.open = false;
    }
}

enum Cmd {
    Exchange(usize),
    /// Close at most .1 of the worker's connections 0, n, 2n, ... still open.
    CloseEvery(usize, usize),
    /// Send back the connections as they are now.
    Report,
}

enum Reply {
    Done(io::Result<usize>),
    Conns(Vec<Conn>),
}

struct Worker {
    cmds: mpsc::Sender<Cmd>,
    replies: mpsc::Receiver<Reply>,
    thread: thread::JoinHandle<()>,
}

/// The connections, held by their workers.
pub struct LongLived {
    workers: Vec<Worker>,
    rounds: usize,
}

/// A worker: its own descriptor table, then `n` connections to its own
/// server address; then commands until the handle is dropped, when its
/// sockets close (in its table, where they are).
fn work(index: usize, n: usize, opened: mpsc::Sender<io::Result<()>>, cmds: mpsc::Receiver<Cmd>, replies: mpsc::Sender<Reply>) {
    let open = || -> io::Result<Vec<Pair>> {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_FILES)?;
        let octet = u8::try_from(2 + index).map_err(|_| io::Error::other("too many workers for 127.0.0.x"))?;
        let l = TcpListener::bind((Ipv4Addr::new(127, 0, 0, octet), 0))?;
        let server_addr = l.local_addr()?;
        (0..n)
            .map(|_| {
                // Accepted right away: the backlog never fills.
                let client = TcpStream::connect(server_addr)?;
                let (server, client_addr) = l.accept()?;
                let conn = Conn { client_addr, server_addr, up: 0, down: 0, open: true };
                Ok(Pair { client: Some(client), server: Some(server), conn })
            })
            .collect()
    };
    let mut pairs = match open() {
        Ok(p) => {
            let _ = opened.send(Ok(()));
            p
        }
        Err(e) => {
            let _ = opened.send(Err(e));
            return;
        }
    };
    for cmd in cmds {
        let reply = match cmd {
            Cmd::Exchange(round) => Reply::Done(
                pairs
                    .iter_mut()
                    .enumerate()
                    .try_for_each(|(i, p)| {
                        // Each its own count, so that records swapped between
                        // connections would show.
                        let up = 1 + (i * 7 + index * 31 + round * 13) % 1000;
                        p.exchange(up, 2 * up + round)
                    })
                    .map(|()| pairs.len()),
            ),
            Cmd::CloseEvery(nth, at_most) => Reply::Done(Ok(pairs
                .iter_mut()
                .step_by(nth.max(1))
                .filter(|p| p.conn.open)
                .take(at_most)
                .map(Pair::close)
                .count())),
            Cmd::Report => Reply::Conns(pairs.iter().map(|p| p.conn).collect()),
        };
        if replies.send(reply).is_err() {
            break;
        }
    }
    // The sockets close here, in this thread's table.
    drop(pairs);
}

impl LongLived {
    /// Opens `n` connections and returns once all are established and accepted.
    pub fn open(n: usize) -> io::Result<LongLived> {
        // The soft limit up to the hard one: each worker's table needs 2 x PER_WORKER.
        use nix::sys::resource::{getrlimit, setrlimit, Resource};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
        let (opened_tx, opened) = mpsc::channel();
        let workers: Vec<Worker> = (0..n.div_ceil(PER_WORKER))
            .map(|i| {
                let count = PER_WORKER.min(n - i * PER_WORKER);
                let (cmds, cmd_rx) = mpsc::channel();
                let (reply_tx, replies) = mpsc::channel();
                let opened = opened_tx.clone();
                let thread = thread::Builder::new()
                    .name(format!("long-lived-{i}"))
                    .spawn(move || work(i, count, opened, cmd_rx, reply_tx))?;
                Ok(Worker { cmds, replies, thread })
            })
            .collect::<io::Result<_>>()?;
        let ll = LongLived { workers, rounds: 0 };
        for _ in 0..ll.workers.len() {
            opened.recv().map_err(|_| io::Error::other("a worker died while opening"))??;
        }
        Ok(ll)
    }

    /// Sends `cmd` to every worker (they work in parallel), then collects
    /// the replies in worker order.
    fn all(&self, cmd: impl Fn() -> Cmd) -> io::Result<Vec<Reply>> {
        for w in &self.workers {
            w.cmds.send(cmd()).map_err(|_| io::Error::other("a worker is gone"))?;
        }
        self.workers.iter().map(|w| w.replies.recv().map_err(|_| io::Error::other("a worker is gone"))).collect()
    }

    fn counted(&self, cmd: impl Fn() -> Cmd) -> io::Result<usize> {
        let mut total = 0;
        for r in self.all(cmd)? {
            if let Reply::Done(n) = r {
                total += n?;
            }
        }
        Ok(total)
    }

    /// One request/response over every open connection.
    pub fn exchange(&mut self) -> io::Result<()> {
        let round = self.rounds;
        self.rounds += 1;
        self.counted(|| Cmd::Exchange(round)).map(drop)
    }

    /// Closes every `nth` connection (at most `at_most` per worker, of
    /// those still open); returns how many it closed.
    pub fn close_every(&mut self, nth: usize, at_most: usize) -> io::Result<usize> {
        self.counted(|| Cmd::CloseEvery(nth, at_most))
    }

    /// The connections as they are now.
    pub fn conns(&self) -> io::Result<Vec<Conn>> {
        Ok(self.all(|| Cmd::Report)?.into_iter().flat_map(|r| if let Reply::Conns(c) = r { c } else { Vec::new() }).collect())
    }

    /// Whether a socket (local, remote) may be an end of such connections:
    /// one of its addresses is a server address (127.0.0.2 and up).
    pub fn may_be_ours(local: SocketAddr, remote: SocketAddr) -> bool {
        let server = |a: SocketAddr| matches!(a.ip(), IpAddr::V4(v4) if v4.octets()[..3] == [127, 0, 0] && v4.octets()[3] >= 2);
        server(local) || server(remote)
    }

    /// What is wrong with `totals` for these connections, one line per
    /// socket: every end's records must sum to exactly what it sent and
    /// received, a closed connection's ends have one final record each, an
    /// open one's none.
    pub fn check(&self, totals: &Totals) -> io::Result<Vec<String>> {
        let mut problems = Vec::new();
        for c in self.conns()? {
            for (local, remote, sent, received) in [(c.client_addr, c.server_addr, c.up, c.down), (c.server_addr, c.client_addr, c.down, c.up)] {
                let got = totals.by_socket.get(&(local, remote)).copied().unwrap_or_default();
                let finals = u32::from(!c.open);
                if (got.sent, got.received, got.finals) != (sent, received, finals) {
                    problems.push(format!(
                        "{local} -> {remote}: sent {} received {} in {} interim + {} final records; want {sent} / {received} with {finals} final",
                        got.sent, got.received, got.interim, got.finals
                    ));
                }
            }
        }
        Ok(problems)
    }
}

impl Drop for LongLived {
    /// Each worker closes its sockets and ends.
    fn drop(&mut self) {
        for w in self.workers.drain(..) {
            drop(w.cmds);
            let _ = w.thread.join();
        }
    }
}

/// What one socket's records add up to.
#[derive(Debug, Default, Clone, Copy)]
pub struct Side {
    pub sent: u64,
    pub received: u64,
    pub interim: u32,
    pub finals: u32,
}

/// The flow records of some sockets, summed per socket (local, remote).
#[derive(Debug, Default)]
pub struct Totals {
    by_socket: HashMap<(SocketAddr, SocketAddr), Side>,
    pub interim_records: u64,
    pub final_records: u64,
}

/// The fields of a flow record (the sidecar's JSON output) the totals read.
#[derive(serde::Deserialize)]
struct Counted {
    local_addr: IpAddr,
    local_port: u16,
    remote_addr: IpAddr,
    remote_port: u16,
    bytes_sent: u64,
    bytes_received: u64,
    record_type: String,
}

impl Totals {
    /// Adds one JSON flow record if it may be one of [`LongLived`]'s
    /// sockets; returns whether it was.
    pub fn add_json(&mut self, line: &str) -> serde_json::Result<bool> {
        let r: Counted = serde_json::from_str(line)?;
        let (local, remote) = (SocketAddr::new(r.local_addr, r.local_port), SocketAddr::new(r.remote_addr, r.remote_port));
        let ours = LongLived::may_be_ours(local, remote);
        if ours {
            self.add(local, remote, r.bytes_sent, r.bytes_received, r.record_type == "final");
        }
        Ok(ours)
    }

    pub fn add(&mut self, local: SocketAddr, remote: SocketAddr, sent: u64, received: u64, is_final: bool) {
        let s = self.by_socket.entry((local, remote)).or_default();
        s.sent += sent;
        s.received += received;
        if is_final {
            s.finals += 1;
            self.final_records += 1;
        } else {
            s.interim += 1;
            self.interim_records += 1;
        }
    }
}
