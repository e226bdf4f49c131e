//! Enricher configuration: defaults < TOML file (`--config`) < env < flags.

use std::{collections::BTreeMap, path::PathBuf};

use clap::Parser;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// bootstrap.servers
    pub brokers: String,
    /// Consumer group shared by every enricher process.
    pub group_id: String,
    pub flow_topic: String,
    pub identity_topic: String,
    /// Messages that do not decode (or decode to nonsense) go here, with the
    /// reason in the `flowlog.dlq.reason` header.
    pub dlq_topic: String,
    /// Root of the Avro files (Hive-style dt=/hr= partitions below it).
    pub output_dir: PathBuf,
    /// Also produce enriched records (Avro single-object encoded) to this
    /// topic; empty disables it. At least once: a batch redone after a crash
    /// is produced again.
    pub enriched_topic: String,
    /// Static CIDR map (TOML); reloaded when the file changes.
    pub static_map: Option<PathBuf>,
    /// A batch (one file set per Kafka partition) rolls at this many records...
    pub batch_max_records: usize,
    /// ... or this age, seconds.
    pub batch_max_age_secs: u64,
    /// A flow with an unattributed side, younger than this (by its end time),
    /// is held back (its batch waits) so that late metadata can still
    /// attribute it; seconds, 0 disables.
    pub late_window_secs: u64,
    /// Prometheus endpoint; empty disables it.
    pub metrics_listen: String,
    /// Extra librdkafka properties for the consumer and the DLQ producer.
    pub kafka_properties: BTreeMap<String, String>,
    /// The EC2 network-interface source (`[ec2]`).
    pub ec2: Ec2Settings,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Ec2Settings {
    /// Regions to describe; empty disables the source.
    pub regions: Vec<String>,
    /// Custom endpoint URL (an EC2-compatible server); unset for AWS.
    pub endpoint_url: Option<String>,
    /// Seconds between DescribeNetworkInterfaces sweeps.
    pub refresh_secs: u64,
}

impl Default for Ec2Settings {
    fn default() -> Self {
        Ec2Settings { regions: Vec::new(), endpoint_url: None, refresh_secs: 60 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            brokers: "127.0.0.1:9092".into(),
            group_id: "flowlog-enricher".into(),
            flow_topic: "flowlog.flows".into(),
            identity_topic: "flowlog.identity".into(),
            dlq_topic: "flowlog.dlq".into(),
            output_dir: PathBuf::from("/var/lib/flowlog/enriched"),
            enriched_topic: String::new(),
            static_map: None,
            batch_max_records: 50_000,
            batch_max_age_secs: 10,
            late_window_secs: 120,
            metrics_listen: "127.0.0.1:9465".into(),
            kafka_properties: BTreeMap::new(),
            ec2: Ec2Settings::default(),
        }
    }
}

/// flowlog enricher: attributes flows to workloads and writes enriched Avro.
#[derive(Debug, Parser)]
#[command(name = "flowlog-enricher", version, about, args_override_self = true)]
pub struct Cli {
    #[arg(long, short, env = "FLOWLOG_ENRICHER_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "FLOWLOG_ENRICHER_BROKERS")]
    pub brokers: Option<String>,
    #[arg(long, env = "FLOWLOG_ENRICHER_GROUP_ID")]
    pub group_id: Option<String>,
    #[arg(long, env = "FLOWLOG_ENRICHER_OUTPUT_DIR")]
    pub output_dir: Option<PathBuf>,
    #[arg(long, env = "FLOWLOG_ENRICHER_ENRICHED_TOPIC")]
    pub enriched_topic: Option<String>,
    #[arg(long, env = "FLOWLOG_ENRICHER_STATIC_MAP")]
    pub static_map: Option<PathBuf>,
    #[arg(long, env = "FLOWLOG_ENRICHER_BATCH_MAX_RECORDS")]
    pub batch_max_records: Option<usize>,
    #[arg(long, env = "FLOWLOG_ENRICHER_BATCH_MAX_AGE_SECS")]
    pub batch_max_age_secs: Option<u64>,
    #[arg(long, env = "FLOWLOG_ENRICHER_LATE_WINDOW_SECS")]
    pub late_window_secs: Option<u64>,
    #[arg(long, env = "FLOWLOG_ENRICHER_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// ec2.regions (comma separated)
    #[arg(long, env = "FLOWLOG_ENRICHER_EC2_REGIONS", value_delimiter = ',')]
    pub ec2_regions: Option<Vec<String>>,
    /// ec2.endpoint_url
    #[arg(long, env = "FLOWLOG_ENRICHER_EC2_ENDPOINT_URL")]
    pub ec2_endpoint_url: Option<String>,
    /// ec2.refresh_secs
    #[arg(long, env = "FLOWLOG_ENRICHER_EC2_REFRESH_SECS")]
    pub ec2_refresh_secs: Option<u64>,
    #[arg(long, env = "FLOWLOG_ENRICHER_LOG", default_value = "info")]
    pub log: String,
    /// Check the configuration (file, environment, flags, and the static map
    /// it names) and exit: 0 when valid, 1 with the reason when not.
    #[arg(long)]
    pub check_config: bool,
}

impl Config {
    pub fn load(cli: &Cli) -> anyhow::Result<Config> {
        let mut c: Config = match &cli.config {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| anyhow::anyhow!("cannot read config file {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| anyhow::anyhow!("invalid config file {}: {e}", p.display()))?
            }
            None => Config::default(),
        };
        if let Some(v) = &cli.brokers { c.brokers = v.clone(); }
        if let Some(v) = &cli.group_id { c.group_id = v.clone(); }
        if let Some(v) = &cli.output_dir { c.output_dir = v.clone(); }
        if let Some(v) = &cli.static_map { c.static_map = Some(v.clone()); }
        if let Some(v) = &cli.enriched_topic { c.enriched_topic = v.clone(); }
        if let Some(v) = cli.batch_max_records { c.batch_max_records = v; }
        if let Some(v) = cli.batch_max_age_secs { c.batch_max_age_secs = v; }
        if let Some(v) = &cli.metrics_listen { c.metrics_listen = v.clone(); }
        if let Some(v) = cli.late_window_secs { c.late_window_secs = v; }
        if let Some(v) = &cli.ec2_regions { c.ec2.regions = v.clone(); }
        if let Some(v) = &cli.ec2_endpoint_url { c.ec2.endpoint_url = Some(v.clone()); }
        if let Some(v) = cli.ec2_refresh_secs { c.ec2.refresh_secs = v; }
        if c.batch_max_records == 0 {
            anyhow::bail!("invalid setting batch_max_records: must be > 0");
        }
        if !c.metrics_listen.is_empty() && c.metrics_listen.parse::<std::net::SocketAddr>().is_err() {
            anyhow::bail!("invalid setting metrics_listen: {:?} is not an address:port", c.metrics_listen);
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_unknown_keys() {
        assert!(toml::from_str::<Config>("brokerz = \"x\"").is_err());
        let c: Config = toml::from_str("batch_max_records = 5\n[kafka_properties]\n\"security.protocol\" = \"SSL\"").unwrap();
        assert_eq!(c.batch_max_records, 5);
        assert_eq!(c.kafka_properties["security.protocol"], "SSL");
    }
}
