//! flowlog enricher: consumes the sidecars' flow topic as a consumer group,
//! attributes both IPs of every flow to the workload that owned them at the
//! flow's start, and writes enriched Avro files exactly once. Messages that
//! do not decode go to a dead-letter topic and never stop the consumer.

use flowlog_enricher::{decode, metrics};

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use clap::Parser as _;
use rdkafka::{
    consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance},
    message::{Header, OwnedHeaders},
    producer::{BaseRecord, Producer, ThreadedProducer},
    ClientConfig, ClientContext, Message, Offset, TopicPartitionList,
};
use tracing::{error, info, warn};

use flowlog_enricher::{
    attribute::Attributor,
    config::{Cli, Config},
    sink::files::{Batch, FileSink},
    sources::{cidr::CidrMap, identity::IdentityStore},
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

/// Per-partition state shared with the rebalance callbacks (which run inside
/// `poll` on this same thread).
#[derive(Default)]
struct State {
    batches: HashMap<i32, Batch>,
    /// Offsets at or below this are already in files (exactly-once resume).
    done_through: HashMap<i32, i64>,
}

/// Counts failed deliveries of the producer shared by the dead-letter and
/// enriched topics: a batch is committed only if none failed.
#[derive(Default)]
struct ProduceCtx {
    failed: std::sync::atomic::AtomicU64,
}

impl ClientContext for ProduceCtx {}

impl rdkafka::producer::ProducerContext for ProduceCtx {
    type DeliveryOpaque = ();
    fn delivery(&self, r: &rdkafka::producer::DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = r {
            self.failed.fetch_add(1, Ordering::Relaxed);
            warn!("delivery failed: {e}");
        }
    }
}

type OutProducer = ThreadedProducer<ProduceCtx>;

/// The enriched-topic sink: Avro single-object encoding of the enriched schema.
struct TopicSink {
    topic: String,
    header: Vec<u8>,
}

/// The metadata the attribution reads (shared with the rebalance callbacks).
#[derive(Clone)]
struct Sources {
    identity: Arc<RwLock<IdentityStore>>,
    ec2: Arc<RwLock<IdentityStore>>,
    cidr: Arc<RwLock<CidrMap>>,
}

impl Sources {
    /// Attributes the held-back records again, now that more metadata may be in.
    fn settle(&self, b: &mut Batch) {
        if b.held.is_empty() {
            return;
        }
        let (ids, ec2, cidr) = (
            self.identity.read().unwrap(),
            self.ec2.read().unwrap(),
            self.cidr.read().unwrap(),
        );
        let a = Attributor {
            identity: &ids,
            ec2: &ec2,
            cidr: &cidr,
        };
        for i in b.held.drain(..) {
            let e = &mut b.records[i];
            a.settle(e);
            if e.local.attributed() && e.remote.attributed() {
                ::metrics::counter!(metrics::LATE_ATTRIBUTED).increment(1);
            }
        }
    }
}

struct Ctx {
    state: Arc<Mutex<State>>,
    sources: Sources,
    sink: Arc<FileSink>,
    dlq: Arc<OutProducer>,
    enriched: Option<Arc<TopicSink>>,
    topic: String,
}

impl ClientContext for Ctx {}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // Finish what was read from the partitions being taken away.
            let mut st = self.state.lock().unwrap();
            for e in tpl.elements() {
                if let Some(mut b) = st.batches.remove(&e.partition()) {
                    if let Err(err) = self.roll(consumer, e.partition(), &mut b) {
                        error!(
                            partition = e.partition(),
                            "flushing on revoke failed; the next owner redoes it: {err:#}"
                        );
                    }
                }
                st.done_through.remove(&e.partition());
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut st = self.state.lock().unwrap();
            for e in tpl.elements() {
                let p = e.partition();
                let orphans = self.sink.remove_orphans(p);
                if orphans > 0 {
                    warn!(
                        partition = p,
                        orphans, "removed files of an unfinished batch; redoing it"
                    );
                }
                let done = self.sink.done_through(p).unwrap_or(-1);
                st.done_through.insert(p, done);
                info!(partition = p, done_through = done, "assigned");
            }
        }
    }
}

impl Ctx {
    /// Attributes held-back records once more, writes the batch to every
    /// sink, makes sure its dead letters are delivered, then commits.
    fn roll(
        &self,
        consumer: &BaseConsumer<Ctx>,
        partition: i32,
        b: &mut Batch,
    ) -> anyhow::Result<()> {
        self.sources.settle(b);
        let (sink, out, enriched, topic) = (
            &self.sink,
            &*self.dlq,
            self.enriched.as_deref(),
            &self.topic,
        );
        let failed_before = out.context().failed.load(Ordering::Relaxed);
        if let Some(t) = enriched {
            for r in &b.records {
                let mut msg = t.header.clone();
                r.write(&mut msg);
                let mut rec = BaseRecord::<str, [u8], ()>::to(&t.topic)
                    .key(r.host.identity.host_id.as_str())
                    .payload(&msg[..]);
                loop {
                    match out.send(rec) {
                        Ok(()) => break,
                        Err((
                            rdkafka::error::KafkaError::MessageProduction(
                                rdkafka::types::RDKafkaErrorCode::QueueFull,
                            ),
                            back,
                        )) => {
                            rec = back;
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err((e, _)) => anyhow::bail!("producing to {}: {e}", t.topic),
                    }
                }
            }
        }
        // Dead letters and enriched records must be delivered before the offsets
        // move past them.
        out.flush(Duration::from_secs(30))
            .context("delivering dead letters / enriched records")?;
        if out.context().failed.load(Ordering::Relaxed) != failed_before {
            anyhow::bail!(
                "some dead-letter or enriched records were not delivered; not committing"
            );
        }
        if enriched.is_some() {
            ::metrics::counter!(metrics::RECORDS_OUT, "sink" => "topic")
                .increment(b.records.len() as u64);
        }
        let files = sink.write(partition, b)?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(b.last + 1))?;
        consumer
            .commit(&tpl, CommitMode::Sync)
            .context("committing offsets")?;
        ::metrics::counter!(metrics::RECORDS_OUT, "sink" => "files")
            .increment(b.records.len() as u64);
        ::metrics::counter!(metrics::FILES_ROLLED).increment(files.len() as u64);
        metrics::record_attributions(&b.records);
        Ok(())
    }
}

fn client_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    for (k, v) in &cfg.kafka_properties {
        c.set(k, v);
    }
    c
}

/// Reads the identity topic from the beginning into `store`: first up to the
/// current end (so attribution starts complete), then in the background.
fn follow_identity(cfg: &Config, store: Arc<RwLock<IdentityStore>>) -> anyhow::Result<()> {
    let consumer: BaseConsumer = client_config(cfg)
        .set(
            "group.id",
            format!("{}-identity-{}", cfg.group_id, std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .create()?;
    let md = consumer.fetch_metadata(Some(&cfg.identity_topic), Duration::from_secs(10))?;
    let parts: Vec<i32> = md
        .topics()
        .iter()
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    let mut tpl = TopicPartitionList::new();
    let mut ends = HashMap::new();
    for p in &parts {
        tpl.add_partition_offset(&cfg.identity_topic, *p, Offset::Beginning)?;
        let (_, high) =
            consumer.fetch_watermarks(&cfg.identity_topic, *p, Duration::from_secs(10))?;
        ends.insert(*p, high);
    }
    consumer.assign(&tpl)?;
    let loaded = store.clone();
    let apply = move |m: &rdkafka::message::BorrowedMessage| match decode::Identity::decode(
        m.payload().unwrap_or_default(),
    ) {
        Ok(id) => {
            store.write().unwrap().apply(&id);
            ::metrics::gauge!(metrics::IDENTITY_LAST_SEEN).set(id.time_ns as f64 / 1e9);
        }
        Err(e) => warn!("ignoring undecodable identity record: {e}"),
    };
    let t0 = Instant::now();
    let mut caught_up: HashSet<i32> = ends
        .iter()
        .filter(|(_, h)| **h == 0)
        .map(|(p, _)| *p)
        .collect();
    while caught_up.len() < parts.len() && t0.elapsed() < Duration::from_secs(60) {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            apply(&m);
            // A partition added since the watermarks were read has no end: treat it as caught up.
            if ends
                .get(&m.partition())
                .is_none_or(|end| m.offset() + 1 >= *end)
            {
                caught_up.insert(m.partition());
            }
        }
    }
    info!(
        ips = loaded.read().unwrap().tracked_ips(),
        "identity history loaded"
    );
    std::thread::Builder::new()
        .name("identity".into())
        .spawn(move || {
            while !STOP.load(Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                    apply(&m);
                }
            }
        })?;
    Ok(())
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// The metrics endpoint's address; None when disabled (empty).
fn metrics_addr(cfg: &Config) -> anyhow::Result<Option<std::net::SocketAddr>> {
    if cfg.metrics_listen.is_empty() {
        return Ok(None);
    }
    let addr = cfg.metrics_listen.parse();
    addr.map(Some)
        .map_err(|e| anyhow::anyhow!("metrics_listen {:?}: {e}", cfg.metrics_listen))
}

/// The static map the config names (empty without one).
fn load_static_map(cfg: &Config) -> anyhow::Result<CidrMap> {
    match &cfg.static_map {
        Some(p) => CidrMap::load(p).map_err(|e| anyhow::anyhow!("static map: {e}")),
        None => Ok(CidrMap::default()),
    }
}

/// What `--check-config` checks beyond parsing: what `run` would refuse.
fn check(cfg: &Config) -> anyhow::Result<()> {
    metrics_addr(cfg)?;
    load_static_map(cfg)?;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    flowlog_runtime::logging::init(&cli.log);
    let run_or_check = |cfg: Config| {
        if !cli.check_config {
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

fn run(cfg: Config) -> anyhow::Result<()> {
    // SAFETY: installing an async-signal-safe handler that only sets a flag.
    unsafe {
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
    }
    if let Some(listen) = metrics_addr(&cfg)? {
        metrics::serve(listen)?;
    }
    let cidr = Arc::new(RwLock::new(load_static_map(&cfg)?));
    let mut cidr_loaded = SystemTime::now();
    let mut cidr_in_sync = true;
    let mut cidr_mtime = cfg
        .static_map
        .as_ref()
        .and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    ::metrics::gauge!(metrics::STATIC_MAP_ENTRIES).set(cidr.read().unwrap().entries as f64);

    let identity = Arc::new(RwLock::new(IdentityStore::default()));
    follow_identity(&cfg, identity.clone())?;
    let ec2 = Arc::new(RwLock::new(IdentityStore::default()));
    if !cfg.ec2.regions.is_empty() {
        #[cfg(feature = "ec2")]
        flowlog_enricher::sources::ec2::start(cfg.ec2.clone(), ec2.clone())?;
        #[cfg(not(feature = "ec2"))]
        anyhow::bail!("[ec2] is configured but this enricher was built without the ec2 feature");
    }
    let sources = Sources {
        identity: identity.clone(),
        ec2: ec2.clone(),
        cidr: cidr.clone(),
    };
    let late_window_ns = cfg.late_window_secs as i64 * 1_000_000_000;

    let sink = Arc::new(FileSink::new(
        cfg.output_dir.clone(),
        cfg.flow_topic.clone(),
    )?);
    let dlq: Arc<OutProducer> = Arc::new(
        client_config(&cfg)
            .set("enable.idempotence", "true")
            .set("linger.ms", "20")
            .set("compression.type", "lz4")
            .create_with_context(ProduceCtx::default())?,
    );
    let enriched = (!cfg.enriched_topic.is_empty()).then(|| {
        let header = flowlog_schema::ENRICHED_FLOW.header().to_vec();
        Arc::new(TopicSink {
            topic: cfg.enriched_topic.clone(),
            header,
        })
    });
    let state = Arc::new(Mutex::new(State::default()));
    let consumer: BaseConsumer<Ctx> = client_config(&cfg)
        .set("group.id", &cfg.group_id)
        // Offsets are committed by hand, only after the files are durable.
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("partition.assignment.strategy", "cooperative-sticky")
        .set("session.timeout.ms", "10000")
        .set("fetch.wait.max.ms", "50")
        .create_with_context(Ctx {
            state: state.clone(),
            sources,
            sink,
            dlq: dlq.clone(),
            enriched,
            topic: cfg.flow_topic.clone(),
        })?;
    consumer.subscribe(&[&cfg.flow_topic])?;
    info!(topic = %cfg.flow_topic, group = %cfg.group_id, out = %cfg.output_dir.display(), "enriching");

    let decoder = decode::Decoder::new();
    let max_age = Duration::from_secs(cfg.batch_max_age_secs);
    let mut last_check = Instant::now();
    // Per host: the sequence epoch and the last sequence number seen.
    let mut seqs: HashMap<String, (i64, i64)> = HashMap::new();
    let mut last_lag = Instant::now();
    while !STOP.load(Ordering::Relaxed) {
        if let Some(res) = consumer.poll(Duration::from_millis(100)) {
            let m = match res {
                Ok(m) => m,
                Err(e) => {
                    warn!("consume error: {e}");
                    continue;
                }
            };
            let (p, off) = (m.partition(), m.offset());
            let mut st = state.lock().unwrap();
            if st.done_through.get(&p).is_some_and(|d| off <= *d) {
                continue; // already in a file from before a restart
            }
            ::metrics::counter!(metrics::RECORDS_IN).increment(1);
            let payload = m.payload().unwrap_or_default();
            let batch = st.batches.entry(p).or_insert_with(|| Batch::new(off));
            batch.last = off;
            match decoder.flow(payload) {
                Ok((host, f)) => {
                    // Per-host sequence gaps (the transport numbers records 0, 1, 2, ...).
                    let host_id = &host.identity.host_id;
                    match seqs.get_mut(host_id.as_str()) {
                        Some((epoch, prev)) if *epoch == f.sequence_epoch => {
                            if f.sequence > *prev + 1 {
                                ::metrics::counter!(metrics::SEQUENCE_GAPS)
                                    .increment((f.sequence - *prev - 1) as u64);
                            }
                            *prev = f.sequence;
                        }
                        Some(v) => *v = (f.sequence_epoch, f.sequence),
                        None => {
                            seqs.insert(host_id.clone(), (f.sequence_epoch, f.sequence));
                        }
                    }
                    let (ids, ec2s, map) = (
                        identity.read().unwrap(),
                        ec2.read().unwrap(),
                        cidr.read().unwrap(),
                    );
                    let e = Attributor {
                        identity: &ids,
                        ec2: &ec2s,
                        cidr: &map,
                    }
                    .enrich(host, f);
                    // Young and unattributed: hold it back for late metadata.
                    let age = now_ns() - e.flow.end_time_ns;
                    if (!e.local.attributed() || !e.remote.attributed()) && age < late_window_ns {
                        let until = Instant::now()
                            + Duration::from_nanos((late_window_ns - age.max(0)) as u64);
                        batch.hold_until = Some(batch.hold_until.map_or(until, |h| h.max(until)));
                        batch.held.push(batch.records.len());
                    }
                    batch.records.push(e);
                }
                Err(reject) => {
                    ::metrics::counter!(metrics::DLQ, "reason" => reject.kind())
                        .increment(1);
                    let headers = OwnedHeaders::new()
                        .insert(Header {
                            key: "flowlog.dlq.reason",
                            value: Some(reject.to_string().as_str()),
                        })
                        .insert(Header {
                            key: "flowlog.dlq.source",
                            value: Some(&format!("{}/{p}/{off}", cfg.flow_topic)),
                        });
                    let mut rec = BaseRecord::<[u8], [u8], ()>::to(&cfg.dlq_topic)
                        .payload(payload)
                        .headers(headers);
                    if let Some(k) = m.key() {
                        rec = rec.key(k);
                    }
                    if let Err((e, _)) = dlq.send(rec) {
                        // Not durable in the DLQ: do not commit past it.
                        error!(
                            "dead-letter produce failed: {e}; stopping so the message is retried"
                        );
                        return Err(anyhow::anyhow!("dead-letter topic unavailable: {e}"));
                    }
                }
            }
        }
        if last_check.elapsed() >= Duration::from_millis(200) {
            last_check = Instant::now();
            ::metrics::counter!(metrics::HOST_CACHE, "result" => "hit")
                .absolute(decoder.host_hits.load(Ordering::Relaxed));
            ::metrics::counter!(metrics::HOST_CACHE, "result" => "miss")
                .absolute(decoder.host_misses.load(Ordering::Relaxed));
            let due: Vec<i32> = {
                let st = state.lock().unwrap();
                st.batches
                    .iter()
                    .filter(|(_, b)| {
                        let full = b.records.len() >= cfg.batch_max_records
                            || b.opened.elapsed() >= max_age;
                        let waiting = b.hold_until.is_some_and(|h| Instant::now() < h);
                        // Held batches wait, but never past max age + the late window.
                        full && (!waiting
                            || b.opened.elapsed()
                                >= max_age + Duration::from_secs(cfg.late_window_secs))
                    })
                    .map(|(p, _)| *p)
                    .collect()
            };
            for p in due {
                let b = state.lock().unwrap().batches.remove(&p);
                if let Some(mut b) = b {
                    consumer.context().roll(&consumer, p, &mut b)?;
                    state.lock().unwrap().done_through.insert(p, b.last);
                }
            }
            // Static map: reload when the file changes; a bad file keeps the old
            // map. Its age is the time since the map in force last matched the
            // file, so a rejected (or vanished) file shows up as a growing age.
            if let Some(path) = &cfg.static_map {
                let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
                if mtime != cidr_mtime {
                    cidr_mtime = mtime;
                    match CidrMap::load(path) {
                        Ok(m) => {
                            info!(entries = m.entries, "static map reloaded");
                            ::metrics::gauge!(metrics::STATIC_MAP_ENTRIES).set(m.entries as f64);
                            *cidr.write().unwrap() = m;
                            cidr_in_sync = true;
                        }
                        Err(e) => {
                            ::metrics::counter!(metrics::SOURCE_ERRORS, "source" => "static")
                                .increment(1);
                            error!("static map rejected, keeping the previous one: {e}");
                            cidr_in_sync = false;
                        }
                    }
                }
                if cidr_in_sync {
                    cidr_loaded = SystemTime::now();
                }
                ::metrics::gauge!(metrics::SOURCE_AGE, "source" => "static")
                    .set(cidr_loaded.elapsed().unwrap_or_default().as_secs_f64());
            }
            metrics::record_process();
            ::metrics::gauge!(metrics::TRACKED_IPS)
                .set(identity.read().unwrap().tracked_ips() as f64);
            if last_lag.elapsed() >= Duration::from_secs(10) {
                last_lag = Instant::now();
                // Lag: what is in the topic beyond what is durably written.
                let mut lag = 0i64;
                if let Ok(assigned) = consumer.assignment() {
                    for e in assigned.elements() {
                        if let Ok((_, high)) = consumer.fetch_watermarks(
                            &cfg.flow_topic,
                            e.partition(),
                            Duration::from_secs(1),
                        ) {
                            let done = state
                                .lock()
                                .unwrap()
                                .done_through
                                .get(&e.partition())
                                .copied()
                                .unwrap_or(-1);
                            lag += (high - 1 - done).max(0);
                        }
                    }
                }
                ::metrics::gauge!(metrics::CONSUMER_LAG).set(lag as f64);
            }
        }
    }
    info!("stopping: writing open batches");
    let batches: Vec<(i32, Batch)> = state.lock().unwrap().batches.drain().collect();
    for (p, mut b) in batches {
        consumer.context().roll(&consumer, p, &mut b)?;
    }
    Ok(())
}
