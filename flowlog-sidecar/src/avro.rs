//! Avro encoding of the records in `schemas/` (Flow, Identity), as
//! single-object encoding: `C3 01`, the schema's 8-byte CRC-64-AVRO
//! fingerprint (little endian), then the binary datum.
//!
//! The datum writer is hand-written for speed (no generic `Value` tree); it
//! writes fields in the schema's order and the tests decode its output with
//! apache-avro against the committed `.avsc` files, so the two cannot drift.

use apache_avro::{rabin::Rabin, Schema};

use crate::{
    flow::{Direction, EndReason, FlowRecord, OwnerSource},
    identity::HostIdentity,
};

pub const FLOW_SCHEMA: &str = include_str!("../../schemas/flow.avsc");
pub const IDENTITY_SCHEMA: &str = include_str!("../../schemas/identity.avsc");

/// Single-object header for a schema.
pub fn header(schema_json: &str) -> Result<[u8; 10], apache_avro::Error> {
    let schema = Schema::parse_str(schema_json)?;
    let fp = schema.fingerprint::<Rabin>();
    let mut h = [0u8; 10];
    h[0] = 0xC3;
    h[1] = 0x01;
    h[2..].copy_from_slice(&fp.bytes[..8]);
    Ok(h)
}

/// Appends Avro binary primitives to a buffer.
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    pub fn long(&mut self, v: i64) {
        let mut z = ((v << 1) ^ (v >> 63)) as u64;
        while z >= 0x80 {
            self.0.push((z as u8) | 0x80);
            z >>= 7;
        }
        self.0.push(z as u8);
    }
    pub fn int(&mut self, v: i32) {
        self.long(v as i64)
    }
    pub fn bytes(&mut self, b: &[u8]) {
        self.long(b.len() as i64);
        self.0.extend_from_slice(b);
    }
    pub fn string(&mut self, s: &str) {
        self.bytes(s.as_bytes())
    }
    /// `["null", "string"]`.
    pub fn opt_string(&mut self, s: Option<&str>) {
        match s {
            None => self.long(0),
            Some(s) => {
                self.long(1);
                self.string(s);
            }
        }
    }
    /// `["null", "long"]`.
    pub fn opt_long(&mut self, v: Option<i64>) {
        match v {
            None => self.long(0),
            Some(v) => {
                self.long(1);
                self.long(v);
            }
        }
    }
    pub fn string_array<'s>(&mut self, items: impl ExactSizeIterator<Item = &'s str>) {
        if items.len() > 0 {
            self.long(items.len() as i64);
            for s in items {
                self.string(s);
            }
        }
        self.long(0);
    }
}

/// The HostIdentity record, encoded once per identity change and copied into
/// every Flow (Avro records have no framing, so a nested record's bytes can
/// be reused verbatim).
pub fn encode_host(h: &HostIdentity) -> Vec<u8> {
    let mut buf = Vec::with_capacity(128);
    let mut w = Writer(&mut buf);
    w.string(&h.host_id);
    w.string(&h.hostname);
    w.opt_string(h.instance_id.as_deref());
    w.opt_string(h.workload.as_deref());
    if !h.labels.is_empty() {
        w.long(h.labels.len() as i64);
        for (k, v) in &h.labels {
            w.string(k);
            w.string(v);
        }
    }
    w.long(0);
    w.string_array(h.ips.iter().map(|s| s.as_str()));
    buf
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    Final = 0,
    Interim = 1,
}

/// Counters of one record: deltas since the previous record of the connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub segs_in: u64,
    pub segs_out: u64,
    pub retransmits: u64,
}

impl Counters {
    pub fn of(r: &FlowRecord) -> Counters {
        Counters {
            bytes_sent: r.bytes_sent,
            bytes_received: r.bytes_received,
            segs_in: r.segs_in as u64,
            segs_out: r.segs_out as u64,
            retransmits: r.retransmits as u64,
        }
    }
    pub fn minus(&self, earlier: &Counters) -> Counters {
        Counters {
            bytes_sent: self.bytes_sent.saturating_sub(earlier.bytes_sent),
            bytes_received: self.bytes_received.saturating_sub(earlier.bytes_received),
            segs_in: self.segs_in.saturating_sub(earlier.segs_in),
            segs_out: self.segs_out.saturating_sub(earlier.segs_out),
            retransmits: self.retransmits.saturating_sub(earlier.retransmits),
        }
    }
}

/// Where a record sits in this host's sequence.
#[derive(Debug, Clone, Copy)]
pub struct Position {
    pub epoch: i64,
    pub sequence: i64,
    pub connection_id: i64,
}

fn addr_bytes(ip: &std::net::IpAddr) -> ([u8; 16], usize) {
    let mut b = [0u8; 16];
    match ip {
        std::net::IpAddr::V4(a) => {
            b[..4].copy_from_slice(&a.octets());
            (b, 4)
        }
        std::net::IpAddr::V6(a) => {
            b.copy_from_slice(&a.octets());
            (b, 16)
        }
    }
}

/// Encodes one Flow datum (after the single-object header) into `buf`.
pub fn encode_flow(
    buf: &mut Vec<u8>,
    host: &[u8],
    pos: Position,
    kind: RecordType,
    r: &FlowRecord,
    c: &Counters,
) {
    buf.extend_from_slice(host);
    let mut w = Writer(buf);
    w.long(pos.epoch);
    w.long(pos.sequence);
    w.long(pos.connection_id);
    w.int(kind as i32);
    w.int(if r.local_addr.is_ipv6() { 1 } else { 0 });
    w.int(match r.direction {
        Direction::Unknown => 0,
        Direction::Client => 1,
        Direction::Server => 2,
    });
    let (a, n) = addr_bytes(&r.local_addr);
    w.bytes(&a[..n]);
    w.int(r.local_port as i32);
    let (a, n) = addr_bytes(&r.remote_addr);
    w.bytes(&a[..n]);
    w.int(r.remote_port as i32);
    w.opt_long(r.start_time_ns.map(|v| v as i64));
    w.long(r.end_time_ns as i64);
    w.long(c.bytes_sent as i64);
    w.long(c.bytes_received as i64);
    w.long(c.segs_in as i64);
    w.long(c.segs_out as i64);
    w.long(c.retransmits as i64);
    w.int(r.srtt_us as i32);
    w.int(r.rtt_min_us as i32);
    w.int(match (kind, r.end_reason) {
        (RecordType::Interim, _) => 0,
        (_, EndReason::Normal) => 1,
        (_, EndReason::FailedConnect) => 2,
        (_, EndReason::ResetReceived) => 3,
        (_, EndReason::ResetSent) => 4,
        (_, EndReason::Timeout) => 5,
        (_, EndReason::Error) => 6,
    });
    w.opt_string(r.error.as_deref());
    w.string_array(r.state_path.iter().copied());
    w.int(r.pid as i32);
    w.int(r.tid as i32);
    w.string(&r.comm);
    w.int(match r.owner_source {
        OwnerSource::Unknown => 0,
        OwnerSource::Open => 1,
        OwnerSource::Close => 2,
    });
    w.long(r.cgroup_id as i64);
    w.long(r.netns_ino as i64);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityReason {
    Start = 0,
    Heartbeat = 1,
    IpChange = 2,
    Stop = 3,
}

pub fn encode_identity(buf: &mut Vec<u8>, host: &[u8], time_ns: i64, reason: IdentityReason, epoch: i64, next_sequence: i64) {
    buf.extend_from_slice(host);
    let mut w = Writer(buf);
    w.long(time_ns);
    w.int(reason as i32);
    w.long(epoch);
    w.long(next_sequence);
    w.string(env!("CARGO_PKG_VERSION"));
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::{from_avro_datum, types::Value, GenericSingleObjectReader};
    use std::collections::BTreeMap;

    fn host() -> HostIdentity {
        HostIdentity {
            host_id: "host-1".into(),
            hostname: "box".into(),
            instance_id: Some("i-0abc".into()),
            workload: None,
            labels: BTreeMap::from([("team".to_string(), "net".to_string())]),
            ips: vec!["10.0.0.5".into(), "fe80::1".into()],
        }
    }

    fn record() -> FlowRecord {
        FlowRecord {
            connection_id: 5,
            family: "ipv6",
            direction: Direction::Server,
            local_addr: "::1".parse().unwrap(),
            local_port: 443,
            remote_addr: "2001:db8::7".parse().unwrap(),
            remote_port: 50000,
            start_time_ns: Some(1_700_000_000_000_000_000),
            end_time_ns: 1_700_000_000_500_000_000,
            duration_ns: Some(500_000_000),
            bytes_sent: 1_000_003,
            bytes_received: 12_345,
            segs_in: 10,
            segs_out: 700,
            retransmits: 3,
            srtt_us: 250,
            rtt_min_us: 90,
            end_reason: EndReason::ResetReceived,
            error: Some("ECONNRESET".into()),
            state_path: vec!["LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE"],
            state_path_truncated: false,
            pid: 4242,
            tid: 4243,
            comm: "nginx".into(),
            owner_source: OwnerSource::Open,
            cgroup_id: 99,
            netns_ino: 4026531840,
        }
    }

    fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
        let Value::Record(fields) = v else { panic!("not a record: {v:?}") };
        &fields.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no field {name}")).1
    }

    /// apache-avro decodes the hand-written encoding against the committed
    /// schema, with every field as written.
    #[test]
    fn flow_decodes_with_apache_avro() {
        let schema = Schema::parse_str(FLOW_SCHEMA).unwrap();
        let r = record();
        let mut msg = header(FLOW_SCHEMA).unwrap().to_vec();
        let pos = Position { epoch: 1_699_999_999_000_000_000, sequence: 41, connection_id: -77 };
        encode_flow(&mut msg, &encode_host(&host()), pos, RecordType::Final, &r, &Counters::of(&r));

        // The single-object reader checks the marker and the fingerprint.
        let reader = GenericSingleObjectReader::new(schema.clone()).unwrap();
        let v = reader.read_value(&mut &msg[..]).unwrap();
        let h = field(&v, "host");
        assert_eq!(field(h, "host_id"), &Value::String("host-1".into()));
        assert_eq!(field(h, "instance_id"), &Value::Union(1, Box::new(Value::String("i-0abc".into()))));
        assert_eq!(field(h, "workload"), &Value::Union(0, Box::new(Value::Null)));
        assert_eq!(field(h, "labels"), &Value::Map([("team".to_string(), Value::String("net".into()))].into()));
        assert_eq!(field(h, "ips"), &Value::Array(vec![Value::String("10.0.0.5".into()), Value::String("fe80::1".into())]));
        assert_eq!(field(&v, "sequence_epoch"), &Value::Long(1_699_999_999_000_000_000));
        assert_eq!(field(&v, "sequence"), &Value::Long(41));
        assert_eq!(field(&v, "connection_id"), &Value::Long(-77));
        assert_eq!(field(&v, "record_type"), &Value::Enum(0, "FINAL".into()));
        assert_eq!(field(&v, "family"), &Value::Enum(1, "IPV6".into()));
        assert_eq!(field(&v, "direction"), &Value::Enum(2, "SERVER".into()));
        let mut lo = vec![0u8; 16];
        lo[15] = 1;
        assert_eq!(field(&v, "local_addr"), &Value::Bytes(lo));
        assert_eq!(field(&v, "local_port"), &Value::Int(443));
        assert_eq!(field(&v, "remote_port"), &Value::Int(50000));
        assert_eq!(field(&v, "start_time_ns"), &Value::Union(1, Box::new(Value::Long(1_700_000_000_000_000_000))));
        assert_eq!(field(&v, "end_time_ns"), &Value::Long(1_700_000_000_500_000_000));
        assert_eq!(field(&v, "bytes_sent"), &Value::Long(1_000_003));
        assert_eq!(field(&v, "bytes_received"), &Value::Long(12_345));
        assert_eq!(field(&v, "segs_out"), &Value::Long(700));
        assert_eq!(field(&v, "retransmits"), &Value::Long(3));
        assert_eq!(field(&v, "srtt_us"), &Value::Int(250));
        assert_eq!(field(&v, "end_reason"), &Value::Enum(3, "RESET_RECEIVED".into()));
        assert_eq!(field(&v, "error"), &Value::Union(1, Box::new(Value::String("ECONNRESET".into()))));
        assert_eq!(
            field(&v, "state_path"),
            &Value::Array(["LISTEN", "SYN_RECV", "ESTABLISHED", "CLOSE"].iter().map(|s| Value::String(s.to_string())).collect())
        );
        assert_eq!(field(&v, "pid"), &Value::Int(4242));
        assert_eq!(field(&v, "comm"), &Value::String("nginx".into()));
        assert_eq!(field(&v, "owner_source"), &Value::Enum(1, "OPEN".into()));
        assert_eq!(field(&v, "cgroup_id"), &Value::Long(99));
        assert_eq!(field(&v, "netns_ino"), &Value::Long(4026531840));

        // And the datum alone is exactly one record: nothing left over.
        let mut datum = &msg[10..];
        from_avro_datum(&schema, &mut datum, None).unwrap();
        assert!(datum.is_empty());
    }

    #[test]
    fn interim_and_ipv4_and_empty_collections() {
        let schema = Schema::parse_str(FLOW_SCHEMA).unwrap();
        let mut r = record();
        r.local_addr = "10.1.2.3".parse().unwrap();
        r.start_time_ns = None;
        r.error = None;
        r.state_path = vec![];
        let mut h = host();
        h.labels.clear();
        h.ips.clear();
        let mut buf = Vec::new();
        let c = Counters { bytes_sent: 5, ..Default::default() };
        encode_flow(&mut buf, &encode_host(&h), Position { epoch: 1, sequence: 0, connection_id: 0 }, RecordType::Interim, &r, &c);
        let v = from_avro_datum(&schema, &mut &buf[..], None).unwrap();
        assert_eq!(field(&v, "record_type"), &Value::Enum(1, "INTERIM".into()));
        assert_eq!(field(&v, "end_reason"), &Value::Enum(0, "OPEN".into()));
        assert_eq!(field(&v, "local_addr"), &Value::Bytes(vec![10, 1, 2, 3]));
        assert_eq!(field(&v, "bytes_sent"), &Value::Long(5));
        assert_eq!(field(&v, "start_time_ns"), &Value::Union(0, Box::new(Value::Null)));
        assert_eq!(field(&v, "state_path"), &Value::Array(vec![]));
        assert_eq!(field(field(&v, "host"), "labels"), &Value::Map(Default::default()));
    }

    #[test]
    fn identity_decodes_with_apache_avro() {
        let schema = Schema::parse_str(IDENTITY_SCHEMA).unwrap();
        let mut msg = header(IDENTITY_SCHEMA).unwrap().to_vec();
        encode_identity(&mut msg, &encode_host(&host()), 123, IdentityReason::IpChange, 7, 1000);
        let v = GenericSingleObjectReader::new(schema).unwrap().read_value(&mut &msg[..]).unwrap();
        assert_eq!(field(&v, "time_ns"), &Value::Long(123));
        assert_eq!(field(&v, "reason"), &Value::Enum(2, "IP_CHANGE".into()));
        assert_eq!(field(&v, "next_sequence"), &Value::Long(1000));
        assert_eq!(field(&v, "version"), &Value::String(env!("CARGO_PKG_VERSION").into()));
    }

    #[test]
    fn zigzag() {
        for (v, want) in [(0i64, vec![0u8]), (-1, vec![1]), (1, vec![2]), (-64, vec![0x7f]), (64, vec![0x80, 1])] {
            let mut b = Vec::new();
            Writer(&mut b).long(v);
            assert_eq!(b, want, "{v}");
        }
    }

    /// Every committed schema version can still be read by the current
    /// schema: changes must stay backward compatible.
    #[test]
    fn schemas_stay_backward_compatible() {
        use apache_avro::schema_compatibility::SchemaCompatibility;
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas");
        let mut checked = 0;
        for entry in std::fs::read_dir(format!("{dir}/history")).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            let current = if name.starts_with("flow.") { FLOW_SCHEMA } else if name.starts_with("identity.") { IDENTITY_SCHEMA } else { continue };
            let old = Schema::parse_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            let new = Schema::parse_str(current).unwrap();
            SchemaCompatibility::can_read(&old, &new)
                .unwrap_or_else(|e| panic!("schemas/{} cannot read data written with history/{name}: {e}", if name.starts_with("flow.") { "flow.avsc" } else { "identity.avsc" }));
            checked += 1;
        }
        assert!(checked >= 2);
    }
}
