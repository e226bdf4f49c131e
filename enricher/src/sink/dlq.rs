//! The dead-letter topic: messages that do not decode (or decode to
//! nonsense), as they were, with the reason and their origin in headers.

use flowlog_schema::DecodeError;
use rdkafka::{
    message::{Header, OwnedHeaders},
    producer::BaseRecord,
};

use super::{Batch, DeadLetters, Message, Sink};
use crate::{kafka::Producer, metrics};

pub struct DeadLetterTopic {
    producer: Producer,
    topic: String,
    /// The flow topic, named in the `flowlog.dlq.source` header.
    source_topic: String,
}

impl DeadLetterTopic {
    pub fn new(producer: Producer, topic: String, source_topic: String) -> DeadLetterTopic {
        DeadLetterTopic {
            producer,
            topic,
            source_topic,
        }
    }
}

impl DeadLetters for DeadLetterTopic {
    fn send(&self, m: &Message, reason: &DecodeError) -> anyhow::Result<()> {
        ::metrics::counter!(metrics::DLQ, "reason" => reason.kind()).increment(1);
        let reason = reason.to_string();
        let source = format!("{}/{}/{}", self.source_topic, m.partition, m.offset);
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "flowlog.dlq.reason",
                value: Some(&reason),
            })
            .insert(Header {
                key: "flowlog.dlq.source",
                value: Some(&source),
            });
        let mut rec = BaseRecord::<[u8], [u8], ()>::to(&self.topic)
            .payload(m.payload)
            .headers(headers);
        if let Some(k) = m.key {
            rec = rec.key(k);
        }
        self.producer.send(rec)
    }
}

/// The batch's dead letters were sent as its messages were read; writing
/// the batch waits until they are delivered.
impl Sink for DeadLetterTopic {
    fn write(&self, _partition: i32, _batch: &Batch) -> anyhow::Result<()> {
        self.producer.deliver()
    }
}
