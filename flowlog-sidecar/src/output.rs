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
    if !fixed_row(out, r) {
        any_row(out, r);
    }
}

/// Where each cell of a row starts when every cell fits its column.
const COL_COMM: usize = 8;
const COL_DIR: usize = 24;
const COL_LOCAL: usize = 28;
const COL_REMOTE: usize = 57;
/// Right-aligned cells: where they end.
const END_TX: usize = 96;
const END_RX: usize = 107;
const END_MS: usize = 117;
const END_RTT: usize = 125;
const COL_END: usize = 126;

/// The common row (IPv4, an ASCII name, every number fitting its column)
/// written into a row of spaces at fixed places: [`any_row`] copies each
/// cell and its padding through the Vec one at a time, ~15 small copies
/// and 6 itoa calls (in a loop, ~225 ns a row through the printer; this,
/// ~135). False, and nothing written, for any other row.
fn fixed_row(out: &mut Vec<u8>, r: &Flow) -> bool {
    use std::net::IpAddr::V4;
    let (V4(local), V4(remote)) = (r.local_addr, r.remote_addr) else { return false };
    let fits = |v: i64, digits: u32| (0..10i64.pow(digits)).contains(&v);
    let ms = duration_hundredths(r);
    if !(r.comm.is_ascii()
        && r.comm.len() <= 15
        && fits(r.pid.into(), 7)
        && fits(r.bytes_sent, 10)
        && fits(r.bytes_received, 10)
        && fits(r.srtt_us.into(), 7)
        && ms.is_none_or(|(negative, h)| !negative && h < 10u64.pow(8)))
    {
        return false;
    }
    let mut row = [b' '; COL_END];
    put_left(&mut row, 0, r.pid as u64);
    row[COL_COMM..COL_COMM + r.comm.len()].copy_from_slice(r.comm.as_bytes());
    row[COL_DIR] = direction_letter(r.direction).as_bytes()[0];
    for (col, ip, port) in [(COL_LOCAL, local, r.local_port), (COL_REMOTE, remote, r.remote_port)] {
        let mut at = col;
        for (i, octet) in ip.octets().into_iter().enumerate() {
            if i > 0 {
                row[at] = b'.';
                at += 1;
            }
            at = put_left(&mut row, at, octet.into());
        }
        row[at] = b':';
        put_left(&mut row, at + 1, port.into());
    }
    put_right(&mut row, END_TX, r.bytes_sent as u64);
    put_right(&mut row, END_RX, r.bytes_received as u64);
    match ms {
        Some((_, h)) => {
            put_right(&mut row, END_MS - 3, h / 100);
            row[END_MS - 3..END_MS].copy_from_slice(&decimals(h));
        }
        None => row[END_MS - 1] = b'-',
    }
    put_right(&mut row, END_RTT, r.srtt_us as u64);
    out.extend_from_slice(&row);
    end_cell(out, r);
    true
}

/// Writes `v` in decimal from `at`; returns where it ended.
fn put_left(row: &mut [u8], at: usize, v: u64) -> usize {
    let end = at + v.checked_ilog10().unwrap_or(0) as usize + 1;
    put_right(row, end, v);
    end
}

/// Writes `v` in decimal ending just before `end`; returns where it started.
fn put_right(row: &mut [u8], end: usize, mut v: u64) -> usize {
    let mut at = end;
    loop {
        at -= 1;
        row[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            return at;
        }
    }
}

/// Any row, cell by cell.
fn any_row(out: &mut Vec<u8>, r: &Flow) {
    let mut n = itoa::Buffer::new();
    left(out, 7, n.format(r.pid));
    left(out, 15, &r.comm);
    left(out, 3, direction_letter(r.direction));
    sockaddr(out, &r.local_addr, r.local_port);
    sockaddr(out, &r.remote_addr, r.remote_port);
    right(out, 10, n.format(r.bytes_sent).as_bytes());
    right(out, 10, n.format(r.bytes_received).as_bytes());
    match duration_hundredths(r) {
        Some((negative, hundredths)) => {
            let mut cell = [0u8; 24];
            let sign = usize::from(negative);
            cell[0] = b'-';
            let whole = n.format(hundredths / 100).as_bytes();
            let len = sign + whole.len();
            cell[sign..len].copy_from_slice(whole);
            cell[len..len + 3].copy_from_slice(&decimals(hundredths));
            right(out, 9, &cell[..len + 3]);
        }
        None => right(out, 9, b"-"),
    }
    right(out, 7, n.format(r.srtt_us).as_bytes());
    end_cell(out, r);
}

fn direction_letter(d: Direction) -> &'static str {
    match d {
        Direction::Client => "C",
        Direction::Server => "S",
        Direction::Unknown => "?",
    }
}

/// The duration in hundredths of a millisecond, rounded half up (format!'s
/// {:.2} of the f64 rounds half to even: they differ only on exact ties),
/// and whether it is negative (an end before its start: clocks of another
/// boot; format! prints "-0.02"). None without a start.
fn duration_hundredths(r: &Flow) -> Option<(bool, u64)> {
    let d = r.end_time_ns.saturating_sub(r.start_time_ns?);
    Some((d < 0, d.unsigned_abs().saturating_add(5_000) / 10_000))
}

/// ".xx" of a duration in hundredths.
fn decimals(hundredths: u64) -> [u8; 3] {
    let frac = (hundredths % 100) as u8;
    [b'.', b'0' + frac / 10, b'0' + frac % 10]
}

/// The last cell, how the flow ended ("open" for an interim record), and
/// the line's end.
fn end_cell(out: &mut Vec<u8>, r: &Flow) {
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

    /// Every number at and around its column's width, both ways a row is
    /// written: the same text as format!, and the fixed layout taken
    /// exactly when everything fits.
    #[test]
    fn rows_at_column_limits_match_format() {
        let base = fixtures::flow();
        let edges = |digits: u32| [0i64, 7, 10i64.pow(digits) - 1, 10i64.pow(digits), -1];
        let mut flows = Vec::new();
        for (i, v) in edges(7).into_iter().enumerate() {
            flows.push(Flow { pid: v as i32, srtt_us: edges(7)[4 - i] as i32, ..base.clone() });
        }
        for v in edges(10) {
            flows.push(Flow { bytes_sent: v, bytes_received: 10_000_000_000 - v, ..base.clone() });
        }
        // Hundredths of a millisecond: 999999.99 ms fits, 1000000.00 not
        // (no exact ties: format!'s f64 rounds those to even).
        for ns in [0, 4_999, 5_001, 999_999_994_999, 999_999_995_001, 123_456_789] {
            flows.push(Flow { start_time_ns: Some(base.end_time_ns - ns), ..base.clone() });
        }
        for later in [20_000, 3_000] {
            flows.push(Flow { start_time_ns: Some(base.end_time_ns + later), ..base.clone() });
        }
        for comm in ["", "x", "fifteen-chars-x", "sixteen-chars-xx", "ü"] {
            flows.push(Flow { comm: comm.into(), ..base.clone() });
        }
        for (a, p) in [("255.255.255.255", 65535), ("0.0.0.0", 0), ("10.0.0.1", 9)] {
            let ip: std::net::IpAddr = a.parse().unwrap();
            flows.push(Flow { local_addr: ip, remote_addr: ip, local_port: p, remote_port: p, ..base.clone() });
        }
        let mut fixed = 0;
        for f in &flows {
            let mut row = Vec::new();
            super::table_row(&mut row, f);
            assert_eq!(String::from_utf8(row).unwrap(), table_row_by_format(f), "{f:?}");
            let mut row = Vec::new();
            super::any_row(&mut row, f);
            assert_eq!(String::from_utf8(row).unwrap(), table_row_by_format(f));
            let mut row = Vec::new();
            if super::fixed_row(&mut row, f) {
                fixed += 1;
                assert_eq!(String::from_utf8(row).unwrap(), table_row_by_format(f));
            } else {
                assert!(row.is_empty());
            }
        }
        // The rows that fit: not the -1s, the 10^n, 1000000.00 ms, the ends
        // before their starts, the 16-character and the non-ASCII name.
        assert_eq!(flows.len() - fixed, 12);
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
