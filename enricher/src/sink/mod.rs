//! Where enriched batches and rejected messages go. A batch goes through
//! every [`Sink`] in order (dead-letter queue, enriched topic, files); its
//! offsets are committed only once all of them have it durably.

pub mod dlq;
pub mod lake;
pub mod parquet;
pub mod store;
pub mod topic;

use std::time::Instant;

use flowlog_schema::{DecodeError, EnrichedFlow};

/// One message of the flow topic.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<&'a [u8]>,
    pub payload: &'a [u8],
}

/// The enriched records of one Kafka partition's offsets `first..=last`
/// (offsets of rejected messages and dropped repeats included: they are
/// committed with the batch).
pub struct Batch {
    pub first: i64,
    pub last: i64,
    pub records: Vec<EnrichedFlow>,
    /// The Kafka offset of each record (same order as `records`): where a
    /// batch splits when its boundary was agreed elsewhere.
    pub offsets: Vec<i64>,
    pub opened: Instant,
    /// Records with an unattributed side, recent enough for metadata to
    /// still arrive (indexes in `records`), attributed again when the batch
    /// rolls.
    pub held: Vec<usize>,
    /// The batch waits for late metadata until then.
    pub hold_until: Option<Instant>,
    /// The last offset this batch must end at: the boundary an earlier
    /// attempt at the same batch agreed on (see [`lake`]); None: this
    /// process chooses.
    pub end: Option<i64>,
    /// Held-back records attributed again and the self-check fed: done
    /// once, even when the write is retried.
    pub finalized: bool,
}

impl Batch {
    pub fn new(first: i64, opened: Instant) -> Batch {
        Batch {
            first,
            last: first,
            records: Vec::new(),
            offsets: Vec::new(),
            opened,
            held: Vec::new(),
            hold_until: None,
            end: None,
            finalized: false,
        }
    }

    /// Moves the offsets after `at` (and their records) to a new batch
    /// starting at `at + 1`; None when the batch ends at or before `at`.
    pub fn split_after(&mut self, at: i64) -> Option<Batch> {
        if self.last <= at {
            return None;
        }
        let cut = self.offsets.partition_point(|&o| o <= at);
        let mut tail = Batch::new(at + 1, self.opened);
        tail.last = self.last;
        tail.records = self.records.split_off(cut);
        tail.offsets = self.offsets.split_off(cut);
        tail.hold_until = self.hold_until;
        let held = std::mem::take(&mut self.held);
        for i in held {
            if i < cut {
                self.held.push(i);
            } else {
                tail.held.push(i - cut);
            }
        }
        self.last = at;
        Some(tail)
    }

    /// Appends `next`, the batch of the offsets that follow.
    pub fn append(&mut self, next: Batch) {
        let base = self.records.len();
        self.last = next.last;
        self.records.extend(next.records);
        self.offsets.extend(next.offsets);
        self.held.extend(next.held.into_iter().map(|i| i + base));
        self.hold_until = self.hold_until.max(next.hold_until);
        self.opened = self.opened.min(next.opened);
    }
}

/// A destination of rolled batches. When `write` returns, the batch is
/// durable there (or the error says why not, and nothing is committed).
pub trait Sink: Send + Sync {
    fn write(&self, partition: i32, batch: &Batch) -> anyhow::Result<()>;
}

/// Where messages that do not decode go, with the reason. Sending queues
/// the message; the queue's [`Sink::write`] makes it durable before the
/// batch that covers its offset is committed.
pub trait DeadLetters: Send + Sync {
    fn send(&self, message: &Message, reason: &DecodeError) -> anyhow::Result<()>;
}
