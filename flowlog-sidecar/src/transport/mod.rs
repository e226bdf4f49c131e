//! Flow records to Kafka with no silent loss.
//!
//! Records are Avro single-object encoded, keyed by host id (so one host's
//! records stay in one partition, in order) and handed to an idempotent
//! librdkafka producer, whose bounded queue is the in-memory buffer. When the
//! broker is down, the queue is full, or a delivery fails, records go to the
//! bounded on-disk [`spool::Spool`]; a replay thread sends them back in order
//! once the broker answers. While anything is spooled, new records queue
//! behind it. Only what the spool cannot hold is dropped, and counted.

pub mod kafka;
pub mod spool;

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Mutex,
    },
    thread,
    time::{Duration, Instant},
};

use metrics::{counter, gauge, histogram};
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer},
    ClientContext, Message,
};
use tracing::{info, warn};

use crate::{
    avro::{self, Counters, IdentityReason, Position, RecordType},
    flow::FlowRecord,
    identity::HostIdentity,
    metrics as m,
};

pub use kafka::KafkaConfig;
pub use spool::{Spool, SpoolConfig};

pub const FINGERPRINT_HEADER: &str = "flowlog.schema.fingerprint";

/// What rides with each message to its delivery report, packed in a usize
/// so that producing allocates nothing for it: 0 for identity records, else
/// 1 + the send time in µs since the sink started (only every 8th flow record
/// is timed; the others carry 1).
type Sent = usize;
const SENT_IDENTITY: usize = 0;
const SENT_UNTIMED: usize = 1;

static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

fn sent_timed() -> Sent {
    2 + START.get_or_init(Instant::now).elapsed().as_micros() as usize
}

fn sent_latency(sent: Sent) -> Option<f64> {
    (sent >= 2).then(|| {
        let start = *START.get_or_init(Instant::now);
        start.elapsed().as_secs_f64() - (sent - 2) as f64 / 1e6
    })
}

struct Shared {
    spool: Mutex<Spool>,
    /// Records whose delivery failed, in the order they were produced. They
    /// are older than anything in the spool, so they are replayed first (and
    /// written in front of the spool at shutdown).
    retry: Mutex<std::collections::VecDeque<Vec<u8>>>,
    /// Cleared by a failed delivery, set by a successful one or a metadata probe.
    healthy: AtomicBool,
    /// True while the replay thread holds records taken off the spool.
    replaying: AtomicBool,
    stop: AtomicBool,
}

impl Shared {
    fn spool(&self, payload: &[u8], reason: &'static str) {
        let mut sp = self.spool.lock().unwrap();
        match sp.append(payload) {
            Ok(dropped) => {
                m::spooled(reason, 1);
                if dropped > 0 {
                    m::dropped("spool_full", dropped);
                    warn!(dropped, "spool full: dropped its oldest records");
                }
            }
            Err(e) => {
                m::dropped("spool_error", 1);
                warn!("spool write failed, record lost: {e}");
            }
        }
        gauge!(m::SPOOL_BYTES).set(sp.bytes() as f64);
        gauge!(m::SPOOL_RECORDS).set(sp.records() as f64);
    }
}

pub struct Ctx {
    shared: Arc<Shared>,
    /// Handles resolved once: the delivery callback runs per message.
    delivered: metrics::Counter,
    latency: metrics::Histogram,
    broker_up: metrics::Gauge,
}

impl ClientContext for Ctx {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error.rdkafka_error_code(), Some(RDKafkaErrorCode::AllBrokersDown)) {
            // Stop filling the in-memory queue; new records go to the spool.
            self.shared.healthy.store(false, Ordering::Relaxed);
            gauge!(m::BROKER_UP).set(0.0);
        }
        warn!("kafka: {error}: {reason}");
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Sent;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Sent) {
        match (result, sent == SENT_IDENTITY) {
            (Ok(_), false) => {
                self.delivered.increment(1);
                if let Some(latency) = sent_latency(sent) {
                    self.latency.record(latency);
                    self.broker_up.set(1.0);
                }
                if !self.shared.healthy.load(Ordering::Relaxed) {
                    self.shared.healthy.store(true, Ordering::Relaxed);
                    self.broker_up.set(1.0);
                }
            }
            (Ok(_), true) => {}
            (Err((e, msg)), false) => {
                counter!(m::FLOWS_FAILED).increment(1);
                if !matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)) {
                    self.shared.healthy.store(false, Ordering::Relaxed);
                    gauge!(m::BROKER_UP).set(0.0);
                }
                if let Some(p) = msg.payload() {
                    self.shared.retry.lock().unwrap().push_back(p.to_vec());
                }
            }
            // A lost heartbeat is replaced by the next one.
            (Err((e, _)), true) => warn!("identity heartbeat not delivered: {e}"),
        }
    }
}

/// The Kafka side of the sidecar.
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<Ctx>>,
    shared: Arc<Shared>,
    cfg: KafkaConfig,
    flow_header: [u8; 10],
    identity_header: [u8; 10],
    flow_fp: String,
    identity_fp: String,
    host: HostIdentity,
    host_block: Vec<u8>,
    epoch: i64,
    next_sequence: i64,
    replayer: Option<thread::JoinHandle<()>>,
    buf: Vec<u8>,
    produced: metrics::Counter,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl KafkaSink {
    pub fn new(cfg: KafkaConfig, spool_cfg: SpoolConfig, host: HostIdentity) -> anyhow::Result<KafkaSink> {
        gauge!(m::SPOOL_MAX_BYTES).set(spool_cfg.max_bytes as f64);
        let spool = Spool::open(spool_cfg.clone())
            .map_err(|e| anyhow::anyhow!("opening the spool at {}: {e}", spool_cfg.dir.display()))?;
        if !spool.is_empty() {
            info!(records = spool.records(), bytes = spool.bytes(), "spool holds records from a previous run; replaying");
        }
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            retry: Mutex::new(Default::default()),
            healthy: AtomicBool::new(true),
            replaying: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let producer: ThreadedProducer<Ctx> =
            cfg.client_config()?.create_with_context(Ctx {
                shared: shared.clone(),
                delivered: counter!(m::FLOWS_DELIVERED),
                latency: histogram!(m::DELIVERY_LATENCY),
                broker_up: gauge!(m::BROKER_UP),
            })?;
        let producer = Arc::new(producer);
        let flow_header = avro::header(avro::FLOW_SCHEMA)?;
        let identity_header = avro::header(avro::IDENTITY_SCHEMA)?;
        let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i64;
        let replayer = {
            let (producer, shared, topic) = (producer.clone(), shared.clone(), cfg.flow_topic.clone());
            let key = host.host_id.clone();
            let fp = hex(&flow_header[2..]);
            thread::Builder::new()
                .name("flowlog-replay".into())
                .spawn(move || replay_loop(&producer, &shared, &topic, &key, &fp))?
        };
        Ok(KafkaSink {
            host_block: avro::encode_host(&host),
            host,
            producer,
            shared,
            flow_fp: hex(&flow_header[2..]),
            identity_fp: hex(&identity_header[2..]),
            flow_header,
            identity_header,
            cfg,
            epoch,
            next_sequence: 0,
            replayer: Some(replayer),
            buf: Vec::with_capacity(512),
            produced: counter!(m::FLOWS_PRODUCED),
        })
    }

    pub fn host(&self) -> &HostIdentity {
        &self.host
    }

    /// Replaces the identity (e.g. the IPs changed) for records from now on.
    pub fn set_host(&mut self, host: HostIdentity) {
        self.host_block = avro::encode_host(&host);
        self.host = host;
    }

    /// Encodes and produces one flow record.
    pub fn send_flow(&mut self, r: &FlowRecord, kind: RecordType, c: &Counters) {
        let pos = Position { epoch: self.epoch, sequence: self.next_sequence, connection_id: r.connection_id as i64 };
        self.next_sequence += 1;
        self.buf.clear();
        self.buf.extend_from_slice(&self.flow_header);
        avro::encode_flow(&mut self.buf, &self.host_block, pos, kind, r, c);
        // Keep order: while anything is spooled (or being replayed), queue behind it.
        let backlog = self.shared.replaying.load(Ordering::Relaxed)
            || !self.shared.retry.lock().unwrap().is_empty()
            || !self.shared.spool.lock().unwrap().is_empty();
        if backlog {
            self.shared.spool(&self.buf, "backlog");
            return;
        }
        if !self.shared.healthy.load(Ordering::Relaxed) {
            self.shared.spool(&self.buf, "broker_down");
            return;
        }
        let headers = OwnedHeaders::new().insert(Header { key: FINGERPRINT_HEADER, value: Some(self.flow_fp.as_str()) });
        // Every 8th record is timed for the delivery-latency histogram.
        let sent = if self.next_sequence % 8 == 0 { sent_timed() } else { SENT_UNTIMED };
        let rec = BaseRecord::with_opaque_to(&self.cfg.flow_topic, sent)
            .key(self.host.host_id.as_str())
            .payload(&self.buf[..])
            .headers(headers);
        match self.producer.send(rec) {
            Ok(()) => self.produced.increment(1),
            Err((e, _)) => {
                let reason = match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => "queue_full",
                    _ => "produce_error",
                };
                self.shared.spool(&self.buf, reason);
            }
        }
    }

    /// Produces an identity heartbeat.
    pub fn send_identity(&mut self, reason: IdentityReason) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let mut buf = self.identity_header.to_vec();
        avro::encode_identity(&mut buf, &self.host_block, now, reason, self.epoch, self.next_sequence);
        let headers = OwnedHeaders::new().insert(Header { key: FINGERPRINT_HEADER, value: Some(self.identity_fp.as_str()) });
        let rec = BaseRecord::with_opaque_to(&self.cfg.identity_topic, SENT_IDENTITY)
            .key(self.host.host_id.as_str())
            .payload(&buf[..])
            .headers(headers);
        let label = match reason {
            IdentityReason::Start => "start",
            IdentityReason::Heartbeat => "heartbeat",
            IdentityReason::IpChange => "ip_change",
            IdentityReason::Stop => "stop",
        };
        match self.producer.send(rec) {
            Ok(()) => counter!(m::IDENTITY_SENT, "reason" => label).increment(1),
            Err((e, _)) => warn!("identity heartbeat not queued: {e}"),
        }
    }

    pub fn update_gauges(&self) {
        gauge!(m::KAFKA_QUEUE).set(self.producer.in_flight_count() as f64);
    }

    /// Delivers what it can within `timeout`; the rest goes to the spool.
    pub fn shutdown(mut self, timeout: Duration) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(r) = self.replayer.take() {
            let _ = r.join();
        }
        if self.producer.flush(timeout).is_err() {
            let left = self.producer.in_flight_count();
            warn!(left, "broker did not take everything before shutdown; spooling the rest");
            self.producer.purge(PurgeConfig::default().queue().inflight());
            // Purged messages come back through delivery reports, which spool them.
            let _ = self.producer.flush(Duration::from_secs(2));
        }
        let retry: Vec<Vec<u8>> = self.shared.retry.lock().unwrap().drain(..).collect();
        let mut sp = self.shared.spool.lock().unwrap();
        if !retry.is_empty() {
            m::spooled("shutdown", retry.len() as u64);
            if let Err(e) = sp.prepend(&retry) {
                m::dropped("spool_error", retry.len() as u64);
                warn!(records = retry.len(), "spooling undelivered records failed, they are lost: {e}");
            }
        }
        if let Err(e) = sp.seal() {
            warn!("syncing the spool: {e}");
        }
        if !sp.is_empty() {
            info!(records = sp.records(), "records left in the spool for the next run");
        }
    }
}

/// Sends spooled records back, oldest first, whenever the broker answers.
fn replay_loop(producer: &ThreadedProducer<Ctx>, shared: &Shared, topic: &str, key: &str, fp: &str) {
    let mut last_probe = Instant::now() - Duration::from_secs(60);
    while !shared.stop.load(Ordering::Relaxed) {
        thread::sleep(Duration::from_millis(100));
        if shared.spool.lock().unwrap().is_empty() && shared.retry.lock().unwrap().is_empty() {
            continue;
        }
        if !shared.healthy.load(Ordering::Relaxed) {
            if last_probe.elapsed() < Duration::from_secs(1) {
                continue;
            }
            last_probe = Instant::now();
            if producer.client().fetch_metadata(Some(topic), Duration::from_secs(2)).is_err() {
                continue;
            }
            info!("broker reachable again; replaying the spool");
            shared.healthy.store(true, Ordering::Relaxed);
            gauge!(m::BROKER_UP).set(1.0);
        }
        // Everything older must be settled first, or replayed records could
        // overtake it.
        if producer.in_flight_count() > 0 {
            continue;
        }
        shared.replaying.store(true, Ordering::Relaxed);
        let retried: Vec<Vec<u8>> = shared.retry.lock().unwrap().drain(..).collect();
        let batch = if !retried.is_empty() {
            Ok(Some(retried))
        } else {
            let mut sp = shared.spool.lock().unwrap();
            let b = sp.take_oldest();
            gauge!(m::SPOOL_BYTES).set(sp.bytes() as f64);
            gauge!(m::SPOOL_RECORDS).set(sp.records() as f64);
            let corrupt = std::mem::take(&mut sp.corrupt_records);
            if corrupt > 0 {
                m::dropped("spool_corrupt", corrupt);
            }
            b
        };
        let records = match batch {
            Ok(Some(r)) => r,
            Ok(None) => Vec::new(),
            Err(e) => {
                warn!("reading the spool: {e}");
                Vec::new()
            }
        };
        for pending in records {
            loop {
                let headers = OwnedHeaders::new().insert(Header { key: FINGERPRINT_HEADER, value: Some(fp) });
                let rec = BaseRecord::with_opaque_to(topic, SENT_UNTIMED)
                    .key(key)
                    .payload(&pending[..])
                    .headers(headers);
                match producer.send(rec) {
                    Ok(()) => {
                        counter!(m::FLOWS_PRODUCED).increment(1);
                        counter!(m::FLOWS_REPLAYED).increment(1);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                        if !shared.stop.load(Ordering::Relaxed) =>
                    {
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err((_, rec)) => {
                        drop(rec);
                        shared.spool(&pending, "shutdown");
                        break;
                    }
                }
            }
        }
        shared.replaying.store(false, Ordering::Relaxed);
    }
}
