//! Kafka clients shared by the enricher's stages: the client configuration,
//! and the producer the dead-letter and enriched topics share.

use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::Context as _;
use rdkafka::{
    error::KafkaError,
    message::ToBytes,
    producer::{BaseRecord, DeliveryResult, Producer as _, ProducerContext, ThreadedProducer},
    types::RDKafkaErrorCode,
    ClientConfig, ClientContext,
};
use tracing::warn;

use crate::config::Config;

/// How long a roll waits for its records to be delivered before giving up.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

pub fn client_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.kafka_properties {
        c.set(k, v);
    }
    c
}

/// Counts failed deliveries.
#[derive(Default)]
pub struct Deliveries {
    failed: AtomicU64,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = r {
            self.failed.fetch_add(1, Ordering::Relaxed);
            warn!("delivery failed: {e}");
        }
    }
}

/// An idempotent producer (shared by the dead-letter and enriched topics).
#[derive(Clone)]
pub struct Producer(Arc<ThreadedProducer<Deliveries>>);

impl Producer {
    pub fn new(cfg: &Config) -> anyhow::Result<Producer> {
        let p = client_config(cfg)
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .set("compression.type", "lz4")
            .create_with_context(Deliveries::default())?;
        Ok(Producer(Arc::new(p)))
    }

    /// Queues one record, waiting while the local queue is full.
    pub fn send<K, P>(&self, mut rec: BaseRecord<'_, K, P>) -> anyhow::Result<()>
    where
        K: ToBytes + ?Sized,
        P: ToBytes + ?Sized,
    {
        loop {
            match self.0.send(rec) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    rec = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, back)) => anyhow::bail!("producing to {}: {e}", back.topic),
            }
        }
    }

    /// Waits until everything queued is delivered. Fails if any delivery
    /// ever failed: the offsets of what was lost must never be committed,
    /// so the process stops and its successor redoes them.
    pub fn deliver(&self) -> anyhow::Result<()> {
        self.0
            .flush(DELIVERY_TIMEOUT)
            .context("delivering to Kafka")?;
        let failed = self.0.context().failed.load(Ordering::Relaxed);
        if failed > 0 {
            anyhow::bail!("{failed} records were not delivered; not committing");
        }
        Ok(())
    }
}
