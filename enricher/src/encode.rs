//! Enriched records to Avro binary (schemas/enriched_flow.avsc), written
//! field by field in the schema's order, and Avro object container files.
//! Checked against apache-avro's reader in the tests below and against
//! fastavro in the end-to-end tests; the generic `Value` path it replaces
//! is the baseline of `bench-enrich`.

use std::{
    hash::{BuildHasher, Hasher},
    io::{self, Write},
    net::IpAddr,
};

use crate::attribute::{Attribution, EnrichedFlow, ENRICHED_SCHEMA};

fn long(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

fn bytes(out: &mut Vec<u8>, b: &[u8]) {
    long(out, b.len() as i64);
    out.extend_from_slice(b);
}

fn opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        None => out.push(0),
        Some(s) => {
            out.push(2);
            bytes(out, s.as_bytes());
        }
    }
}

/// An IP address as its usual text form (dotted quad / RFC 5952).
fn ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            // Hand-formatted: the common case, and several times cheaper than Display.
            let mut buf = [0u8; 15];
            let mut n = 0;
            for (i, o) in a.octets().into_iter().enumerate() {
                if i > 0 {
                    buf[n] = b'.';
                    n += 1;
                }
                if o >= 100 {
                    buf[n] = b'0' + o / 100;
                    n += 1;
                }
                if o >= 10 {
                    buf[n] = b'0' + o / 10 % 10;
                    n += 1;
                }
                buf[n] = b'0' + o % 10;
                n += 1;
            }
            bytes(out, &buf[..n]);
        }
        IpAddr::V6(a) => {
            let mut buf = [0u8; 48];
            let mut c = io::Cursor::new(&mut buf[..]);
            write!(c, "{a}").expect("an IPv6 address fits in 48 bytes");
            let n = c.position() as usize;
            bytes(out, &buf[..n]);
        }
    }
}

fn attribution(out: &mut Vec<u8>, a: &Attribution) {
    out.push(a.attributed as u8);
    bytes(out, a.source.as_bytes());
    opt_str(out, a.reason);
    match &a.owner {
        None => out.extend_from_slice(&[0; 15]), // 14 nulls and an empty map
        Some(o) => {
            for s in [
                &o.workload,
                &o.host_id,
                &o.instance_id,
                &o.app,
                &o.service,
                &o.cluster,
                &o.env,
                &o.account,
                &o.region,
                &o.zone,
                &o.team,
            ] {
                opt_str(out, s.as_deref());
            }
            if !o.labels.is_empty() {
                long(out, o.labels.len() as i64);
                for (k, v) in &o.labels {
                    bytes(out, k.as_bytes());
                    bytes(out, v.as_bytes());
                }
            }
            out.push(0);
            for s in [&o.eni_id, &o.vpc_id, &o.subnet_id] {
                opt_str(out, s.as_deref());
            }
        }
    }
    out.extend_from_slice(&a.confidence.to_le_bytes());
}

/// Appends one enriched record's Avro binary datum to `out`.
pub fn datum(e: &EnrichedFlow, out: &mut Vec<u8>) {
    let f = &e.flow;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 16];
    for (i, d) in id.iter_mut().enumerate() {
        *d = HEX[(e.flow_id >> (60 - 4 * i) & 0xf) as usize];
    }
    bytes(out, &id);
    bytes(out, f.host.identity.host_id.as_bytes());
    opt_str(out, f.host.identity.workload.as_deref());
    long(out, f.sequence_epoch);
    long(out, f.sequence);
    long(out, f.connection_id);
    bytes(out, f.record_type.as_bytes());
    bytes(out, f.family.as_bytes());
    bytes(out, f.direction.as_bytes());
    ip(out, f.local_addr);
    long(out, f.local_port as i64);
    ip(out, f.remote_addr);
    long(out, f.remote_port as i64);
    match f.start_time_ns {
        None => out.push(0),
        Some(t) => {
            out.push(2);
            long(out, t);
        }
    }
    for v in [
        f.end_time_ns,
        f.bytes_sent,
        f.bytes_received,
        f.segs_in,
        f.segs_out,
        f.retransmits,
    ] {
        long(out, v);
    }
    long(out, f.srtt_us as i64);
    long(out, f.rtt_min_us as i64);
    bytes(out, f.end_reason.as_bytes());
    opt_str(out, f.error.as_deref());
    long(out, f.pid as i64);
    bytes(out, f.comm.as_bytes());
    long(out, f.cgroup_id);
    long(out, f.netns_ino);
    attribution(out, &e.local);
    attribution(out, &e.remote);
}

/// Records per container block are cut at about this many bytes.
const BLOCK_BYTES: usize = 256 * 1024;

/// An Avro object container file (codec `null`) of enriched records.
pub struct ContainerWriter<W: Write> {
    out: W,
    block: Vec<u8>,
    count: i64,
    sync: [u8; 16],
}

impl<W: Write> ContainerWriter<W> {
    /// Writes the header: magic, metadata (schema, codec), sync marker.
    pub fn new(mut out: W) -> io::Result<Self> {
        let mut sync = [0u8; 16];
        let rs = std::collections::hash_map::RandomState::new();
        for (i, half) in sync.chunks_mut(8).enumerate() {
            let mut h = rs.build_hasher();
            h.write_usize(i);
            half.copy_from_slice(&h.finish().to_le_bytes());
        }
        let mut head = b"Obj\x01".to_vec();
        long(&mut head, 2);
        bytes(&mut head, b"avro.schema");
        bytes(&mut head, ENRICHED_SCHEMA.as_bytes());
        bytes(&mut head, b"avro.codec");
        bytes(&mut head, b"null");
        long(&mut head, 0);
        head.extend_from_slice(&sync);
        out.write_all(&head)?;
        Ok(ContainerWriter {
            out,
            block: Vec::with_capacity(BLOCK_BYTES + 4096),
            count: 0,
            sync,
        })
    }

    pub fn append(&mut self, e: &EnrichedFlow) -> io::Result<()> {
        datum(e, &mut self.block);
        self.count += 1;
        if self.block.len() >= BLOCK_BYTES {
            self.flush_block()?;
        }
        Ok(())
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.count == 0 {
            return Ok(());
        }
        let mut head = Vec::with_capacity(20);
        long(&mut head, self.count);
        long(&mut head, self.block.len() as i64);
        self.out.write_all(&head)?;
        self.out.write_all(&self.block)?;
        self.out.write_all(&self.sync)?;
        self.block.clear();
        self.count = 0;
        Ok(())
    }

    /// Writes the last block and hands back the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.flush_block()?;
        self.out.flush()?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use apache_avro::types::Value;

    use super::*;
    use crate::{
        attribute::Attributor,
        decode::{self, tests::encode_flow, FLOW_SCHEMA},
        sources::{cidr::CidrMap, identity::IdentityStore},
    };

    fn field<'a>(v: &'a Value, name: &str) -> &'a Value {
        let Value::Record(f) = v else {
            panic!("not a record: {v:?}")
        };
        &f.iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no field {name}"))
            .1
    }
    fn s(v: &str) -> Value {
        Value::String(v.into())
    }
    fn some(v: &str) -> Value {
        Value::Union(1, Box::new(s(v)))
    }
    fn null() -> Value {
        Value::Union(0, Box::new(Value::Null))
    }

    fn sample(remote: &str, v6: bool) -> EnrichedFlow {
        sample_with(remote, v6, "{ tier = \"gold\", zz = \"é\" }")
    }

    fn sample_with(remote: &str, v6: bool, labels: &str) -> EnrichedFlow {
        let msg = encode_flow(|r| {
            if v6 {
                r.put("family", Value::Enum(1, "IPV6".into()));
                r.put(
                    "local_addr",
                    Value::Bytes(
                        "2001:db8::1"
                            .parse::<std::net::Ipv6Addr>()
                            .unwrap()
                            .octets()
                            .to_vec(),
                    ),
                );
                r.put(
                    "remote_addr",
                    Value::Bytes(
                        remote
                            .parse::<std::net::Ipv6Addr>()
                            .unwrap()
                            .octets()
                            .to_vec(),
                    ),
                );
            } else {
                r.put(
                    "remote_addr",
                    Value::Bytes(
                        remote
                            .parse::<std::net::Ipv4Addr>()
                            .unwrap()
                            .octets()
                            .to_vec(),
                    ),
                );
            }
            r.put("error", Value::Union(1, Box::new(s("ECONNRESET"))));
        });
        let f = decode::flow(&msg, &decode::fingerprint(FLOW_SCHEMA)).unwrap();
        let map = CidrMap::parse(
            &format!("[[entry]]\ncidr = \"192.168.0.0/16\"\nworkload = \"db\"\napp = \"pg\"\nteam = \"data\"\nvpc_id = \"vpc-1\"\nlabels = {labels}\n"),
        )
        .unwrap();
        let ids = IdentityStore::default();
        Attributor {
            identity: &ids,
            ec2: &ids,
            cidr: &map,
        }
        .enrich(f)
    }

    /// apache-avro reads what we write, and every field holds what it should.
    #[test]
    fn container_is_read_by_apache_avro() {
        let recs = [
            sample("192.168.200.7", false),
            sample("10.9.9.9", false),
            sample("2001:db8::2:0:0:1", true),
        ];
        let mut w = ContainerWriter::new(Vec::new()).unwrap();
        for r in &recs {
            w.append(r).unwrap();
        }
        let bytes = w.finish().unwrap();
        let read: Vec<Value> = apache_avro::Reader::new(&bytes[..])
            .unwrap()
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(read.len(), 3);
        let v = &read[0];
        assert_eq!(
            field(v, "flow_id"),
            &s(&format!("{:016x}", recs[0].flow_id))
        );
        assert_eq!(field(v, "host_id"), &s("h1"));
        assert_eq!(field(v, "host_workload"), &some("web"));
        assert_eq!(field(v, "sequence_epoch"), &Value::Long(5));
        assert_eq!(field(v, "connection_id"), &Value::Long(-3));
        assert_eq!(field(v, "direction"), &s("CLIENT"));
        assert_eq!(field(v, "local_ip"), &s("10.0.0.1"));
        assert_eq!(field(v, "remote_ip"), &s("192.168.200.7"));
        assert_eq!(field(v, "remote_port"), &Value::Int(443));
        assert_eq!(
            field(v, "start_time_ns"),
            &Value::Union(1, Box::new(Value::Long(1_000)))
        );
        assert_eq!(field(v, "bytes_received"), &Value::Long(1_000_003));
        assert_eq!(field(v, "error"), &some("ECONNRESET"));
        assert_eq!(field(v, "comm"), &s("curl"));
        assert_eq!(field(v, "netns_ino"), &Value::Long(2));
        let local = field(v, "local");
        assert_eq!(field(local, "attributed"), &Value::Boolean(true));
        assert_eq!(field(local, "source"), &s("SIDECAR"));
        assert_eq!(field(local, "host_id"), &some("h1"));
        assert_eq!(field(local, "team"), &some("net"));
        assert_eq!(field(local, "confidence"), &Value::Float(1.0));
        let remote = field(v, "remote");
        assert_eq!(field(remote, "source"), &s("STATIC"));
        assert_eq!(field(remote, "reason"), &null());
        assert_eq!(field(remote, "workload"), &some("db"));
        assert_eq!(field(remote, "app"), &some("pg"));
        assert_eq!(field(remote, "vpc_id"), &some("vpc-1"));
        assert_eq!(field(remote, "subnet_id"), &null());
        let labels = BTreeMap::from([("tier".to_string(), s("gold")), ("zz".to_string(), s("é"))]);
        assert_eq!(
            field(remote, "labels"),
            &Value::Map(labels.into_iter().collect())
        );
        assert_eq!(field(remote, "confidence"), &Value::Float(0.7));
        let miss = field(&read[1], "remote");
        assert_eq!(field(miss, "attributed"), &Value::Boolean(false));
        assert_eq!(field(miss, "source"), &s("NONE"));
        assert_eq!(field(miss, "reason"), &some("UNKNOWN_IP"));
        assert_eq!(field(miss, "workload"), &null());
        assert_eq!(field(miss, "labels"), &Value::Map(Default::default()));
        assert_eq!(field(&read[2], "local_ip"), &s("2001:db8::1"));
        assert_eq!(field(&read[2], "remote_ip"), &s("2001:db8::2:0:0:1"));
    }

    /// Byte for byte what apache-avro's generic writer makes of the same values.
    #[test]
    fn datum_equals_apache_avro_encoding() {
        let schema = apache_avro::Schema::parse_str(ENRICHED_SCHEMA).unwrap();
        // One label per side: apache-avro's map is a HashMap, its order would vary.
        let e = sample_with("192.168.1.1", false, "{ tier = \"gold\" }");
        let mut ours = Vec::new();
        datum(&e, &mut ours);
        let value = apache_avro::from_avro_datum(&schema, &mut &ours[..], None).unwrap();
        assert_eq!(apache_avro::to_avro_datum(&schema, value).unwrap(), ours);
    }

    #[test]
    fn ipv4_text_matches_display() {
        for a in [
            "0.0.0.0",
            "1.2.3.4",
            "10.0.100.255",
            "255.255.255.255",
            "192.168.9.90",
        ] {
            let mut out = Vec::new();
            ip(&mut out, a.parse().unwrap());
            assert_eq!(&out[1..], a.as_bytes());
        }
    }
}
