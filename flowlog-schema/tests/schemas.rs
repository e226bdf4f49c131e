//! The hand-written codecs against the committed `.avsc` files, through
//! apache-avro (an independent implementation): every field and every enum
//! symbol, both directions, and backward compatibility with every released
//! schema version.

use std::{collections::BTreeMap, sync::Arc};

use apache_avro::{
    schema_compatibility::SchemaCompatibility, types::Value, GenericSingleObjectReader, Schema,
};
use flowlog_schema::{
    container::{Codec, ContainerWriter},
    decode_flow, fixtures,
    schemas::{ALL, ENRICHED_FLOW, FLOW, FLOW_BATCH, FLOW_V1, FLOW_V2, FLOW_V3, IDENTITY},
    flow_messages, BatchWriter,
    Attribution, Attrs, DecodeError, Direction, EndReason, EnrichedFlow, Family, Flow, Host, HostIdentity,
    Identity, IdentityReason, Limits, WorkloadIps, OwnerSource, RecordType, Source, Unattributed, Workload, WorkloadKind, WorkloadReason,
    Encoder, Writer,
};
use serde_json::Value as Json;

fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
    let Value::Record(fields) = v else { panic!("not a record: {v:?}") };
    &fields.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no field {name}")).1
}
fn s(v: &str) -> Value {
    Value::String(v.into())
}
fn some(v: Value) -> Value {
    Value::Union(1, Box::new(v))
}
fn null() -> Value {
    Value::Union(0, Box::new(Value::Null))
}

/// The JSON object of every named type in a schema, by name.
fn named_types(j: &Json, out: &mut BTreeMap<String, Json>) {
    match j {
        Json::Object(o) => {
            if let Some(Json::String(n)) = o.get("name") {
                if o.get("type").is_some_and(|t| t == "enum" || t == "record") {
                    out.insert(n.clone(), j.clone());
                }
            }
            o.values().for_each(|v| named_types(v, out));
        }
        Json::Array(a) => a.iter().for_each(|v| named_types(v, out)),
        _ => {}
    }
}

/// A record or enum that several schemas define (each .avsc must stand
/// alone) is defined the same in each: one definition, copied.
#[test]
fn shared_types_are_defined_alike() {
    let mut seen: BTreeMap<String, (&str, Json)> = BTreeMap::new();
    for def in ALL {
        let mut types = BTreeMap::new();
        named_types(&serde_json::from_str(def.json).unwrap(), &mut types);
        for (name, t) in types {
            match seen.get(&name) {
                Some((first, t0)) => assert_eq!(t0, &t, "{name} differs between {first}.avsc and {}.avsc", def.name),
                None => drop(seen.insert(name, (def.name, t))),
            }
        }
    }
}

#[test]
fn enum_symbols_match_the_schemas() {
    let mut types = BTreeMap::new();
    for def in ALL {
        named_types(&serde_json::from_str(def.json).unwrap(), &mut types);
    }
    let avro_enums: [(&str, &[&str]); 8] = [
        (RecordType::DECLARED_IN, RecordType::SYMBOLS),
        (Family::DECLARED_IN, Family::SYMBOLS),
        (Direction::DECLARED_IN, Direction::SYMBOLS),
        (EndReason::DECLARED_IN, EndReason::SYMBOLS),
        (OwnerSource::DECLARED_IN, OwnerSource::SYMBOLS),
        (IdentityReason::DECLARED_IN, IdentityReason::SYMBOLS),
        (WorkloadKind::DECLARED_IN, WorkloadKind::SYMBOLS),
        (WorkloadReason::DECLARED_IN, WorkloadReason::SYMBOLS),
    ];
    for (name, symbols) in avro_enums {
        let t = types.get(name).unwrap_or_else(|| panic!("no enum {name} in schemas/"));
        assert_eq!(t["symbols"], serde_json::json!(symbols), "enum {name}");
    }
    // String fields whose doc lists the symbols, in order (the enriched
    // workload's enums as text: every symbol the enricher can write).
    for (at, symbols) in [
        (Source::DECLARED_IN, Source::SYMBOLS),
        (Unattributed::DECLARED_IN, Unattributed::SYMBOLS),
        ("WorkloadInfo.kind", WorkloadKind::SYMBOLS),
        ("WorkloadInfo.reason", &WorkloadReason::SYMBOLS[1..]),
    ] {
        let (record, name) = at.split_once('.').unwrap();
        let f = types[record]["fields"].as_array().unwrap().iter().find(|f| f["name"] == name).unwrap();
        let doc = f["doc"].as_str().unwrap();
        let at: Vec<usize> = symbols.iter().map(|s| doc.find(s).unwrap_or_else(|| panic!("{s} not in {record}.{name}'s doc"))).collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "{record}.{name}: symbols in another order than its doc");
    }
}

fn sample_flow() -> (HostIdentity, Flow) {
    let mut h = fixtures::host();
    h.instance_id = Some("i-0abc".into());
    h.ips.push("fe80::1".into());
    let mut f = fixtures::flow();
    f.family = Family::Ipv6;
    f.direction = Direction::Server;
    f.local_addr = "::1".parse().unwrap();
    f.remote_addr = "2001:db8::7".parse().unwrap();
    f.start_time_ns = Some(1_700_000_000_000_000_000);
    f.end_time_ns = 1_700_000_000_500_000_000;
    f.retransmits = 3;
    f.end_reason = EndReason::ResetReceived;
    f.error = Some("ECONNRESET".into());
    f.state_path = flowlog_schema::StatePath(0xa31a);
    f.workload = Some(Arc::new(every_workload_field()));
    (h, f)
}

/// A workload with every field set (not a combination the sidecar makes:
/// a codec test). One label: apache-avro's map is a HashMap, the
/// byte-for-byte comparison needs one order.
fn every_workload_field() -> Workload {
    Workload {
        reason: Some(WorkloadReason::UnknownRuntime),
        name: Some("web-0".into()),
        cgroup_path: Some("/kubepods/pod1/x".into()),
        ..fixtures::named_pod_workload()
    }
}

/// The fields of a Workload (or WorkloadInfo) value, checked one by one;
/// `kind`/`reason` as apache-avro reads them from that record.
fn check_workload(v: &Value, kind: Value, reason: Value) {
    let w = fixtures::pod_workload();
    let Value::Union(1, v) = v else { panic!("workload is null: {v:?}") };
    let want = [
        ("kind", kind),
        ("reason", reason),
        ("name", some(s("web-0"))),
        ("namespace", some(s("shop"))),
        ("pod_uid", some(s(w.pod_uid.as_deref().unwrap()))),
        ("container_id", some(s(w.container_id.as_deref().unwrap()))),
        ("runtime", some(s("containerd"))),
        ("qos_class", some(s("Burstable"))),
        ("unit", some(s(w.unit.as_deref().unwrap()))),
        ("cgroup_path", some(s("/kubepods/pod1/x"))),
        ("container_name", some(s("web"))),
        ("owner_kind", some(s("Deployment"))),
        ("owner_name", some(s("web"))),
        ("labels", Value::Map([("app".to_string(), s("web"))].into())),
    ];
    let Value::Record(fields) = &**v else { panic!() };
    assert_eq!(fields.len(), want.len(), "a field of Workload is not checked here");
    for (name, value) in want {
        assert_eq!(field(v, name), &value, "workload.{name}");
    }
}

/// `limits` as fixtures::limits() wrote it, field by field.
fn check_limits(v: &Value) {
    let Value::Union(1, l) = v else { panic!("limits is present: {v:?}") };
    let want = [
        ("busy_us", Value::Long(8_000)),
        ("rwnd_limited_us", Value::Long(4_000)),
        ("sndbuf_limited_us", Value::Long(0)),
        ("delivery_rate_bytes_per_s", Value::Long(1_250_000)),
        ("bytes_retrans", Value::Long(1_448)),
        ("reordering", Value::Long(3)),
        ("reord_seen", Value::Long(0)),
        ("rto_count", some(Value::Long(1))),
        ("rto_recoveries", some(Value::Long(1))),
        ("rto_time_ms", some(Value::Long(204))),
    ];
    let Value::Record(fields) = &**l else { panic!() };
    assert_eq!(fields.len(), want.len(), "a field of Limits is not checked here");
    for (name, value) in want {
        assert_eq!(field(l, name), &value, "limits.{name}");
    }
}

/// apache-avro decodes our encoding against the committed schema with every
/// field as written; its own encoding of that value is ours byte for byte,
/// and our decoder reads it back to the same record.
#[test]
fn flow_matches_apache_avro_field_by_field() {
    let (h, f) = sample_flow();
    let msg = fixtures::flow_message(&h, &f);
    let schema = FLOW.parse();
    let v = GenericSingleObjectReader::new(schema.clone()).unwrap().read_value(&mut &msg[..]).unwrap();
    let host = field(&v, "host");
    assert_eq!(field(host, "host_id"), &s("h1"));
    assert_eq!(field(host, "hostname"), &s("box"));
    assert_eq!(field(host, "instance_id"), &some(s("i-0abc")));
    assert_eq!(field(host, "workload"), &some(s("web")));
    assert_eq!(field(host, "labels"), &Value::Map([("team".to_string(), s("net"))].into()));
    assert_eq!(field(host, "ips"), &Value::Array(vec![s("10.0.0.1"), s("fe80::1")]));
    let mut lo = vec![0u8; 16];
    lo[15] = 1;
    let want = [
        ("sequence_epoch", Value::Long(5)),
        ("sequence", Value::Long(9)),
        ("connection_id", Value::Long(-3)),
        ("record_type", Value::Enum(0, "FINAL".into())),
        ("family", Value::Enum(1, "IPV6".into())),
        ("direction", Value::Enum(2, "SERVER".into())),
        ("local_addr", Value::Bytes(lo)),
        ("local_port", Value::Int(40000)),
        ("remote_addr", Value::Bytes("2001:db8::7".parse::<std::net::Ipv6Addr>().unwrap().octets().to_vec())),
        ("remote_port", Value::Int(443)),
        ("start_time_ns", some(Value::Long(1_700_000_000_000_000_000))),
        ("end_time_ns", Value::Long(1_700_000_000_500_000_000)),
        ("bytes_sent", Value::Long(12_345)),
        ("bytes_received", Value::Long(1_000_003)),
        ("segs_in", Value::Long(1)),
        ("segs_out", Value::Long(2)),
        ("retransmits", Value::Long(3)),
        ("srtt_us", Value::Int(100)),
        ("rtt_min_us", Value::Int(50)),
        ("end_reason", Value::Enum(3, "RESET_RECEIVED".into())),
        ("error", some(s("ECONNRESET"))),
        ("state_path", Value::Array(vec![s("LISTEN"), s("SYN_RECV"), s("ESTABLISHED"), s("LISTEN")])),
        ("pid", Value::Int(7)),
        ("tid", Value::Int(8)),
        ("comm", s("curl")),
        ("owner_source", Value::Enum(1, "OPEN".into())),
        ("cgroup_id", Value::Long(1)),
        ("netns_ino", Value::Long(2)),
    ];
    let Value::Record(fields) = &v else { panic!() };
    assert_eq!(fields.len(), want.len() + 3, "a field of flow.avsc is not checked here");
    for (name, value) in want {
        assert_eq!(field(&v, name), &value, "{name}");
    }
    check_workload(field(&v, "workload"), Value::Enum(1, "POD".into()), some(Value::Enum(4, "UNKNOWN_RUNTIME".into())));
    check_limits(field(&v, "limits"));
    assert_eq!(apache_avro::to_avro_datum(&schema, v).unwrap(), msg[10..]);
    let (host_back, back) = decode_flow(&msg, HostIdentity::decode).unwrap();
    assert_eq!((host_back, back), (h, f));
}

#[test]
fn flow_defaults_and_empty_collections_round_trip() {
    let mut h = fixtures::host();
    h.labels.clear();
    h.ips.clear();
    h.workload = None;
    let mut f = fixtures::flow();
    f.record_type = RecordType::Interim;
    f.end_reason = EndReason::Open;
    f.start_time_ns = None;
    f.state_path = Default::default();
    f.limits = Some(Limits { rto_count: None, rto_recoveries: None, rto_time_ms: None, ..fixtures::limits() });
    let msg = fixtures::flow_message(&h, &f);
    let v = apache_avro::from_avro_datum(&FLOW.parse(), &mut &msg[10..], None).unwrap();
    assert_eq!(field(&v, "record_type"), &Value::Enum(1, "INTERIM".into()));
    assert_eq!(field(&v, "end_reason"), &Value::Enum(0, "OPEN".into()));
    assert_eq!(field(&v, "start_time_ns"), &null());
    assert_eq!(field(&v, "state_path"), &Value::Array(vec![]));
    assert_eq!(field(field(&v, "host"), "labels"), &Value::Map(Default::default()));
    assert_eq!(field(&v, "workload"), &null());
    // A kernel without RTO totals (before 6.7): those three are null.
    let Value::Union(1, l) = field(&v, "limits") else { panic!() };
    assert_eq!(field(l, "rto_count"), &null());
    assert_eq!(field(l, "rto_time_ms"), &null());
    assert_eq!(decode_flow(&msg, HostIdentity::decode).unwrap(), (h.clone(), f.clone()));
    let f = Flow { limits: None, ..f };
    let msg = fixtures::flow_message(&h, &f);
    let v = apache_avro::from_avro_datum(&FLOW.parse(), &mut &msg[10..], None).unwrap();
    assert_eq!(field(&v, "limits"), &null());
    assert_eq!(decode_flow(&msg, HostIdentity::decode).unwrap(), (h.clone(), f.clone()));
    // A resolved workload: the optional fields it leaves empty are nulls.
    let f = Flow { workload: Some(Arc::new(Workload::unresolved(WorkloadReason::NoOwner, None))), ..f };
    let msg = fixtures::flow_message(&h, &f);
    let v = apache_avro::from_avro_datum(&FLOW.parse(), &mut &msg[10..], None).unwrap();
    let Value::Union(1, w) = field(&v, "workload") else { panic!() };
    assert_eq!(field(w, "kind"), &Value::Enum(0, "HOST".into()));
    assert_eq!(field(w, "reason"), &some(Value::Enum(1, "NO_OWNER".into())));
    assert_eq!(field(w, "pod_uid"), &null());
    assert_eq!(field(w, "owner_kind"), &null());
    assert_eq!(field(w, "labels"), &Value::Map(Default::default()));
    assert_eq!(decode_flow(&msg, HostIdentity::decode).unwrap(), (h, f));
}

/// A message of the previous version (history/flow.v1.avsc, written by
/// apache-avro with that schema and its fingerprint) still decodes, with no
/// workload: sidecars upgrade one by one and their spools replay old records.
#[test]
fn previous_flow_version_still_decodes() {
    let (h, mut f) = sample_flow();
    let v1 = FLOW_V1.parse();
    let current = apache_avro::from_avro_datum(&FLOW.parse(), &mut &fixtures::flow_message(&h, &f)[10..], None).unwrap();
    let Value::Record(mut fields) = current else { panic!() };
    assert_eq!(fields.pop().map(|(n, _)| n).as_deref(), Some("limits"), "v4 appended limits last");
    assert_eq!(fields.pop().map(|(n, _)| n).as_deref(), Some("workload"), "v2 appended workload last");
    let mut msg = FLOW_V1.header().to_vec();
    msg.extend(apache_avro::to_avro_datum(&v1, Value::Record(fields)).unwrap());
    assert_ne!(FLOW_V1.fingerprint(), FLOW.fingerprint());
    f.workload = None;
    f.limits = None;
    assert_eq!(decode_flow(&msg, HostIdentity::decode).unwrap(), (h, f));
    // Any other fingerprint is still refused.
    msg[3] ^= 1;
    assert!(matches!(decode_flow(&msg, HostIdentity::decode), Err(DecodeError::UnknownFingerprint(_))));
}

/// A message of v2 (history/flow.v2.avsc: a workload without the
/// Kubernetes API's fields, which v3 appended) still decodes, those fields
/// empty; an enum symbol v3 added is never in it.
#[test]
fn flow_v2_still_decodes() {
    let (h, mut f) = sample_flow();
    let current = apache_avro::from_avro_datum(&FLOW.parse(), &mut &fixtures::flow_message(&h, &f)[10..], None).unwrap();
    let Value::Record(mut fields) = current else { panic!() };
    assert_eq!(fields.pop().map(|(n, _)| n).as_deref(), Some("limits"), "v4 appended limits last");
    let Some((_, Value::Union(1, w))) = fields.last_mut() else { panic!("workload is last") };
    let Value::Record(wf) = &mut **w else { panic!() };
    let appended: Vec<String> = wf.drain(wf.len() - 4..).map(|(n, _)| n).collect();
    assert_eq!(appended, ["container_name", "owner_kind", "owner_name", "labels"], "v3 appended these to Workload");
    let mut msg = FLOW_V2.header().to_vec();
    msg.extend(apache_avro::to_avro_datum(&FLOW_V2.parse(), Value::Record(fields)).unwrap());
    assert_ne!(FLOW_V2.fingerprint(), FLOW.fingerprint());
    f.limits = None;
    let w = f.workload.as_deref().unwrap();
    f.workload = Some(Arc::new(Workload {
        container_name: None,
        owner_kind: None,
        owner_name: None,
        labels: Default::default(),
        ..w.clone()
    }));
    assert_eq!(decode_flow(&msg, HostIdentity::decode).unwrap(), (h, f));
}

/// A message of v3 (history/flow.v3.avsc: everything but `limits`, which
/// v4 appended) still decodes, with no limits.
#[test]
fn flow_v3_still_decodes() {
    let (h, mut f) = sample_flow();
    let current = apache_avro::from_avro_datum(&FLOW.parse(), &mut &fixtures::flow_message(&h, &f)[10..], None).unwrap();
    let Value::Record(mut fields) = current else { panic!() };
    assert_eq!(fields.pop().map(|(n, _)| n).as_deref(), Some("limits"), "v4 appended limits last");
    let mut msg = FLOW_V3.header().to_vec();
    msg.extend(apache_avro::to_avro_datum(&FLOW_V3.parse(), Value::Record(fields)).unwrap());
    assert_ne!(FLOW_V3.fingerprint(), FLOW.fingerprint());
    f.limits = None;
    assert_eq!(decode_flow(&msg, HostIdentity::decode).unwrap(), (h, f));
}

#[test]
fn identity_matches_apache_avro_field_by_field() {
    let h = fixtures::host();
    let workloads = vec![
        WorkloadIps { workload: Arc::new(every_workload_field()), ips: vec!["10.1.0.5".into(), "fd00::5".into()] },
        WorkloadIps { workload: Arc::new(Workload::of(WorkloadKind::Container)), ips: vec![] },
    ];
    let id = Identity { next_sequence: 1000, workloads, ..fixtures::identity(&h, 123, IdentityReason::IpChange) };
    let msg = id.to_message();
    let schema = IDENTITY.parse();
    let v = GenericSingleObjectReader::new(schema.clone()).unwrap().read_value(&mut &msg[..]).unwrap();
    assert_eq!(field(&v, "time_ns"), &Value::Long(123));
    assert_eq!(field(&v, "reason"), &Value::Enum(2, "IP_CHANGE".into()));
    assert_eq!(field(&v, "sequence_epoch"), &Value::Long(1));
    assert_eq!(field(&v, "next_sequence"), &Value::Long(1000));
    assert_eq!(field(&v, "version"), &s("test"));
    assert_eq!(field(field(&v, "host"), "host_id"), &s("h1"));
    let Value::Array(workloads) = field(&v, "workloads") else { panic!() };
    assert_eq!(workloads.len(), 2);
    check_workload(&Value::Union(1, Box::new(field(&workloads[0], "workload").clone())), Value::Enum(1, "POD".into()), some(Value::Enum(4, "UNKNOWN_RUNTIME".into())));
    assert_eq!(field(&workloads[0], "ips"), &Value::Array(vec![s("10.1.0.5"), s("fd00::5")]));
    assert_eq!(field(&workloads[1], "ips"), &Value::Array(vec![]));
    let Value::Record(fields) = &v else { panic!() };
    assert_eq!(fields.len(), 7, "a field of Identity is not checked here");
    assert_eq!(apache_avro::to_avro_datum(&schema, v.clone()).unwrap(), msg[10..]);
    assert_eq!(Identity::decode(&msg).unwrap(), id);
}

fn enriched(remote: Attribution, v6: bool) -> EnrichedFlow {
    let mut f = fixtures::flow();
    f.error = Some("ECONNRESET".into());
    f.workload = (!v6).then(|| Arc::new(every_workload_field()));
    if v6 {
        f.family = Family::Ipv6;
        f.local_addr = "2001:db8::1".parse().unwrap();
        f.remote_addr = "2001:db8::2:0:0:1".parse().unwrap();
    }
    let host = Arc::new(Host::new(fixtures::host()));
    EnrichedFlow { flow_id: 0x00ab_cdef_0123_4567, local: Attribution::of(&host.owner, Source::Sidecar), host, flow: f, remote }
}

fn db_owner(labels: &[(&str, &str)]) -> Arc<Attrs> {
    Arc::new(Attrs {
        workload: Some("db".into()),
        app: Some("pg".into()),
        team: Some("data".into()),
        vpc_id: Some("vpc-1".into()),
        labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        ..Default::default()
    })
}

/// apache-avro reads the container we write, every field as it should be.
#[test]
fn enriched_container_is_read_by_apache_avro() {
    let recs = [
        enriched(Attribution::of(&db_owner(&[("tier", "gold"), ("zz", "é")]), Source::Static), false),
        enriched(Attribution::none(Unattributed::UnknownIp), false),
        enriched(Attribution::none(Unattributed::NoOwnerAtTime), true),
        enriched(Attribution::of(&Arc::new(Attrs::of_workload(&fixtures::host(), Arc::new(every_workload_field()))), Source::Sidecar), false),
    ];
    let mut w = ContainerWriter::new(Vec::new()).unwrap();
    for r in &recs {
        w.append(r).unwrap();
    }
    let bytes = w.finish().unwrap();
    let read: Vec<Value> = apache_avro::Reader::new(&bytes[..]).unwrap().map(|r| r.unwrap()).collect();
    assert_eq!(read.len(), 4);
    let v = &read[0];
    let want = [
        ("flow_id", s("00abcdef01234567")),
        ("host_id", s("h1")),
        ("host_workload", some(s("web"))),
        ("sequence_epoch", Value::Long(5)),
        ("sequence", Value::Long(9)),
        ("connection_id", Value::Long(-3)),
        ("record_type", s("FINAL")),
        ("family", s("IPV4")),
        ("direction", s("CLIENT")),
        ("local_ip", s("10.0.0.1")),
        ("local_port", Value::Int(40000)),
        ("remote_ip", s("10.0.0.2")),
        ("remote_port", Value::Int(443)),
        ("start_time_ns", some(Value::Long(1_000))),
        ("end_time_ns", Value::Long(2_000)),
        ("bytes_sent", Value::Long(12_345)),
        ("bytes_received", Value::Long(1_000_003)),
        ("segs_in", Value::Long(1)),
        ("segs_out", Value::Long(2)),
        ("retransmits", Value::Long(0)),
        ("srtt_us", Value::Int(100)),
        ("rtt_min_us", Value::Int(50)),
        ("end_reason", s("NORMAL")),
        ("error", some(s("ECONNRESET"))),
        ("pid", Value::Int(7)),
        ("comm", s("curl")),
        ("cgroup_id", Value::Long(1)),
        ("netns_ino", Value::Long(2)),
    ];
    let Value::Record(fields) = v else { panic!() };
    assert_eq!(fields.len(), want.len() + 4, "a field of enriched_flow.avsc is not checked here");
    for (name, value) in want {
        assert_eq!(field(v, name), &value, "{name}");
    }
    check_limits(field(v, "limits"));
    check_workload(field(v, "local_workload"), s("POD"), some(s("UNKNOWN_RUNTIME")));
    assert_eq!(field(&read[2], "local_workload"), &null());
    let local = field(v, "local");
    assert_eq!(field(local, "attributed"), &Value::Boolean(true));
    assert_eq!(field(local, "source"), &s("SIDECAR"));
    assert_eq!(field(local, "reason"), &null());
    assert_eq!(field(local, "host_id"), &some(s("h1")));
    assert_eq!(field(local, "workload"), &some(s("web")));
    assert_eq!(field(local, "team"), &some(s("net")));
    assert_eq!(field(local, "confidence"), &Value::Float(1.0));
    let remote = field(v, "remote");
    let labels: std::collections::HashMap<String, Value> = [("tier".to_string(), s("gold")), ("zz".to_string(), s("é"))].into();
    for (name, value) in [
        ("attributed", Value::Boolean(true)),
        ("source", s("STATIC")),
        ("reason", null()),
        ("workload", some(s("db"))),
        ("host_id", null()),
        ("instance_id", null()),
        ("app", some(s("pg"))),
        ("service", null()),
        ("cluster", null()),
        ("env", null()),
        ("account", null()),
        ("region", null()),
        ("zone", null()),
        ("team", some(s("data"))),
        ("labels", Value::Map(labels)),
        ("eni_id", null()),
        ("vpc_id", some(s("vpc-1"))),
        ("subnet_id", null()),
        ("confidence", Value::Float(0.7)),
        ("held_by", null()),
    ] {
        assert_eq!(field(remote, name), &value, "remote.{name}");
    }
    let Value::Record(fields) = remote else { panic!() };
    assert_eq!(fields.len(), 20, "a field of Attribution is not checked here");
    // A pod its sidecar announced: named after the pod, on its host.
    let pod = field(&read[3], "remote");
    assert_eq!(field(pod, "workload"), &some(s("web-0")));
    assert_eq!(field(pod, "host_id"), &some(s("h1")));
    assert_eq!(field(pod, "team"), &some(s("net")));
    check_workload(field(pod, "held_by"), s("POD"), some(s("UNKNOWN_RUNTIME")));
    let miss = field(&read[1], "remote");
    assert_eq!(field(miss, "attributed"), &Value::Boolean(false));
    assert_eq!(field(miss, "source"), &s("NONE"));
    assert_eq!(field(miss, "reason"), &some(s("UNKNOWN_IP")));
    assert_eq!(field(miss, "workload"), &null());
    assert_eq!(field(miss, "labels"), &Value::Map(Default::default()));
    assert_eq!(field(miss, "confidence"), &Value::Float(0.0));
    assert_eq!(field(field(&read[2], "remote"), "reason"), &some(s("NO_OWNER_AT_TIME")));
    assert_eq!(field(&read[2], "local_ip"), &s("2001:db8::1"));
    assert_eq!(field(&read[2], "remote_ip"), &s("2001:db8::2:0:0:1"));
}

/// The `zstandard` codec: apache-avro reads the same records as from the
/// `null` file, over several blocks, and the file is smaller.
#[test]
fn zstandard_container_is_read_by_apache_avro() {
    let recs = fixtures::enriched_flows(20_000);
    let write = |codec| {
        let mut w = ContainerWriter::with_codec(Vec::new(), codec).unwrap();
        for r in &recs {
            w.append(r).unwrap();
        }
        w.finish().unwrap()
    };
    let (plain, packed) = (write(Codec::Null), write(Codec::Zstandard(3)));
    let read = |bytes: &[u8]| -> Vec<Value> { apache_avro::Reader::new(bytes).unwrap().map(|r| r.unwrap()).collect() };
    let (a, b) = (read(&plain), read(&packed));
    assert_eq!(a.len(), recs.len());
    assert!(a == b, "the zstandard file reads differently");
    assert!(packed.len() * 4 < plain.len(), "zstd {} bytes, null {} bytes", packed.len(), plain.len());
    assert!(plain.len() > 2 * 1024 * 1024, "more than one zstd block");
    assert_eq!(Codec::default(), Codec::Null);
}

/// Byte for byte what apache-avro's generic writer makes of the same values.
#[test]
fn enriched_datum_equals_apache_avro_encoding() {
    let schema = ENRICHED_FLOW.parse();
    // One label per side: apache-avro's map is a HashMap, its order would vary.
    // IPv6 without a workload, IPv4 with one.
    for v6 in [true, false] {
        let e = enriched(Attribution::of(&db_owner(&[("tier", "gold")]), Source::Ec2), v6);
        let mut ours = Vec::new();
        e.write(&mut ours);
        let value = apache_avro::from_avro_datum(&schema, &mut &ours[..], None).unwrap();
        assert_eq!(apache_avro::to_avro_datum(&schema, value).unwrap(), ours);
    }
}

#[test]
fn nonsense_is_rejected_with_a_reason() {
    let (h, good_flow) = (fixtures::host(), fixtures::flow());
    let msg = |f: &Flow| fixtures::flow_message(&h, f);
    let decode = |m: &[u8]| decode_flow(m, HostIdentity::decode).map(|_| ()).unwrap_err();
    let good = msg(&good_flow);

    let mut wrong_family = good_flow.clone();
    wrong_family.family = Family::Ipv6;
    let e = decode(&msg(&wrong_family));
    assert_eq!(e.to_string(), "bad local address length 4 for IPV6");
    assert_eq!(e.kind(), "bad_address");

    let backwards = Flow { start_time_ns: Some(5_000), ..good_flow.clone() };
    assert_eq!(decode(&msg(&backwards)), DecodeError::EndBeforeStart);
    assert_eq!(DecodeError::EndBeforeStart.kind(), "bad_time");
    let negative = Flow { bytes_sent: -1, ..good_flow.clone() };
    assert_eq!(decode(&msg(&negative)).kind(), "bad_time");

    assert_eq!(decode(&good[..good.len() - 3]), DecodeError::Truncated);
    let mut other = good.clone();
    other[5] ^= 0xff;
    let e = decode(&other);
    assert!(e.to_string().starts_with("unknown schema fingerprint"), "{e}");
    assert_eq!(e.kind(), "schema");
    assert_eq!(decode(b"hello").to_string(), "not Avro single-object encoded");
    let mut extra = good.clone();
    extra.push(0);
    assert_eq!(decode(&extra).to_string(), "1 trailing bytes");
    assert_eq!(decode(&extra).kind(), "truncated");

    // A port beyond u16, written by hand at the local port's place.
    let mut big_port = FLOW.header().to_vec();
    big_port.extend(h.encode());
    let w = &mut Writer(&mut big_port);
    for v in [5, 9, -3] {
        w.long(v);
    }
    for i in [0, 0, 1] {
        w.int(i);
    }
    w.bytes(&[10, 0, 0, 1]);
    w.int(70_000);
    assert_eq!(decode(&big_port), DecodeError::PortOutOfRange);
    // An enum index past the symbols.
    let mut bad_enum = FLOW.header().to_vec();
    bad_enum.extend(h.encode());
    let w = &mut Writer(&mut bad_enum);
    for v in [5, 9, -3] {
        w.long(v);
    }
    w.int(7);
    assert_eq!(decode(&bad_enum), DecodeError::BadEnumIndex(7));
    assert_eq!(DecodeError::BadEnumIndex(7).kind(), "invalid");
}

/// Every committed schema version can still be read by the current schema:
/// changes must stay backward compatible.
#[test]
fn schemas_stay_backward_compatible() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/history");
    let mut checked = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        let def = ALL.iter().find(|d| name.starts_with(&format!("{}.", d.name))).unwrap_or_else(|| panic!("history/{name}: which schema?"));
        let old = Schema::parse_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        SchemaCompatibility::can_read(&old, &def.parse())
            .unwrap_or_else(|e| panic!("schemas/{}.avsc cannot read data written with history/{name}: {e}", def.name));
        *checked.entry(def.name).or_insert(0) += 1;
    }
    assert_eq!(checked.len(), ALL.len(), "every schema has a released version: {checked:?}");
}

/// A FlowBatch as apache-avro reads it with schemas/flow_batch.avsc: its
/// items are the Flow records without their host block, byte for byte, its
/// host the one record of the block, its flow_schema the Flow schema's
/// fingerprint; and one apache-avro writes (several blocks) splits into the
/// same records here.
#[test]
fn flow_batches_match_the_schema() {
    let (h, f) = sample_flow();
    let flows: Vec<Flow> = (0..5).map(|i| Flow { sequence: i, ..f.clone() }).collect();
    let mut w = BatchWriter::new(h.encode());
    flows.iter().for_each(|f| w.push(f));
    let mut batch = Vec::new();
    w.finish(&mut batch);
    let read = GenericSingleObjectReader::new(FLOW_BATCH.parse()).unwrap().read_value(&mut &batch[..]).unwrap();
    let block = h.encode();
    let bodies: Vec<Value> = flows.iter().map(|f| Value::Bytes(fixtures::flow_message(&h, f)[10 + block.len()..].to_vec())).collect();
    let want = Value::Array(bodies);
    assert_eq!(field(&read, "flows"), &want);
    let whole = GenericSingleObjectReader::new(FLOW.parse()).unwrap().read_value(&mut &fixtures::flow_message(&h, &f)[..]).unwrap();
    assert_eq!(field(&read, "host"), field(&whole, "host"));
    assert_eq!(field(&read, "flow_schema"), &Value::Fixed(8, FLOW.fingerprint().to_vec()));
    let theirs = apache_avro::to_avro_datum(
        &FLOW_BATCH.parse(),
        Value::Record(vec![
            ("flows".into(), want),
            ("host".into(), field(&whole, "host").clone()),
            ("flow_schema".into(), Value::Fixed(8, FLOW.fingerprint().to_vec())),
        ]),
    )
    .unwrap();
    let mut msg = FLOW_BATCH.header().to_vec();
    msg.extend(theirs);
    let back: Vec<(HostIdentity, Flow)> = flow_messages(&msg).unwrap().map(|i| i.decode(HostIdentity::decode).unwrap()).collect();
    assert_eq!(back, flows.iter().map(|f| (h.clone(), f.clone())).collect::<Vec<_>>());
}
