//! Kafka settings and the one place they become an rdkafka `ClientConfig`.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use serde::Deserialize;

use crate::config::ConfigError;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// bootstrap.servers
    pub brokers: String,
    /// Topic for flow records.
    pub flow_topic: String,
    /// Topic for identity heartbeats.
    pub identity_topic: String,
    /// linger.ms: how long the producer waits to fill a batch.
    pub linger_ms: u32,
    /// compression.type: lz4 or zstd (snappy is refused by the local broker).
    pub compression: String,
    /// queue.buffering.max.messages: the bounded in-memory queue.
    pub queue_max_messages: u32,
    /// queue.buffering.max.kbytes.
    pub queue_max_kbytes: u32,
    /// message.timeout.ms: after this a record counts as failed and goes to the spool.
    pub message_timeout_ms: u32,
    /// Any other librdkafka property (TLS, SASL, ...), applied last. Setting a
    /// property that a typed field above controls is an error.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            flow_topic: "flowlog.flows".into(),
            identity_topic: "flowlog.identity".into(),
            linger_ms: 50,
            compression: "lz4".into(),
            queue_max_messages: 100_000,
            queue_max_kbytes: 16 * 1024,
            message_timeout_ms: 30_000,
            properties: BTreeMap::new(),
        }
    }
}

/// Properties the typed settings own (and idempotence, which must stay on).
const OWNED: [&str; 9] = [
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

#[cfg(test)]
mod tests {
    use super::*;

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
