//! Where flow records go for now: JSON lines or a readable table on stdout.

use std::io::{self, Write};

use crate::{config::Output, flow::FlowRecord};

pub struct Printer<W: Write> {
    mode: Output,
    out: io::BufWriter<W>,
    header_done: bool,
}

impl<W: Write> Printer<W> {
    pub fn new(mode: Output, out: W) -> Self {
        Printer { mode, out: io::BufWriter::with_capacity(64 * 1024, out), header_done: false }
    }

    /// `interim`: a snapshot of a live connection (counters since the last record).
    pub fn write(&mut self, r: &FlowRecord, interim: bool) -> io::Result<()> {
        match self.mode {
            Output::Null | Output::Kafka => Ok(()),
            Output::Json => {
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    record_type: &'static str,
                    #[serde(flatten)]
                    r: &'a FlowRecord,
                }
                let record_type = if interim { "interim" } else { "final" };
                serde_json::to_writer(&mut self.out, &Out { record_type, r })?;
                self.out.write_all(b"\n")
            }
            Output::Table => {
                if !self.header_done {
                    self.header_done = true;
                    writeln!(
                        self.out,
                        "{:<7} {:<15} {:<3} {:<28} {:<28} {:>10} {:>10} {:>9} {:>7} {}",
                        "PID", "COMM", "DIR", "LOCAL", "REMOTE", "TX_BYTES", "RX_BYTES", "MS", "RTT_US", "END"
                    )?;
                }
                let dir = match r.direction {
                    crate::flow::Direction::Client => "C",
                    crate::flow::Direction::Server => "S",
                    crate::flow::Direction::Unknown => "?",
                };
                let ms = r.duration_ns.map(|d| format!("{:.2}", d as f64 / 1e6)).unwrap_or_else(|| "-".into());
                writeln!(
                    self.out,
                    "{:<7} {:<15} {:<3} {:<28} {:<28} {:>10} {:>10} {:>9} {:>7} {}",
                    r.pid,
                    r.comm,
                    dir,
                    sockaddr(&r.local_addr, r.local_port),
                    sockaddr(&r.remote_addr, r.remote_port),
                    r.bytes_sent,
                    r.bytes_received,
                    ms,
                    r.srtt_us,
                    if interim {
                        "open".to_string()
                    } else {
                        serde_json::to_value(r.end_reason).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
                    }
                )
            }
        }
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn sockaddr(ip: &std::net::IpAddr, port: u16) -> String {
    match ip {
        std::net::IpAddr::V4(a) => format!("{a}:{port}"),
        std::net::IpAddr::V6(a) => format!("[{a}]:{port}"),
    }
}
