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
use tokio::sync::watch;
use rdkafka::{
    error::{KafkaError, RDKafkaErrorCode},
    message::{Header, OwnedHeaders},
    producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, PurgeConfig, ThreadedProducer},
    ClientContext, Message,
};
use tracing::{info, warn};

use flowlog_schema::{schemas::FINGERPRINT_HEADER, Flow, HostIdentity, Identity, IdentityReason, FLOW, IDENTITY};

use crate::{
    identity::IdentityConfig,
    metrics as m,
    sink::{Sink, Tick},
    workload::addresses::Listing,
};

pub use kafka::KafkaConfig;
pub use spool::{Spool, SpoolConfig};

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

/// Numbers this host's flow records (epoch + sequence 0, 1, 2, ...) and
/// encodes them with the host block, which is encoded once per identity.
pub struct FlowEncoder {
    pub epoch: i64,
    pub next_sequence: i64,
    pub host_block: Vec<u8>,
    buf: Vec<u8>,
}

impl FlowEncoder {
    pub fn new(epoch: i64, host: &HostIdentity) -> FlowEncoder {
        FlowEncoder { epoch, next_sequence: 0, host_block: host.encode(), buf: Vec::with_capacity(512) }
    }

    /// The record's message (valid until the next call).
    pub fn encode(&mut self, r: &mut Flow) -> &[u8] {
        r.sequence_epoch = self.epoch;
        r.sequence = self.next_sequence;
        self.next_sequence += 1;
        self.buf.clear();
        r.to_message(&self.host_block, &mut self.buf);
        &self.buf
    }
}

/// The Kafka side of the sidecar.
pub struct KafkaSink {
    producer: Arc<ThreadedProducer<Ctx>>,
    shared: Arc<Shared>,
    cfg: KafkaConfig,
    flow_fp: String,
    identity_fp: String,
    /// Where the host's identity comes from (re-read for IP changes).
    identity: IdentityConfig,
    host: HostIdentity,
    /// The local workloads' IPs (workload::addresses), announced with the host's.
    workload_ips: Option<watch::Receiver<Listing>>,
    encoder: FlowEncoder,
    replayer: Option<thread::JoinHandle<()>>,
    produced: metrics::Counter,
}

impl KafkaSink {
    /// Starts the producer and the replay thread, and announces the host (START).
    pub fn new(
        cfg: KafkaConfig,
        spool_cfg: SpoolConfig,
        identity: IdentityConfig,
        workload_ips: Option<watch::Receiver<Listing>>,
    ) -> anyhow::Result<KafkaSink> {
        let host = identity.current();
        info!(host_id = %host.host_id, ips = ?host.ips, brokers = %cfg.brokers, "producing to Kafka");
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
        let epoch = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos() as i64;
        let replayer = {
            let (producer, shared, topic) = (producer.clone(), shared.clone(), cfg.flow_topic.clone());
            let key = host.host_id.clone();
            let fp = FLOW.fingerprint_hex();
            thread::Builder::new()
                .name("flowlog-replay".into())
                .spawn(move || replay_loop(&producer, &shared, &topic, &key, &fp))?
        };
        let mut sink = KafkaSink {
            encoder: FlowEncoder::new(epoch, &host),
            host,
            identity,
            workload_ips,
            producer,
            shared,
            flow_fp: FLOW.fingerprint_hex(),
            identity_fp: IDENTITY.fingerprint_hex(),
            cfg,
            replayer: Some(replayer),
            produced: counter!(m::FLOWS_PRODUCED),
        };
        sink.send_identity(IdentityReason::Start);
        Ok(sink)
    }

    /// Re-reads this host's identity and announces a change at once.
    fn check_identity(&mut self) {
        let now = self.identity.current();
        if now != self.host {
            info!(ips = ?now.ips, "host identity changed");
            self.encoder.host_block = now.encode();
            self.host = now;
            self.send_identity(IdentityReason::IpChange);
        }
    }

    /// Numbers, encodes and produces one flow record.
    fn send_flow(&mut self, r: &mut Flow) {
        // Every 8th record is timed for the delivery-latency histogram.
        let timed = (self.encoder.next_sequence + 1) % 8 == 0;
        let msg = self.encoder.encode(r);
        // Keep order: while anything is spooled (or being replayed), queue behind it.
        let backlog = self.shared.replaying.load(Ordering::Relaxed)
            || !self.shared.retry.lock().unwrap().is_empty()
            || !self.shared.spool.lock().unwrap().is_empty();
        if backlog {
            self.shared.spool(msg, "backlog");
            return;
        }
        if !self.shared.healthy.load(Ordering::Relaxed) {
            self.shared.spool(msg, "broker_down");
            return;
        }
        let headers = OwnedHeaders::new().insert(Header { key: FINGERPRINT_HEADER, value: Some(self.flow_fp.as_str()) });
        let sent = if timed { sent_timed() } else { SENT_UNTIMED };
        let rec = BaseRecord::with_opaque_to(&self.cfg.flow_topic, sent)
            .key(self.host.host_id.as_str())
            .payload(msg)
            .headers(headers);
        match self.producer.send(rec) {
            Ok(()) => self.produced.increment(1),
            Err((e, _)) => {
                let reason = match e {
                    KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => "queue_full",
                    _ => "produce_error",
                };
                self.shared.spool(msg, reason);
            }
        }
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

    /// Delivers what it can within `timeout`; the rest goes to the spool.
    fn shutdown(mut self, timeout: Duration) {
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

impl Sink for KafkaSink {
    fn send(&mut self, flow: &mut Flow) -> std::io::Result<()> {
        self.send_flow(flow);
        Ok(())
    }

    fn tick(&mut self, tick: Tick) {
        match tick {
            Tick::Heartbeat => self.send_identity(IdentityReason::Heartbeat),
            Tick::IdentityCheck => self.check_identity(),
            Tick::WorkloadIps => self.send_identity(IdentityReason::IpChange),
            Tick::Stats => gauge!(m::KAFKA_QUEUE).set(self.producer.in_flight_count() as f64),
        }
    }

    /// Announces the stop (STOP), then delivers or spools what is left.
    fn close(mut self: Box<Self>, timeout: Duration) {
        self.send_identity(IdentityReason::Stop);
        self.shutdown(timeout);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flow::{flow_from_event, Clock};
    use flowlog_common::{direction, flags, tcp_state, FlowEvent, AF_INET6, FLOW_EVENT_KIND_V1};

    /// The sidecar's path (kernel event -> record -> numbered message) read
    /// by the enricher's decoder: every field arrives as the sidecar meant it.
    #[test]
    fn enricher_decodes_what_the_sidecar_encodes() {
        let mut local = [0u8; 16];
        local[15] = 1;
        let ev = FlowEvent {
            kind: FLOW_EVENT_KIND_V1,
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
        };
        let mut record = flow_from_event(&ev, &Clock::fixed(1_700_000_000_000_000_000), 7);
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
}
