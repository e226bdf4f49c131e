//! Flow records to Kafka, at least once, with no silent loss.
//!
//! Records are Avro single-object encoded and go out several to a Kafka
//! message (a FlowBatch, `schemas/flow_batch.avsc`; `records_per_message`),
//! keyed by host id (so one host's records stay in one partition, in order)
//! and handed to an idempotent librdkafka producer, whose bounded queue is
//! the in-memory buffer. When the broker is down or the queue is full,
//! records go to the bounded on-disk
//! [`spool::Spool`]; deliveries that fail (for a reason that may pass) are
//! written in front of it. A replay thread sends the spool back, a segment
//! at a time, once the broker answers, and deletes a segment only when the
//! broker has acknowledged all its records: a crash during replay sends some
//! again (same host, epoch and sequence), never fewer. While anything is
//! spooled, new records queue behind it, until the replay has handed the
//! last spooled segment to the producer. What is lost is counted in
//! `flows_dropped_total{reason}`: what the spool cannot hold or write, and
//! records no retry can deliver ([`kafka::undeliverable`]).

pub mod kafka;
pub mod spool;

use std::{
    collections::{HashMap, VecDeque},
    fmt::Display,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex, OnceLock,
    },
    thread,
    time::{Duration, Instant},
};

use metrics::{counter, gauge, histogram};
use tokio::sync::watch;
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    producer::{BaseProducer, BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig},
    ClientContext, Message,
};
use tracing::{info, warn};

use flowlog_runtime::producer::PolledProducer;
use flowlog_schema::{records_in, Writer, BatchWriter, Flow, HostIdentity, Identity, IdentityReason, StatePath, Workload};

use crate::{
    identity::IdentityConfig,
    metrics as m,
    sink::{Sink, Tick},
    workload::addresses::Listing,
};

pub use kafka::KafkaConfig;
pub use spool::{Spool, SpoolConfig};

/// What rides with each message to its delivery report, packed in a usize
/// so that producing allocates nothing for it: 0 for identity records;
/// [`REPLAYED`] + the record's index in its segment for replayed ones; else
/// 1 + the send time in µs since the sink started (only every 8th live flow
/// record is timed; the others carry 1).
type Sent = usize;
const SENT_IDENTITY: usize = 0;
const SENT_UNTIMED: usize = 1;
const REPLAYED: usize = 1 << (usize::BITS - 1);

static START: OnceLock<Instant> = OnceLock::new();

/// The replay thread's wait between rounds while it has work ([`Shared::nap`]).
const BUSY_NAP: Duration = Duration::from_millis(100);
/// Its longest wait with nothing spooled: a wake-up it missed costs no more.
const IDLE_NAP: Duration = Duration::from_secs(1);

fn sent_timed() -> Sent {
    2 + START.get_or_init(Instant::now).elapsed().as_micros() as usize
}

fn sent_latency(sent: Sent) -> Option<f64> {
    (sent >= 2 && sent & REPLAYED == 0).then(|| {
        let start = *START.get_or_init(Instant::now);
        start.elapsed().as_secs_f64() - (sent - 2) as f64 / 1e6
    })
}

/// The index of a replayed record in its segment.
fn replayed_index(sent: Sent) -> Option<usize> {
    (sent & REPLAYED != 0).then_some(sent & !REPLAYED)
}

/// A drop reason, or another trouble, is logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// What became of a replayed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// Not sent, or no delivery report yet.
    Pending,
    Delivered,
    /// May pass: kept in the spool.
    Failed,
    /// Can never be delivered: counted and let go.
    Dropped,
}

/// The delivery reports of the segment being replayed, by record index.
#[derive(Default)]
struct Acks {
    outcome: Vec<Outcome>,
    reported: usize,
}

struct Shared {
    spool: Mutex<Spool>,
    /// Live records whose delivery failed for a reason that may pass, in the
    /// order they were produced. They are older than anything spooled (live
    /// records are produced only while the spool is empty), so the replay
    /// thread writes them in front of the spool.
    retry: Mutex<VecDeque<Vec<u8>>>,
    /// Cleared by a failed delivery, set by a successful one or a metadata probe.
    healthy: AtomicBool,
    /// True while the replay thread holds failed records not yet in the spool.
    in_hand: AtomicBool,
    /// Set (under the spool's lock) once every record of the leased segment,
    /// the only one spooled, was handed to the producer; cleared when it settles.
    handed_off: AtomicBool,
    /// Set at shutdown: when the replay thread must let go.
    stop: OnceLock<Instant>,
    acks: Mutex<Acks>,
    /// Signalled on each delivery report of a replayed record.
    acked: Condvar,
    /// Set, and `poke` signalled, when the replay thread has work: a record
    /// spooled, a failed delivery to write back, shutdown.
    poked: Mutex<bool>,
    poke: Condvar,
    /// When each trouble was last logged.
    logged: Mutex<HashMap<&'static str, Instant>>,
}

impl Shared {
    fn stopping(&self) -> bool {
        self.stop.get().is_some()
    }

    /// Anything older than a new record still waits to be sent: the new
    /// record must queue behind it. Once the replay has handed the last
    /// spooled segment to the producer, nothing older waits: new records go
    /// to the producer behind it (same partition, idempotent, in order)
    /// instead of to the spool, which would otherwise never empty while
    /// records keep coming faster than one replay round trip.
    fn backlog(&self) -> bool {
        if self.in_hand.load(Ordering::Relaxed) || !self.retry.lock().unwrap().is_empty() {
            return true;
        }
        let sp = self.spool.lock().unwrap();
        !(sp.is_empty() || (self.handed_off.load(Ordering::Relaxed) && sp.only_leased()))
    }

    fn set_healthy(&self, up: bool) {
        self.healthy.store(up, Ordering::Relaxed);
        gauge!(m::BROKER_UP).set(if up { 1.0 } else { 0.0 });
    }

    /// Logs `what` at most once a minute per `key` (a full disk or a bad
    /// topic would otherwise log every record; the counters count them all).
    fn warn_once(&self, key: &'static str, what: impl Display) {
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap();
        if logged.get(key).is_none_or(|t| now.duration_since(*t) >= LOG_EVERY) {
            logged.insert(key, now);
            warn!(key, "{what} (logged at most once a minute)");
        }
    }

    /// A message no retry can deliver: its `n` records counted under
    /// `reason`, let go.
    fn undeliverable(&self, reason: &'static str, n: u64, e: &KafkaError) {
        m::dropped(reason, n);
        self.warn_once(reason, format_args!("record dropped, it can never be delivered: {e}"));
    }

    /// Runs `f` on the spool, then counts what it dropped and updates the gauges.
    fn with_spool<R>(&self, f: impl FnOnce(&mut Spool) -> R) -> R {
        let (r, drops, bytes, records) = {
            let mut sp = self.spool.lock().unwrap();
            let r = f(&mut sp);
            (r, sp.take_drops(), sp.bytes(), sp.records())
        };
        gauge!(m::SPOOL_BYTES).set(bytes as f64);
        gauge!(m::SPOOL_RECORDS).set(records as f64);
        if drops.full > 0 {
            m::dropped("spool_full", drops.full);
            self.warn_once("spool_full", format_args!("spool full: dropped {} of its oldest records", drops.full));
        }
        if drops.error > 0 {
            // Logged by the caller, with the error.
            m::dropped("spool_error", drops.error);
        }
        r
    }

    fn spool(&self, payload: &[u8], reason: &'static str) {
        m::spooled(reason, records_in(payload));
        if let Err(e) = self.with_spool(|sp| sp.append(payload)) {
            self.warn_once("spool_error", format_args!("spool write failed, records lost (counted): {e}"));
        }
        self.wake_replay();
    }

    /// Tells the replay thread it has work.
    fn wake_replay(&self) {
        *self.poked.lock().unwrap() = true;
        self.poke.notify_one();
    }

    /// The replay thread's wait between rounds: [`BUSY_NAP`] while records
    /// are spooled or held (it replays, probes the broker, syncs the open
    /// segment), else until woken ([`Shared::wake_replay`]) or [`IDLE_NAP`].
    /// A wake-up costs this VM ~70 us of CPU: napping 100 ms with nothing
    /// to do was a quarter of the sidecar's CPU at rest.
    fn nap(&self) {
        let busy = {
            let sp = self.spool.lock().unwrap();
            !sp.is_empty() || sp.is_open()
        } || !self.retry.lock().unwrap().is_empty();
        let poked = self.poked.lock().unwrap();
        let (mut poked, _) = self
            .poke
            .wait_timeout_while(poked, if busy { BUSY_NAP } else { IDLE_NAP }, |p| !*p)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *poked = false;
    }

    /// The spool's fsync timer; the fsync itself runs without the lock.
    fn sync_spool(&self) {
        let synced = self.with_spool(|sp| sp.sync_due(Instant::now())).and_then(|f| f.map_or(Ok(()), |f| f.sync_data()));
        if let Err(e) = synced {
            self.warn_once("spool_error", format_args!("spool write or fsync failed: {e}"));
        }
    }

    /// Writes failed deliveries in front of the spool, durably.
    fn spool_retries(&self) {
        if self.retry.lock().unwrap().is_empty() {
            return;
        }
        self.in_hand.store(true, Ordering::Relaxed);
        let records: Vec<Vec<u8>> = self.retry.lock().unwrap().drain(..).collect();
        let n = records.iter().map(|r| records_in(r)).sum();
        let front = self.spool.lock().unwrap().front_slot();
        match front.write(&records) {
            Ok(bytes) => {
                m::spooled("delivery_failed", n);
                self.with_spool(|sp| sp.add_front(front, n, bytes));
            }
            Err(e) => {
                m::dropped("spool_error", n);
                self.warn_once("spool_error", format_args!("spooling {n} failed deliveries failed, they are lost: {e}"));
            }
        }
        self.in_hand.store(false, Ordering::Relaxed);
    }

    /// The delivery report of record `i` of the segment being replayed.
    fn report(&self, i: usize, outcome: Outcome) {
        let mut acks = self.acks.lock().unwrap();
        if let Some(o) = acks.outcome.get_mut(i).filter(|o| **o == Outcome::Pending) {
            *o = outcome;
            acks.reported += 1;
            self.acked.notify_one();
        }
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
            self.shared.set_healthy(false);
            // Repeated at every reconnection attempt while the broker is away.
            self.shared.warn_once("all_brokers_down", format_args!("kafka: {error}: {reason}"));
            return;
        }
        warn!("kafka: {error}: {reason}");
    }
}

impl ProducerContext for Ctx {
    type DeliveryOpaque = Sent;

    fn delivery(&self, result: &DeliveryResult<'_>, sent: Sent) {
        if sent == SENT_IDENTITY {
            // A lost heartbeat is replaced by the next one.
            if let Err((e, _)) = result {
                warn!("identity heartbeat not delivered: {e}");
            }
            return;
        }
        let replayed = replayed_index(sent);
        let records = |msg: &rdkafka::message::BorrowedMessage| msg.payload().map_or(1, records_in);
        let outcome = match result {
            Ok(msg) => {
                self.delivered.increment(records(msg));
                self.broker_up.set(1.0);
                if let Some(latency) = sent_latency(sent) {
                    self.latency.record(latency);
                }
                if !self.shared.healthy.load(Ordering::Relaxed) {
                    self.shared.set_healthy(true);
                }
                Outcome::Delivered
            }
            Err((e, msg)) => {
                let n = records(msg);
                counter!(m::FLOWS_FAILED).increment(n);
                if let Some(reason) = kafka::undeliverable(e) {
                    self.shared.undeliverable(reason, n, e);
                    Outcome::Dropped
                } else {
                    if !matches!(e, KafkaError::MessageProduction(RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight)) {
                        self.shared.set_healthy(false);
                    }
                    // A replayed record is still in its segment.
                    if let (None, Some(p)) = (replayed, msg.payload()) {
                        self.shared.retry.lock().unwrap().push_back(p.to_vec());
                        self.shared.wake_replay();
                    }
                    Outcome::Failed
                }
            }
        };
        if let Some(i) = replayed {
            self.shared.report(i, outcome);
        }
    }
}

/// Numbers this host's flow records (epoch + sequence 0, 1, 2, ...) and
/// encodes them with the host block, which is encoded once per identity.
pub struct FlowEncoder {
    pub epoch: i64,
    pub next_sequence: i64,
    pub host_block: Vec<u8>,
    parts: Reused,
    buf: Vec<u8>,
}

impl FlowEncoder {
    pub fn new(epoch: i64, host: &HostIdentity) -> FlowEncoder {
        FlowEncoder {
            epoch,
            next_sequence: 0,
            host_block: host.encode(),
            parts: Reused::default(),
            buf: Vec::with_capacity(512),
        }
    }

    /// The record's message (valid until the next call).
    pub fn encode(&mut self, r: &mut Flow) -> &[u8] {
        self.number(r);
        self.buf.clear();
        r.to_message_with(&self.host_block, &mut self.buf, &mut self.parts);
        &self.buf
    }

    /// The record, encoded in place into `batch` (whose host block is this
    /// encoder's).
    pub fn encode_into(&mut self, r: &mut Flow, batch: &mut BatchWriter) {
        self.number(r);
        batch.push_with(|out| r.write_body_with(&mut Writer(out), &mut self.parts));
    }

    fn number(&mut self, r: &mut Flow) {
        r.sequence_epoch = self.epoch;
        r.sequence = self.next_sequence;
        self.next_sequence += 1;
    }
}

/// The parts of a record that many share, encoded once and copied.
#[derive(Default)]
struct Reused {
    /// The last workload written, as its encoded `["null", Workload]`:
    /// consecutive records mostly share theirs (the resolver hands out one
    /// Arc per cgroup), and encoding its names and labels for each record
    /// was ~2.5% of the sidecar's CPU with Kafka. Holding the Arc keeps its
    /// address from being reused by another workload.
    workload: Option<Arc<Workload>>,
    workload_bytes: Vec<u8>,
    /// The last [`PATHS`] distinct state paths written, encoded: a host's
    /// flows go through a few (a client's and a server's orderly close, a
    /// refused connect, a reset), and writing each state's name (six
    /// lengths and copies a record) was ~3% of the sidecar's CPU with Kafka.
    paths: [(u64, Vec<u8>); PATHS],
    /// The slot the next new path replaces (round robin).
    next_path: usize,
}

const PATHS: usize = 8;

impl flowlog_schema::Parts for Reused {
    fn workload(&mut self, w: &mut Writer, workload: Option<&Arc<Workload>>) {
        let Some(workload) = workload else { return Workload::write_opt(w, None) };
        if !self.workload.as_ref().is_some_and(|last| Arc::ptr_eq(last, workload)) {
            self.workload_bytes.clear();
            Workload::write_opt(&mut Writer(&mut self.workload_bytes), Some(workload));
            self.workload = Some(workload.clone());
        }
        w.0.extend_from_slice(&self.workload_bytes);
    }

    fn state_path(&mut self, w: &mut Writer, path: StatePath) {
        // 0 (no state) marks an empty slot.
        if path.0 == 0 {
            return path.write(w);
        }
        let i = match self.paths.iter().position(|(p, _)| *p == path.0) {
            Some(i) => i,
            None => {
                let i = self.next_path;
                self.next_path = (i + 1) % PATHS;
                let (key, bytes) = &mut self.paths[i];
                bytes.clear();
                path.write(&mut Writer(bytes));
                *key = path.0;
                i
            }
        };
        w.0.extend_from_slice(&self.paths[i].1);
    }
}

/// The Kafka side of the sidecar.
pub struct KafkaSink {
    out: FlowOut,
    cfg: KafkaConfig,
    /// Where the host's identity comes from (re-read for IP changes).
    identity: IdentityConfig,
    host: HostIdentity,
    /// The local workloads' IPs (workload::addresses), announced with the host's.
    workload_ips: Option<watch::Receiver<Listing>>,
    encoder: FlowEncoder,
    /// Records waiting for their message (`records_per_message` > 1).
    batch: BatchWriter,
    replayer: Option<thread::JoinHandle<()>>,
}

/// A batch message is sent once its records reach this size, whatever
/// `records_per_message` says: far below the 1 MB a broker takes by default.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Where flow messages go: the producer, or the spool while anything older
/// waits there or the broker is away.
struct FlowOut {
    producer: Arc<PolledProducer<Ctx>>,
    shared: Arc<Shared>,
    topic: String,
    key: String,
    produced: metrics::Counter,
}

impl FlowOut {
    /// Produces one message of `n` records (or spools it).
    fn send(&self, msg: &[u8], n: u64, timed: bool) {
        // Keep order: while anything is spooled (or being replayed), queue behind it.
        if self.shared.backlog() {
            self.shared.spool(msg, "backlog");
            return;
        }
        if !self.shared.healthy.load(Ordering::Relaxed) {
            self.shared.spool(msg, "broker_down");
            return;
        }
        let sent = if timed { sent_timed() } else { SENT_UNTIMED };
        let rec = BaseRecord::with_opaque_to(&self.topic, sent).key(self.key.as_str()).payload(msg);
        match self.producer.send(rec) {
            Ok(()) => self.produced.increment(n),
            Err((e, _)) => match (kafka::undeliverable(&e), e) {
                (Some(reason), e) => self.shared.undeliverable(reason, n, &e),
                (None, KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => self.shared.spool(msg, "queue_full"),
                (None, _) => self.shared.spool(msg, "produce_error"),
            },
        }
    }
}

/// Opens the spool a [`KafkaSink`] writes to (reads every segment a
/// previous run left: seconds for a full one).
pub fn open_spool(cfg: &SpoolConfig) -> anyhow::Result<Spool> {
    gauge!(m::SPOOL_MAX_BYTES).set(cfg.max_bytes as f64);
    Spool::open(cfg.clone()).map_err(|e| anyhow::anyhow!("opening the spool at {}: {e}", cfg.dir.display()))
}

impl KafkaSink {
    /// Starts the producer and the replay thread on `spool` ([`open_spool`]),
    /// and announces the host (START).
    pub fn new(
        cfg: KafkaConfig,
        spool: Spool,
        identity: IdentityConfig,
        workload_ips: Option<watch::Receiver<Listing>>,
    ) -> anyhow::Result<KafkaSink> {
        let host = identity.current();
        info!(host_id = %host.host_id, ips = ?host.ips, brokers = %cfg.brokers, "producing to Kafka");
        if !spool.is_empty() {
            info!(records = spool.records(), bytes = spool.bytes(), "spool holds records from a previous run; replaying");
        }
        let shared = Arc::new(Shared {
            spool: Mutex::new(spool),
            retry: Mutex::new(Default::default()),
            healthy: AtomicBool::new(true),
            in_hand: AtomicBool::new(false),
            handed_off: AtomicBool::new(false),
            stop: OnceLock::new(),
            acks: Mutex::new(Acks::default()),
            acked: Condvar::new(),
            poked: Mutex::new(false),
            poke: Condvar::new(),
            logged: Mutex::new(HashMap::new()),
        });
        shared.with_spool(|_| ());
        let producer: BaseProducer<Ctx> = cfg.client_config()?.create_with_context(Ctx {
            shared: shared.clone(),
            delivered: counter!(m::FLOWS_DELIVERED),
            latency: histogram!(m::DELIVERY_LATENCY),
            broker_up: gauge!(m::BROKER_UP),
        })?;
        let producer = Arc::new(PolledProducer::new(producer, "kafka-reports")?);
        let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i64;
        let replayer = Replayer {
            producer: producer.clone(),
            shared: shared.clone(),
            topic: cfg.flow_topic.clone(),
            key: host.host_id.clone(),
        };
        let replayer = thread::Builder::new().name("flowlog-replay".into()).spawn(move || replayer.run())?;
        let batch = BatchWriter::new(host.encode());
        let mut sink = KafkaSink {
            out: FlowOut {
                producer,
                shared,
                topic: cfg.flow_topic.clone(),
                key: host.host_id.clone(),
                produced: counter!(m::FLOWS_PRODUCED),
            },
            encoder: FlowEncoder::new(epoch, &host),
            host,
            identity,
            workload_ips,
            cfg,
            batch,
            replayer: Some(replayer),
        };
        sink.send_identity(IdentityReason::Start);
        Ok(sink)
    }

    /// Re-reads this host's identity and announces a change at once.
    fn check_identity(&mut self) {
        let now = self.identity.current();
        if now != self.host {
            info!(ips = ?now.ips, "host identity changed");
            // The open batch's records are the old host's.
            self.send_batch();
            self.encoder.host_block = now.encode();
            self.batch.set_host(self.encoder.host_block.clone());
            self.host = now;
            self.send_identity(IdentityReason::IpChange);
        }
    }

    /// Numbers and encodes one flow record, and produces it: into the open
    /// batch, which goes out when full and after each drain of the ring
    /// buffer ([`Sink::flush`]); alone with `records_per_message = 1`.
    fn send_flow(&mut self, r: &mut Flow) {
        if self.cfg.records_per_message <= 1 {
            // Every 8th record is timed for the delivery-latency histogram.
            let timed = (self.encoder.next_sequence + 1) % 8 == 0;
            let msg = self.encoder.encode(r);
            self.out.send(msg, 1, timed);
            return;
        }
        self.encoder.encode_into(r, &mut self.batch);
        if self.batch.len() >= self.cfg.records_per_message as usize || self.batch.bytes() >= MAX_BATCH_BYTES {
            self.send_batch();
        }
    }

    /// Produces the open batch, if it holds anything (every batch is timed).
    fn send_batch(&mut self) {
        if self.batch.is_empty() {
            return;
        }
        let n = self.batch.len() as u64;
        self.batch.take(|msg| self.out.send(msg, n, true));
    }

    /// Produces an identity heartbeat.
    pub fn send_identity(&mut self, reason: IdentityReason) {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0);
        let buf = Identity {
            host: self.host.clone(),
            time_ns: now,
            reason,
            sequence_epoch: self.encoder.epoch,
            next_sequence: self.encoder.next_sequence,
            version: env!("CARGO_PKG_VERSION").into(),
            // A listing whose thread is gone (it panicked) is not announced.
            workloads: self
                .workload_ips
                .as_ref()
                .filter(|l| l.has_changed().is_ok())
                .map(|l| l.borrow().to_vec())
                .unwrap_or_default(),
        }
        .to_message();
        let rec = BaseRecord::with_opaque_to(&self.cfg.identity_topic, SENT_IDENTITY)
            .key(self.host.host_id.as_str())
            .payload(&buf[..]);
        let producer = &self.out.producer;
        let label = match reason {
            IdentityReason::Start => "start",
            IdentityReason::Heartbeat => "heartbeat",
            IdentityReason::IpChange => "ip_change",
            IdentityReason::Stop => "stop",
        };
        match producer.send(rec) {
            Ok(()) => counter!(m::IDENTITY_SENT, "reason" => label).increment(1),
            Err((e, _)) => warn!("identity heartbeat not queued: {e}"),
        }
    }

    /// Delivers what it can within `timeout`; the rest stays in (or goes to) the spool.
    fn shutdown(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let _ = self.out.shared.stop.set(deadline);
        self.out.shared.wake_replay();
        if let Some(r) = self.replayer.take() {
            let _ = r.join();
        }
        if self.out.producer.flush(deadline.saturating_duration_since(Instant::now())).is_err() {
            let left = self.out.producer.in_flight_count();
            warn!(left, "broker did not take everything before shutdown; spooling the rest");
            self.out.producer.purge(PurgeConfig::default().queue().inflight());
            // Purged messages come back through delivery reports: live ones
            // to `retry`; replayed ones are still in their segment.
            let _ = self.out.producer.flush(Duration::from_secs(2));
        }
        let retry: Vec<Vec<u8>> = self.out.shared.retry.lock().unwrap().drain(..).collect();
        let retry_records = retry.iter().map(|r| records_in(r)).sum();
        let (prepended, sealed, left) = self.out.shared.with_spool(|sp| {
            let prepended = if retry.is_empty() { Ok(()) } else { sp.prepend(&retry) };
            (prepended, sp.seal(), sp.records())
        });
        match prepended {
            Ok(()) => m::spooled("shutdown", retry_records),
            Err(e) => {
                m::dropped("spool_error", retry_records);
                warn!(records = retry.len(), "spooling undelivered records failed, they are lost: {e}");
            }
        }
        if let Err(e) = sealed {
            warn!("writing the spool at shutdown: {e}");
        }
        if left > 0 {
            info!(records = left, "records left in the spool for the next run");
        }
    }
}

impl Sink for KafkaSink {
    fn send(&mut self, flow: &mut Flow) -> std::io::Result<()> {
        self.send_flow(flow);
        Ok(())
    }

    /// After each drain of the ring buffer: what it spooled leaves the
    /// process's buffer (one write per batch), so a crash cannot lose it.
    fn flush(&mut self) -> std::io::Result<()> {
        self.send_batch();
        if let Err(e) = self.out.shared.with_spool(Spool::write_out) {
            self.out.shared.warn_once("spool_error", format_args!("spool write failed, records lost (counted): {e}"));
        }
        Ok(())
    }

    fn tick(&mut self, tick: Tick) {
        match tick {
            Tick::Heartbeat => self.send_identity(IdentityReason::Heartbeat),
            Tick::IdentityCheck => self.check_identity(),
            Tick::WorkloadIps => self.send_identity(IdentityReason::IpChange),
            Tick::Stats => gauge!(m::KAFKA_QUEUE).set(self.out.producer.in_flight_count() as f64),
        }
    }

    /// Announces the stop (STOP), then delivers or spools what is left.
    fn close(mut self: Box<Self>, timeout: Duration) {
        self.send_batch();
        self.send_identity(IdentityReason::Stop);
        self.shutdown(timeout);
    }
}

/// The replay thread: sends the spool back, oldest segment first, whenever
/// the broker answers; also the spool's fsync timer.
struct Replayer {
    producer: Arc<PolledProducer<Ctx>>,
    shared: Arc<Shared>,
    topic: String,
    key: String,
}

impl Replayer {
    fn run(self) {
        let mut last_probe: Option<Instant> = None;
        while !self.shared.stopping() {
            self.shared.sync_spool();
            self.shared.spool_retries();
            if !self.ready(&mut last_probe) {
                self.shared.nap();
                continue;
            }
            match self.shared.with_spool(|sp| sp.lease()) {
                Ok(Some(lease)) => self.replay(lease),
                Ok(None) => self.shared.nap(),
                Err(e) => {
                    self.shared.warn_once("spool_error", format_args!("spool write failed, records lost (counted): {e}"));
                    self.shared.nap();
                }
            }
        }
    }

    /// Something is spooled, the broker answers, and nothing older is in flight.
    fn ready(&self, last_probe: &mut Option<Instant>) -> bool {
        if self.shared.spool.lock().unwrap().is_empty() {
            return false;
        }
        if !self.shared.healthy.load(Ordering::Relaxed) {
            if last_probe.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return false;
            }
            *last_probe = Some(Instant::now());
            if self.producer.client().fetch_metadata(Some(&self.topic), Duration::from_secs(2)).is_err() {
                return false;
            }
            info!("broker reachable again; replaying the spool");
            self.shared.set_healthy(true);
        }
        // Everything older must be settled first, or replayed records could
        // overtake it.
        self.producer.in_flight_count() == 0
    }

    /// Sends one leased segment and settles it: its file is deleted once
    /// every record is acknowledged (or can never be), else cut down to the
    /// records still unacknowledged.
    fn replay(&self, mut lease: spool::Lease) {
        // Read without the spool's lock: capture never waits on this.
        let (records, corrupt) = match lease.read() {
            Ok(r) => r,
            Err(e) => {
                // Unreadable: its records are lost (counted), not retried for ever.
                m::dropped("spool_error", lease.records);
                self.shared.warn_once("spool_error", format_args!("reading a spool segment failed, {} records lost: {e}", lease.records));
                let _ = lease.keep([]);
                self.shared.with_spool(|sp| sp.settle(lease, 0, 0));
                return;
            }
        };
        if corrupt > 0 {
            m::dropped("spool_corrupt", corrupt);
            self.shared.warn_once("spool_corrupt", "a spool segment ends in a torn or corrupt record (crash mid-write); skipped");
        }
        *self.shared.acks.lock().unwrap() = Acks { outcome: vec![Outcome::Pending; records.len()], reported: 0 };
        let sent = self.send(&records);
        if sent == records.len() {
            self.shared.with_spool(|sp| {
                let last = sp.only_leased() && !self.shared.in_hand.load(Ordering::Relaxed) && self.shared.retry.lock().unwrap().is_empty();
                self.shared.handed_off.store(last, Ordering::Relaxed);
            });
        }
        let outcome = self.wait_for(sent);
        let left: Vec<&[u8]> = records
            .iter()
            .zip(&outcome)
            .filter(|(_, o)| matches!(o, Outcome::Pending | Outcome::Failed))
            .map(|(r, _)| &r[..])
            .collect();
        let (n, bytes) = match lease.keep(left.iter().copied()) {
            Ok(bytes) => (left.iter().map(|r| records_in(r)).sum(), bytes),
            Err(e) => {
                // The old file is still whole: all of it is sent again.
                self.shared.warn_once("spool_error", format_args!("updating a replayed spool segment failed (its records will be sent again): {e}"));
                (lease.records, lease.bytes)
            }
        };
        self.shared.with_spool(|sp| {
            sp.settle(lease, n, bytes);
            self.shared.handed_off.store(false, Ordering::Relaxed);
        });
    }

    /// Produces `records` in order, each tagged with its index; returns how
    /// many it handled. It stops early at shutdown, or when the producer
    /// refuses one for a reason that may pass (the rest stay spooled).
    fn send(&self, records: &[Vec<u8>]) -> usize {
        for (i, r) in records.iter().enumerate() {
            loop {
                if self.shared.stopping() {
                    return i;
                }
                let rec = BaseRecord::with_opaque_to(&self.topic, REPLAYED | i).key(self.key.as_str()).payload(&r[..]);
                match self.producer.send(rec) {
                    Ok(()) => {
                        let n = records_in(r);
                        counter!(m::FLOWS_PRODUCED).increment(n);
                        counter!(m::FLOWS_REPLAYED).increment(n);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                        self.shared.sync_spool();
                        thread::sleep(Duration::from_millis(10));
                    }
                    Err((e, _)) => match kafka::undeliverable(&e) {
                        Some(reason) => {
                            self.shared.undeliverable(reason, records_in(r), &e);
                            self.shared.report(i, Outcome::Dropped);
                            break;
                        }
                        None => {
                            self.shared.warn_once("replay", format_args!("replay paused, the producer refused a record: {e}"));
                            self.shared.set_healthy(false);
                            return i;
                        }
                    },
                }
            }
        }
        records.len()
    }

    /// Waits for the delivery reports of the first `sent` records (at
    /// shutdown, until its deadline at most); returns every record's outcome.
    fn wait_for(&self, sent: usize) -> Vec<Outcome> {
        loop {
            let mut acks = self.shared.acks.lock().unwrap();
            let past_deadline = self.shared.stop.get().is_some_and(|d| Instant::now() >= *d);
            if acks.reported >= sent || past_deadline {
                // Reports still to come (at shutdown) find nothing to mark.
                return std::mem::take(&mut *acks).outcome;
            }
            drop(self.shared.acked.wait_timeout(acks, Duration::from_millis(100)).unwrap());
            self.shared.sync_spool();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{flow_from_event, Clock, Comms};
    use flowlog_common::{direction, flags, tcp_state, FlowEvent, AF_INET6, FLOW_EVENT_KIND_V2};

    /// The sidecar's path (kernel event -> record -> numbered message) read
    /// by the enricher's decoder: every field arrives as the sidecar meant it.
    #[test]
    fn enricher_decodes_what_the_sidecar_encodes() {
        let mut local = [0u8; 16];
        local[15] = 1;
        let ev = FlowEvent {
            kind: FLOW_EVENT_KIND_V2,
            family: AF_INET6,
            direction: direction::SERVER,
            old_state: tcp_state::LAST_ACK,
            flags: flags::OPEN_SEEN | flags::OWNER_AT_OPEN | flags::SND_ALL_ACKED | flags::FIN_RECEIVED,
            local_port: 443,
            remote_port: 50_000,
            sk_err: 0,
            local_addr: local,
            remote_addr: "2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets(),
            start_ns: 1_000,
            end_ns: 501_000,
            bytes_acked: 1_000_004,
            bytes_received: 12_346,
            cgroup_id: 99,
            state_path: 0xa3_1897,
            segs_in: 10,
            segs_out: 700,
            total_retrans: 3,
            srtt_us: 250,
            rtt_min_us: 90,
            tgid: 4242,
            tid: 4243,
            netns_ino: 4026531840,
            comm: *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
            sk: 0xffff_8880_0000_2000,
            limits: Default::default(),
        };
        let mut record = flow_from_event(&ev, &Clock::fixed(1_700_000_000_000_000_000), 7, &mut Comms::default());
        // As the workload resolver fills it in for a pod's container.
        record.workload = Some(std::sync::Arc::new(crate::workload::cgroup::classify(
            "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod7f3e1c2a_9b4d_4e5f_8a6b_0c1d2e3f4a5b.slice/\
             cri-containerd-4c01db0b339c4c01db0b339c4c01db0b339c4c01db0b339c4c01db0b339cabcd.scope",
        )));
        assert_eq!(record.workload.as_deref(), Some(&flowlog_schema::fixtures::pod_workload()));
        let host = flowlog_schema::fixtures::host();
        let mut enc = FlowEncoder::new(123, &host);
        enc.encode(&mut record.clone());
        let msg = enc.encode(&mut record).to_vec();

        let (h, f) = flowlog_enricher::decode::Decoder::new().flow(&msg).unwrap();
        assert_eq!(h.identity, host);
        assert_eq!(f, record);
        assert_eq!((f.sequence_epoch, f.sequence), (123, 1));
        assert_eq!((f.bytes_sent, f.bytes_received), (1_000_003, 12_345));
        assert_eq!(f.local_addr.to_string(), "::1");
        assert_eq!(f.remote_port, 50_000);
        assert_eq!(f.start_time_ns, Some(1_700_000_000_000_001_000));
        assert_eq!(f.end_reason, flowlog_schema::EndReason::Normal);
        assert_eq!(f.state_path.iter().collect::<Vec<_>>(), ["LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE_WAIT", "LAST_ACK", "CLOSE"]);
        assert_eq!((f.pid, f.tid, f.comm.as_str(), f.cgroup_id), (4242, 4243, "nginx", 99));
    }

    /// Each workload's and state path's bytes are encoded once and reused:
    /// the messages are those of the plain encoding, whichever workload (or
    /// none) a record has, an equal workload behind another Arc, and state
    /// paths coming back after more than the cache holds.
    #[test]
    fn reused_workload_bytes_are_the_plain_encoding() {
        use flowlog_schema::fixtures;
        let pod = Arc::new(fixtures::pod_workload());
        let other = Arc::new(Workload { name: Some("other".into()), ..fixtures::pod_workload() });
        let again = Arc::new(fixtures::pod_workload());
        let host = fixtures::host();
        let mut enc = FlowEncoder::new(5, &host);
        let mut batch = BatchWriter::new(host.encode());
        let mut plain = Vec::new();
        let mut check = |mut record: Flow, what: &str| {
            let mut first = record.clone();
            enc.encode_into(&mut first, &mut batch);
            plain.push(Vec::new());
            first.to_message(&host.encode(), plain.last_mut().unwrap());
            let got = enc.encode(&mut record).to_vec();
            let mut want = Vec::new();
            record.to_message(&host.encode(), &mut want);
            assert_eq!(got, want, "{what}");
            let (_, f) = flowlog_enricher::decode::Decoder::new().flow(&got).unwrap();
            assert_eq!((f.workload, f.state_path), (record.workload, record.state_path), "{what}");
        };
        for (i, w) in [Some(&pod), Some(&pod), None, Some(&other), Some(&pod), Some(&again), None].into_iter().enumerate() {
            check(Flow { workload: w.cloned(), pid: i as i32, ..fixtures::flow() }, &format!("workload {i}"));
        }
        // 13 paths (one empty), twice, then backwards: more than the cache holds.
        let paths: Vec<StatePath> = (0..13u8)
            .map(|k| {
                let mut p = StatePath::default();
                (0..k).for_each(|j| p.push(1 + (j + k) % 12));
                p
            })
            .collect();
        for (i, p) in paths.iter().chain(&paths).chain(paths.iter().rev()).enumerate() {
            check(Flow { state_path: *p, ..fixtures::flow() }, &format!("path {i}"));
        }
        let batched = batch.take(|msg| flowlog_schema::flow_messages(msg).unwrap().map(|i| i.message().into_owned()).collect::<Vec<_>>());
        assert_eq!(batched, plain);
    }
}
