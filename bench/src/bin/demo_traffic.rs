//! `flowlog-demo-traffic`: the traffic of `make demo`'s workloads.
//!
//! `serve` answers requests on a port; `client` opens connections to a server
//! at a given rate for a while, sends a few requests on each and reads the
//! replies, then prints what it did as one JSON line (so the demo can compare
//! it with what the flow log saw). The demo runs each under `ip netns exec`.
//!
//! Protocol: a request is an 8-byte header (request body length, reply
//! length; u32 big-endian) and the body; the reply is that many bytes. The
//! client closes first.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "flowlog-demo-traffic",
    about = "Request/response traffic between the demo's workloads"
)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer requests on ADDR:PORT until killed.
    Serve {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Open connections to a server at a steady rate for a while.
    Client(ClientArgs),
}

#[derive(clap::Args)]
struct ClientArgs {
    #[arg(long)]
    connect: SocketAddr,
    /// Label for the JSON summary, e.g. "frontend->api".
    #[arg(long, default_value = "")]
    name: String,
    /// Local address to connect from (the namespace's own, for the summary).
    #[arg(long)]
    bind: Option<std::net::IpAddr>,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// New connections per second (all threads together).
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Threads (connections in flight at once, at most).
    #[arg(long, default_value_t = 4)]
    threads: usize,
    /// Requests per connection.
    #[arg(long, default_value_t = 1)]
    requests: u32,
    /// Request body size, bytes: N or MIN-MAX (k and m suffixes allowed).
    #[arg(long, default_value = "512", value_parser = parse_range)]
    request_bytes: (u64, u64),
    /// Reply size, bytes: N or MIN-MAX.
    #[arg(long, default_value = "16k", value_parser = parse_range)]
    response_bytes: (u64, u64),
    /// Pause between two requests on one connection, ms.
    #[arg(long, default_value_t = 0)]
    think_ms: u64,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim().to_ascii_lowercase();
    let (num, mul) = match s.chars().last() {
        Some('k') => (&s[..s.len() - 1], 1024),
        Some('m') => (&s[..s.len() - 1], 1024 * 1024),
        _ => (&s[..], 1),
    };
    num.parse::<u64>()
        .map(|n| n * mul)
        .map_err(|_| format!("{s:?} is not a size"))
}

fn parse_range(s: &str) -> Result<(u64, u64), String> {
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (parse_size(a)?, parse_size(b)?),
        None => (parse_size(s)?, parse_size(s)?),
    };
    if lo > hi || hi > u32::MAX as u64 {
        return Err(format!("{s:?}: want MIN-MAX with MIN <= MAX < 4 GiB"));
    }
    Ok((lo, hi))
}

/// xorshift64*: sizes only need to look varied, not be random.
struct Rng(u64);
impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Log-uniform in [lo, hi]: many small values, a few large ones.
    fn size(&mut self, (lo, hi): (u64, u64)) -> u64 {
        if lo >= hi {
            return lo;
        }
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let (a, b) = ((lo.max(1) as f64).ln(), (hi as f64).ln());
        ((a + u * (b - a)).exp() as u64).clamp(lo, hi)
    }
}

const CHUNK: usize = 64 * 1024;

fn serve(listen: SocketAddr) -> anyhow::Result<()> {
    let l = TcpListener::bind(listen)?;
    println!("listening on {listen}");
    std::io::stdout().flush()?;
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        thread::spawn(move || {
            let _ = answer(s);
        });
    }
    Ok(())
}

fn answer(mut s: TcpStream) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut hdr = [0u8; 8];
    let mut buf = vec![0u8; CHUNK];
    let reply = vec![b'r'; CHUNK];
    loop {
        // EOF before a header: the client is done.
        match s.read_exact(&mut hdr) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let mut body = u32::from_be_bytes(hdr[..4].try_into().unwrap()) as usize;
        let mut want = u32::from_be_bytes(hdr[4..].try_into().unwrap()) as usize;
        while body > 0 {
            let n = s.read(&mut buf[..body.min(CHUNK)])?;
            if n == 0 {
                return Ok(());
            }
            body -= n;
        }
        while want > 0 {
            let n = want.min(CHUNK);
            s.write_all(&reply[..n])?;
            want -= n;
        }
    }
}

#[derive(Default)]
struct Counts {
    connections: AtomicU64,
    failed_connects: AtomicU64,
    errors: AtomicU64,
    requests: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
}

fn one_connection(spec: &ClientArgs, rng: &mut Rng, c: &Counts) {
    let mut s = match connect(spec) {
        Ok(s) => s,
        Err(_) => {
            c.failed_connects.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    c.connections.fetch_add(1, Ordering::Relaxed);
    let _ = s.set_nodelay(true);
    let _ = s.set_read_timeout(Some(Duration::from_secs(20)));
    let mut buf = vec![0u8; CHUNK];
    let body = vec![b'q'; CHUNK];
    let r = (|| -> std::io::Result<()> {
        for i in 0..spec.requests {
            if i > 0 && spec.think_ms > 0 {
                thread::sleep(Duration::from_millis(spec.think_ms));
            }
            let (mut req, mut want) = (rng.size(spec.request_bytes), rng.size(spec.response_bytes));
            let mut hdr = [0u8; 8];
            hdr[..4].copy_from_slice(&(req as u32).to_be_bytes());
            hdr[4..].copy_from_slice(&(want as u32).to_be_bytes());
            s.write_all(&hdr)?;
            c.bytes_sent.fetch_add(8 + req, Ordering::Relaxed);
            while req > 0 {
                let n = req.min(CHUNK as u64) as usize;
                s.write_all(&body[..n])?;
                req -= n as u64;
            }
            while want > 0 {
                let n = s.read(&mut buf[..want.min(CHUNK as u64) as usize])?;
                if n == 0 {
                    return Err(std::io::Error::other("server closed early"));
                }
                want -= n as u64;
                c.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
            }
            c.requests.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    })();
    if r.is_err() {
        c.errors.fetch_add(1, Ordering::Relaxed);
    }
}

fn connect(spec: &ClientArgs) -> std::io::Result<TcpStream> {
    let Some(ip) = spec.bind else {
        return TcpStream::connect_timeout(&spec.connect, Duration::from_secs(3));
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(spec.connect),
        socket2::Type::STREAM,
        None,
    )?;
    s.bind(&SocketAddr::new(ip, 0).into())?;
    s.connect_timeout(&spec.connect.into(), Duration::from_secs(3))?;
    Ok(s.into())
}

#[allow(clippy::too_many_arguments)]
fn client(a: ClientArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.rate > 0.0 && a.threads > 0 && a.seconds > 0.0,
        "rate, threads and seconds must be > 0"
    );
    let (rate, seconds, threads) = (a.rate, a.seconds, a.threads);
    let spec = Arc::new(a);
    let counts = Arc::new(Counts::default());
    let t0 = Instant::now();
    let total = (rate * seconds).round().max(1.0) as u64;
    let next = Arc::new(AtomicU64::new(0));
    let interval = Duration::from_secs_f64(1.0 / rate);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_nanos() as u64
        ^ std::process::id() as u64;
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (spec, counts, next) = (spec.clone(), counts.clone(), next.clone());
            thread::spawn(move || {
                let mut rng = Rng::new(seed.wrapping_add(t as u64 * 7919));
                loop {
                    // Connection i starts at t0 + i / rate (or as soon as a thread is free).
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        break;
                    }
                    let at = t0 + interval * i as u32;
                    if let Some(wait) = at.checked_duration_since(Instant::now()) {
                        thread::sleep(wait);
                    }
                    one_connection(&spec, &mut rng, &counts);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let c = &counts;
    let out = serde_json::json!({
        "name": spec.name,
        "target": spec.connect.to_string(),
        "source": spec.bind.map(|ip| ip.to_string()),
        "seconds": (t0.elapsed().as_secs_f64() * 100.0).round() / 100.0,
        "connections": c.connections.load(Ordering::Relaxed),
        "failed_connects": c.failed_connects.load(Ordering::Relaxed),
        "errors": c.errors.load(Ordering::Relaxed),
        "requests": c.requests.load(Ordering::Relaxed),
        "bytes_sent": c.bytes_sent.load(Ordering::Relaxed),
        "bytes_received": c.bytes_received.load(Ordering::Relaxed),
    });
    println!("{out}");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Args::parse().cmd {
        Cmd::Serve { listen } => serve(listen),
        Cmd::Client(a) => client(a),
    }
}
