//! Enricher configuration: defaults < TOML file (`--config`) < env < flags.
//! Each setting is declared once below; `--print-config-reference` lists them.

use std::{collections::BTreeMap, path::PathBuf};

use clap::{CommandFactory, Parser};
use flowlog_settings::Common;

flowlog_settings::settings! {
    /// The settings file. Every field is optional.
    pub struct Config {
        /// bootstrap.servers
        #[flag(long = "brokers", env = "FLOWLOG_ENRICHER_BROKERS")]
        pub brokers: String = "127.0.0.1:9092".into(),
        /// Consumer group shared by every enricher process.
        #[flag(long = "group-id", env = "FLOWLOG_ENRICHER_GROUP_ID")]
        pub group_id: String = "flowlog-enricher".into(),
        /// Topic of the sidecars' flow records, consumed as the group `group_id`.
        pub flow_topic: String = "flowlog.flows".into(),
        /// Topic of the sidecars' identity heartbeats, read from the beginning
        /// by every enricher.
        pub identity_topic: String = "flowlog.identity".into(),
        /// Messages that do not decode (or decode to nonsense) go here, with the
        /// reason in the `flowlog.dlq.reason` header.
        pub dlq_topic: String = "flowlog.dlq".into(),
        /// Where enriched records are written (Hive-style dt=/hr= partitions
        /// below it): a local directory, or `s3://bucket/prefix` (`[s3]`).
        #[flag(long = "output", env = "FLOWLOG_ENRICHER_OUTPUT")]
        pub output: String = "/var/lib/flowlog/enriched".into(),
        /// The formats written, each object once per format: `avro` (the
        /// pipeline's record format) and/or `parquet` (columnar, for query
        /// engines).
        #[flag(long = "output-formats", env = "FLOWLOG_ENRICHER_OUTPUT_FORMATS")]
        pub output_formats: Vec<String> = vec!["avro".into()],
        /// Batch boundaries (`_claims/` in the output) are kept this long
        /// after they were written, hours: an instance that lost its
        /// partition but wakes up within this time redoes the very same
        /// batches (overwriting identical objects) instead of writing
        /// overlapping ones.
        pub claim_retention_hours: u64 = 24,
        /// Read these partitions of the flow topic without joining the
        /// consumer group (offsets are still committed to `group_id`); empty:
        /// join the group. For tests and for a fixed assignment.
        pub static_partitions: Vec<i32> = Vec::new(),
        /// Also produce enriched records (Avro single-object encoded) to this
        /// topic; empty disables it. At least once: a batch redone after a crash
        /// is produced again.
        #[flag(long = "enriched-topic", env = "FLOWLOG_ENRICHER_ENRICHED_TOPIC")]
        pub enriched_topic: String = String::new(),
        /// Static CIDR map (TOML); reloaded when the file changes.
        #[flag(long = "static-map", env = "FLOWLOG_ENRICHER_STATIC_MAP")]
        pub static_map: Option<PathBuf> = None,
        /// A batch (one file set per Kafka partition) rolls at this many records...
        #[flag(long = "batch-max-records", env = "FLOWLOG_ENRICHER_BATCH_MAX_RECORDS")]
        pub batch_max_records: usize = 50_000,
        /// ... or this age, seconds.
        #[flag(long = "batch-max-age-secs", env = "FLOWLOG_ENRICHER_BATCH_MAX_AGE_SECS")]
        pub batch_max_age_secs: u64 = 10,
        /// A flow with an unattributed side, younger than this (by its end time),
        /// is held back (its batch waits) so that late metadata can still
        /// attribute it; seconds, 0 disables.
        #[flag(long = "late-window-secs", env = "FLOWLOG_ENRICHER_LATE_WINDOW_SECS")]
        pub late_window_secs: u64 = 120,
        /// Records kept in memory at most while batches wait for late
        /// metadata (all partitions; an enriched record takes about 0.5-1 KB):
        /// past it held batches are written at once, counted in
        /// `flowlog_enricher_hold_cut_total`.
        pub max_held_records: usize = 1_000_000,
        /// Prometheus endpoint; empty disables it.
        #[flag(long = "metrics-listen", env = "FLOWLOG_ENRICHER_METRICS_LISTEN")]
        pub metrics_listen: String = "127.0.0.1:9465".into(),
        /// Extra librdkafka properties for the consumer and the DLQ producer.
        /// Also used by the identity reader and the enriched-topic producer;
        /// the enricher's own consumer settings (`group.id`,
        /// `enable.auto.commit`, `auto.offset.reset`,
        /// `partition.assignment.strategy`, ...) are applied after them and win.
        pub kafka_properties: BTreeMap<String, String> = BTreeMap::new(),
        /// The Kubernetes Services source (`[kubernetes]`).
        pub kubernetes: KubernetesSettings = KubernetesSettings::default(),
        /// The EC2 network-interface source (`[ec2]`).
        pub ec2: Ec2Settings = Ec2Settings::default(),
        /// The S3 output (`[s3]`), when `output` is an `s3://` URL.
        pub s3: S3Settings = S3Settings::default(),
    }
}

flowlog_settings::settings! {
    /// An S3 output (`[s3]` in the config file). Credentials come from the
    /// standard AWS chain: `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`, web
    /// identity (IRSA: `AWS_ROLE_ARN` + `AWS_WEB_IDENTITY_TOKEN_FILE`),
    /// container or instance credentials.
    pub struct S3Settings {
        /// Custom endpoint URL (an S3-compatible server, path-style
        /// requests); unset for AWS.
        #[flag(long = "s3-endpoint-url", env = "FLOWLOG_ENRICHER_S3_ENDPOINT_URL")]
        pub endpoint_url: Option<String> = None,
        /// The bucket's region; unset: `AWS_REGION` / `AWS_DEFAULT_REGION`.
        #[flag(long = "s3-region", env = "FLOWLOG_ENRICHER_S3_REGION")]
        pub region: Option<String> = None,
        /// One request's time limit, seconds.
        pub request_timeout_secs: u64 = 30,
        /// How long one operation is retried (throttling, 5xx, timeouts)
        /// before the batch is given up for now and tried again later,
        /// seconds.
        pub retry_timeout_secs: u64 = 60,
    }
}

flowlog_settings::settings! {
    /// The Kubernetes Services source (`[kubernetes]` in the config file).
    pub struct KubernetesSettings {
        /// Attribute Services' ClusterIPs (source KUBERNETES, held_by the
        /// Service) from a watch of every Service in the cluster (RBAC: list
        /// and watch services, cluster-wide).
        #[flag(long = "kubernetes-services", env = "FLOWLOG_ENRICHER_KUBERNETES_SERVICES")]
        pub services: bool = false,
        /// The API server's URL, plain http without authentication (tests, a
        /// local proxy); unset: the in-cluster service account (else
        /// ~/.kube/config), as kube-rs infers it.
        #[flag(long = "kubernetes-api-url", env = "FLOWLOG_ENRICHER_KUBERNETES_API_URL")]
        pub api_url: Option<String> = None,
    }
}

flowlog_settings::settings! {
    /// The EC2 network-interface source (`[ec2]` in the config file).
    pub struct Ec2Settings {
        /// Regions to describe; empty disables the source.
        #[flag(long = "ec2-regions", env = "FLOWLOG_ENRICHER_EC2_REGIONS")]
        pub regions: Vec<String> = Vec::new(),
        /// Custom endpoint URL (an EC2-compatible server); unset for AWS.
        #[flag(long = "ec2-endpoint-url", env = "FLOWLOG_ENRICHER_EC2_ENDPOINT_URL")]
        pub endpoint_url: Option<String> = None,
        /// Seconds between DescribeNetworkInterfaces sweeps.
        #[flag(long = "ec2-refresh-secs", env = "FLOWLOG_ENRICHER_EC2_REFRESH_SECS")]
        pub refresh_secs: u64 = 60,
    }
}

/// flowlog enricher: attributes flows to workloads and writes enriched Avro.
#[derive(Debug, Parser)]
#[command(name = "flowlog-enricher", version, about, args_override_self = true)]
pub struct Cli {
    /// TOML settings file.
    #[arg(long, short, env = "FLOWLOG_ENRICHER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `flowlog_enricher=debug`.
    #[arg(long, env = "FLOWLOG_ENRICHER_LOG", default_value = "info")]
    pub log: String,
    #[command(flatten)]
    pub common: Common<Config>,
}

impl Config {
    /// Defaults, then the file, then env/flags.
    pub fn load(cli: &Cli) -> anyhow::Result<Config> {
        let c = flowlog_settings::load(cli.config.as_deref(), &cli.common.flags)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        for f in &self.output_formats {
            if crate::sink::lake::Format::parse(f).is_none() {
                anyhow::bail!("invalid setting output_formats: {f:?} is not avro or parquet");
            }
        }
        if self.output_formats.is_empty() {
            anyhow::bail!("invalid setting output_formats: empty (avro, parquet or both)");
        }
        if self.output.contains("://") && !self.output.starts_with("s3://") && !self.output.starts_with("file://") {
            anyhow::bail!("invalid setting output: {:?} is not a directory or an s3:// URL", self.output);
        }
        if self.batch_max_records == 0 {
            anyhow::bail!("invalid setting batch_max_records: must be > 0");
        }
        if !self.metrics_listen.is_empty() && self.metrics_listen.parse::<std::net::SocketAddr>().is_err() {
            anyhow::bail!("invalid setting metrics_listen: {:?} is not an address:port", self.metrics_listen);
        }
        if let Some(url) = self.kubernetes.api_url.as_deref().filter(|u| !flowlog_runtime::kube::api_url_ok(u)) {
            anyhow::bail!("invalid setting kubernetes.api_url: {url:?} is not a plain http URL (http://host:port)");
        }
        Ok(())
    }
}

/// What `--print-config-reference` prints: every setting, and every metric
/// exported.
pub fn reference() -> String {
    let mut r = flowlog_settings::reference::<Config>(&Cli::command());
    r.insert("metrics", flowlog_runtime::prometheus::reference(crate::metrics::describe));
    r.to_json()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use flowlog_settings::FileError;

    use super::*;

    fn parse(text: &str) -> Result<Config, FileError> {
        flowlog_settings::parse_toml(text, Path::new("enricher.toml"))
    }

    /// The setting a file error names, and its message.
    fn file_error(text: &str) -> (String, String) {
        let e = parse(text).unwrap_err();
        (e.key().expect("an invalid file").to_string(), e.to_string())
    }

    #[test]
    fn file_settings() {
        assert_eq!(parse("").unwrap(), Config::default());
        let c = parse("batch_max_records = 5\n[kafka_properties]\n\"security.protocol\" = \"SSL\"\n[ec2]\nregions = [\"eu-west-1\"]")
            .unwrap();
        assert_eq!(c.batch_max_records, 5);
        assert_eq!(c.kafka_properties["security.protocol"], "SSL");
        assert_eq!((c.ec2.regions.as_slice(), c.ec2.refresh_secs), (["eu-west-1".to_string()].as_slice(), 60));
        let k = parse("[kubernetes]\nservices = true\napi_url = \"http://127.0.0.1:8001\"").unwrap().kubernetes;
        assert_eq!((k.services, k.api_url.as_deref()), (true, Some("http://127.0.0.1:8001")));
        assert!(!Config::default().kubernetes.services);
    }

    #[test]
    fn rejects_bad_input() {
        let (key, msg) = file_error("brokerz = \"x\"");
        assert_eq!(key, "brokerz");
        assert!(msg.contains("enricher.toml") && msg.contains("unknown field `brokerz`"), "{msg}");
        assert_eq!(file_error("batch_max_records = -5").0, "batch_max_records");
        assert_eq!(file_error("static_map = 3").0, "static_map");
        assert_eq!(file_error("[ec2]\nregions = \"us-east-1\"").0, "ec2.regions");
        assert_eq!(file_error("[ec2]\nrefresh = 5").0, "ec2.refresh");
        assert_eq!(file_error("[kubernetes]\nservices = \"yes\"").0, "kubernetes.services");
        assert_eq!(file_error("[kafka_properties]\n\"fetch.max.bytes\" = 1").0, "kafka_properties.fetch.max.bytes");
        let zero = Config { batch_max_records: 0, ..Config::default() };
        assert!(zero.validate().unwrap_err().to_string().contains("batch_max_records"));
        let bad = Config { metrics_listen: "nope".into(), ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("metrics_listen"));
        let bad = Config { kubernetes: KubernetesSettings { api_url: Some("127.0.0.1:8001".into()), ..Default::default() }, ..Config::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("kubernetes.api_url"));
    }

    #[test]
    fn flags_override_file() {
        let file = flowlog_settings::TempFile::new("flowlog-enricher-cfg", "group_id = \"file\"\nlate_window_secs = 5\n[ec2]\nregions = [\"a\"]\n");
        let cli = Cli::parse_from([
            "x", "--config", file.arg(), "--late-window-secs", "7", "--ec2-regions", "b,c",
            "--static-map", "/etc/m.toml",
        ]);
        let c = Config::load(&cli).unwrap();
        assert_eq!((c.group_id.as_str(), c.late_window_secs), ("file", 7));
        assert_eq!(c.ec2.regions, ["b", "c"]);
        assert_eq!(c.static_map.as_deref(), Some(Path::new("/etc/m.toml")));
        let missing = Cli::parse_from(["x", "--config", "/nonexistent/enricher.toml"]);
        assert!(Config::load(&missing).unwrap_err().to_string().contains("cannot read config file"));
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
                "brokers --brokers FLOWLOG_ENRICHER_BROKERS",
                "group_id --group-id FLOWLOG_ENRICHER_GROUP_ID",
                "output --output FLOWLOG_ENRICHER_OUTPUT",
                "output_formats --output-formats FLOWLOG_ENRICHER_OUTPUT_FORMATS",
                "enriched_topic --enriched-topic FLOWLOG_ENRICHER_ENRICHED_TOPIC",
                "static_map --static-map FLOWLOG_ENRICHER_STATIC_MAP",
                "batch_max_records --batch-max-records FLOWLOG_ENRICHER_BATCH_MAX_RECORDS",
                "batch_max_age_secs --batch-max-age-secs FLOWLOG_ENRICHER_BATCH_MAX_AGE_SECS",
                "late_window_secs --late-window-secs FLOWLOG_ENRICHER_LATE_WINDOW_SECS",
                "metrics_listen --metrics-listen FLOWLOG_ENRICHER_METRICS_LISTEN",
                "kubernetes.services --kubernetes-services FLOWLOG_ENRICHER_KUBERNETES_SERVICES",
                "kubernetes.api_url --kubernetes-api-url FLOWLOG_ENRICHER_KUBERNETES_API_URL",
                "ec2.regions --ec2-regions FLOWLOG_ENRICHER_EC2_REGIONS",
                "ec2.endpoint_url --ec2-endpoint-url FLOWLOG_ENRICHER_EC2_ENDPOINT_URL",
                "ec2.refresh_secs --ec2-refresh-secs FLOWLOG_ENRICHER_EC2_REFRESH_SECS",
                "s3.endpoint_url --s3-endpoint-url FLOWLOG_ENRICHER_S3_ENDPOINT_URL",
                "s3.region --s3-region FLOWLOG_ENRICHER_S3_REGION",
            ]
        );
        assert_eq!(r.command_line_flags(), ["--config", "--log", "--check-config", "--print-config-reference"]);
    }
}
