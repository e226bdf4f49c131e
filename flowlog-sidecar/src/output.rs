//! The printing modes: JSON lines or a readable table on stdout (or nothing).

use std::io::{self, Write};

use flowlog_schema::{Direction, Flow, RecordType};

use crate::{config::Output, sink::Sink};

pub struct Printer<W: Write> {
    mode: Output,
    out: io::BufWriter<W>,
    header_done: bool,
}

impl<W: Write> Printer<W> {
    pub fn new(mode: Output, out: W) -> Self {
        Printer { mode, out: io::BufWriter::with_capacity(64 * 1024, out), header_done: false }
    }
}

/// The record's fields (enum symbols in snake_case) plus its duration.
#[derive(serde::Serialize)]
struct Json<'a> {
    #[serde(flatten)]
    flow: &'a Flow,
    duration_ns: Option<i64>,
}

impl<W: Write> Sink for Printer<W> {
    fn send(&mut self, r: &mut Flow) -> io::Result<()> {
        match self.mode {
            Output::Null | Output::Kafka => Ok(()),
            Output::Json => {
                let duration_ns = r.start_time_ns.map(|s| r.end_time_ns - s);
                serde_json::to_writer(&mut self.out, &Json { flow: r, duration_ns })?;
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
                    Direction::Client => "C",
                    Direction::Server => "S",
                    Direction::Unknown => "?",
                };
                let ms = match r.start_time_ns {
                    Some(s) => format!("{:.2}", (r.end_time_ns - s) as f64 / 1e6),
                    None => "-".into(),
                };
                let end = match r.record_type {
                    RecordType::Interim => "open".to_string(),
                    RecordType::Final => r.end_reason.symbol().to_ascii_lowercase(),
                };
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
                    end
                )
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

fn sockaddr(ip: &std::net::IpAddr, port: u16) -> String {
    std::net::SocketAddr::new(*ip, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlog_schema::fixtures;

    fn print(mode: Output, f: &Flow) -> String {
        let mut buf = Vec::new();
        let mut p = Printer::new(mode, &mut buf);
        p.send(&mut f.clone()).unwrap();
        p.flush().unwrap();
        drop(p);
        String::from_utf8(buf).unwrap()
    }

    /// The JSON lines users pipe into jq: field names and spellings stay.
    #[test]
    fn json_keeps_its_shape() {
        let v: serde_json::Value = serde_json::from_str(&print(Output::Json, &fixtures::flow())).unwrap();
        assert_eq!(v["record_type"], "final");
        assert_eq!(v["family"], "ipv4");
        assert_eq!(v["direction"], "client");
        assert_eq!(v["end_reason"], "normal");
        assert_eq!(v["owner_source"], "open");
        assert_eq!(v["local_addr"], "10.0.0.1");
        assert_eq!(v["remote_port"], 443);
        assert_eq!(v["state_path"], serde_json::json!(["CLOSE"]));
        assert_eq!(v["duration_ns"], 1_000);
        assert_eq!(v["error"], serde_json::Value::Null);
    }

    #[test]
    fn table_row() {
        let out = print(Output::Table, &fixtures::flow());
        let row = out.lines().nth(1).unwrap();
        assert!(row.starts_with("7       curl            C   10.0.0.1:40000"), "{row}");
        assert!(row.ends_with(" normal"), "{row}");
    }
}
