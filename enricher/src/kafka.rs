//! Kafka clients shared by the enricher's stages: the client configuration,
//! and the producer the dead-letter and enriched topics share.
//!
//! Every record is sent with a [`Tracker`] (one per sink): the producer's
//! delivery report of that very record updates it, so a sink knows, record
//! by record, that everything it sent was acknowledged before its batch's
//! offsets are committed ([`Producer::wait`]), and gets back the records
//! that were not, to send them again. A flush of the whole producer would
//! not tell: it can return before the report of a failed record has been
//! handled.

use std::{
    sync::{Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

use rdkafka::{
    error::KafkaError,
    message::{Headers, Message as _, OwnedHeaders},
    producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext},
    types::RDKafkaErrorCode,
    ClientConfig, ClientContext,
};
use flowlog_runtime::producer::PolledProducer;
use tracing::warn;

use crate::config::Config;

/// How long a roll waits for its records to be delivered, and how long a
/// send waits for room in the producer's queue, before giving up.
pub const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn client_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.kafka_properties {
        c.set(k, v);
    }
    c
}

/// A record whose delivery failed, as it was, to be sent again. One the
/// producer or the broker refused as larger than the maximum message size
/// keeps its key and headers only (`payload` None), to go as a reference.
#[derive(Debug, Clone, PartialEq)]
pub struct Returned {
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    pub payload_bytes: usize,
    pub too_large: bool,
    pub error: String,
}

#[derive(Default)]
struct Reports {
    /// Sent and not yet reported.
    outstanding: u64,
    /// Failed, not yet taken by [`Producer::wait`].
    returned: Vec<Returned>,
}

/// The deliveries of the records one sink sent (see the module docs).
#[derive(Default)]
pub struct Tracker {
    reports: Mutex<Reports>,
    reported: Condvar,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, Reports> {
        // A panic elsewhere while holding it leaves plain counters: usable.
        self.reports.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn report(&self, r: &DeliveryResult<'_>) {
        let mut s = self.lock();
        if let Err((e, m)) = r {
            let too_large = matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge));
            if !too_large {
                warn!(topic = m.topic(), "delivery failed: {e}");
            }
            s.returned.push(Returned {
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().filter(|_| !too_large).map(<[u8]>::to_vec),
                headers: m.headers().map_or_else(Vec::new, |h| {
                    h.iter().map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec())).collect()
                }),
                payload_bytes: m.payload().map_or(0, <[u8]>::len),
                too_large,
                error: format!("{}: {e}", m.topic()),
            });
        }
        s.outstanding = s.outstanding.saturating_sub(1);
        drop(s);
        self.reported.notify_all();
    }
}

/// Hands each delivery report to the record's [`Tracker`].
pub struct Deliveries;

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = Arc<Tracker>;
    fn delivery(&self, r: &DeliveryResult<'_>, tracker: Arc<Tracker>) {
        tracker.report(r);
    }
}

/// Why a record was not queued.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Larger than the producer's `message.max.bytes`.
    #[error("larger than the maximum message size")]
    TooLarge,
    #[error("producing to {topic}: {reason}")]
    Failed { topic: String, reason: String },
}

/// One record to send.
pub struct Outgoing<'a> {
    pub topic: &'a str,
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    pub headers: Option<OwnedHeaders>,
}

/// An idempotent producer (shared by the dead-letter and enriched topics).
#[derive(Clone)]
pub struct Producer(Arc<PolledProducer<Deliveries>>);

impl Producer {
    pub fn new(cfg: &Config) -> anyhow::Result<Producer> {
        let p = client_config(cfg)
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .set("compression.type", "lz4")
            .create_with_context::<_, BaseProducer<Deliveries>>(Deliveries)?;
        Ok(Producer(Arc::new(PolledProducer::new(p, "kafka-reports")?)))
    }

    /// Queues one record, tracked by `tracker`. While the local queue is
    /// full (a flood, or the broker away) it backs off and tries again, for
    /// up to [`DELIVERY_TIMEOUT`] (the producer's report thread keeps polling,
    /// which makes room).
    pub fn send(&self, out: Outgoing<'_>, tracker: &Arc<Tracker>) -> Result<(), SendError> {
        let mut rec = BaseRecord::with_opaque_to(out.topic, tracker.clone());
        if let Some(k) = out.key {
            rec = rec.key(k);
        }
        if let Some(p) = out.payload {
            rec = rec.payload(p);
        }
        if let Some(h) = out.headers {
            rec = rec.headers(h);
        }
        let (t0, mut backoff) = (Instant::now(), Duration::from_millis(1));
        loop {
            // Counted before the send: the report may come before `send` returns.
            tracker.lock().outstanding += 1;
            let (e, back) = match self.0.send(rec) {
                Ok(()) => return Ok(()),
                Err(refused) => refused,
            };
            tracker.lock().outstanding -= 1;
            match e {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) if t0.elapsed() < DELIVERY_TIMEOUT => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                    rec = back;
                }
                KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge) => return Err(SendError::TooLarge),
                e => return Err(SendError::Failed { topic: out.topic.to_string(), reason: e.to_string() }),
            }
        }
    }

    /// Waits until every record sent with `tracker` so far has been
    /// reported, for up to `timeout` (an error if reports are still
    /// missing then). Returns the records that failed since the last call
    /// (none: all acknowledged); the caller must not commit what they cover
    /// before it has sent them again, or the batch again.
    pub fn wait(&self, tracker: &Tracker, timeout: Duration) -> anyhow::Result<Vec<Returned>> {
        let deadline = Instant::now() + timeout;
        let mut s = tracker.lock();
        while s.outstanding > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                anyhow::bail!("{} records not acknowledged within {timeout:?}; not committing", s.outstanding);
            }
            s = tracker.reported.wait_timeout(s, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        Ok(std::mem::take(&mut s.returned))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn producer(extra: &[(&str, &str)]) -> Producer {
        let mut c = ClientConfig::new();
        // Nothing listens on port 1: every delivery fails once it times out.
        c.set("bootstrap.servers", "127.0.0.1:1").set("message.timeout.ms", "200");
        for (k, v) in extra {
            c.set(*k, *v);
        }
        let p: BaseProducer<Deliveries> = c.create_with_context(Deliveries).unwrap();
        Producer(Arc::new(PolledProducer::new(p, "test-reports").unwrap()))
    }

    fn out<'a>(payload: &'a [u8]) -> Outgoing<'a> {
        Outgoing { topic: "t", key: Some(b"k"), payload: Some(payload), headers: None }
    }

    /// A delivery that fails comes back, whole, from the wait of its
    /// tracker (once), and not from another sink's tracker.
    #[test]
    fn a_failed_delivery_comes_back_from_its_tracker() {
        let p = producer(&[]);
        let (mine, other) = (Arc::new(Tracker::default()), Arc::new(Tracker::default()));
        p.send(out(b"x"), &mine).unwrap();
        let back = p.wait(&mine, Duration::from_secs(10)).unwrap();
        assert_eq!(back.len(), 1, "{back:?}");
        assert_eq!((back[0].key.as_deref(), back[0].payload.as_deref(), back[0].too_large), (Some(&b"k"[..]), Some(&b"x"[..]), false));
        assert_eq!(p.wait(&mine, Duration::from_secs(1)).unwrap(), vec![]);
        assert_eq!(p.wait(&other, Duration::from_secs(1)).unwrap(), vec![]);
    }

    /// A record larger than `message.max.bytes` is refused at once, not
    /// queued (nor counted as outstanding).
    #[test]
    fn oversized_records_are_refused_at_once() {
        let p = producer(&[("message.max.bytes", "1000")]);
        let t = Arc::new(Tracker::default());
        assert!(matches!(p.send(out(&[0u8; 5000]), &t), Err(SendError::TooLarge)));
        assert_eq!(t.lock().outstanding, 0);
    }
}
