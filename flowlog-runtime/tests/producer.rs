//! The producer whose delivery reports a thread serves
//! (`flowlog_runtime::producer`), on the real local broker (tansu over TCP):
//! every report comes without the caller polling, burst after burst (each
//! lands on an empty queue, the case librdkafka's wake-up is for), and
//! dropping the producer stops its thread.
use std::{
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use flowlog_runtime::{
    producer::PolledProducer,
    testkit::{have_tools, Broker, BrokerSpec, TANSU},
};
use rdkafka::{
    producer::{BaseProducer, BaseRecord, DeliveryResult, ProducerContext},
    ClientConfig, ClientContext,
};

#[derive(Clone, Default)]
struct Reports {
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl ClientContext for Reports {}

impl ProducerContext for Reports {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        let n = if result.is_ok() { &self.ok } else { &self.failed };
        n.fetch_add(1, Ordering::Relaxed);
    }
}

#[test]
fn every_report_is_served_without_polling_and_drop_stops_the_thread() {
    if !have_tools(&[TANSU]) {
        return;
    }
    let broker = Broker::start(&BrokerSpec { name: "producer", topics: &["reports"], memory: true, ..BrokerSpec::default() })
        .expect("broker");
    let reports = Reports::default();
    let producer: BaseProducer<Reports> = ClientConfig::new()
        .set("bootstrap.servers", &broker.addr)
        .set("linger.ms", "5")
        .create_with_context(reports.clone())
        .expect("producer");
    let producer = PolledProducer::new(producer, "test-reports").expect("report thread");
    const BURST: u64 = 1000;
    for burst in 1..=3u64 {
        for i in 0..BURST {
            let payload = format!("burst {burst} record {i}");
            producer.send(BaseRecord::<(), _, ()>::to("reports").payload(&payload)).expect("queued");
        }
        // Nobody but the report thread polls: the count can only grow there.
        let deadline = Instant::now() + Duration::from_secs(60);
        while reports.ok.load(Ordering::Relaxed) + reports.failed.load(Ordering::Relaxed) < burst * BURST {
            assert!(Instant::now() < deadline, "reports after burst {burst}: {} ok, {} failed", reports.ok.load(Ordering::Relaxed), reports.failed.load(Ordering::Relaxed));
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    assert_eq!(reports.ok.load(Ordering::Relaxed), 3 * BURST);
    assert_eq!(reports.failed.load(Ordering::Relaxed), 0);
    let threads = || std::fs::read_dir("/proc/self/task").unwrap().filter(|t| {
        std::fs::read_to_string(t.as_ref().unwrap().path().join("comm")).is_ok_and(|c| c.trim() == "test-reports")
    }).count();
    assert_eq!(threads(), 1);
    drop(producer);
    assert_eq!(threads(), 0, "the report thread outlived its producer");
}
