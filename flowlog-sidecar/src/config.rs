//! Sidecar configuration: defaults < TOML file (`--config`) < environment
//! (`FLOWLOG_*`) < command-line flags.

use std::path::{Path, PathBuf};

use clap::{Parser, ValueEnum};
use serde::Deserialize;

use crate::{
    identity::IdentityConfig,
    transport::{KafkaConfig, SpoolConfig},
    workload::WorkloadConfig,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Output {
    /// One JSON object per flow on stdout.
    Json,
    /// A readable table on stdout (like tcplife).
    Table,
    /// Avro records to Kafka (see `[kafka]`, `[spool]`, `[identity]`).
    Kafka,
    /// Discard records (benchmarks); counters are still kept.
    Null,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Attach {
    /// BTF tracepoint when the kernel supports it, else the classic tracepoint.
    Auto,
    /// Only the BTF tracepoint (tp_btf).
    TpBtf,
    /// Only the classic tracepoint.
    Tracepoint,
}

/// The settings file. Every field is optional; see the defaults below.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where flow records go.
    pub output: Output,
    /// How to attach to sock:inet_sock_set_state.
    pub attach: Attach,
    /// Ring-buffer size in bytes (a power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// Live sockets tracked at once; opens beyond it are still reported at
    /// close, without start time and owner, and counted.
    pub max_sockets: u32,
    /// Listening ports tracked at once (for naming the server process).
    pub max_listeners: u32,
    /// Bytes waiting in the ring buffer before the kernel wakes the reader.
    pub wakeup_bytes: u64,
    /// How often the reader drains the ring buffer without a wake-up, ms.
    pub drain_interval_ms: u64,
    /// How often kernel drop counters are checked and logged, seconds.
    pub stats_interval_secs: u64,
    /// Write the final counters as JSON to this file at exit.
    pub stats_file: Option<PathBuf>,
    /// Prometheus endpoint; empty string disables it.
    pub metrics_listen: String,
    /// Connections open longer than this get interim records, seconds (0: off).
    pub interim_interval_secs: u64,
    /// Identity heartbeat period, seconds.
    pub heartbeat_secs: u64,
    /// How long SIGTERM waits for the broker before spooling the rest, seconds.
    pub shutdown_timeout_secs: u64,
    pub kafka: KafkaConfig,
    pub spool: SpoolConfig,
    pub identity: IdentityConfig,
    pub workload: WorkloadConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            output: Output::Json,
            attach: Attach::Auto,
            ring_buffer_bytes: default_ring_buffer_bytes(),
            max_sockets: 65_536,
            max_listeners: 16_384,
            wakeup_bytes: 256 * 1024,
            drain_interval_ms: 50,
            stats_interval_secs: 10,
            stats_file: None,
            metrics_listen: "127.0.0.1:9464".into(),
            interim_interval_secs: 60,
            heartbeat_secs: 30,
            shutdown_timeout_secs: 5,
            kafka: KafkaConfig::default(),
            spool: SpoolConfig::default(),
            identity: IdentityConfig::default(),
            workload: WorkloadConfig::default(),
        }
    }
}

/// 4 MiB holds ~29 000 flow events: at 50 ms drains that is 580 000
/// closes/s before anything could be dropped.
fn default_ring_buffer_bytes() -> u32 {
    4 * 1024 * 1024
}

/// flowlog sidecar: one flow record per TCP connection, from eBPF.
#[derive(Debug, Parser)]
#[command(name = "flowlog-sidecar", version, about, args_override_self = true)]
pub struct Cli {
    /// TOML settings file.
    #[arg(long, short, env = "FLOWLOG_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "FLOWLOG_OUTPUT")]
    pub output: Option<Output>,
    #[arg(long, env = "FLOWLOG_ATTACH")]
    pub attach: Option<Attach>,
    #[arg(long, env = "FLOWLOG_RING_BUFFER_BYTES")]
    pub ring_buffer_bytes: Option<u32>,
    #[arg(long, env = "FLOWLOG_MAX_SOCKETS")]
    pub max_sockets: Option<u32>,
    #[arg(long, env = "FLOWLOG_MAX_LISTENERS")]
    pub max_listeners: Option<u32>,
    #[arg(long, env = "FLOWLOG_WAKEUP_BYTES")]
    pub wakeup_bytes: Option<u64>,
    #[arg(long, env = "FLOWLOG_DRAIN_INTERVAL_MS")]
    pub drain_interval_ms: Option<u64>,
    #[arg(long, env = "FLOWLOG_STATS_INTERVAL_SECS")]
    pub stats_interval_secs: Option<u64>,
    #[arg(long, env = "FLOWLOG_STATS_FILE")]
    pub stats_file: Option<PathBuf>,
    #[arg(long, env = "FLOWLOG_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    #[arg(long, env = "FLOWLOG_INTERIM_INTERVAL_SECS")]
    pub interim_interval_secs: Option<u64>,
    #[arg(long, env = "FLOWLOG_HEARTBEAT_SECS")]
    pub heartbeat_secs: Option<u64>,
    #[arg(long, env = "FLOWLOG_SHUTDOWN_TIMEOUT_SECS")]
    pub shutdown_timeout_secs: Option<u64>,
    /// kafka.brokers
    #[arg(long, env = "FLOWLOG_KAFKA_BROKERS")]
    pub kafka_brokers: Option<String>,
    /// kafka.flow_topic
    #[arg(long, env = "FLOWLOG_KAFKA_FLOW_TOPIC")]
    pub kafka_flow_topic: Option<String>,
    /// kafka.identity_topic
    #[arg(long, env = "FLOWLOG_KAFKA_IDENTITY_TOPIC")]
    pub kafka_identity_topic: Option<String>,
    /// spool.dir
    #[arg(long, env = "FLOWLOG_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// spool.max_bytes
    #[arg(long, env = "FLOWLOG_SPOOL_MAX_BYTES")]
    pub spool_max_bytes: Option<u64>,
    /// identity.host_id
    #[arg(long, env = "FLOWLOG_HOST_ID")]
    pub host_id: Option<String>,
    /// identity.instance_id
    #[arg(long, env = "FLOWLOG_INSTANCE_ID")]
    pub instance_id: Option<String>,
    /// identity.workload
    #[arg(long, env = "FLOWLOG_WORKLOAD")]
    pub workload: Option<String>,
    /// workload.resolve
    #[arg(long, env = "FLOWLOG_WORKLOAD_RESOLVE")]
    pub workload_resolve: Option<bool>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `flowlog_sidecar=debug`.
    #[arg(long, env = "FLOWLOG_LOG", default_value = "info")]
    pub log: String,
    /// Check the configuration (file, environment, flags) and exit: 0 when it
    /// is valid, 1 with the reason when not. Touches neither the kernel nor Kafka.
    #[arg(long)]
    pub check_config: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: String, source: toml::de::Error },
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

impl Config {
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse { path: path.display().to_string(), source })
    }

    /// Defaults, then the file, then env/flags.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let mut c = match &cli.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|source| ConfigError::Read { path: path.display().to_string(), source })?;
                Config::from_toml(&text, path)?
            }
            None => Config::default(),
        };
        macro_rules! over {
            ($($f:ident),*) => { $( if let Some(v) = cli.$f.clone() { c.$f = v; } )* };
        }
        over!(
            output, attach, ring_buffer_bytes, max_sockets, max_listeners, wakeup_bytes, drain_interval_ms,
            stats_interval_secs, metrics_listen, interim_interval_secs, heartbeat_secs, shutdown_timeout_secs
        );
        if cli.stats_file.is_some() {
            c.stats_file = cli.stats_file.clone();
        }
        macro_rules! nested {
            ($($flag:ident => $($path:ident).+),*) => { $( if let Some(v) = cli.$flag.clone() { c.$($path).+ = v; } )* };
        }
        nested!(kafka_brokers => kafka.brokers, kafka_flow_topic => kafka.flow_topic,
            kafka_identity_topic => kafka.identity_topic, spool_dir => spool.dir, spool_max_bytes => spool.max_bytes,
            workload_resolve => workload.resolve);
        macro_rules! nested_opt {
            ($($flag:ident => $($path:ident).+),*) => { $( if let Some(v) = cli.$flag.clone() { c.$($path).+ = Some(v); } )* };
        }
        nested_opt!(host_id => identity.host_id, instance_id => identity.instance_id, workload => identity.workload);
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let page = 4096u32;
        if !self.ring_buffer_bytes.is_power_of_two() || self.ring_buffer_bytes < page {
            return Err(ConfigError::Invalid {
                name: "ring_buffer_bytes",
                reason: format!("{} is not a power of two >= {page}", self.ring_buffer_bytes),
            });
        }
        if self.max_sockets == 0 || self.max_listeners == 0 {
            return Err(ConfigError::Invalid { name: "max_sockets/max_listeners", reason: "must be > 0".into() });
        }
        if self.drain_interval_ms == 0 || self.drain_interval_ms > 10_000 {
            return Err(ConfigError::Invalid { name: "drain_interval_ms", reason: "must be 1..=10000".into() });
        }
        if !self.metrics_listen.is_empty() && self.metrics_listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(ConfigError::Invalid {
                name: "metrics_listen",
                reason: format!("{:?} is not an address:port", self.metrics_listen),
            });
        }
        if self.heartbeat_secs == 0 {
            return Err(ConfigError::Invalid { name: "heartbeat_secs", reason: "must be > 0".into() });
        }
        if self.spool.segment_bytes == 0 || self.spool.max_bytes < self.spool.segment_bytes {
            return Err(ConfigError::Invalid {
                name: "spool.max_bytes",
                reason: "must be at least spool.segment_bytes (> 0)".into(),
            });
        }
        if self.output == Output::Kafka {
            self.kafka.client_config()?;
        }
        if self.wakeup_bytes >= self.ring_buffer_bytes as u64 {
            return Err(ConfigError::Invalid {
                name: "wakeup_bytes",
                reason: format!("{} must be below ring_buffer_bytes ({})", self.wakeup_bytes, self.ring_buffer_bytes),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let c = Config::from_toml(text, Path::new("test.toml"))?;
        c.validate()?;
        Ok(c)
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(parse("").unwrap(), Config::default());
        let c = parse("output = \"table\"\nattach = \"tracepoint\"\nmax_sockets = 10").unwrap();
        assert_eq!(c.output, Output::Table);
        assert_eq!(c.attach, Attach::Tracepoint);
        assert_eq!(c.max_sockets, 10);
        assert_eq!(c.ring_buffer_bytes, default_ring_buffer_bytes());
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(parse("outptu = \"json\""), Err(ConfigError::Parse { .. })));
        assert!(matches!(parse("output = \"xml\""), Err(ConfigError::Parse { .. })));
        assert!(matches!(parse("ring_buffer_bytes = 5000"), Err(ConfigError::Invalid { name: "ring_buffer_bytes", .. })));
        assert!(matches!(parse("wakeup_bytes = 8388608"), Err(ConfigError::Invalid { name: "wakeup_bytes", .. })));
    }

    #[test]
    fn nested_sections() {
        let c = parse(
            "output = \"kafka\"\n[kafka]\nbrokers = \"b1:9092\"\n[kafka.properties]\n\"security.protocol\" = \"SSL\"\n\
             [spool]\ndir = \"/tmp/s\"\nfsync = \"always\"\n[identity]\nworkload = \"web\"\nlabels = { team = \"net\" }\n\
             [workload]\nresolve = false\n",
        )
        .unwrap();
        assert!(!c.workload.resolve && Config::default().workload.resolve);
        assert_eq!(c.kafka.brokers, "b1:9092");
        assert_eq!(c.kafka.properties["security.protocol"], "SSL");
        assert_eq!(c.spool.fsync, crate::transport::spool::Fsync::Always);
        assert_eq!(c.identity.labels["team"], "net");
        assert!(matches!(parse("[kafka]\nbrokerz = \"x\""), Err(ConfigError::Parse { .. })));
        assert!(matches!(parse("metrics_listen = \"nope\""), Err(ConfigError::Invalid { name: "metrics_listen", .. })));
        assert!(matches!(
            parse("output = \"kafka\"\n[kafka.properties]\n\"acks\" = \"1\""),
            Err(ConfigError::Invalid { name: "kafka.properties", .. })
        ));
    }

    #[test]
    fn flags_override_file() {
        let dir = std::env::temp_dir().join(format!("flowlog-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.toml");
        std::fs::write(&path, "output = \"table\"\nmax_sockets = 10\n").unwrap();
        let cli = Cli::parse_from(["x", "--config", path.to_str().unwrap(), "--max-sockets", "20", "--workload-resolve", "false"]);
        let c = Config::load(&cli).unwrap();
        assert_eq!((c.output, c.max_sockets, c.workload.resolve), (Output::Table, 20, false));
        std::fs::remove_dir_all(dir).unwrap();
    }
}
