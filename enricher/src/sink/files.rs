//! Enriched records to Avro object container files, exactly once.
//!
//! Records are collected per Kafka partition; a batch covers offsets
//! `first..=last`. Rolling a batch writes one file per Hive-style partition
//! of the flows' end time (`dt=YYYY-MM-DD/hr=HH/`), named
//! `{topic}-{partition}-{first}-{last}.avro`, each to a temporary name,
//! fsync'd and renamed; then `_state/{topic}-{partition}` records `last`
//! (also fsync'd and renamed); only then is the offset committed. After a
//! crash, files past the state's offset are orphans of an unfinished batch
//! and are deleted, and consumption resumes after the state's offset: every
//! input record ends up in exactly one file.

use std::{
    collections::BTreeMap,
    fs,
    io::Write,
    path::{Path, PathBuf},
    time::Instant,
};

use apache_avro::{Schema, Writer};

use crate::{
    attribute::{EnrichedFlow, ENRICHED_SCHEMA},
    decode::Flow,
};

pub struct Batch {
    pub first: i64,
    pub last: i64,
    pub records: Vec<EnrichedFlow>,
    pub opened: Instant,
    /// Records with an unattributed side that recent enough for metadata to
    /// still arrive: (index in `records`, the decoded flow), re-attributed
    /// when the batch rolls.
    pub held: Vec<(usize, Flow)>,
    /// The batch waits for late metadata until then.
    pub hold_until: Option<Instant>,
}

impl Batch {
    pub fn new(first: i64) -> Batch {
        Batch { first, last: first, records: Vec::new(), opened: Instant::now(), held: Vec::new(), hold_until: None }
    }
}

pub struct FileSink {
    pub dir: PathBuf,
    schema: Schema,
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
        Ok(FileSink { dir, schema: Schema::parse_str(ENRICHED_SCHEMA)?, topic })
    }

    fn state_path(&self, partition: i32) -> PathBuf {
        self.dir.join("_state").join(format!("{}-{partition}", self.topic))
    }

    /// The last offset durably written for `partition`, if any.
    pub fn done_through(&self, partition: i32) -> Option<i64> {
        fs::read_to_string(self.state_path(partition)).ok().and_then(|s| s.trim().parse().ok())
    }

    /// Deletes files of `partition` that an unfinished batch left behind.
    pub fn remove_orphans(&self, partition: i32) -> usize {
        let done = self.done_through(partition).unwrap_or(-1);
        let prefix = format!("{}-{partition}-", self.topic);
        let mut removed = 0;
        let mut stack = vec![self.dir.clone()];
        while let Some(d) = stack.pop() {
            let Ok(rd) = fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                let name = e.file_name().to_string_lossy().into_owned();
                if p.is_dir() {
                    if name != "_state" {
                        stack.push(p);
                    }
                    continue;
                }
                let Some(rest) = name.strip_prefix(&prefix) else { continue };
                let first = rest.split('-').next().and_then(|s| s.parse::<i64>().ok());
                if name.ends_with(".tmp") || first.is_some_and(|f| f > done) {
                    if fs::remove_file(&p).is_ok() {
                        removed += 1;
                    }
                }
            }
        }
        removed
    }

    /// Writes one batch durably and records its last offset.
    pub fn write(&self, partition: i32, batch: &Batch) -> anyhow::Result<Vec<PathBuf>> {
        let mut by_dir: BTreeMap<String, Vec<&EnrichedFlow>> = BTreeMap::new();
        for r in &batch.records {
            by_dir.entry(hive_dir(r.end_time_ns)).or_default().push(r);
        }
        let name = format!("{}-{partition}-{:020}-{:020}.avro", self.topic, batch.first, batch.last);
        let mut written = Vec::new();
        for (sub, records) in by_dir {
            let dir = self.dir.join(&sub);
            fs::create_dir_all(&dir)?;
            let tmp = dir.join(format!("{name}.tmp"));
            let mut w = Writer::new(&self.schema, fs::File::create(&tmp)?);
            for r in records {
                w.append_ser(r)?;
            }
            let f = w.into_inner()?;
            f.sync_all()?;
            let dst = dir.join(&name);
            fs::rename(&tmp, &dst)?;
            fsync_dir(&dir);
            written.push(dst);
        }
        let state = self.state_path(partition);
        let tmp = state.with_extension("tmp");
        let mut f = fs::File::create(&tmp)?;
        writeln!(f, "{}", batch.last)?;
        f.sync_all()?;
        fs::rename(&tmp, &state)?;
        fsync_dir(&self.dir.join("_state"));
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hive_partitions_by_end_time() {
        // 2026-11-24T18:05:17Z
        assert_eq!(hive_dir(1_795_543_517_000_000_000), "dt=2026-11-24/hr=18");
        assert_eq!(hive_dir(0), "dt=1970-01-01/hr=00");
        // 2024-02-29T23:59:59Z
        assert_eq!(hive_dir(1_709_251_199_000_000_000), "dt=2024-02-29/hr=23");
    }
}
