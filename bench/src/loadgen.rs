//! Connection-rate load generator on loopback.
//!
//! Each client thread loops: connect, send `request_bytes`, read the reply to
//! EOF, close. Server threads share one listener: accept, read the request,
//! reply `response_bytes`, close. The server closes first so TIME_WAIT lands
//! on the server's 4-tuples and the client never runs out of ephemeral ports.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy)]
pub struct LoadSpec {
    pub client_threads: usize,
    pub server_threads: usize,
    pub request_bytes: usize,
    pub response_bytes: usize,
    pub duration: Duration,
}

impl Default for LoadSpec {
    fn default() -> Self {
        LoadSpec {
            client_threads: 2,
            server_threads: 2,
            request_bytes: 100,
            response_bytes: 1000,
            duration: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct LoadResult {
    pub connections: u64,
    pub errors: u64,
    pub seconds: f64,
    pub connections_per_sec: f64,
}

fn listener() -> std::io::Result<TcpListener> {
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    sock.listen(4096)?;
    Ok(sock.into())
}

/// Runs the load for `spec.duration` and returns what was achieved.
pub fn run(spec: LoadSpec) -> std::io::Result<LoadResult> {
    let load = Load::start(spec)?;
    thread::sleep(spec.duration);
    Ok(load.stop())
}

/// A load running until stopped (`spec.duration` is not used), whose count
/// of connections can be read while it runs: the rate of a window of it.
pub struct Load {
    spec: LoadSpec,
    addr: SocketAddr,
    t0: Instant,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
    clients: Vec<thread::JoinHandle<()>>,
    servers: Vec<thread::JoinHandle<()>>,
}

/// Connections completed by an instant.
#[derive(Debug, Clone, Copy)]
pub struct Mark {
    at: Instant,
    connections: u64,
}

impl Mark {
    /// Connections per second from `self` to `later`.
    pub fn rate_to(&self, later: &Mark) -> f64 {
        (later.connections - self.connections) as f64 / later.at.duration_since(self.at).as_secs_f64()
    }
}

impl Load {
    pub fn start(spec: LoadSpec) -> std::io::Result<Load> {
        let l = listener()?;
        let addr = l.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut servers = Vec::new();
        for _ in 0..spec.server_threads {
            let l = l.try_clone()?;
            let stop = stop.clone();
            servers.push(thread::spawn(move || {
                let mut req = vec![0u8; spec.request_bytes];
                let resp = vec![b'r'; spec.response_bytes];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((mut s, _)) = l.accept() else { continue };
                    if s.read_exact(&mut req).is_ok() {
                        let _ = s.write_all(&resp);
                    }
                }
            }));
        }
        let t0 = Instant::now();
        let mut clients = Vec::new();
        for _ in 0..spec.client_threads {
            let (stop, done, errors) = (stop.clone(), done.clone(), errors.clone());
            clients.push(thread::spawn(move || {
                let req = vec![b'q'; spec.request_bytes];
                let mut buf = vec![0u8; 64 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match one(addr, &req, &mut buf, spec.response_bytes) {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
        Ok(Load { spec, addr, t0, stop, done, errors, clients, servers })
    }

    pub fn mark(&self) -> Mark {
        Mark { at: Instant::now(), connections: self.done.load(Ordering::Relaxed) }
    }

    /// Stops the clients, then the servers; what was achieved since start.
    pub fn stop(mut self) -> LoadResult {
        let seconds = self.halt();
        let connections = self.done.load(Ordering::Relaxed);
        LoadResult {
            connections,
            errors: self.errors.load(Ordering::Relaxed),
            seconds,
            connections_per_sec: connections as f64 / seconds,
        }
    }

    /// Stops and joins the threads (once); the seconds the clients ran.
    fn halt(&mut self) -> f64 {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients.drain(..) {
            let _ = c.join();
        }
        let seconds = self.t0.elapsed().as_secs_f64();
        // Unblock the servers' accept().
        for _ in 0..self.servers.len() {
            let _ = TcpStream::connect(self.addr).map(|mut s| s.write_all(&vec![0u8; self.spec.request_bytes]));
        }
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
        seconds
    }
}

/// A load dropped without [`Load::stop`] (a benchmark that failed half-way)
/// stops too: its threads would otherwise load the machine under whatever
/// the benchmark measures next.
impl Drop for Load {
    fn drop(&mut self) {
        self.halt();
    }
}

fn one(addr: SocketAddr, req: &[u8], buf: &mut [u8], want: usize) -> std::io::Result<()> {
    let mut c = TcpStream::connect(addr)?;
    c.write_all(req)?;
    let mut got = 0;
    loop {
        match c.read(buf)? {
            0 => break,
            n => got += n,
        }
    }
    if got != want {
        return Err(std::io::Error::other(format!("short reply {got}/{want}")));
    }
    Ok(())
}
