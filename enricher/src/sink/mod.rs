//! Where enriched batches and rejected messages go. A batch goes through
//! every [`Sink`] in order (dead-letter queue, enriched topic, files); its
//! offsets are committed only once all of them have it durably.

pub mod dlq;
pub mod files;
pub mod parquet;
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
/// (offsets of rejected messages included: they went to the dead-letter
/// queue).
pub struct Batch {
    pub first: i64,
    pub last: i64,
    pub records: Vec<EnrichedFlow>,
    pub opened: Instant,
    /// Records with an unattributed side, recent enough for metadata to
    /// still arrive (indexes in `records`), attributed again when the batch
    /// rolls.
    pub held: Vec<usize>,
    /// The batch waits for late metadata until then.
    pub hold_until: Option<Instant>,
}

impl Batch {
    pub fn new(first: i64, opened: Instant) -> Batch {
        Batch {
            first,
            last: first,
            records: Vec::new(),
            opened,
            held: Vec::new(),
            hold_until: None,
        }
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
