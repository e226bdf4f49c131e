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
        // Records that failed: the batch fails, and its retry sends it all again.
        let failed = self.producer.wait(&self.deliveries, DELIVERY_TIMEOUT)?;
        if let Some(first) = failed.first() {
            anyhow::bail!("{} enriched records not delivered ({}); the batch is sent again", failed.len(), first.error);
        }
        ::metrics::counter!(metrics::RECORDS_OUT, "sink" => "topic")
            .increment(batch.records.len() as u64);
        Ok(())
    }
}
