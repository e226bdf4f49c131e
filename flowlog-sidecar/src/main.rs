//! flowlog sidecar: attaches eBPF to sock:inet_sock_set_state and emits one
//! flow record per TCP connection.

mod capture;
mod carry;
mod claim;
mod config;
mod flow;
mod identity;
mod loader;
mod metrics;
mod offsets;
mod output;
mod program_stats;
mod sink;
mod snapshot;
mod stage;
mod ticker;
mod transport;
mod workload;

use std::time::Duration;

use anyhow::Context as _;
use clap::Parser as _;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

use crate::{
    capture::{Capture, Timers},
    config::{Cli, Config, Output},
    output::Printer,
    sink::Sink,
    transport::KafkaSink,
    workload::addresses::Announcer,
};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if cli.common.print_config_reference {
        println!("{}", config::reference());
        return std::process::ExitCode::SUCCESS;
    }
    flowlog_runtime::logging::init(&cli.log);
    if cli.common.check_config {
        let checked = Config::load(&cli).map_err(anyhow::Error::from).and_then(|c| {
            if c.output == config::Output::Kafka {
                c.kafka.client_config()?;
            }
            Ok(())
        });
        return match checked {
            Ok(()) => {
                println!("flowlog-sidecar: configuration OK");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("flowlog-sidecar: error: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let result = Config::load(&cli).map_err(anyhow::Error::from).and_then(|config| {
        // Before any thread exists: this forks.
        let resolved = offsets::resolve_running_kernel(config.attach == config::Attach::Tracepoint)
            .map_err(|e| anyhow::anyhow!("reading the kernel's layout: {e}"))?;
        // One thread: the work is reading a ring buffer and writing records.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(run(config, resolved))
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("flowlog-sidecar: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, resolved: offsets::Resolved) -> anyhow::Result<()> {
    bump_memlock_rlimit();
    if !config.metrics_listen.is_empty() {
        metrics::serve(config.metrics_listen.parse()?)?;
        info!(listen = %config.metrics_listen, "serving Prometheus metrics on /metrics");
    }
    // Before the program is attached: opening indexes every segment a
    // previous run left (a full spool takes seconds to read), and once
    // attached, events wait in the ring buffer until the loop drains it.
    let spool = (config.output == Output::Kafka).then(|| transport::open_spool(&config.spool)).transpose()?;
    let (mut ebpf, attached) = loader::load(&config, resolved)?;
    // Give back the memory the one-off BTF parse used.
    // SAFETY: plain glibc call.
    unsafe { libc::malloc_trim(0) };
    rss_debug("attached");
    let scope = workload::scope::Scope::new(&config.scope).map_err(|(name, reason)| anyhow::anyhow!("{name}: {reason}"))?;
    if !scope.is_all() && config.output == Output::Kafka && config.identity.ips.is_none() {
        warn!("a capture scope is set but identity.ips is not: the machine's addresses are announced as this scope's host's");
    }
    // Pod names from the Kubernetes API, for flows and announced workloads.
    let pods = workload::pods::start(&config.workload);
    // Only the identity heartbeats (Kafka) carry the workloads' IPs.
    let announcer = (config.output == Output::Kafka)
        .then(|| Announcer::from_config(&config.workload, &scope, config.identity.claim_filter(), pods.clone()))
        .flatten();
    // Changes from the listing START carries on are announced at once.
    let ips_changes = announcer.as_ref().map(|a| {
        let mut rx = a.listing();
        rx.borrow_and_update();
        rx
    });
    let sink: Box<dyn Sink> = match config.output {
        Output::Kafka => Box::new(KafkaSink::new(
            config.kafka.clone(),
            spool.context("the spool is opened for Kafka output")?,
            config.identity.clone(),
            announcer.as_ref().map(Announcer::listing),
        )?),
        mode => Box::new(Printer::new(mode, std::io::stdout())),
    };
    let mut resolver = workload::Resolver::new(&config.workload, scope, pods);
    if let Some(a) = &announcer {
        resolver.on_new_netns(a.poker());
    }
    let mut capture = Capture::new(&mut ebpf, sink, resolver)?;
    capture.clock.set_hz(resolved.hz);
    if resolved.hz.is_none() {
        warn!("the kernel's tick rate (CONFIG_HZ) is unknown: no /boot/config-<release>, and /proc/timer_list unreadable; records carry no limits");
    }
    let fd = |name: &str| ebpf.program(name).and_then(|p| p.fd().ok()).and_then(|fd| fd.try_clone().ok());
    capture.programs = [attached.program_name(), flowlog_common::PROG_DESTROY].into_iter().filter_map(fd).collect();
    capture.workload_ips = ips_changes;
    if let Some(path) = config.carry_path() {
        capture.carry_over(carry::Carry::open(path, &config.identity.current()));
    }

    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let shutdown = async move {
        tokio::select! {
            _ = sigint.recv() => info!("SIGINT: draining and exiting"),
            _ = sigterm.recv() => info!("SIGTERM: draining and exiting"),
        }
    };
    info!(output = ?config.output, "capturing TCP flows");
    let timers = Timers {
        drain: Duration::from_millis(config.drain_interval_ms),
        stats: Duration::from_secs(config.stats_interval_secs.max(1)),
        heartbeat: Duration::from_secs(config.heartbeat_secs),
        interim: (config.interim_interval_secs > 0).then(|| Duration::from_secs(config.interim_interval_secs)),
    };
    let socks = snapshot::prepare(&mut ebpf)?;
    let stage_heads = stage::take_heads(&mut ebpf)?;
    // Shared with the snapshot passes' thread, which runs the snapshot program.
    let ebpf = std::sync::Arc::new(ebpf);
    let mut stages = stage::Stages::new(stage_heads, ebpf.clone());
    stages.enable();
    capture.stages = Some(stages);
    let snap = snapshot::Snapshotter::new(socks, ebpf.clone(), config.interim_interval_secs * 1_000_000_000);
    capture.run(timers, snapshot::Passes::new(snap), shutdown).await;

    let stats = capture.final_stats(attached);
    capture.into_sink().close(Duration::from_secs(config.shutdown_timeout_secs));
    info!(
        events = stats.user.events_read,
        ringbuf_full = stats.kernel.ringbuf_full,
        sock_map_full = stats.kernel.sock_map_full,
        "stopped"
    );
    if let Some(path) = &config.stats_file {
        std::fs::write(path, serde_json::to_vec_pretty(&stats)?)
            .with_context(|| format!("writing stats to {}", path.display()))?;
    }
    Ok(())
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; raise it so the
/// ring buffer fits. Newer kernels use memcg accounting and ignore this.
fn bump_memlock_rlimit() {
    let rlim = libc::rlimit { rlim_cur: libc::RLIM_INFINITY, rlim_max: libc::RLIM_INFINITY };
    // SAFETY: plain syscall with a valid struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) } != 0 {
        tracing::debug!("could not raise RLIMIT_MEMLOCK (fine on kernels >= 5.11)");
    }
}

/// Logs resident and peak memory at debug level (startup is where peaks happen).
pub fn rss_debug(stage: &str) {
    if !tracing::enabled!(tracing::Level::DEBUG) {
        return;
    }
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let get = |k: &str| s.lines().find(|l| l.starts_with(k)).unwrap_or("").to_string();
    tracing::debug!("{stage}: {} {}", get("VmRSS"), get("VmHWM"));
}
