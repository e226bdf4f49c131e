//! The enriched topic: every record of a batch, Avro single-object encoded
//! (schemas/enriched_flow.avsc), keyed by the sidecar's host id. At least
//! once: a batch redone after a crash is produced again.

use std::sync::Arc;

use super::{Batch, Sink};
use crate::{
    kafka::{Outgoing, Producer, Tracker, DELIVERY_TIMEOUT},
    metrics,
};

pub struct EnrichedTopic {
    producer: Producer,
    topic: String,
    /// The single-object header: marker and schema fingerprint.
    header: [u8; 10],
    deliveries: Arc<Tracker>,
}

impl EnrichedTopic {
    pub fn new(producer: Producer, topic: String) -> EnrichedTopic {
        EnrichedTopic {
            producer,
            topic,
            header: flowlog_schema::ENRICHED_FLOW.header(),
            deliveries: Arc::default(),
        }
    }
}

impl Sink for EnrichedTopic {
    fn write(&self, _partition: i32, batch: &Batch) -> anyhow::Result<()> {
        let mut msg = Vec::new();
        for r in &batch.records {
            msg.clear();
            msg.extend_from_slice(&self.header);
            r.write(&mut msg);
            let out = Outgoing {
                topic: &self.topic,
                key: Some(r.host.identity.host_id.as_bytes()),
                payload: Some(&msg[..]),
                headers: None,
            };
            self.producer.send(out, &self.deliveries)?;
        }
        // An enriched record is far below any maximum size: refused as too
        // large is a failure like any other.
        let refused = self.producer.wait(&self.deliveries, DELIVERY_TIMEOUT)?;
        if !refused.is_empty() {
            anyhow::bail!("{} enriched records refused as too large by {}", refused.len(), self.topic);
        }
        ::metrics::counter!(metrics::RECORDS_OUT, "sink" => "topic")
            .increment(batch.records.len() as u64);
        Ok(())
    }
}
