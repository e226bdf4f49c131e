//! The flow topic as the pipeline's input: a member of the enricher's
//! consumer group, feeding [`Pipeline`] and committing a partition's offsets
//! by hand, only after every sink has the batch. Partitions taken away are
//! flushed first; partitions assigned resume after what their files hold.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance},
    ClientContext, Message as _, Offset, TopicPartitionList,
};
use tracing::{error, info, warn};

use crate::{
    config::Config,
    kafka, metrics,
    pipeline::{self, Now, Pipeline},
    sink::{lake::{failpoint, Lake}, Batch, Message, Sink},
};

/// How often due batches are rolled (and process metrics updated).
const TICK: Duration = Duration::from_millis(200);
/// How often the consumer lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(10);
/// A failed roll is tried again after this, doubling up to `MAX_BACKOFF`.
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Rounds of rolling per tick at most (the loop keeps polling meanwhile).
const MAX_ROLLS_PER_TICK: usize = 16;

/// Shared with the rebalance callbacks, which run inside `poll` on the
/// consuming thread.
pub struct Ctx {
    pipeline: Mutex<Pipeline>,
    /// In the order a batch goes through them.
    sinks: Vec<Arc<dyn Sink>>,
    /// The lake again: it agrees on where each batch ends.
    lake: Arc<Lake>,
    topic: String,
    /// Partitions whose last roll failed: the next wait.
    backoff: Mutex<HashMap<i32, Duration>>,
}

pub type FlowConsumer = BaseConsumer<Ctx>;

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &FlowConsumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Handed over: finish what was read (one attempt; the next owner
            // redoes what fails). Lost (session expired): another member
            // owns the partition already, write nothing.
            let lost = consumer.assignment_lost();
            for e in tpl.elements() {
                let p = e.partition();
                let batches = self.pipeline.lock().unwrap().revoke(p);
                self.backoff.lock().unwrap().remove(&p);
                if lost {
                    ::metrics::counter!(metrics::FENCED).increment(batches.len() as u64);
                    if !batches.is_empty() {
                        warn!(partition = p, batches = batches.len(), "partition lost: its new owner writes what was read");
                    }
                    continue;
                }
                for b in batches {
                    match self.roll(consumer, p, b) {
                        Ok(Rolled::Written) => {}
                        Ok(Rolled::PutBack) => break,
                        Err(f) => {
                            error!(partition = p, stage = f.stage, "flushing on revoke failed; the next owner redoes it: {:#}", f.error);
                            break;
                        }
                    }
                }
                // What is left of a revoked partition is the next owner's.
                self.pipeline.lock().unwrap().revoke(p);
            }
        }
    }

    fn post_rebalance(&self, _consumer: &FlowConsumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut pipeline = self.pipeline.lock().unwrap();
            for e in tpl.elements() {
                pipeline.assign(e.partition(), -1);
                info!(partition = e.partition(), "assigned; resuming at the committed offset");
            }
        }
    }
}

/// A batch that could not be written, handed back.
struct Failed {
    stage: &'static str,
    error: anyhow::Error,
    batch: Batch,
}

/// What became of a batch taken to be written.
enum Rolled {
    /// Written everywhere and committed.
    Written,
    /// An earlier attempt ended it elsewhere: back in the pipeline, split
    /// or waiting for more offsets.
    PutBack,
}

impl Ctx {
    /// Agrees on the batch's end, then writes it to every sink and commits
    /// its offsets. On failure the batch is handed back with the stage
    /// that failed.
    fn roll(&self, consumer: &FlowConsumer, p: i32, mut b: Batch) -> Result<Rolled, Box<Failed>> {
        let end = match self.lake.claim(p, b.first, b.last) {
            Ok(end) => end,
            Err(error) => return Err(Box::new(Failed { stage: "claim", error, batch: b })),
        };
        let mut pipeline = self.pipeline.lock().unwrap();
        if end != b.last {
            info!(partition = p, first = b.first, last = b.last, end, "batch boundary claimed before: ending it there");
            pipeline.put_back(p, b, end);
            return Ok(Rolled::PutBack);
        }
        pipeline.finalize(&mut b);
        drop(pipeline);
        let mut stage = "write";
        let result = pipeline::write(&self.sinks, p, &b, |p, next| {
            failpoint("commit");
            stage = "commit";
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(next))?;
            consumer
                .commit(&tpl, CommitMode::Sync)
                .context("committing offsets")?;
            failpoint("committed");
            Ok(())
        });
        match result {
            Ok(()) => {
                self.pipeline.lock().unwrap().written(p, b.last);
                Ok(Rolled::Written)
            }
            Err(error) => Err(Box::new(Failed { stage, error, batch: b })),
        }
    }

    /// Rolls every batch that is due. A batch that fails waits (backoff)
    /// and its partition is paused meanwhile, so that memory stays bounded
    /// while the store or the broker is away; the process keeps polling and
    /// stays in the group.
    fn roll_due(&self, consumer: &FlowConsumer) {
        // One batch per partition at a time; again while there are more
        // (complete batches queue up when messages come fast).
        for _ in 0..MAX_ROLLS_PER_TICK {
            let due = self.pipeline.lock().unwrap().due(Now::system());
            if due.is_empty() || !self.roll_each(consumer, due) {
                return;
            }
        }
    }

    /// Rolls the batches; false if one failed.
    fn roll_each(&self, consumer: &FlowConsumer, due: Vec<(i32, Batch)>) -> bool {
        let mut all_ok = true;
        for (p, b) in due {
            match self.roll(consumer, p, b) {
                Ok(_) => {
                    if self.backoff.lock().unwrap().remove(&p).is_some() {
                        let _ = consumer.resume(&one(&self.topic, p));
                        info!(partition = p, "writing works again; partition resumed");
                    }
                }
                Err(f) => {
                    ::metrics::counter!(metrics::ROLL_FAILURES, "stage" => f.stage).increment(1);
                    let mut backoff = self.backoff.lock().unwrap();
                    let wait = backoff.get(&p).map_or(FIRST_BACKOFF, |w| (*w * 2).min(MAX_BACKOFF));
                    if backoff.insert(p, wait).is_none() {
                        let _ = consumer.pause(&one(&self.topic, p));
                    }
                    warn!(partition = p, stage = f.stage, retry_in = ?wait, "batch not written, partition paused: {:#}", f.error);
                    self.pipeline.lock().unwrap().retry_later(p, f.batch, Instant::now() + wait);
                    all_ok = false;
                }
            }
        }
        all_ok
    }

    /// Records in the topic beyond what is durably written, over the
    /// partitions this member owns.
    fn lag(&self, consumer: &FlowConsumer) -> i64 {
        let Ok(assigned) = consumer.assignment() else {
            return 0;
        };
        let mut lag = 0;
        for e in assigned.elements() {
            let p = e.partition();
            if let Ok((low, high)) = consumer.fetch_watermarks(&self.topic, p, Duration::from_secs(1))
            {
                let done = self.pipeline.lock().unwrap().done_through(p).unwrap_or(low - 1);
                lag += (high - 1 - done).max(0);
            }
        }
        lag
    }
}

fn one(topic: &str, p: i32) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, p);
    tpl
}

/// Joins the consumer group on the flow topic.
pub fn subscribe(
    cfg: &Config,
    pipeline: Pipeline,
    sinks: Vec<Arc<dyn Sink>>,
    lake: Arc<Lake>,
) -> anyhow::Result<FlowConsumer> {
    let consumer: FlowConsumer = kafka::client_config(cfg)
        .set("group.id", &cfg.group_id)
        // Offsets are committed by hand, only after the lake has the batch.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("fetch.wait.max.ms", "50")
        .create_with_context(Ctx {
            pipeline: Mutex::new(pipeline),
            sinks,
            lake,
            topic: cfg.flow_topic.clone(),
            backoff: Mutex::new(HashMap::new()),
        })?;
    if cfg.static_partitions.is_empty() {
        consumer.subscribe(&[&cfg.flow_topic])?;
        return Ok(consumer);
    }
    // A fixed assignment, no group membership: resume at the group's
    // committed offsets all the same.
    let mut tpl = TopicPartitionList::new();
    for &p in &cfg.static_partitions {
        tpl.add_partition_offset(&cfg.flow_topic, p, Offset::Stored)?;
        consumer.context().pipeline.lock().unwrap().assign(p, -1);
    }
    consumer.assign(&tpl)?;
    info!(partitions = ?cfg.static_partitions, "static assignment");
    Ok(consumer)
}

/// Logs a repeated consume error once a minute.
#[derive(Default)]
struct Quiet {
    last: Option<(String, Instant)>,
    repeats: u64,
}

impl Quiet {
    fn warn(&mut self, e: &rdkafka::error::KafkaError) {
        let text = e.to_string();
        match &self.last {
            Some((seen, at)) if *seen == text && at.elapsed() < Duration::from_secs(60) => self.repeats += 1,
            _ => {
                warn!(repeats_since_last_logged = self.repeats, "consume error: {text}");
                self.last = Some((text, Instant::now()));
                self.repeats = 0;
            }
        }
    }
}

/// Consumes until `stop`, then writes the open batches. Returns an error
/// when a message cannot be handled (the dead-letter queue is away) or the
/// last batches cannot be written (their successor redoes them).
pub fn run(consumer: &FlowConsumer, stop: &AtomicBool) -> anyhow::Result<()> {
    let ctx = consumer.context();
    let (mut last_tick, mut last_lag) = (Instant::now(), Instant::now());
    // librdkafka reports a broker that is away on every poll (100 ms): the
    // same error is logged once a minute, with how often it came.
    let mut quiet = Quiet::default();
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let m = Message {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key(),
                    payload: m.payload().unwrap_or_default(),
                };
                ctx.pipeline.lock().unwrap().consume(&m, Now::system())?;
            }
            Some(Err(e)) => quiet.warn(&e),
            None => {}
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            ctx.roll_due(consumer);
            metrics::record_process();
            if last_lag.elapsed() >= LAG_EVERY {
                last_lag = Instant::now();
                ::metrics::gauge!(metrics::CONSUMER_LAG).set(ctx.lag(consumer) as f64);
            }
        }
    }
    info!("stopping: writing open batches");
    let open = ctx.pipeline.lock().unwrap().drain();
    // A partition stops at its first batch not written; the next owner
    // redoes the rest from the committed offset.
    let (mut stopped, mut failed) = (Vec::new(), Vec::new());
    for (p, b) in open {
        if stopped.contains(&p) {
            continue;
        }
        match ctx.roll(consumer, p, b) {
            Ok(Rolled::Written) => {}
            // Its end was claimed past what was read.
            Ok(Rolled::PutBack) => stopped.push(p),
            Err(f) => {
                error!(partition = p, stage = f.stage, "{:#}", f.error);
                stopped.push(p);
                failed.push(p);
            }
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        anyhow::bail!("batches of partitions {failed:?} were not written; whoever reads them next redoes them")
    }
}
