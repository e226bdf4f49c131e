//! Kafka settings, the one place they become an rdkafka `ClientConfig`, and
//! which produce errors no retry can fix.

use std::collections::BTreeMap;

use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    ClientConfig,
};

use crate::config::ConfigError;

flowlog_settings::settings! {
    /// Kafka settings (`[kafka]` in the config file).
    pub struct KafkaConfig {
        /// bootstrap.servers
        #[flag(long = "kafka-brokers", env = "FLOWLOG_KAFKA_BROKERS")]
        pub brokers: String = "127.0.0.1:9092".into(),
        /// Topic for flow records.
        #[flag(long = "kafka-flow-topic", env = "FLOWLOG_KAFKA_FLOW_TOPIC")]
        pub flow_topic: String = "flowlog.flows".into(),
        /// Topic for identity heartbeats.
        #[flag(long = "kafka-identity-topic", env = "FLOWLOG_KAFKA_IDENTITY_TOPIC")]
        pub identity_topic: String = "flowlog.identity".into(),
        /// Flow records per Kafka message: several go out as one FlowBatch
        /// (schemas/flow_batch.avsc; at most 256 KiB of records), which spares
        /// the sidecar and the broker their per-message work; 1 sends each as a
        /// plain Flow message. A drain of the ring buffer sends what it read
        /// at once, so batching adds no delay. 512 (~110 KiB) took ~5% less
        /// CPU per flow than 128 in alternating pairs here (the bench's
        /// sweep, variants in sequence, does not resolve it); 1024 no less.
        #[flag(long = "kafka-records-per-message", env = "FLOWLOG_KAFKA_RECORDS_PER_MESSAGE")]
        pub records_per_message: u32 = 512,
        /// linger.ms: how long the producer waits to fill a batch.
        pub linger_ms: u32 = 50,
        /// compression.type: lz4 or zstd (snappy is refused by the local broker).
        /// Accepted: `lz4`, `zstd`, `gzip`, `none`.
        pub compression: String = "lz4".into(),
        /// queue.buffering.max.messages: the bounded in-memory queue.
        pub queue_max_messages: u32 = 100_000,
        /// queue.buffering.max.kbytes.
        pub queue_max_kbytes: u32 = 16 * 1024,
        /// message.timeout.ms: after this a record counts as failed and goes to the spool.
        pub message_timeout_ms: u32 = 30_000,
        /// Any other librdkafka property (TLS, SASL, ...), applied last. Setting a
        /// property that a typed field above controls is an error.
        pub properties: BTreeMap<String, String> = BTreeMap::new(),
    }
}

/// Properties the typed settings own (and idempotence, which must stay on).
pub(crate) const OWNED: [&str; 9] = [
    "bootstrap.servers",
    "linger.ms",
    "compression.type",
    "queue.buffering.max.messages",
    "queue.buffering.max.kbytes",
    "message.timeout.ms",
    "enable.idempotence",
    "acks",
    "max.in.flight.requests.per.connection",
];

impl KafkaConfig {
    pub fn client_config(&self) -> Result<ClientConfig, ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::Invalid { name: "kafka.brokers", reason: "empty".into() });
        }
        if !(1..=10_000).contains(&self.records_per_message) {
            return Err(ConfigError::Invalid { name: "kafka.records_per_message", reason: format!("{}: must be 1..=10000", self.records_per_message) });
        }
        if !matches!(self.compression.as_str(), "lz4" | "zstd" | "gzip" | "none") {
            return Err(ConfigError::Invalid {
                name: "kafka.compression",
                reason: format!("{:?}: use lz4, zstd, gzip or none", self.compression),
            });
        }
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            // Idempotence: retries never duplicate or reorder within a partition.
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("max.in.flight.requests.per.connection", "5")
            .set("compression.type", &self.compression)
            .set("linger.ms", self.linger_ms.to_string())
            .set("queue.buffering.max.messages", self.queue_max_messages.to_string())
            .set("queue.buffering.max.kbytes", self.queue_max_kbytes.to_string())
            .set("message.timeout.ms", self.message_timeout_ms.to_string())
            .set("batch.size", "1000000")
            .set("statistics.interval.ms", "0");
        for (k, v) in &self.properties {
            if OWNED.contains(&k.as_str()) {
                return Err(ConfigError::Invalid {
                    name: "kafka.properties",
                    reason: format!("{k} is set by a typed kafka setting (or must not change)"),
                });
            }
            c.set(k, v);
        }
        Ok(c)
    }
}

/// The `reason` (of `flows_dropped_total`) a record is dropped for when its
/// produce or delivery failed in a way no retry fixes; None when it may pass
/// (broker down, timeout, leader change, queue full: keep the record).
/// Retrying these would keep the record, and every record behind it, in the
/// spool for ever. The list follows Vector's Kafka sink's non-retriable codes.
pub fn undeliverable(e: &KafkaError) -> Option<&'static str> {
    use RDKafkaErrorCode::*;
    let KafkaError::MessageProduction(code) = e else { return None };
    Some(match code {
        MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge => "message_too_large",
        InvalidMessage | InvalidRecord | UnsupportedForMessageFormat => "invalid_record",
        // librdkafka reports these only once its metadata says the topic
        // does not exist (after topic.metadata.propagation.max.ms).
        UnknownTopic | UnknownTopicOrPartition | InvalidTopic => "unknown_topic",
        TopicAuthorizationFailed | ClusterAuthorizationFailed => "not_authorized",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permanent_errors_are_told_from_passing_ones() {
        let produce = |c| KafkaError::MessageProduction(c);
        assert_eq!(undeliverable(&produce(RDKafkaErrorCode::MessageSizeTooLarge)), Some("message_too_large"));
        assert_eq!(undeliverable(&produce(RDKafkaErrorCode::InvalidRecord)), Some("invalid_record"));
        assert_eq!(undeliverable(&produce(RDKafkaErrorCode::UnknownTopic)), Some("unknown_topic"));
        assert_eq!(undeliverable(&produce(RDKafkaErrorCode::TopicAuthorizationFailed)), Some("not_authorized"));
        for passing in [
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::AllBrokersDown,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::RequestTimedOut,
            RDKafkaErrorCode::PurgeQueue,
            RDKafkaErrorCode::PurgeInflight,
        ] {
            assert_eq!(undeliverable(&produce(passing)), None, "{passing:?}");
        }
        assert_eq!(undeliverable(&KafkaError::Flush(RDKafkaErrorCode::MessageSizeTooLarge)), None);
    }

    #[test]
    fn passthrough_and_conflicts() {
        let mut k = KafkaConfig::default();
        k.properties.insert("security.protocol".into(), "SSL".into());
        let c = k.client_config().unwrap();
        assert_eq!(c.get("security.protocol"), Some("SSL"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
        assert_eq!(c.get("compression.type"), Some("lz4"));
        k.properties.insert("enable.idempotence".into(), "false".into());
        assert!(matches!(k.client_config(), Err(ConfigError::Invalid { name: "kafka.properties", .. })));
        let k = KafkaConfig { compression: "snappy".into(), ..Default::default() };
        assert!(matches!(k.client_config(), Err(ConfigError::Invalid { name: "kafka.compression", .. })));
    }
}
