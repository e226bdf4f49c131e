//! Bounded on-disk spool: append-only segment files of length+CRC framed
//! Kafka messages, read back oldest first. A message may hold several flow
//! records (a FlowBatch): counts are of records ([`records_in`]). Used while the broker is unreachable or
//! slow, and at shutdown for whatever could not be delivered in time.
//!
//! - **Delete after ack.** The replay thread *leases* the oldest segment,
//!   reads it without holding the spool's lock ([`Lease::read`]) and, once
//!   the broker has acknowledged its records, deletes the file or replaces
//!   it by the records still unacknowledged ([`Lease::keep`], an atomic
//!   rename). A crash during replay replays the segment again: duplicates
//!   (the same host, epoch and sequence), never losses.
//! - **No torn frames mid-segment.** Appends are buffered as whole frames
//!   and written together; when a write fails (ENOSPC, EIO) the file is cut
//!   back to its last whole frame and the buffered records are counted as
//!   dropped ([`Drops::error`]). Later appends go after that whole frame.
//! - **Bounded.** Past `max_bytes` whole oldest segments (never the leased
//!   one) are dropped and their records counted ([`Drops::full`]). A torn
//!   tail (crash mid-write) is detected by its CRC and counted once.
//! - **Written per batch, synced on a timer.** Appends are buffered; the
//!   owner calls [`Spool::write_out`] after each batch (so a process crash
//!   loses nothing handed over before it) and [`Spool::sync_due`]
//!   periodically, so with `fsync = "interval"` a quiet spool reaches the
//!   disk within `fsync_interval_ms` without waiting for the next append.
//! - **Private, one writer.** Records name this host's peers: the directory
//!   is made 0700 and every file 0600, whatever the umask or whoever created
//!   the directory (a hostPath is 0755). An exclusive `flock` on
//!   [`LOCK_FILE`] keeps a second sidecar (a manual run, a DaemonSet's
//!   `maxSurge`) out; it fails to open the spool, naming the holder's pid.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions, Permissions},
    io::{self, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::ValueEnum;
use flowlog_schema::records_in;
use serde::{Deserialize, Serialize};

pub(crate) mod frames;

use frames::{frame, HEADER};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// fsync after every append (safest, slowest).
    Always,
    /// fsync every `fsync_interval_ms` (on a timer, so also when no more
    /// records come) and at shutdown.
    Interval,
    /// Leave it to the OS.
    Never,
}

flowlog_settings::value_enum!(Fsync);

flowlog_settings::settings! {
    /// Spool settings (`[spool]` in the config file).
    pub struct SpoolConfig {
        /// Directory for segment files; created if missing.
        #[flag(long = "spool-dir", env = "FLOWLOG_SPOOL_DIR")]
        pub dir: PathBuf = PathBuf::from("/var/lib/flowlog/spool"),
        /// Total bytes on disk before the oldest segments are dropped.
        #[flag(long = "spool-max-bytes", env = "FLOWLOG_SPOOL_MAX_BYTES")]
        pub max_bytes: u64 = 1 << 30,
        /// A segment is closed and a new one started past this size. A
        /// segment is deleted once all its records are acknowledged, so a
        /// crash during replay sends at most this much again.
        pub segment_bytes: u64 = 8 << 20,
        /// When the spool is fsync'd.
        pub fsync: Fsync = Fsync::Interval,
        /// With `fsync = "interval"`: the longest time a spooled record
        /// stays unsynced, ms.
        pub fsync_interval_ms: u64 = 1000,
    }
}

/// Records the spool lost, by cause; taken (and reset) with [`Spool::take_drops`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Drops {
    /// Dropped to stay within `max_bytes` (whole oldest segments, or a
    /// record even an empty spool cannot hold).
    pub full: u64,
    /// Not written: the write failed (ENOSPC, EIO) and was rolled back.
    pub error: u64,
}

#[derive(Debug, Clone)]
struct Segment {
    id: u64,
    bytes: u64,
    records: u64,
    /// Being replayed: not dropped to make room, deleted only on [`Spool::settle`].
    leased: bool,
}

/// The segment being appended to (always the last one).
struct Writer {
    file: File,
    /// Bytes of whole frames in the file.
    len: u64,
    /// Whole frames not yet written, and how many records they hold.
    buf: Vec<u8>,
    buffered: u64,
    /// Written since the last fsync.
    unsynced: bool,
    last_sync: Instant,
}

pub struct Spool {
    cfg: SpoolConfig,
    /// Holds the directory's lock (released when the spool is dropped or the
    /// process dies).
    _lock: File,
    /// Oldest first; the last one is open for appends when `writer` is Some.
    segments: VecDeque<Segment>,
    writer: Option<Writer>,
    next_id: u64,
    drops: Drops,
}

/// Buffered appends are written out past this many bytes.
const BUF_BYTES: usize = 64 * 1024;

/// In the spool directory; holds the pid of the sidecar that locked it.
pub const LOCK_FILE: &str = "sidecar.lock";
/// The spool's files: the sidecar's user only.
const FILE_MODE: u32 = 0o600;
const DIR_MODE: u32 = 0o700;

/// Opens a spool file for writing, private whatever the umask.
fn private_file(path: &Path, truncate: bool) -> io::Result<File> {
    OpenOptions::new().create(true).write(true).append(!truncate).truncate(truncate).mode(FILE_MODE).open(path)
}

/// Takes the directory's lock, or fails naming the pid that holds it.
fn lock_dir(dir: &Path) -> io::Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).mode(FILE_MODE).open(&path)?;
    match f.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            let mut pid = String::new();
            let _ = f.read_to_string(&mut pid);
            let holder = match pid.trim() {
                "" => "another process".to_string(),
                pid => format!("another sidecar, pid {pid}"),
            };
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("{} is locked by {holder} ({}): one sidecar per spool directory", dir.display(), path.display()),
            ));
        }
        Err(fs::TryLockError::Error(e)) => return Err(e),
    }
    f.set_permissions(Permissions::from_mode(FILE_MODE))?;
    f.set_len(0)?;
    f.write_all(format!("{}\n", std::process::id()).as_bytes())?;
    Ok(f)
}

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:016}.log"))
}

fn frame_len(payload: &[u8]) -> u64 {
    (payload.len() + HEADER) as u64
}

impl Spool {
    /// Opens the spool, indexing segments left by a previous run (all of
    /// them unacknowledged: a segment is deleted only once delivered).
    pub fn open(cfg: SpoolConfig) -> io::Result<Spool> {
        fs::create_dir_all(&cfg.dir)?;
        fs::set_permissions(&cfg.dir, Permissions::from_mode(DIR_MODE))?;
        let lock = lock_dir(&cfg.dir)?;
        let mut ids = Vec::new();
        for e in fs::read_dir(&cfg.dir)?.filter_map(|e| e.ok()) {
            let Ok(name) = e.file_name().into_string() else { continue };
            if name.starts_with("seg-") && name.ends_with(".tmp") {
                // A replacement cut short by a crash; the segment it was to
                // replace is still there, whole.
                fs::remove_file(e.path())?;
            } else if let Some(id) = name.strip_prefix("seg-").and_then(|n| n.strip_suffix(".log")).and_then(|n| n.parse().ok()) {
                // Left by an older version or another umask: private too.
                fs::set_permissions(e.path(), Permissions::from_mode(FILE_MODE))?;
                ids.push(id);
            }
        }
        ids.sort_unstable();
        let mut segments = VecDeque::new();
        for id in ids {
            let path = seg_path(&cfg.dir, id);
            let bytes = fs::metadata(&path)?.len();
            let records = read_segment(&path)?.0.iter().map(|m| records_in(m)).sum();
            segments.push_back(Segment { id, bytes, records, leased: false });
        }
        // Ids start high so that new segments can always go in front.
        let next_id = segments.back().map(|s| s.id + 1).unwrap_or(1 << 40);
        Ok(Spool { cfg, _lock: lock, segments, writer: None, next_id, drops: Drops::default() })
    }

    pub fn is_empty(&self) -> bool {
        self.segments.iter().all(|s| s.records == 0)
    }

    /// A segment is open for appends (written out and synced on a timer).
    pub fn is_open(&self) -> bool {
        self.writer.is_some()
    }

    /// Nothing is spooled but the leased segment (whose records the replay
    /// may have handed to the producer already).
    pub fn only_leased(&self) -> bool {
        self.segments.iter().all(|s| s.leased || s.records == 0)
    }

    /// Bytes spooled, including the leased segment's.
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    /// Records spooled and not yet acknowledged (the leased segment's too).
    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }

    /// What was lost since the last call.
    pub fn take_drops(&mut self) -> Drops {
        std::mem::take(&mut self.drops)
    }

    /// Appends one record. Past `max_bytes` the oldest segments go, or this
    /// record if even that is not enough ([`Drops::full`]). An error means
    /// a write failed: the records it held (buffered ones, maybe this one)
    /// were dropped ([`Drops::error`]), and the file holds only whole frames.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<()> {
        let need = frame_len(payload);
        let records = records_in(payload);
        self.make_room(need);
        if self.bytes() + need > self.cfg.max_bytes {
            self.drops.full += records;
            return Ok(());
        }
        let roll = match self.segments.back() {
            Some(s) => self.writer.is_none() || s.bytes + need > self.cfg.segment_bytes,
            None => true,
        };
        let mut sealed = Ok(());
        if roll {
            sealed = self.seal();
            let id = self.next_id;
            self.next_id += 1;
            let file = match private_file(&seg_path(&self.cfg.dir, id), false) {
                Ok(f) => f,
                Err(e) => {
                    self.drops.error += records;
                    return Err(e);
                }
            };
            self.writer = Some(Writer { file, len: 0, buf: Vec::new(), buffered: 0, unsynced: false, last_sync: Instant::now() });
            self.segments.push_back(Segment { id, bytes: 0, records: 0, leased: false });
        }
        let (w, seg) = (self.writer.as_mut().unwrap(), self.segments.back_mut().unwrap());
        frame(&mut w.buf, payload);
        w.buffered += records;
        seg.bytes += need;
        seg.records += records;
        let written = if self.cfg.fsync == Fsync::Always {
            self.write_out().and_then(|()| self.sync_writer())
        } else if w.buf.len() >= BUF_BYTES {
            self.write_out()
        } else {
            Ok(())
        };
        sealed.and(written)
    }

    /// Drops whole oldest segments until `need` more bytes fit, but never
    /// the one being replayed (its records may be on their way).
    fn make_room(&mut self, need: u64) {
        while self.bytes() + need > self.cfg.max_bytes {
            let Some(i) = self.segments.iter().position(|s| !s.leased) else { break };
            if i + 1 == self.segments.len() {
                // The open one: its buffered records go with it.
                self.writer = None;
            }
            let old = self.segments.remove(i).unwrap();
            let _ = fs::remove_file(seg_path(&self.cfg.dir, old.id));
            self.drops.full += old.records;
        }
    }

    /// Writes the buffered frames (no fsync): once written, a crash of the
    /// process (kill -9, OOM) no longer loses them. On failure the file is
    /// cut back to its last whole frame and the buffered records are counted
    /// as dropped, so no torn frame is ever followed by more records.
    pub fn write_out(&mut self) -> io::Result<()> {
        let Some(w) = self.writer.as_mut().filter(|w| !w.buf.is_empty()) else { return Ok(()) };
        let result = w.file.write_all(&w.buf);
        if result.is_ok() {
            w.len += w.buf.len() as u64;
            w.unsynced = true;
        } else {
            let seg = self.segments.back_mut().unwrap();
            seg.bytes -= w.buf.len() as u64;
            seg.records -= w.buffered;
            self.drops.error += w.buffered;
            if w.file.set_len(w.len).is_err() {
                // Could not cut it: close the segment so nothing follows the
                // torn frame (replay counts it as a torn tail).
                self.writer = None;
            }
        }
        if let Some(w) = self.writer.as_mut() {
            w.buf.clear();
            w.buffered = 0;
        }
        result
    }

    fn sync_writer(&mut self) -> io::Result<()> {
        let Some(w) = self.writer.as_mut() else { return Ok(()) };
        w.last_sync = Instant::now();
        if std::mem::take(&mut w.unsynced) && self.cfg.fsync != Fsync::Never {
            w.file.sync_data()?;
        }
        Ok(())
    }

    /// The timer: once `fsync_interval_ms` has passed since the last time,
    /// writes out buffered appends and returns the file to fsync, which the
    /// caller does after releasing the spool's lock (None with `fsync =
    /// "never"`, or when nothing is pending).
    pub fn sync_due(&mut self, now: Instant) -> io::Result<Option<File>> {
        let interval = Duration::from_millis(self.cfg.fsync_interval_ms);
        let Some(w) = self.writer.as_mut() else { return Ok(None) };
        if now.saturating_duration_since(w.last_sync) < interval {
            return Ok(None);
        }
        w.last_sync = now;
        self.write_out()?;
        let Some(w) = self.writer.as_mut() else { return Ok(None) };
        if self.cfg.fsync != Fsync::Interval || !std::mem::take(&mut w.unsynced) {
            return Ok(None);
        }
        w.file.try_clone().map(Some)
    }

    /// Writes out, fsyncs (unless `fsync = "never"`) and closes the open segment.
    pub fn seal(&mut self) -> io::Result<()> {
        let written = self.write_out();
        let synced = self.sync_writer();
        self.writer = None;
        written.and(synced)
    }

    /// Leases the oldest segment for replay (None if there is none, or it
    /// is leased already). If it is the open one, it is closed first.
    pub fn lease(&mut self) -> io::Result<Option<Lease>> {
        match self.segments.front() {
            None => return Ok(None),
            Some(s) if s.leased => return Ok(None),
            Some(_) => {}
        }
        let mut unsynced = None;
        if self.segments.len() == 1 && self.writer.is_some() {
            let written = self.write_out();
            if let Some(w) = self.writer.take() {
                // fsync'd by the reader, outside the lock.
                unsynced = (w.unsynced && self.cfg.fsync != Fsync::Never).then_some(w.file);
            }
            written?;
        }
        let seg = self.segments.front_mut().unwrap();
        seg.leased = true;
        Ok(Some(Lease { id: seg.id, records: seg.records, bytes: seg.bytes, path: seg_path(&self.cfg.dir, seg.id), sync: self.cfg.fsync != Fsync::Never, unsynced }))
    }

    /// Records the outcome of a lease: its file now holds `left` records in
    /// `left_bytes` (0: it was deleted).
    pub fn settle(&mut self, lease: Lease, left: u64, left_bytes: u64) {
        let Some(i) = self.segments.iter().position(|s| s.id == lease.id) else { return };
        if left == 0 {
            self.segments.remove(i);
        } else {
            let s = &mut self.segments[i];
            (s.records, s.bytes, s.leased) = (left, left_bytes, false);
        }
    }

    /// A new segment in front of all others, for records older than
    /// everything spooled (deliveries that failed). Write it with
    /// [`Front::write`] (no lock needed), then add it with [`Spool::add_front`].
    pub fn front_slot(&mut self) -> Front {
        let id = match self.segments.front() {
            Some(s) => s.id - 1,
            None => {
                self.next_id += 1;
                self.next_id - 1
            }
        };
        Front { id, path: seg_path(&self.cfg.dir, id), sync: self.cfg.fsync != Fsync::Never }
    }

    pub fn add_front(&mut self, front: Front, records: u64, bytes: u64) {
        self.segments.push_front(Segment { id: front.id, bytes, records, leased: false });
    }

    /// Writes `records` as a new segment in front of everything spooled
    /// (at shutdown: failed deliveries).
    pub fn prepend(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        let front = self.front_slot();
        let bytes = front.write(records)?;
        self.add_front(front, records.iter().map(|m| records_in(m)).sum(), bytes);
        Ok(())
    }
}

/// A segment to be written in front of the spool ([`Spool::front_slot`]).
pub struct Front {
    id: u64,
    path: PathBuf,
    sync: bool,
}

impl Front {
    /// Writes the segment file, durably; returns its size.
    pub fn write(&self, records: &[Vec<u8>]) -> io::Result<u64> {
        write_segment(&self.path, records.iter().map(|r| &r[..]), self.sync)
    }
}

/// The oldest segment, handed to the replay thread: nothing else touches
/// its file until [`Spool::settle`].
pub struct Lease {
    id: u64,
    /// As indexed (what is lost if the file cannot be read).
    pub records: u64,
    pub bytes: u64,
    path: PathBuf,
    sync: bool,
    unsynced: Option<File>,
}

impl Lease {
    /// Every intact record, oldest first, and 1 if a torn or corrupt tail
    /// was skipped. Reads the whole file: call it without the spool's lock.
    pub fn read(&mut self) -> io::Result<(Vec<Vec<u8>>, u64)> {
        if let Some(f) = self.unsynced.take() {
            f.sync_data()?;
        }
        read_segment(&self.path)
    }

    /// Deletes the segment's file when nothing is `left`, else replaces it
    /// by `left` (atomically: a crash leaves the old file or the new one).
    /// Returns the new file's size. Disk I/O: call it without the lock.
    pub fn keep<'a>(&self, left: impl IntoIterator<Item = &'a [u8]>) -> io::Result<u64> {
        let mut left = left.into_iter().peekable();
        if left.peek().is_none() {
            return match fs::remove_file(&self.path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(0),
            };
        }
        write_segment(&self.path, left, self.sync)
    }
}

/// Writes `records` as the segment file `path`, replacing any: a temporary
/// file, fsync'd (if `sync`), renamed over `path`. Returns its size.
fn write_segment<'a>(path: &Path, records: impl IntoIterator<Item = &'a [u8]>, sync: bool) -> io::Result<u64> {
    let tmp = path.with_extension("log.tmp");
    let mut data = Vec::new();
    for r in records {
        frame(&mut data, r);
    }
    let written = (|| {
        let mut f = private_file(&tmp, true)?;
        f.write_all(&data)?;
        if sync {
            f.sync_data()?;
        }
        fs::rename(&tmp, path)?;
        if sync {
            if let Some(dir) = path.parent() {
                File::open(dir)?.sync_all()?;
            }
        }
        Ok(data.len() as u64)
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Reads every intact record of a segment; returns them and 1 if a torn
/// or corrupt tail was skipped (how many records it held is unknown).
fn read_segment(path: &Path) -> io::Result<(Vec<Vec<u8>>, u64)> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let (records, torn) = frames::records(&data);
    Ok((records.into_iter().map(<[u8]>::to_vec).collect(), u64::from(torn)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, max: u64, seg: u64) -> SpoolConfig {
        SpoolConfig { dir: dir.to_path_buf(), max_bytes: max, segment_bytes: seg, fsync: Fsync::Never, fsync_interval_ms: 1000 }
    }

    /// A spool in `dir` that one segment of 1 MiB fills: nothing is dropped.
    fn roomy(dir: &Path) -> Spool {
        Spool::open(cfg(dir, 1 << 20, 1 << 20)).unwrap()
    }

    /// Replays one segment as the transport does when the broker takes all
    /// of it: lease, read, delete, settle.
    fn replay_one(s: &mut Spool) -> Option<(Vec<Vec<u8>>, u64)> {
        let mut lease = s.lease().unwrap()?;
        let got = lease.read().unwrap();
        lease.keep([]).unwrap();
        s.settle(lease, 0, 0);
        Some(got)
    }

    /// Every record left, oldest first.
    fn drain(s: &mut Spool) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| replay_one(s)).flat_map(|(r, _)| r).collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowlog-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn segment_files(d: &Path) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = fs::read_dir(d).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "log")).collect();
        v.sort();
        v
    }

    fn file_names(d: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        v.sort();
        v
    }

    fn mode(p: &Path) -> u32 {
        fs::metadata(p).unwrap().permissions().mode() & 0o777
    }

    /// Records name this host's peers: the directory is 0700 and every file
    /// 0600 even when the directory and an old segment were created open
    /// (a hostPath is 0755; here 0777 and 0666).
    #[test]
    fn the_spool_is_private() {
        let d = tmp("private");
        fs::create_dir_all(&d).unwrap();
        fs::set_permissions(&d, Permissions::from_mode(0o777)).unwrap();
        let old = seg_path(&d, 7);
        fs::write(&old, []).unwrap();
        fs::set_permissions(&old, Permissions::from_mode(0o666)).unwrap();
        let mut s = Spool::open(cfg(&d, 1 << 20, 100)).unwrap();
        for i in 0..20u32 {
            s.append(&i.to_le_bytes().repeat(5)).unwrap();
        }
        s.prepend(&[b"failed".to_vec()]).unwrap();
        s.seal().unwrap();
        // A partly delivered segment is rewritten (a new file, renamed).
        let mut lease = s.lease().unwrap().unwrap();
        let (got, _) = lease.read().unwrap();
        let bytes = lease.keep(got.iter().map(|r| &r[..])).unwrap();
        s.settle(lease, got.len() as u64, bytes);
        assert_eq!(mode(&d), 0o700);
        let files: Vec<PathBuf> = fs::read_dir(&d).unwrap().map(|e| e.unwrap().path()).collect();
        assert!(files.len() > 3, "{files:?}");
        for f in files {
            assert_eq!(mode(&f), 0o600, "{}", f.display());
        }
        drop(s);
        fs::remove_dir_all(d).unwrap();
    }

    /// A second writer on the same directory (a manual run, a DaemonSet's
    /// `maxSurge`) is refused, with the directory and the holder's pid; once
    /// the first is gone the directory opens again.
    #[test]
    fn a_second_writer_is_refused() {
        let d = tmp("lock");
        let first = roomy(&d);
        let err = Spool::open(cfg(&d, 1 << 20, 1 << 20)).err().expect("a second spool on the same directory");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        let msg = err.to_string();
        assert!(msg.contains(&d.display().to_string()), "{msg}");
        assert!(msg.contains(&format!("pid {}", std::process::id())), "{msg}");
        drop(first);
        drop(roomy(&d));
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn replays_in_order_across_reopen() {
        let d = tmp("order");
        let mut s = Spool::open(cfg(&d, 1 << 20, 100)).unwrap();
        for i in 0..20u32 {
            s.append(&i.to_le_bytes().repeat(5)).unwrap();
        }
        s.seal().unwrap();
        assert_eq!(s.records(), 20);
        drop(s);
        let mut s = Spool::open(cfg(&d, 1 << 20, 100)).unwrap();
        assert_eq!(s.records(), 20);
        let got = drain(&mut s);
        let want: Vec<Vec<u8>> = (0..20u32).map(|i| i.to_le_bytes().repeat(5)).collect();
        assert_eq!(got, want);
        assert!(s.is_empty());
        assert_eq!(file_names(&d), [LOCK_FILE], "only the lock is left");
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn drops_oldest_whole_segments_past_the_bound() {
        let d = tmp("bound");
        // 28-byte records (20 + 8), 2 per segment, at most 4 on disk.
        let mut s = Spool::open(cfg(&d, 4 * 28, 56)).unwrap();
        for i in 0..10u8 {
            s.append(&[i; 20]).unwrap();
        }
        assert_eq!(s.take_drops(), Drops { full: 6, error: 0 });
        assert_eq!(drain(&mut s), (6..10u8).map(|i| vec![i; 20]).collect::<Vec<_>>());
        fs::remove_dir_all(d).unwrap();
    }

    /// The segment being replayed is never dropped to make room (its records
    /// may be on their way to the broker): the next oldest goes instead.
    #[test]
    fn the_leased_segment_is_not_dropped_for_room() {
        let d = tmp("leased-room");
        let mut s = Spool::open(cfg(&d, 4 * 28, 56)).unwrap();
        for i in 0..4u8 {
            s.append(&[i; 20]).unwrap();
        }
        let mut lease = s.lease().unwrap().unwrap();
        for i in 4..8u8 {
            s.append(&[i; 20]).unwrap();
        }
        // Segments [0,1] (leased), [2,3], [4,5], [6,7]: [2,3] and [4,5] went.
        assert_eq!(s.take_drops().full, 4);
        assert_eq!(lease.read().unwrap().0, vec![vec![0u8; 20], vec![1u8; 20]]);
        lease.keep([]).unwrap();
        s.settle(lease, 0, 0);
        assert_eq!(drain(&mut s), (6..8u8).map(|i| vec![i; 20]).collect::<Vec<_>>());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn prepend_goes_first() {
        let d = tmp("prepend");
        let mut s = roomy(&d);
        s.append(b"new").unwrap();
        s.prepend(&[b"old1".to_vec(), b"old2".to_vec()]).unwrap();
        s.seal().unwrap();
        drop(s);
        assert_eq!(drain(&mut roomy(&d)), vec![b"old1".to_vec(), b"old2".to_vec(), b"new".to_vec()]);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn torn_tail_is_skipped_and_counted() {
        let d = tmp("torn");
        let mut s = roomy(&d);
        s.append(b"first").unwrap();
        s.append(b"second").unwrap();
        s.seal().unwrap();
        drop(s);
        let path = seg_path(&d, 1 << 40);
        let mut data = fs::read(&path).unwrap();
        data.truncate(data.len() - 2);
        fs::write(&path, data).unwrap();
        let mut s = roomy(&d);
        assert_eq!(replay_one(&mut s).unwrap(), (vec![b"first".to_vec()], 1));
        fs::remove_dir_all(d).unwrap();
    }

    /// A leased segment stays on disk, whole, until it is settled: a crash
    /// (here: dropping the spool without settling) replays all of it. A
    /// partly acknowledged segment is cut down to the rest, atomically.
    #[test]
    fn a_segment_is_deleted_only_once_delivered() {
        let d = tmp("lease");
        let mut s = Spool::open(cfg(&d, 1 << 20, 3 * 13)).unwrap();
        for i in 0..6u8 {
            s.append(&[i; 5]).unwrap();
        }
        let mut lease = s.lease().unwrap().unwrap();
        assert_eq!(lease.read().unwrap().0, (0..3u8).map(|i| vec![i; 5]).collect::<Vec<_>>());
        assert!(s.lease().unwrap().is_none(), "one lease at a time");
        assert_eq!(s.records(), 6, "leased records count until delivered");
        // Crash before any acknowledgement: everything is still there.
        s.seal().unwrap();
        drop((s, lease));
        let mut s = Spool::open(cfg(&d, 1 << 20, 3 * 13)).unwrap();
        assert_eq!(s.records(), 6);
        // Records 0 and 2 acknowledged, 1 not: the file keeps only 1.
        let mut lease = s.lease().unwrap().unwrap();
        let (got, _) = lease.read().unwrap();
        let bytes = lease.keep([&got[1][..]]).unwrap();
        s.settle(lease, 1, bytes);
        assert_eq!(s.records(), 4);
        assert_eq!(segment_files(&d).len(), 2);
        drop(s);
        let mut s = Spool::open(cfg(&d, 1 << 20, 3 * 13)).unwrap();
        assert_eq!(drain(&mut s), [1u8, 3, 4, 5].iter().map(|&i| vec![i; 5]).collect::<Vec<_>>());
        fs::remove_dir_all(d).unwrap();
    }

    /// A replacement cut short by a crash (its `.tmp` file) is discarded on
    /// open; the segment it was to replace is replayed whole.
    #[test]
    fn a_half_written_replacement_is_discarded() {
        let d = tmp("tmp");
        let mut s = roomy(&d);
        s.append(b"a").unwrap();
        s.seal().unwrap();
        drop(s);
        let seg = seg_path(&d, 1 << 40);
        fs::write(seg.with_extension("log.tmp"), b"\x05\0\0").unwrap();
        let mut s = roomy(&d);
        assert_eq!(drain(&mut s), vec![b"a".to_vec()]);
        assert_eq!(file_names(&d), [LOCK_FILE], "only the lock is left");
        fs::remove_dir_all(d).unwrap();
    }

    /// fsync = "interval": one record and then silence. The timer, once the
    /// interval has passed, puts the record on disk (before, it sat in the
    /// process's buffer until the next append).
    #[test]
    fn the_timer_writes_out_a_quiet_spool() {
        let d = tmp("timer");
        let mut s = Spool::open(SpoolConfig { fsync: Fsync::Interval, fsync_interval_ms: 1000, ..cfg(&d, 1 << 20, 1 << 20) }).unwrap();
        s.append(b"quiet").unwrap();
        let t0 = Instant::now();
        let path = seg_path(&d, 1 << 40);
        assert_eq!(fs::metadata(&path).unwrap().len(), 0, "buffered until due");
        assert!(s.sync_due(t0).unwrap().is_none(), "not due yet");
        let file = s.sync_due(t0 + Duration::from_millis(1000)).unwrap().expect("due: a file to fsync");
        file.sync_data().unwrap();
        assert_eq!(read_segment(&path).unwrap(), (vec![b"quiet".to_vec()], 0));
        // Nothing new: nothing to fsync.
        assert!(s.sync_due(t0 + Duration::from_millis(2000)).unwrap().is_none());
        fs::remove_dir_all(d).unwrap();
    }

    /// A filesystem mounted by the test (root only), unmounted on drop,
    /// also when the test panics.
    struct TinyFs(PathBuf);

    impl TinyFs {
        fn mount(name: &str, size: &str) -> Option<TinyFs> {
            // SAFETY: plain syscall.
            if unsafe { libc::geteuid() } != 0 {
                assert_ne!(std::env::var("FLOWLOG_REQUIRE_ROOT_TESTS").as_deref(), Ok("1"), "needs root to mount a tmpfs");
                eprintln!("skipping: needs root to mount a tmpfs");
                return None;
            }
            let d = tmp(name);
            fs::create_dir_all(&d).unwrap();
            let opts = format!("size={size}");
            nix::mount::mount(Some("tmpfs"), &d, Some("tmpfs"), nix::mount::MsFlags::empty(), Some(opts.as_str())).expect("mount tmpfs");
            Some(TinyFs(d))
        }
    }

    impl Drop for TinyFs {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// ENOSPC: a 256 KiB tmpfs fills up. Every record is either read back or
    /// counted as dropped; once space is freed, new records are appended and
    /// read back (no torn frame hides them). With `always` each failing
    /// record is rolled back alone, with `interval` a whole buffer.
    #[test]
    fn a_full_disk_loses_only_what_it_counts() {
        for fsync in [Fsync::Always, Fsync::Interval] {
            let Some(fs_) = TinyFs::mount(&format!("enospc-{fsync:?}"), "256k") else { return };
            let filler = fs_.0.join("filler");
            fs::write(&filler, vec![0u8; 64 << 10]).unwrap();
            let dir = fs_.0.join("spool");
            // Bounds far above the filesystem: only the disk says no.
            let mut s = Spool::open(SpoolConfig { fsync, ..cfg(&dir, 16 << 20, 48 << 10) }).unwrap();
            // Records of varied sizes (300..1300 bytes) so frames straddle
            // the last free block; each carries its number.
            let record = |i: u32| {
                let mut r = i.to_le_bytes().to_vec();
                r.resize(300 + (i as usize * 37) % 1000, i as u8);
                r
            };
            // About 500 KB: twice what the filesystem holds.
            let (mut appended, mut failures) = (0u32, 0);
            while appended < 600 {
                failures += u32::from(s.append(&record(appended)).is_err());
                appended += 1;
            }
            failures += u32::from(s.seal().is_err());
            let full = s.take_drops();
            assert_eq!(full.full, 0);
            assert!(full.error > 0 && failures > 0, "{fsync:?}: the disk never filled");
            // Space again: later records must all come back.
            fs::remove_file(&filler).unwrap();
            let first_after = appended;
            for _ in 0..20 {
                s.append(&record(appended)).unwrap();
                appended += 1;
            }
            s.seal().unwrap();
            assert_eq!(s.take_drops(), Drops::default());
            let (mut got, mut corrupt) = (Vec::new(), 0);
            while let Some((r, c)) = replay_one(&mut s) {
                got.extend(r);
                corrupt += c;
            }
            let ids: Vec<u32> = got.iter().map(|r| u32::from_le_bytes(r[..4].try_into().unwrap())).collect();
            for (r, &i) in got.iter().zip(&ids) {
                assert_eq!(r, &record(i), "{fsync:?}: record {i} intact");
            }
            assert!(ids.windows(2).all(|w| w[0] < w[1]), "{fsync:?}: in order, once each: {ids:?}");
            assert_eq!(corrupt, 0, "{fsync:?}: no torn frame");
            assert_eq!(got.len() as u64 + full.error, appended as u64, "{fsync:?}: read back + dropped = appended");
            assert!((first_after..appended).all(|i| ids.contains(&i)), "{fsync:?}: records after the disk freed up are all there");
            eprintln!("{fsync:?}: {appended} appended, {} read back, {} dropped (counted)", got.len(), full.error);
        }
    }
}
