//! Enriched records to a data lake (a local directory or S3, see
//! [`super::store`]), exactly once with no state but the Kafka offsets, the
//! way Kafka Connect's S3 sink does it.
//!
//! A batch holds one Kafka partition's offsets `first..=last`. It is written
//! as one object per Hive-style partition of the flows' end time and per
//! format: `dt=YYYY-MM-DD/hr=HH/{topic}-{partition}-{first}-{last}.{avro,parquet}`.
//! The name depends only on the offsets, and the records in it only on the
//! messages at those offsets, so writing a batch again (after a crash before
//! its commit, after a rebalance) replaces the very same objects.
//!
//! That needs every attempt at a batch to end it at the same offset. Before
//! its objects, a batch *claims* its boundary: it creates
//! `_claims/{topic}/{partition}/{first}` holding `last`, only if no such
//! object exists (S3 conditional put, `If-None-Match: *`; a no-replace link
//! on a file system). If one exists, an earlier attempt chose the boundary
//! and this one takes it: it splits its batch there, or reads on to it. So
//! the batches of a partition form one chain whoever writes them, and an
//! instance that lost its partition but still writes (a "zombie": paused past
//! its session timeout) writes the same objects as the new owner, never
//! overlapping ones. The committed offset says where the chain resumes.
//! Claims are small and kept for `claim_retention_hours`.

use std::{
    collections::BTreeMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        OnceLock,
    },
};

use flowlog_schema::{container::ContainerWriter, EnrichedFlow};
use tracing::warn;

use super::{store::Store, Batch, Sink};
use crate::metrics;

/// A format objects are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Avro,
    Parquet,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "avro" => Some(Format::Avro),
            "parquet" => Some(Format::Parquet),
            _ => None,
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Avro => "avro",
            Format::Parquet => "parquet",
        }
    }

    fn encode(self, records: &[&EnrichedFlow]) -> anyhow::Result<Vec<u8>> {
        match self {
            Format::Avro => {
                let mut w = ContainerWriter::new(Vec::new())?;
                for r in records {
                    w.append(*r)?;
                }
                Ok(w.finish()?)
            }
            Format::Parquet => super::parquet::encode(records, &super::parquet::ParquetOptions::default()),
        }
    }
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

/// The Hive-style partition of a flow ending at `end_ns`.
pub fn hive_dir(end_ns: i64) -> String {
    let (y, m, d, h) = civil(end_ns);
    format!("dt={y:04}-{m:02}-{d:02}/hr={h:02}")
}

/// Test hook: `FLOWLOG_ENRICHER_FAILPOINT=step:n` kills the process
/// (SIGKILL, nothing flushed) the n-th time it reaches `step` (`claim`,
/// `object`, `commit`, `committed`), so that tests can stop it between any
/// two steps of a roll.
pub fn failpoint(step: &str) {
    static AT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static SEEN: AtomicU64 = AtomicU64::new(0);
    let at = AT.get_or_init(|| {
        let v = std::env::var("FLOWLOG_ENRICHER_FAILPOINT").ok()?;
        let (s, n) = v.split_once(':')?;
        Some((s.to_string(), n.parse().ok()?))
    });
    if let Some((s, n)) = at {
        if s == step && SEEN.fetch_add(1, Ordering::SeqCst) + 1 == *n {
            // SAFETY: kill(2) on this process; no memory is touched.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
    }
}

pub struct Lake {
    store: Store,
    topic: String,
    formats: Vec<Format>,
    /// Claims older than this are deleted (looked for once in `GC_EVERY`
    /// claims made by this process, in the partition of the claim).
    claim_retention: std::time::Duration,
    claims_made: AtomicU64,
}

/// Old claims are looked for once in this many claims.
const GC_EVERY: u64 = 64;

impl Lake {
    pub fn new(
        store: Store,
        topic: String,
        formats: Vec<Format>,
        claim_retention_hours: u64,
    ) -> Lake {
        Lake {
            store,
            topic,
            formats,
            claim_retention: std::time::Duration::from_secs(claim_retention_hours * 3600),
            claims_made: AtomicU64::new(0),
        }
    }

    fn claims_dir(&self, p: i32) -> String {
        format!("_claims/{}/{p}", self.topic)
    }

    /// Where the batch of partition `p` starting at `first` ends: `last`
    /// if this is the first attempt at it, else what the first attempt
    /// chose.
    pub fn claim(&self, p: i32, first: i64, last: i64) -> anyhow::Result<i64> {
        let key = format!("{}/{first:020}", self.claims_dir(p));
        failpoint("claim");
        if self.store.create(&key, format!("{last}\n").into_bytes())? {
            if self.claims_made.fetch_add(1, Ordering::Relaxed) % GC_EVERY == GC_EVERY - 1 {
                self.forget_old_claims(p, first);
            }
            return Ok(last);
        }
        let text = self.store.get(&key)?.unwrap_or_default();
        let agreed: i64 = std::str::from_utf8(&text)
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .filter(|&l| l >= first)
            .ok_or_else(|| anyhow::anyhow!("claim {key} in {} is not an offset: {text:?}", self.store.url))?;
        if agreed != last {
            ::metrics::counter!(metrics::BOUNDARIES_ADOPTED).increment(1);
        }
        Ok(agreed)
    }

    /// Deletes claims of batches before `first` older than the retention.
    fn forget_old_claims(&self, p: i32, first: i64) {
        let old = self.store.list(&self.claims_dir(p)).map(|listed| {
            listed
                .into_iter()
                .filter(|l| l.age > self.claim_retention)
                .filter(|l| {
                    let name = l.key.rsplit('/').next().unwrap_or_default();
                    name.parse::<i64>().is_ok_and(|f| f < first)
                })
                .collect::<Vec<_>>()
        });
        match old {
            Ok(old) => {
                for l in old {
                    if let Err(e) = self.store.delete(&l.key) {
                        warn!("{e:#}");
                    }
                }
            }
            Err(e) => warn!("{e:#}"),
        }
    }

    /// The objects of a batch: key -> records, per format.
    fn objects<'a>(&self, p: i32, batch: &'a Batch) -> BTreeMap<String, Vec<&'a EnrichedFlow>> {
        let mut by_dir: BTreeMap<String, Vec<&EnrichedFlow>> = BTreeMap::new();
        for r in &batch.records {
            by_dir
                .entry(hive_dir(r.flow.end_time_ns))
                .or_default()
                .push(r);
        }
        by_dir
            .into_iter()
            .map(|(dir, records)| {
                let name = format!("{dir}/{}-{p}-{:020}-{:020}", self.topic, batch.first, batch.last);
                (name, records)
            })
            .collect()
    }

    /// Writes every object of a batch (whose boundary was claimed);
    /// returns how many.
    pub fn write_objects(&self, p: i32, batch: &Batch) -> anyhow::Result<usize> {
        let mut n = 0;
        for (name, records) in self.objects(p, batch) {
            for f in &self.formats {
                let bytes = f.encode(&records)?;
                let len = bytes.len();
                self.store.put(&format!("{name}.{}", f.extension()), bytes)?;
                ::metrics::counter!(metrics::OBJECTS_WRITTEN, "format" => f.extension()).increment(1);
                ::metrics::counter!(metrics::BYTES_WRITTEN, "format" => f.extension()).increment(len as u64);
                n += 1;
                failpoint("object");
            }
        }
        Ok(n)
    }
}

impl Sink for Lake {
    fn write(&self, partition: i32, batch: &Batch) -> anyhow::Result<()> {
        self.write_objects(partition, batch)?;
        ::metrics::counter!(metrics::RECORDS_OUT, "sink" => "lake")
            .increment(batch.records.len() as u64);
        Ok(())
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

    fn lake(dir: &std::path::Path) -> Lake {
        let store = Store::open(dir.to_str().unwrap(), &Default::default()).unwrap();
        Lake::new(store, "flows".into(), vec![Format::Avro], 24)
    }

    /// The first attempt at a batch chooses its end; every later attempt
    /// (a redo, a zombie) gets the same end, on a real file system.
    #[test]
    fn the_first_claim_of_a_batch_decides_its_end() {
        let dir = std::env::temp_dir().join(format!("flowlog-claims-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (a, b) = (lake(&dir), lake(&dir));
        assert_eq!(a.claim(0, 10, 19).unwrap(), 19);
        assert_eq!(b.claim(0, 10, 25).unwrap(), 19, "a redo reads further: split at 19");
        assert_eq!(b.claim(0, 10, 12).unwrap(), 19, "a redo read less: read on to 19");
        assert_eq!(b.claim(1, 10, 12).unwrap(), 12, "partitions are separate");
        assert_eq!(b.claim(0, 20, 30).unwrap(), 30);
        std::fs::write(dir.join("_claims/flows/0/00000000000000000040"), "garbage").unwrap();
        let e = a.claim(0, 40, 50).unwrap_err().to_string();
        assert!(e.contains("is not an offset"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
