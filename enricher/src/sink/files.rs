//! Enriched records to Avro object container files, exactly once.
//!
//! Records are collected per Kafka partition; a batch covers offsets
//! `first..=last`. Rolling a batch writes one file per Hive-style partition
//! of the flows' end time (`dt=YYYY-MM-DD/hr=HH/`), named
//! `{topic}-{partition}-{first}-{last}.avro`, each to a temporary name,
//! fsync'd and renamed; then `_state/{topic}-{partition}` records `last`
//! (also fsync'd and renamed); only then is the offset committed. Before
//! its files, a batch writes their names to `_state/{topic}-{partition}.pending`;
//! after a crash, the next owner of the partition deletes the files of a
//! pending batch the state does not cover (orphans) without walking the
//! output tree, and consumption resumes after the state's offset: every
//! input record ends up in exactly one file.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use flowlog_schema::{container::ContainerWriter, EnrichedFlow};

use super::{Batch, Sink};
use crate::metrics;

pub struct FileSink {
    pub dir: PathBuf,
    pub topic: String,
}

fn civil(ns: i64) -> (i64, u32, u32, u32) {
    // Days since epoch to y-m-d (Howard Hinnant's algorithm), plus the hour.
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86_400);
    let hour = (secs.rem_euclid(86_400) / 3600) as u32;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d, hour)
}

pub fn hive_dir(end_ns: i64) -> String {
    let (y, m, d, h) = civil(end_ns);
    format!("dt={y:04}-{m:02}-{d:02}/hr={h:02}")
}

fn fsync_dir(p: &Path) {
    if let Ok(f) = fs::File::open(p) {
        let _ = f.sync_all();
    }
}

impl FileSink {
    pub fn new(dir: PathBuf, topic: String) -> anyhow::Result<FileSink> {
        fs::create_dir_all(dir.join("_state"))?;
        Ok(FileSink { dir, topic })
    }

    fn state_path(&self, partition: i32) -> PathBuf {
        self.dir
            .join("_state")
            .join(format!("{}-{partition}", self.topic))
    }

    /// The last offset durably written for `partition`, if any.
    pub fn done_through(&self, partition: i32) -> Option<i64> {
        fs::read_to_string(self.state_path(partition))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    fn pending_path(&self, partition: i32) -> PathBuf {
        self.dir
            .join("_state")
            .join(format!("{}-{partition}.pending", self.topic))
    }

    /// Deletes files of `partition` that an unfinished batch left behind.
    pub fn remove_orphans(&self, partition: i32) -> usize {
        let done = self.done_through(partition).unwrap_or(-1);
        let pending = self.pending_path(partition);
        let Ok(text) = fs::read_to_string(&pending) else {
            return 0;
        };
        let mut lines = text.lines();
        // First line: the batch's last offset; then one file per line.
        let last: Option<i64> = lines.next().and_then(|l| l.trim().parse().ok());
        let mut removed = 0;
        if last.is_none_or(|l| l > done) {
            for f in lines.filter(|l| !l.is_empty()) {
                let f = self.dir.join(f);
                for p in [f.with_extension("avro.tmp"), f] {
                    if fs::remove_file(&p).is_ok() {
                        removed += 1;
                    }
                }
            }
        }
        let _ = fs::remove_file(&pending);
        removed
    }

    /// Writes `text` to `path` durably (temporary name, fsync, rename, fsync dir).
    fn put_durably(&self, path: &Path, text: &str) -> anyhow::Result<()> {
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(".tmp");
        let mut f = fs::File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fsync_dir(&self.dir.join("_state"));
        Ok(())
    }

    /// Writes one batch durably and records its last offset.
    pub fn write_files(&self, partition: i32, batch: &Batch) -> anyhow::Result<Vec<PathBuf>> {
        let mut by_dir: BTreeMap<String, Vec<&EnrichedFlow>> = BTreeMap::new();
        for r in &batch.records {
            by_dir
                .entry(hive_dir(r.flow.end_time_ns))
                .or_default()
                .push(r);
        }
        let name = format!(
            "{}-{partition}-{:020}-{:020}.avro",
            self.topic, batch.first, batch.last
        );
        let mut pending = format!("{}\n", batch.last);
        for sub in by_dir.keys() {
            pending.push_str(&format!("{sub}/{name}\n"));
        }
        self.put_durably(&self.pending_path(partition), &pending)?;
        let mut written = Vec::new();
        for (sub, records) in by_dir {
            let dir = self.dir.join(&sub);
            fs::create_dir_all(&dir)?;
            let tmp = dir.join(format!("{name}.tmp"));
            let mut w = ContainerWriter::new(fs::File::create(&tmp)?)?;
            for r in records {
                w.append(r)?;
            }
            let f = w.finish()?;
            f.sync_all()?;
            let dst = dir.join(&name);
            fs::rename(&tmp, &dst)?;
            fsync_dir(&dir);
            written.push(dst);
        }
        self.put_durably(&self.state_path(partition), &format!("{}\n", batch.last))?;
        let _ = fs::remove_file(self.pending_path(partition));
        Ok(written)
    }
}

impl Sink for FileSink {
    fn write(&self, partition: i32, batch: &Batch) -> anyhow::Result<()> {
        let files = self.write_files(partition, batch)?;
        ::metrics::counter!(metrics::RECORDS_OUT, "sink" => "files")
            .increment(batch.records.len() as u64);
        ::metrics::counter!(metrics::FILES_ROLLED).increment(files.len() as u64);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orphans_of_a_pending_batch_are_removed() {
        let dir = std::env::temp_dir().join(format!("flowlog-orphans-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let sink = FileSink::new(dir.clone(), "flows".into()).unwrap();
        let sub = dir.join("dt=2026-11-24/hr=18");
        fs::create_dir_all(&sub).unwrap();
        let name = "flows-0-00000000000000000010-00000000000000000019.avro";
        let kept = "flows-0-00000000000000000000-00000000000000000009.avro";
        for f in [name, kept, &format!("{name}.tmp")] {
            fs::write(sub.join(f), b"x").unwrap();
        }
        // Batch 0..=9 is done; 10..=19 was being written when the process died.
        sink.put_durably(&sink.state_path(0), "9\n").unwrap();
        sink.put_durably(
            &sink.pending_path(0),
            &format!("19\ndt=2026-11-24/hr=18/{name}\n"),
        )
        .unwrap();
        assert_eq!(sink.remove_orphans(0), 2);
        assert!(sub.join(kept).exists() && !sub.join(name).exists());
        assert!(!sink.pending_path(0).exists());
        // A pending list the state already covers (died before deleting it) removes nothing.
        sink.put_durably(
            &sink.pending_path(0),
            &format!("9\ndt=2026-11-24/hr=18/{kept}\n"),
        )
        .unwrap();
        assert_eq!(sink.remove_orphans(0), 0);
        assert!(sub.join(kept).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn hive_partitions_by_end_time() {
        // 2026-11-24T18:05:17Z
        assert_eq!(hive_dir(1_795_543_517_000_000_000), "dt=2026-11-24/hr=18");
        assert_eq!(hive_dir(0), "dt=1970-01-01/hr=00");
        // 2024-02-29T23:59:59Z
        assert_eq!(hive_dir(1_709_251_199_000_000_000), "dt=2024-02-29/hr=23");
    }
}
