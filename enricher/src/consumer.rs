//! The flow topic as the pipeline's input: a member of the enricher's
//! consumer group, feeding [`Pipeline`] and committing a partition's offsets
//! by hand, only after every sink has the batch. Partitions taken away are
//! flushed first; partitions assigned resume after what their files hold.

use std::{
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
    sink::{files::FileSink, Batch, Message, Sink},
};

/// How often due batches are rolled (and process metrics updated).
const TICK: Duration = Duration::from_millis(200);
/// How often the consumer lag is measured.
const LAG_EVERY: Duration = Duration::from_secs(10);

/// Shared with the rebalance callbacks, which run inside `poll` on the
/// consuming thread.
pub struct Ctx {
    pipeline: Mutex<Pipeline>,
    /// In the order a batch goes through them.
    sinks: Vec<Arc<dyn Sink>>,
    /// The file sink again: its state says where each partition resumes.
    files: Arc<FileSink>,
    topic: String,
}

pub type FlowConsumer = BaseConsumer<Ctx>;

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &FlowConsumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Finish what was read from the partitions being taken away.
            let mut pipeline = self.pipeline.lock().unwrap();
            for e in tpl.elements() {
                let Some(b) = pipeline.revoke(e.partition()) else {
                    continue;
                };
                if let Err(err) = self.roll(consumer, e.partition(), &b) {
                    error!(
                        partition = e.partition(),
                        "flushing on revoke failed; the next owner redoes it: {err:#}"
                    );
                }
            }
        }
    }

    fn post_rebalance(&self, _consumer: &FlowConsumer, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut pipeline = self.pipeline.lock().unwrap();
            for e in tpl.elements() {
                let p = e.partition();
                let orphans = self.files.remove_orphans(p);
                if orphans > 0 {
                    warn!(
                        partition = p,
                        orphans, "removed files of an unfinished batch; redoing it"
                    );
                }
                let done = self.files.done_through(p).unwrap_or(-1);
                pipeline.assign(p, done);
                info!(partition = p, done_through = done, "assigned");
            }
        }
    }
}

impl Ctx {
    /// Writes a batch to every sink, then commits its offsets.
    fn roll(&self, consumer: &FlowConsumer, p: i32, b: &Batch) -> anyhow::Result<()> {
        pipeline::write(&self.sinks, p, b, |p, next| {
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(&self.topic, p, Offset::Offset(next))?;
            consumer
                .commit(&tpl, CommitMode::Sync)
                .context("committing offsets")
        })
    }

    /// Rolls every batch that is due.
    fn roll_due(&self, consumer: &FlowConsumer) -> anyhow::Result<()> {
        let due = self.pipeline.lock().unwrap().due(Now::system());
        for (p, b) in due {
            self.roll(consumer, p, &b)?;
            self.pipeline.lock().unwrap().written(p, b.last);
        }
        Ok(())
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
            if let Ok((_, high)) = consumer.fetch_watermarks(&self.topic, p, Duration::from_secs(1))
            {
                let done = self.pipeline.lock().unwrap().done_through(p).unwrap_or(-1);
                lag += (high - 1 - done).max(0);
            }
        }
        lag
    }
}

/// Joins the consumer group on the flow topic.
pub fn subscribe(
    cfg: &Config,
    pipeline: Pipeline,
    sinks: Vec<Arc<dyn Sink>>,
    files: Arc<FileSink>,
) -> anyhow::Result<FlowConsumer> {
    let consumer: FlowConsumer = kafka::client_config(cfg)
        .set("group.id", &cfg.group_id)
        // Offsets are committed by hand, only after the files are durable.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("fetch.wait.max.ms", "50")
        .create_with_context(Ctx {
            pipeline: Mutex::new(pipeline),
            sinks,
            files,
            topic: cfg.flow_topic.clone(),
        })?;
    consumer.subscribe(&[&cfg.flow_topic])?;
    Ok(consumer)
}

/// Consumes until `stop`, then writes the open batches. Returns an error
/// when a batch cannot be made durable and committed (the process must
/// stop; its successor redoes the batch).
pub fn run(consumer: &FlowConsumer, stop: &AtomicBool) -> anyhow::Result<()> {
    let ctx = consumer.context();
    let (mut last_tick, mut last_lag) = (Instant::now(), Instant::now());
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
            Some(Err(e)) => warn!("consume error: {e}"),
            None => {}
        }
        if last_tick.elapsed() >= TICK {
            last_tick = Instant::now();
            ctx.roll_due(consumer)?;
            metrics::record_process();
            if last_lag.elapsed() >= LAG_EVERY {
                last_lag = Instant::now();
                ::metrics::gauge!(metrics::CONSUMER_LAG).set(ctx.lag(consumer) as f64);
            }
        }
    }
    info!("stopping: writing open batches");
    let open = ctx.pipeline.lock().unwrap().drain();
    for (p, b) in open {
        ctx.roll(consumer, p, &b)?;
    }
    Ok(())
}
