//! `flowlog-loadgen`: opens and closes loopback TCP connections as fast as it
//! can and prints the rate.
use std::time::Duration;

use clap::Parser;
use flowlog_bench::loadgen::{run, LoadSpec};

#[derive(Parser)]
#[command(about = "Loopback TCP connection-rate load generator")]
struct Args {
    #[arg(long, default_value_t = 2)]
    clients: usize,
    #[arg(long, default_value_t = 2)]
    servers: usize,
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 100)]
    request_bytes: usize,
    #[arg(long, default_value_t = 1000)]
    response_bytes: usize,
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let r = run(LoadSpec {
        client_threads: a.clients,
        server_threads: a.servers,
        request_bytes: a.request_bytes,
        response_bytes: a.response_bytes,
        duration: Duration::from_secs_f64(a.seconds),
    })?;
    println!("{}", serde_json::to_string(&r)?);
    Ok(())
}
