//! Bounded on-disk spool: append-only segment files of length+CRC framed
//! records, read back oldest first. Used while the broker is unreachable or
//! slow, and at shutdown for whatever could not be delivered in time.
//!
//! Past `max_bytes` whole oldest segments are dropped and their records
//! counted. A torn tail (crash mid-write) is detected by its CRC and skipped.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions},
    io::{self, BufWriter, Read, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::ValueEnum;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Fsync {
    /// fsync after every append (safest, slowest).
    Always,
    /// fsync at most every `fsync_interval_ms` and at shutdown.
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
        /// A segment is closed and a new one started past this size.
        pub segment_bytes: u64 = 8 << 20,
        /// When the spool is fsync'd.
        pub fsync: Fsync = Fsync::Interval,
        /// With `fsync = "interval"`: the longest time between fsyncs, ms.
        pub fsync_interval_ms: u64 = 1000,
    }
}

#[derive(Debug, Clone)]
struct Segment {
    id: u64,
    bytes: u64,
    records: u64,
}

pub struct Spool {
    cfg: SpoolConfig,
    /// Oldest first; the last one is open for appends when `writer` is Some.
    segments: VecDeque<Segment>,
    writer: Option<BufWriter<File>>,
    next_id: u64,
    last_sync: Instant,
    pub dropped_records: u64,
    pub corrupt_records: u64,
}

const HEADER: usize = 8;

fn seg_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:016}.log"))
}

impl Spool {
    /// Opens the spool, indexing segments left by a previous run.
    pub fn open(cfg: SpoolConfig) -> io::Result<Spool> {
        fs::create_dir_all(&cfg.dir)?;
        let mut ids: Vec<u64> = fs::read_dir(&cfg.dir)?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_prefix("seg-")?.strip_suffix(".log")?.parse().ok()
            })
            .collect();
        ids.sort_unstable();
        let mut segments = VecDeque::new();
        for id in ids {
            let path = seg_path(&cfg.dir, id);
            let bytes = fs::metadata(&path)?.len();
            let records = read_segment(&path)?.0.len() as u64;
            segments.push_back(Segment { id, bytes, records });
        }
        // Ids start high so that `prepend` can always go below the oldest.
        let next_id = segments.back().map(|s| s.id + 1).unwrap_or(1 << 40);
        Ok(Spool {
            cfg,
            segments,
            writer: None,
            next_id,
            last_sync: Instant::now(),
            dropped_records: 0,
            corrupt_records: 0,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.segments.iter().all(|s| s.records == 0)
    }

    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.bytes).sum()
    }

    pub fn records(&self) -> u64 {
        self.segments.iter().map(|s| s.records).sum()
    }

    /// Appends one record. Returns how many old records were dropped to make room.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        let need = (payload.len() + HEADER) as u64;
        let mut dropped = 0;
        // Make room: drop whole oldest segments, never the one being written.
        while self.bytes() + need > self.cfg.max_bytes && self.segments.len() > usize::from(self.writer.is_some()) {
            let old = self.segments.pop_front().unwrap();
            let _ = fs::remove_file(seg_path(&self.cfg.dir, old.id));
            dropped += old.records;
        }
        if self.bytes() + need > self.cfg.max_bytes {
            // Even an empty spool cannot hold it: drop the record itself.
            self.dropped_records += dropped + 1;
            return Ok(dropped + 1);
        }
        let roll = match self.segments.back() {
            Some(s) => self.writer.is_none() || s.bytes + need > self.cfg.segment_bytes,
            None => true,
        };
        if roll {
            self.seal()?;
            let id = self.next_id;
            self.next_id += 1;
            let f = OpenOptions::new().create(true).append(true).open(seg_path(&self.cfg.dir, id))?;
            self.writer = Some(BufWriter::with_capacity(64 * 1024, f));
            self.segments.push_back(Segment { id, bytes: 0, records: 0 });
        }
        let w = self.writer.as_mut().unwrap();
        w.write_all(&(payload.len() as u32).to_le_bytes())?;
        w.write_all(&crc32fast::hash(payload).to_le_bytes())?;
        w.write_all(payload)?;
        let seg = self.segments.back_mut().unwrap();
        seg.bytes += need;
        seg.records += 1;
        match self.cfg.fsync {
            Fsync::Always => self.sync()?,
            Fsync::Interval if self.last_sync.elapsed() >= Duration::from_millis(self.cfg.fsync_interval_ms) => self.sync()?,
            _ => {}
        }
        self.dropped_records += dropped;
        Ok(dropped)
    }

    /// Flushes buffered appends and fsyncs the open segment.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some(w) = self.writer.as_mut() {
            w.flush()?;
            if self.cfg.fsync != Fsync::Never {
                w.get_ref().sync_data()?;
            }
        }
        self.last_sync = Instant::now();
        Ok(())
    }

    /// Closes the open segment so it can be replayed.
    pub fn seal(&mut self) -> io::Result<()> {
        self.sync()?;
        self.writer = None;
        Ok(())
    }

    /// Writes `records` as a new segment in front of everything spooled (they
    /// are older than what the spool holds).
    pub fn prepend(&mut self, records: &[Vec<u8>]) -> io::Result<()> {
        let id = match self.segments.front() {
            Some(s) if s.id > 0 => s.id - 1,
            Some(_) => return records.iter().try_for_each(|r| self.append(r).map(|_| ())),
            None => {
                self.next_id += 1;
                self.next_id - 1
            }
        };
        let mut w = BufWriter::new(File::create(seg_path(&self.cfg.dir, id))?);
        let mut bytes = 0;
        for r in records {
            w.write_all(&(r.len() as u32).to_le_bytes())?;
            w.write_all(&crc32fast::hash(r).to_le_bytes())?;
            w.write_all(r)?;
            bytes += (r.len() + HEADER) as u64;
        }
        w.flush()?;
        w.get_ref().sync_data()?;
        self.segments.push_front(Segment { id, bytes, records: records.len() as u64 });
        Ok(())
    }

    /// Takes the oldest segment's records off the spool, oldest first, and
    /// deletes its file. The caller re-appends whatever it fails to deliver.
    pub fn take_oldest(&mut self) -> io::Result<Option<Vec<Vec<u8>>>> {
        if self.segments.is_empty() {
            return Ok(None);
        }
        if self.segments.len() == 1 && self.writer.is_some() {
            self.seal()?;
        }
        let seg = self.segments.pop_front().unwrap();
        let path = seg_path(&self.cfg.dir, seg.id);
        let (records, corrupt) = read_segment(&path)?;
        self.corrupt_records += corrupt;
        fs::remove_file(&path)?;
        Ok(Some(records))
    }
}

/// Reads every intact record of a segment; returns them and how many
/// trailing bytes-worth of records were corrupt (counted as 1 if any).
fn read_segment(path: &Path) -> io::Result<(Vec<Vec<u8>>, u64)> {
    let mut data = Vec::new();
    File::open(path)?.read_to_end(&mut data)?;
    let mut out = Vec::new();
    let mut at = 0;
    while at + HEADER <= data.len() {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        let crc = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap());
        let end = at + HEADER + len;
        if end > data.len() || crc32fast::hash(&data[at + HEADER..end]) != crc {
            return Ok((out, 1));
        }
        out.push(data[at + HEADER..end].to_vec());
        at = end;
    }
    Ok((out, u64::from(at != data.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path, max: u64, seg: u64) -> SpoolConfig {
        SpoolConfig { dir: dir.to_path_buf(), max_bytes: max, segment_bytes: seg, fsync: Fsync::Never, fsync_interval_ms: 1000 }
    }

    /// Every record left, oldest first.
    /// A spool in `dir` that one segment of 1 MiB fills: nothing is dropped.
    fn roomy(dir: &Path) -> Spool {
        Spool::open(cfg(dir, 1 << 20, 1 << 20)).unwrap()
    }

    fn drain(s: &mut Spool) -> Vec<Vec<u8>> {
        std::iter::from_fn(|| s.take_oldest().unwrap()).flatten().collect()
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("flowlog-spool-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
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
        assert_eq!(fs::read_dir(&d).unwrap().count(), 0);
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn drops_oldest_whole_segments_past_the_bound() {
        let d = tmp("bound");
        // 28-byte records (20 + 8), 2 per segment, at most 4 on disk.
        let mut s = Spool::open(cfg(&d, 4 * 28, 56)).unwrap();
        let mut dropped = 0;
        for i in 0..10u8 {
            dropped += s.append(&[i; 20]).unwrap();
        }
        assert_eq!(dropped, 6);
        assert_eq!(s.dropped_records, 6);
        assert_eq!(drain(&mut s), (6..10u8).map(|i| vec![i; 20]).collect::<Vec<_>>());
        fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn prepend_goes_first() {
        let d = tmp("prepend");
        let mut s = roomy(&d);
        s.append(b"new").unwrap();
        s.prepend(&[b"old1".to_vec(), b"old2".to_vec()]).unwrap();
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
        assert_eq!(s.take_oldest().unwrap().unwrap(), vec![b"first".to_vec()]);
        assert_eq!(s.corrupt_records, 1);
        fs::remove_dir_all(d).unwrap();
    }
}
