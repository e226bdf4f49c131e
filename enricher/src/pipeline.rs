//! The enricher's per-message and periodic work, without Kafka: each
//! message of the flow topic is decoded, attributed and added to its
//! partition's batch (or sent to the dead-letter queue); a batch rolls when
//! full or old, later if it holds young unattributed flows that late
//! metadata may still attribute; a rolled batch's final attribution is
//! self-checked ([`crate::selfcheck`]), then it goes through every sink and
//! only then are its offsets committed. A record the sidecar sent again is
//! dropped before attribution ([`Sequences`]). Where a batch ends is agreed
//! with the lake before it is written ([`crate::sink::lake`]): a batch that
//! must end elsewhere is put back ([`Pipeline::put_back`]) and split or
//! extended. A batch whose write failed waits and is retried
//! ([`Pipeline::retry_later`]), before any later batch of its partition.
//! Time is passed in ([`Now`]) so that tests drive it.

use std::{
    collections::{HashMap, VecDeque},
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

pub(crate) mod sequences;
pub use sequences::{Counts, Produced, Seen, Sequences};

#[derive(Debug, Clone)]
pub struct Settings {
    /// A batch rolls at this many records ...
    pub max_records: usize,
    /// ... or this age.
    pub max_age: Duration,
    /// Flows with an unattributed side younger than this hold their batch
    /// back (zero: never).
    pub late_window: Duration,
    /// Records kept in memory (open and complete batches, all partitions)
    /// at most while held back for late metadata: past it, held batches are
    /// written without waiting longer.
    pub max_held_records: usize,
}

impl Settings {
    pub fn from_config(cfg: &Config) -> Settings {
        Settings {
            max_records: cfg.batch_max_records,
            max_age: Duration::from_secs(cfg.batch_max_age_secs),
            late_window: Duration::from_secs(cfg.late_window_secs),
            max_held_records: cfg.max_held_records,
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
    /// The open batch of each partition.
    batches: HashMap<i32, Batch>,
    /// Batches complete at an agreed end, to be written before their
    /// partition's open batch.
    ready: VecDeque<(i32, Batch)>,
    /// Batches whose write failed, per partition, with when to try again.
    stalled: HashMap<i32, (Batch, Instant)>,
    /// Offsets at or below this are written and committed by this process
    /// (messages read again after a seek are skipped).
    done_through: HashMap<i32, i64>,
    /// The per-host sequence numbers accepted: duplicates, gaps, late ones.
    sequences: Sequences,
    selfcheck: SelfCheck,
    /// The latest time seen (for batches taken without one: revoke, drain).
    now: Instant,
    /// When the memory bound last cut a hold short (logged once a minute).
    last_cut_log: Option<Instant>,
}

impl Pipeline {
    pub fn new(
        settings: Settings,
        sources: Sources,
        dead_letters: Arc<dyn DeadLetters>,
    ) -> Pipeline {
        let selfcheck = SelfCheck::new(settings.selfcheck_window(), selfcheck::MAX_PENDING);
        let sequences = Sequences::with_produced(sequences::MAX_HOSTS, sequences::MAX_RANGES, sources.produced.clone());
        Pipeline {
            settings,
            decoder: Decoder::new(),
            sources,
            dead_letters,
            batches: HashMap::new(),
            ready: VecDeque::new(),
            stalled: HashMap::new(),
            done_through: HashMap::new(),
            sequences,
            selfcheck,
            now: Instant::now(),
            last_cut_log: None,
        }
    }

    /// Partition `p` is ours; its offsets up to `done_through` are already
    /// in files (-1: none).
    pub fn assign(&mut self, p: i32, done_through: i64) {
        self.done_through.insert(p, done_through);
    }

    /// Partition `p` is taken away: its batches in offset order (a failed
    /// one, complete ones, the open one), to be written now if the
    /// partition was handed over, dropped if it was lost. Its hosts'
    /// sequence numbers are forgotten: whoever reads the partition next
    /// redoes what is not committed.
    pub fn revoke(&mut self, p: i32) -> Vec<Batch> {
        self.done_through.remove(&p);
        self.sequences.forget_partition(p);
        self.unwritten(p)
    }

    /// Every batch of `p` not written yet, taken, in offset order.
    fn unwritten(&mut self, p: i32) -> Vec<Batch> {
        let mut out: Vec<Batch> = self.stalled.remove(&p).map(|(b, _)| b).into_iter().collect();
        let (mine, others): (VecDeque<_>, VecDeque<_>) = self.ready.drain(..).partition(|(q, _)| *q == p);
        self.ready = others;
        out.extend(mine.into_iter().map(|(_, b)| b));
        out.extend(self.batches.remove(&p));
        out
    }

    /// The last offset of `p` in files, as far as this process knows.
    pub fn done_through(&self, p: i32) -> Option<i64> {
        self.done_through.get(&p).copied()
    }

    /// One message: skipped if already in files; otherwise each of its
    /// records (a FlowBatch holds several, [`flowlog_schema::batch`])
    /// extends its partition's batch, as an enriched record or, if it does
    /// not decode, as a dead letter of its own (a batch whose framing is
    /// broken goes whole). Fails only if the dead-letter queue does (then
    /// the message must not be committed: the process stops).
    pub fn consume(&mut self, m: &Message, now: Now) -> anyhow::Result<()> {
        let (p, off) = (m.partition, m.offset);
        self.now = now.instant;
        if self.done_through(p).is_some_and(|d| off <= d) {
            return Ok(()); // already in a file from before a restart
        }
        // Past the end agreed for the open batch: it is complete.
        if self.batches.get(&p).is_some_and(|b| b.end.is_some_and(|e| off > e)) {
            let b = self.batches.remove(&p).expect("checked");
            self.ready.push_back((p, b));
        }
        self.batches.entry(p).or_insert_with(|| Batch::new(off, now.instant)).last = off;
        let records = match flowlog_schema::flow_messages(m.payload) {
            Ok(records) => records,
            Err(reject) => {
                ::metrics::counter!(metrics::RECORDS_IN).increment(1);
                return self.dead_letter(m, &reject);
            }
        };
        ::metrics::counter!(metrics::RECORDS_IN).increment(records.len() as u64);
        for record in records {
            self.consume_record(m, record, now)?;
        }
        // Full: complete now, not at the next tick, so that a batch holds
        // at most `max_records` (plus one message's) however fast messages come.
        if let Some(batch) = self.batches.get(&p) {
            if batch.end.is_none() && batch.records.len() >= self.settings.max_records {
                let b = self.batches.remove(&p).expect("just used");
                self.ready.push_back((p, b));
            }
        }
        Ok(())
    }

    fn dead_letter(&self, m: &Message, reject: &flowlog_schema::DecodeError) -> anyhow::Result<()> {
        self.dead_letters
            .send(m, reject)
            .map_err(|e| e.context("dead-letter topic unavailable; stopping so the message is retried"))
    }

    /// One Flow record of message `m`. One that does not decode goes to the
    /// dead-letter topic as a whole Flow message of its own.
    fn consume_record(&mut self, m: &Message, record: flowlog_schema::FlowItem, now: Now) -> anyhow::Result<()> {
        let (p, off) = (m.partition, m.offset);
        let (host, flow) = match self.decoder.item(&record) {
            Ok(decoded) => decoded,
            Err(reject) => return self.dead_letter(&Message { payload: &record.message(), ..*m }, &reject),
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
        let batch = self.batches.get_mut(&p).expect("opened by consume");
        // Young and unattributed: hold it back for late metadata.
        let age = now.unix_ns - e.flow.end_time_ns;
        let window = self.settings.late_window.as_nanos() as i64;
        if (!e.local.attributed() || !e.remote.attributed()) && age < window {
            let until = now.instant + Duration::from_nanos((window - age.max(0)) as u64);
            batch.hold_until = Some(batch.hold_until.map_or(until, |h| h.max(until)));
            batch.held.push(batch.records.len());
        }
        batch.records.push(e);
        batch.offsets.push(off);
        Ok(())
    }

    /// The periodic work: publishes the decoder's cache figures and the
    /// self-check's, and takes the batches due to roll, at most one per
    /// partition, oldest first: a failed one whose retry time has come;
    /// one complete at its agreed end; an open one at its agreed end, or
    /// (no end agreed) full (max records or max age) and not waiting for
    /// late metadata, which it never does past max age + the late window.
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
        let mut out = Vec::new();
        let retry: Vec<i32> = self.stalled.iter().filter(|(_, (_, at))| now.instant >= *at).map(|(p, _)| *p).collect();
        for p in retry {
            out.push((p, self.stalled.remove(&p).expect("listed").0));
        }
        let mut busy: Vec<i32> = self.stalled.keys().copied().collect();
        busy.extend(out.iter().map(|(p, _)| *p));
        let s = self.settings.clone();
        // Memory: past the bound nothing waits for late metadata any more.
        let buffered: usize = self.ready.iter().map(|(_, b)| b.records.len()).sum::<usize>()
            + self.batches.values().map(|b| b.records.len()).sum::<usize>();
        let over = buffered > s.max_held_records;
        // Held back for late metadata (never past max age + the late window);
        // a batch whose end was agreed before waits for nothing.
        let hold = |b: &Batch| {
            let age = now.instant.saturating_duration_since(b.opened);
            b.end.is_none() && b.hold_until.is_some_and(|h| now.instant < h) && age < s.max_age + s.late_window
        };
        let cut = std::cell::Cell::new(0u64);
        let waiting = |b: &Batch| {
            let h = hold(b);
            if h && over {
                cut.set(cut.get() + 1);
            }
            h && !over
        };
        // Batches that would be written now but wait for late metadata.
        let held = std::cell::Cell::new(0u64);
        let mut later = VecDeque::new();
        for (p, b) in self.ready.drain(..) {
            let blocked = busy.contains(&p);
            if blocked || waiting(&b) {
                if !blocked {
                    held.set(held.get() + 1);
                }
                busy.push(p);
                later.push_back((p, b));
            } else {
                busy.push(p);
                out.push((p, b));
            }
        }
        self.ready = later;
        let due: Vec<i32> = self
            .batches
            .iter()
            .filter(|(p, b)| {
                if busy.contains(p) {
                    return false;
                }
                if let Some(end) = b.end {
                    return b.last >= end;
                }
                let age = now.instant.saturating_duration_since(b.opened);
                if b.records.len() < s.max_records && age < s.max_age {
                    return false;
                }
                let w = waiting(b);
                if w {
                    held.set(held.get() + 1);
                }
                !w
            })
            .map(|(p, _)| *p)
            .collect();
        out.extend(self.take(due));
        ::metrics::gauge!(metrics::HELD_BATCHES).set(held.get() as f64);
        if cut.get() > 0 {
            ::metrics::counter!(metrics::HOLD_CUT).increment(cut.get());
            if self.last_cut_log.is_none_or(|t| now.instant.saturating_duration_since(t) >= Duration::from_secs(60)) {
                self.last_cut_log = Some(now.instant);
                tracing::warn!(buffered, max_held_records = s.max_held_records, "too many records held back for late metadata: writing held batches now (flowlog_enricher_hold_cut_total)");
            }
        }
        out
    }

    /// A batch taken to be written must end at `end` instead (its
    /// boundary was agreed before): it goes back, joined with every later
    /// batch of its partition (complete ones and the open one), and is
    /// split at `end` (the head is complete, the rest is cut again by
    /// `max_records`) or stays open until the offsets reach `end`.
    pub fn put_back(&mut self, p: i32, mut b: Batch, end: i64) {
        for later in self.unwritten(p) {
            b.append(later);
        }
        b.end = Some(end);
        let Some(mut rest) = b.split_after(end) else {
            if b.last == end {
                self.ready.push_back((p, b));
            } else {
                self.batches.insert(p, b);
            }
            return;
        };
        self.ready.push_back((p, b));
        let max = self.settings.max_records;
        // Cut between messages: the records of one (a FlowBatch) stay
        // together, so a piece may pass `max_records` by one message's.
        while rest.records.len() > max {
            let at = rest.offsets[max - 1];
            let Some(next) = rest.split_after(at) else { break };
            self.ready.push_back((p, std::mem::replace(&mut rest, next)));
        }
        self.batches.insert(p, rest);
    }

    /// A batch could not be written: it is tried again at `at`, before any
    /// later batch of its partition.
    pub fn retry_later(&mut self, p: i32, b: Batch, at: Instant) {
        self.stalled.insert(p, (b, at));
    }

    /// Whether partition `p` has a batch waiting to be written again.
    pub fn stalled(&self, p: i32) -> bool {
        self.stalled.contains_key(&p)
    }

    /// Every batch not written yet, in offset order per partition (when
    /// stopping). Records still waiting for their other half are one-sided
    /// now: the next process will not know them.
    pub fn drain(&mut self) -> Vec<(i32, Batch)> {
        let mut parts: Vec<i32> = self.batches.keys().chain(self.stalled.keys()).copied().collect();
        parts.extend(self.ready.iter().map(|(p, _)| *p));
        parts.sort();
        parts.dedup();
        let mut open = Vec::new();
        for p in parts {
            open.extend(self.unwritten(p).into_iter().map(|b| (p, b)));
        }
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
                out.push((p, b));
            }
        }
        out
    }

    /// A batch about to be written (its boundary agreed): its held-back
    /// records attributed again, then every record's final attribution
    /// self-checked; once per batch, however often its write is tried.
    pub fn finalize(&mut self, b: &mut Batch) {
        if b.finalized {
            return;
        }
        b.finalized = true;
        self.settle(b);
        self.selfcheck.observe(&b.records, self.now);
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
