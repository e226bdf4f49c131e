//! The enriched topic: every record of a batch, Avro single-object encoded
//! (schemas/enriched_flow.avsc), keyed by the sidecar's host id. At least
//! once: a batch redone after a crash is produced again.

use rdkafka::producer::BaseRecord;

use super::{Batch, Sink};
use crate::{kafka::Producer, metrics};

pub struct EnrichedTopic {
    producer: Producer,
    topic: String,
    /// The single-object header: marker and schema fingerprint.
    header: [u8; 10],
}

impl EnrichedTopic {
    pub fn new(producer: Producer, topic: String) -> EnrichedTopic {
        EnrichedTopic {
            producer,
            topic,
            header: flowlog_schema::ENRICHED_FLOW.header(),
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
            let rec = BaseRecord::<str, [u8], ()>::to(&self.topic)
                .key(r.host.identity.host_id.as_str())
                .payload(&msg[..]);
            self.producer.send(rec)?;
        }
        self.producer.deliver()?;
        ::metrics::counter!(metrics::RECORDS_OUT, "sink" => "topic")
            .increment(batch.records.len() as u64);
        Ok(())
    }
}
