//! Interim totals that survive a sidecar restart.
//!
//! Interim records carry deltas against what was already reported for the
//! connection; the baseline lives in the capture loop's memory. A restarted
//! sidecar (every DaemonSet rollout) would otherwise report a surviving
//! connection's whole totals again at its close, under a new id. So after
//! each interim round, and at shutdown, the latest interim record of every
//! live connection (its running totals, before the delta) is written to the
//! carry file. The next run reads it back: a connection it did not see open
//! is matched by its socket (network namespace and 5-tuple, unique among
//! live TCP sockets) and continues under its old `connection_id`, start
//! time and owner, with its deltas counted from the old totals.
//!
//! The file is a log of flow messages exactly as they go to Kafka
//! (`schemas/flow.avsc`, single-object encoded), in the spool's frames
//! (length, CRC-32, payload). Read in order, an INTERIM record sets its
//! connection's totals and a FINAL one (a connection that closed while the
//! round was written) removes it. It is replaced whole (written to a
//! temporary file, synced, renamed), so a crash leaves the previous round's
//! file. A kill -9 between a round's records and its file repeats that
//! round's deltas at the next run (those records may also be lost with the
//! producer's queue); a clean stop loses and repeats nothing.

use std::{
    collections::HashMap,
    fs::File,
    io::{BufWriter, Write},
    net::IpAddr,
    path::PathBuf,
};

use flowlog_common::tcp_state;
use flowlog_schema::{decode_flow, Direction, Flow, HostIdentity, OwnerSource, RecordType};
use tracing::{info, warn};

use crate::{transport::spool::frames, workload::FastMap};

/// A live TCP socket's identity: no two live sockets share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SocketKey {
    netns: i64,
    local: IpAddr,
    local_port: u16,
    remote: IpAddr,
    remote_port: u16,
}

impl SocketKey {
    fn of(f: &Flow) -> SocketKey {
        SocketKey { netns: f.netns_ino, local: f.local_addr, local_port: f.local_port, remote: f.remote_addr, remote_port: f.remote_port }
    }
}

/// A connection an earlier run reported interim records for.
struct Earlier {
    /// Its latest interim record: running totals, id, start, owner.
    last: Flow,
    /// The round that last wrote it through this run's records (it is then
    /// not written again from here).
    noted_in: u64,
}

pub struct Carry {
    path: PathBuf,
    tmp: PathBuf,
    host_block: Vec<u8>,
    /// Looked up for every record while not empty (after a restart, until
    /// those connections close): a fast hash, SipHash was ~8% of the
    /// sidecar's CPU with Kafka then.
    earlier: FastMap<SocketKey, Earlier>,
    /// The file of the round being written.
    round: Option<BufWriter<File>>,
    round_no: u64,
    failed: bool,
    buf: Vec<u8>,
    framed: Vec<u8>,
}

impl Carry {
    /// Reads what an earlier run left at `path` (nothing if there is no
    /// file). Connections whose last record is older than this boot are gone.
    pub fn open(path: PathBuf, host: &HostIdentity) -> Carry {
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let mut carry = Carry {
            tmp: tmp.into(),
            host_block: host.encode(),
            earlier: FastMap::default(),
            round: None,
            round_no: 0,
            failed: false,
            buf: Vec::with_capacity(512),
            framed: Vec::with_capacity(512),
            path,
        };
        match std::fs::read(&carry.path) {
            Ok(data) => {
                let (earlier, bad) = read_log(&data, boot_time_ns());
                if bad > 0 {
                    warn!(path = %carry.path.display(), bad, "carry file: unreadable records skipped");
                }
                info!(path = %carry.path.display(), connections = earlier.len(), "continuing connections of the previous run");
                carry.earlier = earlier.into_iter().map(|(k, last)| (k, Earlier { last, noted_in: 0 })).collect();
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %carry.path.display(), "carry file unreadable, connections of the previous run start afresh: {e}"),
        }
        carry
    }

    /// The earlier run's connections: id and the totals already reported.
    pub fn baselines(&self) -> impl Iterator<Item = &Flow> {
        self.earlier.values().map(|e| &e.last)
    }

    /// Makes a record of a connection the earlier run reported continue it.
    /// Returns the id of an earlier connection known to be gone (a new
    /// connection opened on its socket), whose baseline must be dropped.
    pub fn adopt(&mut self, flow: &mut Flow) -> Option<i64> {
        if self.earlier.is_empty() {
            return None;
        }
        let key = SocketKey::of(flow);
        if flow.start_time_ns.is_some() {
            // Opened in this run: whatever had this socket before is closed.
            return self.earlier.remove(&key).map(|e| e.last.connection_id);
        }
        let e = self.earlier.get(&key)?;
        continue_from(flow, &e.last);
        if flow.record_type == RecordType::Final {
            self.earlier.remove(&key);
        }
        None
    }

    /// Starts writing a round's file.
    pub fn begin(&mut self) {
        self.round_no += 1;
        self.failed = false;
        self.round = match File::create(&self.tmp) {
            Ok(f) => Some(BufWriter::with_capacity(64 * 1024, f)),
            Err(e) => {
                warn!(path = %self.tmp.display(), "cannot write the carry file: {e}");
                None
            }
        };
    }

    /// A pass's file is being written.
    pub fn in_round(&self) -> bool {
        self.round.is_some()
    }

    /// Adds a record read during the round: every INTERIM record, and the
    /// FINAL record of a connection that had interim records.
    pub fn note(&mut self, flow: &Flow) {
        let Some(out) = &mut self.round else { return };
        if let Some(e) = self.earlier.get_mut(&SocketKey::of(flow)) {
            e.noted_in = self.round_no;
        }
        self.buf.clear();
        self.framed.clear();
        flow.to_message(&self.host_block, &mut self.buf);
        frames::frame(&mut self.framed, &self.buf);
        if let Err(e) = out.write_all(&self.framed) {
            self.fail(e);
        }
    }

    /// Ends the round: adds the earlier run's connections not seen in it,
    /// then replaces the file.
    pub fn commit(&mut self) {
        let Some(mut out) = self.round.take() else { return };
        if self.failed {
            return;
        }
        let mut framed = Vec::new();
        for e in self.earlier.values().filter(|e| e.noted_in != self.round_no) {
            self.buf.clear();
            e.last.to_message(&self.host_block, &mut self.buf);
            frames::frame(&mut framed, &self.buf);
        }
        let done = out
            .write_all(&framed)
            .and_then(|()| out.into_inner().map_err(|e| e.into_error()))
            .and_then(|f| f.sync_all())
            .and_then(|()| std::fs::rename(&self.tmp, &self.path));
        if let Err(e) = done {
            warn!(path = %self.path.display(), "cannot write the carry file: {e}");
        }
    }

    /// Drops the round's file (a pass that did not cover every socket).
    pub fn abort(&mut self) {
        self.round = None;
    }

    fn fail(&mut self, e: std::io::Error) {
        if !self.failed {
            warn!(path = %self.tmp.display(), "cannot write the carry file: {e}");
        }
        self.failed = true;
    }
}

/// The live connections a carry file lists, by socket, and how many
/// records could not be read.
fn read_log(data: &[u8], boot_ns: i64) -> (HashMap<SocketKey, Flow>, usize) {
    let (records, torn) = frames::records(data);
    let mut bad = torn as usize;
    let mut live: HashMap<SocketKey, Flow> = HashMap::new();
    for msg in records {
        let Ok(((), flow)) = decode_flow(msg, |_| Ok(())) else {
            bad += 1;
            continue;
        };
        match flow.record_type {
            RecordType::Final => {
                live.remove(&SocketKey::of(&flow));
            }
            RecordType::Interim if flow.end_time_ns >= boot_ns => {
                live.insert(SocketKey::of(&flow), flow);
            }
            RecordType::Interim => {}
        }
    }
    (live, bad)
}

/// Unix time of this boot, ns (no connection of an earlier boot is alive).
fn boot_time_ns() -> i64 {
    use nix::time::{clock_gettime, ClockId};
    let ns = |id| clock_gettime(id).map_or(0, |t| t.tv_sec() as i64 * 1_000_000_000 + t.tv_nsec() as i64);
    ns(ClockId::CLOCK_REALTIME) - ns(ClockId::CLOCK_BOOTTIME)
}

/// Turns a record of a socket this run did not see open into the next
/// record of the earlier run's connection `last`.
fn continue_from(flow: &mut Flow, last: &Flow) {
    flow.connection_id = last.connection_id;
    flow.start_time_ns = last.start_time_ns;
    if flow.direction == Direction::Unknown {
        flow.direction = last.direction;
    }
    if flow.owner_source == OwnerSource::Unknown {
        flow.pid = last.pid;
        flow.tid = last.tid;
        flow.comm = last.comm.clone();
        flow.cgroup_id = last.cgroup_id;
        flow.owner_source = last.owner_source;
    }
    // The earlier run saw the handshake and left the SYN's sequence unit out
    // of bytes_sent; this run's counters still hold it.
    if handshake_seen(last) {
        flow.bytes_sent = flow.bytes_sent.saturating_sub(1);
    }
    // The earlier states, then this run's (the state both saw only once).
    let mut path = last.state_path;
    let current = last.state_path.0 & 0xf;
    for (i, state) in states(flow.state_path).enumerate() {
        if i > 0 || state as u64 != current {
            path.push(state);
        }
    }
    flow.state_path = path;
}

/// The states of a path, oldest first, as kernel numbers.
fn states(p: flowlog_schema::StatePath) -> impl Iterator<Item = u8> {
    (0..p.len()).rev().map(move |i| ((p.0 >> (4 * i)) & 0xf) as u8)
}

/// A client whose SYN was acknowledged (SYN_SENT then ESTABLISHED).
fn handshake_seen(f: &Flow) -> bool {
    f.direction == Direction::Client
        && states(f.state_path).zip(states(f.state_path).skip(1)).any(|(a, b)| a == tcp_state::SYN_SENT && b == tcp_state::ESTABLISHED)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlog_schema::{fixtures, EndReason, StatePath};

    fn host() -> HostIdentity {
        fixtures::host()
    }

    fn interim(id: i64, port: u16, sent: i64) -> Flow {
        let mut f = fixtures::flow();
        f.connection_id = id;
        f.record_type = RecordType::Interim;
        f.end_reason = EndReason::Open;
        f.direction = Direction::Client;
        f.local_port = port;
        f.bytes_sent = sent;
        // This boot's: older records are dropped when read.
        f.end_time_ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as i64;
        f.start_time_ns = Some(f.end_time_ns - 1_000);
        f.state_path = StatePath(0x721); // CLOSE, SYN_SENT, ESTABLISHED
        f
    }

    /// The same socket seen by a new run that did not see it open.
    fn unseen(of: &Flow, record_type: RecordType, sent: i64) -> Flow {
        let mut f = of.clone();
        f.connection_id = 999;
        f.record_type = record_type;
        f.start_time_ns = None;
        f.direction = Direction::Unknown;
        f.owner_source = OwnerSource::Unknown;
        f.pid = 0;
        f.comm = Default::default();
        f.bytes_sent = sent;
        f.state_path = StatePath(0x57); // FIN_WAIT2, CLOSE
        f
    }

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowlog-carry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_round_carries_interims_and_forgets_closed_connections() {
        let path = dir("round").join("interim.carry");
        let mut c = Carry::open(path.clone(), &host());
        assert_eq!(c.baselines().count(), 0);
        c.begin();
        let (a, b) = (interim(1, 1001, 100), interim(2, 1002, 200));
        c.note(&a);
        c.note(&b);
        let mut b_final = b.clone();
        b_final.record_type = RecordType::Final;
        c.note(&b_final);
        c.commit();

        let mut next = Carry::open(path.clone(), &host());
        let ids: Vec<(i64, i64)> = next.baselines().map(|f| (f.connection_id, f.bytes_sent)).collect();
        assert_eq!(ids, [(1, 100)]);
        // A round of the new run that does not see connection 1 still carries it.
        next.begin();
        next.commit();
        let again = Carry::open(path, &host());
        assert_eq!(again.baselines().map(|f| f.connection_id).collect::<Vec<_>>(), [1]);
    }

    #[test]
    fn an_unseen_socket_continues_the_earlier_connection() {
        let path = dir("adopt").join("interim.carry");
        let mut c = Carry::open(path.clone(), &host());
        let a = interim(7, 2001, 5_000);
        c.begin();
        c.note(&a);
        c.commit();

        let mut next = Carry::open(path.clone(), &host());
        // The close, as the kernel reports it without an entry: the SYN's
        // unit is still in the count (5 000 + 300 payload bytes + 1).
        let mut fin = unseen(&a, RecordType::Final, 5_301);
        assert_eq!(next.adopt(&mut fin), None);
        assert_eq!(fin.connection_id, 7);
        assert_eq!(fin.start_time_ns, a.start_time_ns);
        assert_eq!((fin.direction, fin.owner_source, fin.pid, fin.comm.as_str()), (a.direction, a.owner_source, a.pid, a.comm.as_str()));
        assert_eq!(fin.bytes_sent, 5_300);
        assert_eq!(fin.state_path.iter().collect::<Vec<_>>(), ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT2", "CLOSE"]);
        // Closed: a second record of the same socket is a new connection.
        let mut other = unseen(&a, RecordType::Final, 10);
        next.adopt(&mut other);
        assert_eq!(other.connection_id, 999);
        assert_eq!(next.baselines().count(), 0);
    }

    #[test]
    fn a_new_connection_on_the_socket_ends_the_earlier_one() {
        let path = dir("reuse").join("interim.carry");
        let mut c = Carry::open(path.clone(), &host());
        c.begin();
        c.note(&interim(7, 3001, 5_000));
        c.commit();
        let mut next = Carry::open(path, &host());
        let mut fresh = interim(42, 3001, 10);
        fresh.record_type = RecordType::Final;
        assert_eq!(next.adopt(&mut fresh), Some(7));
        assert_eq!(fresh.connection_id, 42);
        assert_eq!(next.baselines().count(), 0);
    }

    #[test]
    fn records_of_an_earlier_boot_and_torn_files_are_dropped() {
        let a = interim(1, 1001, 100);
        let mut old = interim(2, 1002, 100);
        old.end_time_ns = 1_000;
        old.start_time_ns = Some(10);
        let mut data = Vec::new();
        for f in [&a, &old] {
            let mut msg = Vec::new();
            f.to_message(&host().encode(), &mut msg);
            frames::frame(&mut data, &msg);
        }
        let (live, bad) = read_log(&data, 2_000);
        assert_eq!((live.len(), bad), (1, 0));
        let (live, bad) = read_log(&data[..data.len() - 3], 2_000);
        assert_eq!((live.len(), bad), (1, 1));
        let (live, bad) = read_log(b"garbage that is no frame", 0);
        assert_eq!((live.len(), bad), (0, 1));
    }

    #[test]
    fn a_failed_round_keeps_the_previous_file() {
        let d = dir("fail");
        let path = d.join("interim.carry");
        let mut c = Carry::open(path.clone(), &host());
        c.begin();
        c.note(&interim(1, 1001, 100));
        c.commit();
        let before = std::fs::read(&path).unwrap();
        // The temporary name is taken by a directory: the round cannot start.
        std::fs::create_dir(d.join("interim.carry.tmp")).unwrap();
        c.begin();
        c.note(&interim(2, 1002, 100));
        c.commit();
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }
}
