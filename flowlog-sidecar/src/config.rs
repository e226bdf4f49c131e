//! Sidecar configuration: defaults < TOML file (`--config`) < environment
//! (`FLOWLOG_*`) < command-line flags. Each setting is declared once below
//! (and in the `[kafka]`, `[spool]`, `[identity]`, `[workload]` and
//! `[scope]` sections it includes);
//! `--print-config-reference` lists them all.

use std::path::PathBuf;

use clap::{CommandFactory, Parser, ValueEnum};
use flowlog_settings::{Common, FileError};
use serde::{Deserialize, Serialize};

use crate::{
    identity::IdentityConfig,
    transport::{KafkaConfig, SpoolConfig},
    workload::{scope::ScopeConfig, WorkloadConfig},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Attach {
    /// BTF tracepoint when the kernel supports it, else the classic tracepoint.
    Auto,
    /// Only the BTF tracepoint (tp_btf).
    TpBtf,
    /// Only the classic tracepoint.
    Tracepoint,
}

flowlog_settings::value_enum!(Output, Attach);

flowlog_settings::settings! {
    /// The settings file. Every field is optional.
    pub struct Config {
        /// Where flow records go.
        #[flag(long = "output", env = "FLOWLOG_OUTPUT")]
        pub output: Output = Output::Json,
        /// How to attach to sock:inet_sock_set_state.
        #[flag(long = "attach", env = "FLOWLOG_ATTACH")]
        pub attach: Attach = Attach::Auto,
        /// Ring-buffer size in bytes (a power of two, multiple of the page size).
        #[flag(long = "ring-buffer-bytes", env = "FLOWLOG_RING_BUFFER_BYTES")]
        // 4 MiB holds ~29 000 flow events: at 100 ms drains that is 290 000
        // closes/s before anything could be dropped.
        pub ring_buffer_bytes: u32 = 4 * 1024 * 1024,
        /// Live sockets tracked at once; opens beyond it are still reported at
        /// close, without start time and owner, and counted
        /// (`sock_map_full`). The kernel's socket table is sized so that in
        /// practice it turns no socket away below this number: a power of two of
        /// 7-slot buckets, at least one per three sockets; 64 bytes per slot
        /// and per bucket, allocated at load (65 536: 16.8 MB; 262 144:
        /// 67.1 MB).
        #[flag(long = "max-sockets", env = "FLOWLOG_MAX_SOCKETS")]
        pub max_sockets: u32 = 65_536,
        /// Final flow events that may wait in the kernel when the ring buffer
        /// is full (a burst of closes faster than the reader), until the
        /// reader pops them: nothing is lost unless both are full. Size it
        /// for the closes that can come at once (at most `max_sockets`, plus
        /// untracked ones). Costs 200 bytes of kernel memory each, allocated
        /// at load (65 536: 13 MB).
        #[flag(long = "max-parked", env = "FLOWLOG_MAX_PARKED")]
        pub max_parked: u32 = 65_536,
        /// Listening ports tracked at once (for naming the server process).
        #[flag(long = "max-listeners", env = "FLOWLOG_MAX_LISTENERS")]
        pub max_listeners: u32 = 16_384,
        /// Bytes waiting in the ring buffer before the kernel wakes the reader
        /// ahead of its next timed drain; default: a quarter of
        /// `ring_buffer_bytes`. A burst's safety valve, not the usual way in:
        /// each wake-up costs the reader a drain's fixed work (a context
        /// switch, cold caches, a smaller Kafka batch). At 256 KiB (the old
        /// default) it woke the reader between 50 ms drains at ~14 000
        /// connections/s here, for ~10% more CPU per flow with Kafka.
        #[flag(long = "wakeup-bytes", env = "FLOWLOG_WAKEUP_BYTES")]
        pub wakeup_bytes: Option<u64> = None,
        /// How often the reader drains the ring buffer without a wake-up, ms:
        /// the longest a record waits in the kernel (staged or in the ring).
        /// 100 against 50 here: ~14% less CPU per flow with Kafka, ~20% less
        /// at rest, close -> readable p99 ~163 ms against ~114 ms.
        #[flag(long = "drain-interval-ms", env = "FLOWLOG_DRAIN_INTERVAL_MS")]
        pub drain_interval_ms: u64 = 100,
        /// How often kernel drop counters are checked and logged, seconds.
        #[flag(long = "stats-interval-secs", env = "FLOWLOG_STATS_INTERVAL_SECS")]
        pub stats_interval_secs: u64 = 10,
        /// Write the final counters as JSON to this file at exit.
        #[flag(long = "stats-file", env = "FLOWLOG_STATS_FILE")]
        pub stats_file: Option<PathBuf> = None,
        /// Prometheus endpoint; empty string disables it.
        #[flag(long = "metrics-listen", env = "FLOWLOG_METRICS_LISTEN")]
        pub metrics_listen: String = "127.0.0.1:9464".into(),
        /// Connections open longer than this get interim records, seconds (0: off).
        #[flag(long = "interim-interval-secs", env = "FLOWLOG_INTERIM_INTERVAL_SECS")]
        pub interim_interval_secs: u64 = 60,
        /// Where the running totals of connections with interim records are
        /// kept, so that after a restart each continues (same
        /// `connection_id`, deltas from its old totals) instead of being
        /// reported whole again; default: `interim.carry` in `spool.dir`
        /// with `output = "kafka"`, none otherwise.
        #[flag(long = "carry-file", env = "FLOWLOG_CARRY_FILE")]
        pub carry_file: Option<PathBuf> = None,
        /// Identity heartbeat period, seconds.
        #[flag(long = "heartbeat-secs", env = "FLOWLOG_HEARTBEAT_SECS")]
        pub heartbeat_secs: u64 = 30,
        /// How long SIGTERM waits for the broker before spooling the rest, seconds.
        #[flag(long = "shutdown-timeout-secs", env = "FLOWLOG_SHUTDOWN_TIMEOUT_SECS")]
        pub shutdown_timeout_secs: u64 = 5,
        /// The Kafka producer (with `output = "kafka"`).
        pub kafka: KafkaConfig = KafkaConfig::default(),
        /// The on-disk spool for records the broker has not taken (with `output = "kafka"`).
        pub spool: SpoolConfig = SpoolConfig::default(),
        /// Who this host is: its ids, workload, labels and IPs.
        pub identity: IdentityConfig = IdentityConfig::default(),
        /// Local workload resolution: which pod, container or service owned each flow.
        pub workload: WorkloadConfig = WorkloadConfig::default(),
        /// The part of the machine this sidecar captures (default: all of it):
        /// a flow is kept when its owning process's cgroup is in `cgroup`'s
        /// subtree or its network namespace is one of `netns`; the rest is
        /// dropped, never sent, and counted.
        pub scope: ScopeConfig = ScopeConfig::default(),
    }
}

/// flowlog sidecar: one flow record per TCP connection, from eBPF.
#[derive(Debug, Parser)]
#[command(name = "flowlog-sidecar", version, about, args_override_self = true)]
pub struct Cli {
    /// TOML settings file.
    #[arg(long, short, env = "FLOWLOG_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `flowlog_sidecar=debug`.
    #[arg(long, env = "FLOWLOG_LOG", default_value = "info")]
    pub log: String,
    #[command(flatten)]
    pub common: Common<Config>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    File(#[from] FileError),
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
}

impl Config {
    /// Defaults, then the file, then env/flags.
    pub fn load(cli: &Cli) -> Result<Config, ConfigError> {
        let c = flowlog_settings::load(cli.config.as_deref(), &cli.common.flags)?;
        c.validate()?;
        Ok(c)
    }

    /// The ring buffer's wake-up threshold (see `wakeup_bytes`).
    pub fn wakeup_bytes(&self) -> u64 {
        self.wakeup_bytes.unwrap_or(self.ring_buffer_bytes as u64 / 4)
    }

    /// The carry file in use (see `carry_file`): none without interim records.
    pub fn carry_path(&self) -> Option<PathBuf> {
        if self.interim_interval_secs == 0 {
            return None;
        }
        match (&self.carry_file, self.output) {
            (Some(path), _) => Some(path.clone()),
            (None, Output::Kafka) => Some(self.spool.dir.join("interim.carry")),
            (None, _) => None,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let page = 4096u32;
        if !self.ring_buffer_bytes.is_power_of_two() || self.ring_buffer_bytes < page {
            return Err(ConfigError::Invalid {
                name: "ring_buffer_bytes",
                reason: format!("{} is not a power of two >= {page}", self.ring_buffer_bytes),
            });
        }
        if self.max_sockets == 0 || self.max_listeners == 0 || self.max_parked == 0 {
            return Err(ConfigError::Invalid { name: "max_sockets/max_listeners/max_parked", reason: "must be > 0".into() });
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
        self.workload.validate()?;
        if let Err(reason) = crate::claim::ClaimFilter::new(&self.identity.shared_interfaces) {
            return Err(ConfigError::Invalid { name: "identity.shared_interfaces", reason });
        }
        if self.workload.ips_interval_secs == 0 {
            return Err(ConfigError::Invalid { name: "workload.ips_interval_secs", reason: "must be > 0".into() });
        }
        let scope = crate::workload::scope::Scope::new(&self.scope)
            .map_err(|(name, reason)| ConfigError::Invalid { name, reason })?;
        if scope.has_cgroup() && !self.workload.resolve {
            return Err(ConfigError::Invalid {
                name: "scope.cgroup",
                reason: "needs workload.resolve = true (a flow's cgroup path comes from it)".into(),
            });
        }
        if self.wakeup_bytes() >= self.ring_buffer_bytes as u64 {
            return Err(ConfigError::Invalid {
                name: "wakeup_bytes",
                reason: format!("{} must be below ring_buffer_bytes ({})", self.wakeup_bytes(), self.ring_buffer_bytes),
            });
        }
        Ok(())
    }
}

/// What `--print-config-reference` prints: every setting, the librdkafka
/// properties `kafka.properties` refuses, and every metric exported.
pub fn reference() -> String {
    let mut r = flowlog_settings::reference::<Config>(&Cli::command());
    r.insert("refused_kafka_properties", crate::transport::kafka::OWNED);
    r.insert("metrics", flowlog_runtime::prometheus::reference(crate::metrics::describe));
    r.to_json()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let c: Config = flowlog_settings::parse_toml(text, Path::new("test.toml"))?;
        c.validate()?;
        Ok(c)
    }

    /// The setting a file error names, and its message.
    fn file_error(text: &str) -> (String, String) {
        match parse(text) {
            Err(ConfigError::File(e)) => (e.key().expect("an invalid file").to_string(), e.to_string()),
            other => panic!("{text:?} gave {other:?}"),
        }
    }

    #[test]
    fn defaults_and_overrides() {
        assert_eq!(parse("").unwrap(), Config::default());
        let c = parse("output = \"table\"\nattach = \"tracepoint\"\nmax_sockets = 10").unwrap();
        assert_eq!(c.output, Output::Table);
        assert_eq!(c.attach, Attach::Tracepoint);
        assert_eq!(c.max_sockets, 10);
        assert_eq!(c.ring_buffer_bytes, 4 << 20);
    }

    #[test]
    fn rejects_bad_input() {
        let (key, msg) = file_error("outptu = \"json\"");
        assert_eq!(key, "outptu");
        assert!(msg.contains("test.toml") && msg.contains("unknown field `outptu`"), "{msg}");
        let (key, msg) = file_error("output = \"xml\"");
        assert_eq!(key, "output");
        assert!(msg.contains("unknown variant `xml`"), "{msg}");
        assert_eq!(file_error("max_sockets = \"many\"").0, "max_sockets");
        assert_eq!(file_error("max_sockets = 10\nmax_sockets = 20").0, "", "not TOML: a duplicate key");
        assert!(matches!(parse("ring_buffer_bytes = 5000"), Err(ConfigError::Invalid { name: "ring_buffer_bytes", .. })));
        assert!(matches!(parse("wakeup_bytes = 8388608"), Err(ConfigError::Invalid { name: "wakeup_bytes", .. })));
    }

    #[test]
    fn wakeup_defaults_to_a_quarter_of_the_ring() {
        let c = |toml: &str| parse(toml).expect("valid");
        assert_eq!(c("").wakeup_bytes(), 1024 * 1024);
        // A smaller ring keeps a valid default (a fixed one would be refused).
        assert_eq!(c("ring_buffer_bytes = 8192").wakeup_bytes(), 2048);
        assert_eq!(c("ring_buffer_bytes = 8192\nwakeup_bytes = 4096").wakeup_bytes(), 4096);
        assert!(matches!(parse("ring_buffer_bytes = 8192\nwakeup_bytes = 8192"), Err(ConfigError::Invalid { name: "wakeup_bytes", .. })));
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
        let (key, msg) = file_error("[kafka]\nbrokerz = \"x\"");
        assert_eq!(key, "kafka.brokerz");
        assert!(msg.contains("line 2"), "{msg}");
        assert_eq!(file_error("[kafka]\nlinger_ms = -1").0, "kafka.linger_ms");
        assert_eq!(file_error("[spool]\nfsync = \"sometimes\"").0, "spool.fsync");
        assert_eq!(file_error("[identity]\nips = \"10.0.0.1\"").0, "identity.ips");
        assert!(matches!(parse("metrics_listen = \"nope\""), Err(ConfigError::Invalid { name: "metrics_listen", .. })));
        assert!(matches!(
            parse("output = \"kafka\"\n[kafka.properties]\n\"acks\" = \"1\""),
            Err(ConfigError::Invalid { name: "kafka.properties", .. })
        ));
    }

    #[test]
    fn scope_and_address_settings_are_checked() {
        let c = parse("[scope]\ncgroup = \"/node1\"\nnetns = [\"/proc/self/ns/net\", \"4026531840\"]").unwrap();
        assert_eq!((c.scope.cgroup.as_deref(), c.scope.netns.len()), (Some("/node1"), 2));
        let invalid = |text: &str| match parse(text) {
            Err(ConfigError::Invalid { name, .. }) => name,
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(invalid("[scope]\ncgroup = \"node1\""), "scope.cgroup");
        assert_eq!(invalid("[scope]\nnetns = [\"/run/netns/flowlog-no-such-namespace\"]"), "scope.netns");
        assert_eq!(invalid("[workload]\nresolve = false\n[scope]\ncgroup = \"/node1\""), "scope.cgroup");
        assert_eq!(invalid("[identity]\nshared_interfaces = [\"br-[\"]"), "identity.shared_interfaces");
        assert_eq!(invalid("[workload]\nips_interval_secs = 0"), "workload.ips_interval_secs");
        // Without resolution, a namespace scope still works.
        assert!(parse("[workload]\nresolve = false\n[scope]\nnetns = [\"1\"]").is_ok());
        let cli = Cli::parse_from(["x", "--scope-netns", "1,2", "--shared-interfaces", "cni*,weave", "--workload-announce-ips", "false"]);
        let c = Config::load(&cli).unwrap();
        assert_eq!((c.scope.netns, c.identity.shared_interfaces), (vec!["1".to_string(), "2".into()], vec!["cni*".to_string(), "weave".into()]));
        assert!(!c.workload.announce_ips);
    }

    #[test]
    fn flags_override_file() {
        let file = flowlog_settings::TempFile::new("flowlog-cfg", "output = \"table\"\nmax_sockets = 10\n[kafka]\nbrokers = \"file:9092\"\n");
        let cli = Cli::parse_from([
            "x", "--config", file.arg(), "--max-sockets", "20", "--kafka-brokers", "flag:9092",
            "--host-id", "h1", "--attach", "tp-btf", "--workload-resolve", "false",
        ]);
        let c = Config::load(&cli).unwrap();
        assert_eq!((c.output, c.max_sockets, c.attach), (Output::Table, 20, Attach::TpBtf));
        assert!(!c.workload.resolve);
        assert_eq!((c.kafka.brokers.as_str(), c.identity.host_id.as_deref()), ("flag:9092", Some("h1")));
        let missing = Cli::parse_from(["x", "--config", "/nonexistent/flowlog.toml"]);
        assert!(matches!(Config::load(&missing), Err(ConfigError::File(FileError::Read { .. }))));
    }

    /// deploy/, scripts/demo.sh, bench/ and the tests use these names.
    #[test]
    fn reference_keeps_every_flag_and_variable() {
        Cli::command().debug_assert();
        let r = flowlog_settings::reference::<Config>(&Cli::command());
        assert_eq!(r.undocumented(), Vec::<&str>::new());
        assert_eq!(
            r.flag_names(),
            [
                "output --output FLOWLOG_OUTPUT",
                "attach --attach FLOWLOG_ATTACH",
                "ring_buffer_bytes --ring-buffer-bytes FLOWLOG_RING_BUFFER_BYTES",
                "max_sockets --max-sockets FLOWLOG_MAX_SOCKETS",
                "max_parked --max-parked FLOWLOG_MAX_PARKED",
                "max_listeners --max-listeners FLOWLOG_MAX_LISTENERS",
                "wakeup_bytes --wakeup-bytes FLOWLOG_WAKEUP_BYTES",
                "drain_interval_ms --drain-interval-ms FLOWLOG_DRAIN_INTERVAL_MS",
                "stats_interval_secs --stats-interval-secs FLOWLOG_STATS_INTERVAL_SECS",
                "stats_file --stats-file FLOWLOG_STATS_FILE",
                "metrics_listen --metrics-listen FLOWLOG_METRICS_LISTEN",
                "interim_interval_secs --interim-interval-secs FLOWLOG_INTERIM_INTERVAL_SECS",
                "carry_file --carry-file FLOWLOG_CARRY_FILE",
                "heartbeat_secs --heartbeat-secs FLOWLOG_HEARTBEAT_SECS",
                "shutdown_timeout_secs --shutdown-timeout-secs FLOWLOG_SHUTDOWN_TIMEOUT_SECS",
                "kafka.brokers --kafka-brokers FLOWLOG_KAFKA_BROKERS",
                "kafka.flow_topic --kafka-flow-topic FLOWLOG_KAFKA_FLOW_TOPIC",
                "kafka.identity_topic --kafka-identity-topic FLOWLOG_KAFKA_IDENTITY_TOPIC",
                "kafka.records_per_message --kafka-records-per-message FLOWLOG_KAFKA_RECORDS_PER_MESSAGE",
                "spool.dir --spool-dir FLOWLOG_SPOOL_DIR",
                "spool.max_bytes --spool-max-bytes FLOWLOG_SPOOL_MAX_BYTES",
                "identity.host_id --host-id FLOWLOG_HOST_ID",
                "identity.instance_id --instance-id FLOWLOG_INSTANCE_ID",
                "identity.workload --workload FLOWLOG_WORKLOAD",
                "identity.shared_interfaces --shared-interfaces FLOWLOG_SHARED_INTERFACES",
                "workload.resolve --workload-resolve FLOWLOG_WORKLOAD_RESOLVE",
                "workload.announce_ips --workload-announce-ips FLOWLOG_WORKLOAD_ANNOUNCE_IPS",
                "workload.ips_interval_secs --workload-ips-interval-secs FLOWLOG_WORKLOAD_IPS_INTERVAL_SECS",
                "workload.kubernetes.enabled --workload-kubernetes FLOWLOG_WORKLOAD_KUBERNETES",
                "workload.kubernetes.node_name --node-name FLOWLOG_NODE_NAME",
                "workload.kubernetes.labels --workload-kubernetes-labels FLOWLOG_WORKLOAD_KUBERNETES_LABELS",
                "workload.kubernetes.api_url --workload-kubernetes-api-url FLOWLOG_WORKLOAD_KUBERNETES_API_URL",
                "scope.cgroup --scope-cgroup FLOWLOG_SCOPE_CGROUP",
                "scope.netns --scope-netns FLOWLOG_SCOPE_NETNS",
            ]
        );
        assert_eq!(r.command_line_flags(), ["--config", "--log", "--check-config", "--print-config-reference"]);
        let printed: serde_json::Value = serde_json::from_str(&reference()).unwrap();
        assert_eq!(printed["refused_kafka_properties"][0], "bootstrap.servers");
    }
}
