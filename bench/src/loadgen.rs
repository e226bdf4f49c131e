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
            while t0.elapsed() < spec.duration {
                match one(addr, &req, &mut buf, spec.response_bytes) {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
            let _ = stop;
        }));
    }
    for c in clients {
        let _ = c.join();
    }
    let seconds = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    // Unblock the servers' accept().
    for _ in 0..spec.server_threads {
        let _ = TcpStream::connect(addr).map(|mut s| s.write_all(&vec![0u8; spec.request_bytes]));
    }
    for s in servers {
        let _ = s.join();
    }
    let connections = done.load(Ordering::Relaxed);
    Ok(LoadResult {
        connections,
        errors: errors.load(Ordering::Relaxed),
        seconds,
        connections_per_sec: connections as f64 / seconds,
    })
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
