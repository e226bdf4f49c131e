//! A real local Kafka-protocol broker (tansu, flowlog_runtime::testkit) for
//! tests, and reading back what the sidecar produced to it.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use apache_avro::{types::Value, GenericSingleObjectReader, Schema};
use flowlog_runtime::testkit::{self, BrokerSpec};
use rdkafka::{
    consumer::{BaseConsumer, Consumer},
    message::Headers,
    ClientConfig, Message, TopicPartitionList,
};

pub const FLOWS: &str = "flowlog.flows";
pub const IDENTITY: &str = "flowlog.identity";

/// True when the broker can be used; otherwise skips (or fails under `make test`).
pub fn have_broker() -> bool {
    testkit::have_tools(&[testkit::TANSU])
}

/// A broker with the sidecar's two topics.
pub fn spec(name: &str) -> BrokerSpec<'_> {
    BrokerSpec { name, topics: &[FLOWS, IDENTITY], ..BrokerSpec::default() }
}

/// One consumed record, decoded with apache-avro against the committed
/// schema: a message's, or one item of a FlowBatch message's (read with
/// apache-avro and schemas/flow_batch.avsc too).
#[derive(Debug, Clone)]
pub struct Consumed {
    pub key: String,
    /// Kafka headers on the message (none: the payload says its schema).
    pub headers: usize,
    /// The schema fingerprint of the record's single-object header.
    pub fingerprint: [u8; 8],
    /// Records in its Kafka message (1: not a FlowBatch).
    pub in_message: usize,
    pub value: Value,
}

/// Reads every message of `topic` (partition 0) until `until` holds or no
/// message came for `timeout` (a stall, not a total: a loaded machine reads
/// a long topic slowly, and that is no failure).
pub fn consume(brokers: &str, topic: &str, schema_json: &str, timeout: Duration, until: impl Fn(&[Consumed]) -> bool) -> Vec<Consumed> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("flowlog-test-{}", std::process::id()))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "50")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, rdkafka::Offset::Beginning).unwrap();
    consumer.assign(&tpl).unwrap();
    let reader = GenericSingleObjectReader::new(Schema::parse_str(schema_json).unwrap()).unwrap();
    let batches = GenericSingleObjectReader::new(flowlog_schema::FLOW_BATCH.parse()).unwrap();
    let mut out = Vec::new();
    let mut last_progress = Instant::now();
    while last_progress.elapsed() < timeout && !until(&out) {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let payload = m.payload().expect("payload");
                let records = if payload.get(2..10) == Some(&flowlog_schema::FLOW_BATCH.fingerprint()[..]) {
                    let batch = batches.read_value(&mut &payload[..]).expect("a FlowBatch decodes with apache-avro");
                    let Value::Array(items) = field(&batch, "flows") else { panic!("flows is not an array") };
                    // Each record as the whole Flow message it stands for
                    // (header, the batch's host block, the item), which
                    // apache-avro then reads with the Flow schema.
                    let whole: Vec<Vec<u8>> =
                        flowlog_schema::flow_messages(payload).expect("splits").map(|r| r.message().into_owned()).collect();
                    assert_eq!(items.len(), whole.len());
                    for (item, w) in items.iter().zip(&whole) {
                        let Value::Bytes(b) = item else { panic!("item {item:?}") };
                        assert!(w.ends_with(b));
                    }
                    whole
                } else {
                    vec![payload.to_vec()]
                };
                for record in &records {
                    out.push(Consumed {
                        key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                        headers: m.headers().map_or(0, |h| h.count()),
                        fingerprint: record[2..10].try_into().expect("single-object header"),
                        in_message: records.len(),
                        value: reader.read_value(&mut &record[..]).expect("decodes with apache-avro"),
                    });
                }
            }
            Some(Err(e)) => eprintln!("consume error: {e}"),
            None => {}
        }
    }
    out
}

pub fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    let Value::Record(fields) = v else { panic!("not a record: {v:?}") };
    &fields.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no field {name}")).1
}

pub fn long(v: &Value, name: &str) -> i64 {
    match field(v, name) {
        Value::Long(x) => *x,
        Value::Int(x) => *x as i64,
        other => panic!("{name} is {other:?}"),
    }
}

pub fn enum_sym(v: &Value, name: &str) -> String {
    match field(v, name) {
        Value::Enum(_, s) => s.clone(),
        other => panic!("{name} is {other:?}"),
    }
}
