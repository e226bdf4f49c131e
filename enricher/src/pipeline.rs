//! The enricher's per-message and periodic work, without Kafka: each
//! message of the flow topic is decoded, attributed and added to its
//! partition's batch (or sent to the dead-letter queue); a batch rolls when
//! full or old, later if it holds young unattributed flows that late
//! metadata may still attribute; a rolled batch's final attribution is
//! self-checked ([`crate::selfcheck`]), then it goes through every sink and
//! only then are its offsets committed. A record the sidecar sent again is
//! dropped before attribution ([`Sequences`]). Offsets already in files are
//! skipped (exactly once across restarts and rebalances). Time is passed in
//! ([`Now`]) so that tests drive it.

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::Config,
    decode::Decoder,
    metrics,
    selfcheck::{self, SelfCheck},
    sink::{Batch, DeadLetters, Message, Sink},
    sources::Sources,
};

mod sequences;
pub use sequences::{Counts, Seen, Sequences};

#[derive(Debug, Clone)]
pub struct Settings {
    /// A batch rolls at this many records ...
    pub max_records: usize,
    /// ... or this age.
    pub max_age: Duration,
    /// Flows with an unattributed side younger than this hold their batch
    /// back (zero: never).
    pub late_window: Duration,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            max_records: cfg.batch_max_records,
            max_age: Duration::from_secs(cfg.batch_max_age_secs),
            late_window: Duration::from_secs(cfg.late_window_secs),
        }
    }

    /// How long a record waits for its connection's other half (the
    /// self-check): a few times the longest a batch stays open, so two
    /// halves read at about the same time from different partitions meet.
    pub fn selfcheck_window(&self) -> Duration {
        3 * (self.max_age + self.late_window)
    }
}

/// The time: monotonic for batch ages and hold-back deadlines, the wall
/// clock for the age of flows (whose times are Unix nanoseconds).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub instant: Instant,
    pub unix_ns: i64,
}

impl Now {
    pub fn system() -> Now {
        let unix_ns = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        Now {
            instant: Instant::now(),
            unix_ns,
        }
    }
}

pub struct Pipeline {
    settings: Settings,
    decoder: Decoder,
    sources: Sources,
    dead_letters: Arc<dyn DeadLetters>,
    batches: HashMap<i32, Batch>,
    /// Offsets at or below this are already in files (exactly-once resume).
    done_through: HashMap<i32, i64>,
    /// The per-host sequence numbers accepted: duplicates, gaps, late ones.
    sequences: Sequences,
    selfcheck: SelfCheck,
    /// The latest time seen (for batches taken without one: revoke, drain).
    now: Instant,
}

impl Pipeline {
    pub fn new(
        settings: Settings,
        sources: Sources,
        dead_letters: Arc<dyn DeadLetters>,
    ) -> Pipeline {
        let selfcheck = SelfCheck::new(settings.selfcheck_window(), selfcheck::MAX_PENDING);
        Pipeline {
            settings,
            decoder: Decoder::new(),
            sources,
            dead_letters,
            batches: HashMap::new(),
            done_through: HashMap::new(),
            sequences: Sequences::default(),
            selfcheck,
            now: Instant::now(),
        }
    }

    /// Partition `p` is ours; its offsets up to `done_through` are already
    /// in files (-1: none).
    pub fn assign(&mut self, p: i32, done_through: i64) {
        self.done_through.insert(p, done_through);
    }

    /// Partition `p` is taken away: its open batch, to be written now. Its
    /// hosts' sequence numbers are forgotten: if that write fails, whoever
    /// reads the partition next redoes the batch.
    pub fn revoke(&mut self, p: i32) -> Option<Batch> {
        self.done_through.remove(&p);
        self.sequences.forget_partition(p);
        let b = self.batches.remove(&p)?;
        Some(self.finalize(b))
    }

    /// The last offset of `p` in files, as far as this process knows.
    pub fn done_through(&self, p: i32) -> Option<i64> {
        self.done_through.get(&p).copied()
    }

    /// One message: skipped if already in files; otherwise it extends its
    /// partition's batch, as an enriched record or, if it does not decode,
    /// as a dead letter. Fails only if the dead-letter queue does (then the
    /// message must not be committed: the process stops).
    pub fn consume(&mut self, m: &Message, now: Now) -> anyhow::Result<()> {
        let (p, off) = (m.partition, m.offset);
        self.now = now.instant;
        if self.done_through(p).is_some_and(|d| off <= d) {
            return Ok(()); // already in a file from before a restart
        }
        ::metrics::counter!(metrics::RECORDS_IN).increment(1);
        let batch = self
            .batches
            .entry(p)
            .or_insert_with(|| Batch::new(off, now.instant));
        batch.last = off;
        let (host, flow) = match self.decoder.flow(m.payload) {
            Ok(decoded) => decoded,
            Err(reject) => {
                return self.dead_letters.send(m, &reject).map_err(|e| {
                    e.context("dead-letter topic unavailable; stopping so the message is retried")
                })
            }
        };
        // A record accepted before (the sidecar sent it again) is dropped
        // here, before attribution; its offset is committed with the batch.
        let seen = self
            .sequences
            .observe(p, &host.identity.host_id, flow.sequence_epoch, flow.sequence);
        if seen == Seen::Duplicate {
            return Ok(());
        }
        let e = self.sources.attribute(|a| a.enrich(host, flow));
        // Young and unattributed: hold it back for late metadata.
        let age = now.unix_ns - e.flow.end_time_ns;
        let window = self.settings.late_window.as_nanos() as i64;
        if (!e.local.attributed() || !e.remote.attributed()) && age < window {
            let until = now.instant + Duration::from_nanos((window - age.max(0)) as u64);
            batch.hold_until = Some(batch.hold_until.map_or(until, |h| h.max(until)));
            batch.held.push(batch.records.len());
        }
        batch.records.push(e);
        Ok(())
    }

    /// The periodic work: publishes the decoder's cache figures and the
    /// self-check's, and takes the batches due to roll: full (max records
    /// or max age) and not waiting for late metadata, which they never do
    /// past max age + the late window.
    pub fn due(&mut self, now: Now) -> Vec<(i32, Batch)> {
        self.now = now.instant;
        self.selfcheck.expire(now.instant);
        self.selfcheck.publish();
        let cache = |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::Relaxed);
        ::metrics::counter!(metrics::HOST_CACHE, "result" => "hit")
            .absolute(cache(&self.decoder.host_hits));
        ::metrics::counter!(metrics::HOST_CACHE, "result" => "miss")
            .absolute(cache(&self.decoder.host_misses));
        self.publish_sequences();
        let s = &self.settings;
        let due: Vec<i32> = self
            .batches
            .iter()
            .filter(|(_, b)| {
                let age = now.instant.saturating_duration_since(b.opened);
                let full = b.records.len() >= s.max_records || age >= s.max_age;
                let waiting = b.hold_until.is_some_and(|h| now.instant < h);
                full && (!waiting || age >= s.max_age + s.late_window)
            })
            .map(|(p, _)| *p)
            .collect();
        self.take(due)
    }

    /// Every open batch (when stopping). Records still waiting for their
    /// other half are one-sided now: the next process will not know them.
    pub fn drain(&mut self) -> Vec<(i32, Batch)> {
        let all = self.batches.keys().copied().collect();
        let open = self.take(all);
        self.selfcheck.expire_all();
        self.selfcheck.publish();
        self.publish_sequences();
        open
    }

    /// The sequence bookkeeping's totals so far.
    pub fn sequence_counts(&self) -> Counts {
        self.sequences.counts
    }

    fn publish_sequences(&self) {
        let c = self.sequences.counts;
        ::metrics::counter!(metrics::SEQUENCE_GAPS).absolute(c.gaps);
        ::metrics::counter!(metrics::SEQUENCE_LATE).absolute(c.late);
        ::metrics::counter!(metrics::DUPLICATES).absolute(c.duplicates);
        ::metrics::counter!(metrics::SEQUENCE_EVICTED).absolute(c.evicted);
    }

    /// Partition `p`'s batch through `last` is written and committed.
    pub fn written(&mut self, p: i32, last: i64) {
        self.done_through.insert(p, last);
    }

    fn take(&mut self, partitions: Vec<i32>) -> Vec<(i32, Batch)> {
        let mut out = Vec::with_capacity(partitions.len());
        for p in partitions {
            if let Some(b) = self.batches.remove(&p) {
                out.push((p, self.finalize(b)));
            }
        }
        out
    }

    /// A batch about to be written: its held-back records attributed again,
    /// then every record's final attribution self-checked.
    fn finalize(&mut self, mut b: Batch) -> Batch {
        self.settle(&mut b);
        self.selfcheck.observe(&b.records, self.now);
        b
    }

    /// Attributes the held-back records again, now that more metadata may be in.
    fn settle(&self, b: &mut Batch) {
        if b.held.is_empty() {
            return;
        }
        self.sources.attribute(|a| {
            for i in b.held.drain(..) {
                let e = &mut b.records[i];
                a.settle(e);
                if e.local.attributed() && e.remote.attributed() {
                    ::metrics::counter!(metrics::LATE_ATTRIBUTED).increment(1);
                }
            }
        });
    }
}

/// Writes a rolled batch of partition `p` to every sink in order, then
/// commits the offset after it: offsets never move past records that are not
/// durable in every sink. The first failure stops it (nothing committed).
pub fn write(
    sinks: &[Arc<dyn Sink>],
    p: i32,
    batch: &Batch,
    commit: impl FnOnce(i32, i64) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    for s in sinks {
        s.write(p, batch)?;
    }
    commit(p, batch.last + 1)?;
    metrics::record_attributions(&batch.records);
    Ok(())
}

#[cfg(test)]
mod tests;
