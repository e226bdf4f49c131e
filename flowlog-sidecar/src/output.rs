//! The printing modes: JSON lines or a readable table on stdout (or nothing).

use std::io::{self, Write};

use flowlog_schema::{Direction, Flow, RecordType};

use crate::{config::Output, sink::Sink};

pub struct Printer<W: Write> {
    mode: Output,
    out: io::BufWriter<W>,
    header_done: bool,
    /// The line being built (reused).
    row: Vec<u8>,
}

impl<W: Write> Printer<W> {
    pub fn new(mode: Output, out: W) -> Self {
        Printer { mode, out: io::BufWriter::with_capacity(64 * 1024, out), header_done: false, row: Vec::with_capacity(256) }
    }
}

/// One JSON line: the record's fields (enum symbols in snake_case) plus its
/// duration, last. Written as the record's object with the duration put in
/// before its closing brace: serde's `flatten` (the obvious way) serializes
/// the record as a map, field by field through a wrapper, which cost ~15%
/// more per line.
fn json_line(out: &mut Vec<u8>, r: &Flow) -> io::Result<()> {
    serde_json::to_writer(&mut *out, r)?;
    if out.last() != Some(&b'}') {
        return Err(io::Error::other("a flow record did not serialize as a JSON object"));
    }
    out.pop();
    match r.start_time_ns {
        Some(s) => {
            out.extend_from_slice(b",\"duration_ns\":");
            out.extend_from_slice(itoa::Buffer::new().format(r.end_time_ns - s).as_bytes());
        }
        None => out.extend_from_slice(b",\"duration_ns\":null"),
    }
    out.extend_from_slice(b"}\n");
    Ok(())
}

impl<W: Write> Sink for Printer<W> {
    fn send(&mut self, r: &mut Flow) -> io::Result<()> {
        match self.mode {
            Output::Null | Output::Kafka => Ok(()),
            Output::Json => {
                self.row.clear();
                json_line(&mut self.row, r)?;
                self.out.write_all(&self.row)
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
                self.row.clear();
                table_row(&mut self.row, r);
                self.out.write_all(&self.row)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// One table row, as `{:<7} {:<15} {:<3} {:<28} {:<28} {:>10} {:>10} {:>9}
/// {:>7} {}` would print it, written by hand: core::fmt writes padding a
/// character at a time through the writer, and the addresses, duration and
/// end went through Strings; that made table mode cost ~1.5 us per flow
/// (perf: write_char, pad, pad_integral). `table_row_matches_format` checks
/// it against format!.
fn table_row(out: &mut Vec<u8>, r: &Flow) {
    let mut n = itoa::Buffer::new();
    left(out, 7, n.format(r.pid));
    left(out, 15, &r.comm);
    let dir = match r.direction {
        Direction::Client => "C",
        Direction::Server => "S",
        Direction::Unknown => "?",
    };
    left(out, 3, dir);
    sockaddr(out, &r.local_addr, r.local_port);
    sockaddr(out, &r.remote_addr, r.remote_port);
    right(out, 10, n.format(r.bytes_sent).as_bytes());
    right(out, 10, n.format(r.bytes_received).as_bytes());
    match r.start_time_ns {
        // Milliseconds with two decimals, rounded half up (format!'s {:.2}
        // of the f64 rounds half to even: they differ only on exact ties).
        Some(s) => {
            let hundredths = (r.end_time_ns - s).saturating_add(5_000).div_euclid(10_000);
            let mut cell = [0u8; 24];
            let whole = n.format(hundredths.div_euclid(100)).as_bytes();
            let len = whole.len();
            cell[..len].copy_from_slice(whole);
            let frac = hundredths.rem_euclid(100) as u8;
            cell[len..len + 3].copy_from_slice(&[b'.', b'0' + frac / 10, b'0' + frac % 10]);
            right(out, 9, &cell[..len + 3]);
        }
        None => right(out, 9, b"-"),
    }
    right(out, 7, n.format(r.srtt_us).as_bytes());
    match r.record_type {
        RecordType::Interim => out.extend_from_slice(b"open"),
        RecordType::Final => out.extend(r.end_reason.symbol().bytes().map(|b| b.to_ascii_lowercase())),
    }
    out.push(b'\n');
}

/// `cell` left-aligned in `width` columns (characters, as format! counts
/// them), and a space.
fn left(out: &mut Vec<u8>, width: usize, cell: &str) {
    let chars = if cell.is_ascii() { cell.len() } else { cell.chars().count() };
    out.extend_from_slice(cell.as_bytes());
    out.resize(out.len() + width.saturating_sub(chars) + 1, b' ');
}

/// An ASCII `cell` right-aligned in `width` columns, and a space.
fn right(out: &mut Vec<u8>, width: usize, cell: &[u8]) {
    out.resize(out.len() + width.saturating_sub(cell.len()), b' ');
    out.extend_from_slice(cell);
    out.push(b' ');
}

/// `ip:port` (IPv6: `[ip]:port`), left-aligned in 28 columns.
fn sockaddr(out: &mut Vec<u8>, ip: &std::net::IpAddr, port: u16) {
    let start = out.len();
    let mut n = itoa::Buffer::new();
    match ip {
        std::net::IpAddr::V4(a) => {
            for (i, octet) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(n.format(octet).as_bytes());
            }
        }
        // Writing to a Vec cannot fail.
        std::net::IpAddr::V6(a) => drop(write!(out, "[{a}]")),
    }
    out.push(b':');
    out.extend_from_slice(n.format(port).as_bytes());
    let len = out.len() - start;
    out.resize(out.len() + 28usize.saturating_sub(len) + 1, b' ');
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
        assert_eq!(v["workload"], serde_json::Value::Null);
        let f = Flow { workload: Some(std::sync::Arc::new(fixtures::pod_workload())), ..fixtures::flow() };
        let v: serde_json::Value = serde_json::from_str(&print(Output::Json, &f)).unwrap();
        assert_eq!(v["workload"]["kind"], "pod");
        assert_eq!(v["workload"]["reason"], serde_json::Value::Null);
        assert_eq!(v["workload"]["pod_uid"], "7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b");
        assert_eq!(v["workload"]["qos_class"], "Burstable");
    }

    /// The row as format! printed it before `table_row` (the reference).
    fn table_row_by_format(r: &Flow) -> String {
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
        let sockaddr = |ip: &std::net::IpAddr, port| std::net::SocketAddr::new(*ip, port).to_string();
        format!(
            "{:<7} {:<15} {:<3} {:<28} {:<28} {:>10} {:>10} {:>9} {:>7} {}\n",
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

    #[test]
    fn table_row_matches_format() {
        use flowlog_schema::EndReason;
        let base = fixtures::flow();
        let v6: std::net::IpAddr = "fd00::1:2".parse().unwrap();
        let mapped: std::net::IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let start = base.end_time_ns - 1_234_567_891;
        let flows = [
            base.clone(),
            Flow { local_addr: v6, remote_addr: mapped, local_port: 65535, remote_port: 1, ..base.clone() },
            Flow { comm: "définitif-ü".into(), pid: 1234567, direction: Direction::Server, ..base.clone() },
            Flow { comm: "a-very-long-command-name".into(), direction: Direction::Unknown, ..base.clone() },
            Flow { start_time_ns: None, record_type: RecordType::Interim, ..base.clone() },
            Flow { start_time_ns: Some(start), bytes_sent: 12_345_678_901_234, bytes_received: 0, srtt_us: -1, ..base.clone() },
            Flow { start_time_ns: Some(base.end_time_ns - 7_777), end_reason: EndReason::FailedConnect, ..base.clone() },
            Flow { start_time_ns: Some(base.end_time_ns - 99_996_000), ..base.clone() },
        ];
        for f in &flows {
            let mut row = Vec::new();
            super::table_row(&mut row, f);
            assert_eq!(String::from_utf8(row).unwrap(), table_row_by_format(f));
        }
    }

    /// The line as serde's flatten wrote it before `json_line` (the reference).
    #[derive(serde::Serialize)]
    struct Flattened<'a> {
        #[serde(flatten)]
        flow: &'a Flow,
        duration_ns: Option<i64>,
    }

    #[test]
    fn json_line_matches_flatten() {
        let with_workload = Flow { workload: Some(std::sync::Arc::new(fixtures::pod_workload())), ..fixtures::flow() };
        for f in [fixtures::flow(), with_workload, Flow { start_time_ns: None, ..fixtures::flow() }] {
            let mut line = Vec::new();
            json_line(&mut line, &f).unwrap();
            let duration_ns = f.start_time_ns.map(|s| f.end_time_ns - s);
            let mut reference = serde_json::to_vec(&Flattened { flow: &f, duration_ns }).unwrap();
            reference.push(b'\n');
            assert_eq!(String::from_utf8(line).unwrap(), String::from_utf8(reference).unwrap());
        }
    }

    #[test]
    fn table_row_layout() {
        let out = print(Output::Table, &fixtures::flow());
        let row = out.lines().nth(1).unwrap();
        assert!(row.starts_with("7       curl            C   10.0.0.1:40000"), "{row}");
        assert!(row.ends_with(" normal"), "{row}");
    }
}
