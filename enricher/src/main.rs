//! flowlog enricher: consumes the sidecars' flow topic as a consumer group,
//! attributes both IPs of every flow to the workload that owned them at the
//! flow's start, and writes enriched Avro and/or Parquet to a local
//! directory or S3, exactly once. Messages that
//! do not decode go to a dead-letter topic and never stop the consumer.
//!
//! This file only wires the stages: sources (static map, identity topic,
//! Kubernetes Services, EC2) -> the flow topic through the pipeline (decode, attribute, batch)
//! -> sinks (dead-letter topic, enriched topic, lake) -> commit.

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use clap::Parser as _;
use tracing::info;

use flowlog_enricher::{
    config::{Cli, Config},
    consumer, kafka, metrics,
    pipeline::{Pipeline, Settings},
    sink::{
        dlq::DeadLetterTopic,
        lake::{Format, Lake},
        store::Store,
        topic::EnrichedTopic,
        Sink,
    },
    sources::{cidr::CidrMap, heartbeats, services, static_map, Sources},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.common.print_config_reference {
        println!("{}", flowlog_enricher::config::reference());
        return std::process::ExitCode::SUCCESS;
    }
    flowlog_runtime::logging::init(&cli.log);
    let run_or_check = |cfg: Config| {
        if !cli.common.check_config {
            return run(cfg);
        }
        check(&cfg)?;
        println!("flowlog-enricher: configuration OK");
        Ok(())
    };
    match Config::load(&cli).and_then(run_or_check) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowlog-enricher: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// The metrics endpoint's address; None when disabled (empty).
fn metrics_addr(cfg: &Config) -> anyhow::Result<Option<SocketAddr>> {
    if cfg.metrics_listen.is_empty() {
        return Ok(None);
    }
    let addr = cfg.metrics_listen.parse();
    addr.map(Some)
        .map_err(|e| anyhow::anyhow!("metrics_listen {:?}: {e}", cfg.metrics_listen))
}

/// What `--check-config` checks beyond parsing: what `run` would refuse.
fn check(cfg: &Config) -> anyhow::Result<()> {
    metrics_addr(cfg)?;
    if let Some(p) = &cfg.static_map {
        CidrMap::load(p).map_err(|e| anyhow::anyhow!("static map: {e}"))?;
    }
    Ok(())
}

fn run(cfg: Config) -> anyhow::Result<()> {
    // SAFETY: installing an async-signal-safe handler that only sets a flag.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    if let Some(listen) = metrics_addr(&cfg)? {
        metrics::serve(listen)?;
    }

    // Sources, each loaded before the first flow is read, then kept current.
    let sources = Sources::default();
    static_map::start(cfg.static_map.as_deref(), sources.cidr.clone())?;
    heartbeats::follow(&cfg, sources.identity.clone(), sources.produced.clone(), &STOP)?;
    services::start(&cfg.kubernetes, sources.kubernetes.clone());
    if !cfg.ec2.regions.is_empty() {
        #[cfg(feature = "ec2")]
        flowlog_enricher::sources::ec2::start(cfg.ec2.clone(), sources.ec2.clone())?;
        #[cfg(not(feature = "ec2"))]
        anyhow::bail!("[ec2] is configured but this enricher was built without the ec2 feature");
    }

    // Sinks, in the order a batch goes through them before its commit.
    let producer = kafka::Producer::new(&cfg)?;
    let dead_letters = Arc::new(DeadLetterTopic::new(
        producer.clone(),
        cfg.dlq_topic.clone(),
        cfg.flow_topic.clone(),
    ));
    let formats = cfg.output_formats.iter().filter_map(|f| Format::parse(f)).collect();
    let store = Store::open(&cfg.output, &cfg.s3)?;
    let lake = Arc::new(Lake::new(store, cfg.flow_topic.clone(), formats, cfg.claim_retention_hours));
    let mut sinks: Vec<Arc<dyn Sink>> = vec![dead_letters.clone()];
    if !cfg.enriched_topic.is_empty() {
        sinks.push(Arc::new(EnrichedTopic::new(
            producer,
            cfg.enriched_topic.clone(),
        )));
    }
    sinks.push(lake.clone());

    let pipeline = Pipeline::new(Settings::from_config(&cfg), sources, dead_letters);
    let consumer = consumer::subscribe(&cfg, pipeline, sinks, lake)?;
    info!(topic = %cfg.flow_topic, group = %cfg.group_id, out = %cfg.output, formats = ?cfg.output_formats, "enriching");
    consumer::run(&consumer, &STOP)
}
