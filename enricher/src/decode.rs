//! Decodes Flow and Identity messages (schemas/flow.avsc, identity.avsc):
//! single-object header check, then a direct reader of the binary datum in
//! the schema's field order. Anything that does not decode, or decodes to
//! nonsense, is a [`Reject`] with a reason for the dead-letter topic.
//!
//! Every flow repeats its sidecar's host block (id, name, workload, labels,
//! IPs). It is decoded once per distinct block and shared ([`Host`], from a
//! bounded moka cache keyed by the block's bytes), so a flow costs no string
//! allocations for it and its IPs are parsed once per host, not per flow.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use apache_avro::{rabin::Rabin, Schema};

use crate::sources::{identity::owner_of, Owner};

pub const FLOW_SCHEMA: &str = include_str!("../../schemas/flow.avsc");
pub const IDENTITY_SCHEMA: &str = include_str!("../../schemas/identity.avsc");

pub fn fingerprint(schema_json: &str) -> [u8; 8] {
    let s = Schema::parse_str(schema_json).expect("committed schema parses");
    let mut fp = [0u8; 8];
    fp.copy_from_slice(&s.fingerprint::<Rabin>().bytes[..8]);
    fp
}

/// Why a message went to the dead-letter topic (the `flowlog.dlq.reason` header).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject(pub String);

impl Reject {
    fn new(s: impl Into<String>) -> Reject {
        Reject(s.into())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn long(&mut self) -> Result<i64, Reject> {
        let mut v: u64 = 0;
        for shift in (0..64).step_by(7) {
            let b = *self
                .buf
                .get(self.at)
                .ok_or_else(|| Reject::new("truncated"))?;
            self.at += 1;
            v |= ((b & 0x7f) as u64) << shift;
            if b & 0x80 == 0 {
                return Ok(((v >> 1) as i64) ^ -((v & 1) as i64));
            }
        }
        Err(Reject::new("varint too long"))
    }
    fn int(&mut self) -> Result<i32, Reject> {
        i32::try_from(self.long()?).map_err(|_| Reject::new("int out of range"))
    }
    fn bytes(&mut self) -> Result<&'a [u8], Reject> {
        let n = self.long()?;
        // A length from the network: checked before any arithmetic on it.
        let end = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|e| *e <= self.buf.len());
        let end = end.ok_or_else(|| Reject::new("truncated"))?;
        let s = &self.buf[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn string(&mut self) -> Result<String, Reject> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|_| Reject::new("invalid UTF-8"))
    }
    fn str(&mut self) -> Result<&'a str, Reject> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Reject::new("invalid UTF-8"))
    }
    fn union_index(&mut self, n: i64) -> Result<i64, Reject> {
        let i = self.long()?;
        if !(0..n).contains(&i) {
            return Err(Reject::new(format!("bad union index {i}")));
        }
        Ok(i)
    }
    fn opt_string(&mut self) -> Result<Option<String>, Reject> {
        Ok(if self.union_index(2)? == 0 {
            None
        } else {
            Some(self.string()?)
        })
    }
    fn opt_long(&mut self) -> Result<Option<i64>, Reject> {
        Ok(if self.union_index(2)? == 0 {
            None
        } else {
            Some(self.long()?)
        })
    }
    fn enum_sym(&mut self, symbols: &[&'static str]) -> Result<&'static str, Reject> {
        let i = self.int()?;
        symbols
            .get(i as usize)
            .copied()
            .ok_or_else(|| Reject::new(format!("bad enum index {i}")))
    }
    /// Array or map blocks: calls `item` once per element.
    fn blocks(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<(), Reject>,
    ) -> Result<(), Reject> {
        loop {
            let mut n = self.long()?;
            if n == 0 {
                return Ok(());
            }
            if n < 0 {
                n = -n;
                self.long()?; // block size in bytes
            }
            if n > 1_000_000 {
                return Err(Reject::new("absurd block count"));
            }
            for _ in 0..n {
                item(self)?;
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HostIdentity {
    pub host_id: String,
    pub hostname: String,
    pub instance_id: Option<String>,
    pub workload: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<String>,
}

/// A sidecar's host block, decoded once and shared by all its flows.
#[derive(Debug, PartialEq)]
pub struct Host {
    pub identity: HostIdentity,
    /// The host as the owner of its own IPs.
    pub owner: Owner,
    /// `identity.ips` parsed (unparseable entries left out).
    pub ips: Vec<IpAddr>,
}

impl Host {
    pub fn new(identity: HostIdentity) -> Host {
        Host {
            owner: owner_of(&identity),
            ips: identity.ips.iter().filter_map(|s| s.parse().ok()).collect(),
            identity,
        }
    }
}

/// Host blocks seen recently, by their exact bytes. Bounded: a fleet's
/// sidecars, each with a few IP changes, fit many times over.
const HOST_CACHE_ENTRIES: u64 = 200_000;

/// Decodes flow messages of one schema, sharing decoded host blocks.
pub struct Decoder {
    fp: [u8; 8],
    hosts: moka::sync::Cache<Box<[u8]>, Arc<Host>, foldhash::fast::RandomState>,
    pub host_hits: AtomicU64,
    pub host_misses: AtomicU64,
}

impl Decoder {
    pub fn new(fp: [u8; 8]) -> Decoder {
        // foldhash, not SipHash: the keys are ~100-byte blocks hashed per flow.
        let hosts = moka::sync::Cache::builder()
            .max_capacity(HOST_CACHE_ENTRIES)
            .build_with_hasher(Default::default());
        Decoder {
            fp,
            hosts,
            host_hits: AtomicU64::new(0),
            host_misses: AtomicU64::new(0),
        }
    }

    /// The host block at the reader: from the cache, or decoded and cached.
    fn host(&self, r: &mut Reader) -> Result<Arc<Host>, Reject> {
        let start = r.at;
        skip_host(r)?;
        let block = &r.buf[start..r.at];
        if let Some(h) = self.hosts.get(block) {
            self.host_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(h);
        }
        self.host_misses.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(Host::new(host(&mut Reader { buf: block, at: 0 })?));
        self.hosts.insert(block.into(), h.clone());
        Ok(h)
    }

    /// Decodes and checks one flow message.
    pub fn flow(&self, msg: &[u8]) -> Result<Flow, Reject> {
        check_header(msg, &self.fp)?;
        let r = &mut Reader { buf: msg, at: 10 };
        let host = self.host(r)?;
        flow_body(r, host)
    }
}

/// Walks over a host block, checking its structure but building nothing.
fn skip_host(r: &mut Reader) -> Result<(), Reject> {
    r.bytes()?;
    r.bytes()?;
    for _ in 0..2 {
        if r.union_index(2)? == 1 {
            r.bytes()?;
        }
    }
    r.blocks(|r| r.bytes().and_then(|_| r.bytes()).map(|_| ()))?;
    r.blocks(|r| r.bytes().map(|_| ()))
}

fn host(r: &mut Reader) -> Result<HostIdentity, Reject> {
    let mut h = HostIdentity {
        host_id: r.string()?,
        hostname: r.string()?,
        instance_id: r.opt_string()?,
        workload: r.opt_string()?,
        ..Default::default()
    };
    let mut labels = BTreeMap::new();
    r.blocks(|r| {
        let k = r.string()?;
        labels.insert(k, r.string()?);
        Ok(())
    })?;
    h.labels = labels;
    let mut ips = Vec::new();
    r.blocks(|r| {
        ips.push(r.string()?);
        Ok(())
    })?;
    h.ips = ips;
    Ok(h)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub host: Arc<Host>,
    pub sequence_epoch: i64,
    pub sequence: i64,
    pub connection_id: i64,
    pub record_type: &'static str,
    pub family: &'static str,
    pub direction: &'static str,
    pub local_addr: IpAddr,
    pub local_port: i32,
    pub remote_addr: IpAddr,
    pub remote_port: i32,
    pub start_time_ns: Option<i64>,
    pub end_time_ns: i64,
    pub bytes_sent: i64,
    pub bytes_received: i64,
    pub segs_in: i64,
    pub segs_out: i64,
    pub retransmits: i64,
    pub srtt_us: i32,
    pub rtt_min_us: i32,
    pub end_reason: &'static str,
    pub error: Option<String>,
    /// How many states the connection went through (the path itself is
    /// not part of the enriched record).
    pub state_path_len: usize,
    pub pid: i32,
    pub tid: i32,
    pub comm: String,
    pub owner_source: &'static str,
    pub cgroup_id: i64,
    pub netns_ino: i64,
}

fn addr(family: &str, b: &[u8], which: &str) -> Result<IpAddr, Reject> {
    match (family, b.len()) {
        ("IPV4", 4) => Ok(IpAddr::from(<[u8; 4]>::try_from(b).unwrap())),
        ("IPV6", 16) => Ok(IpAddr::from(<[u8; 16]>::try_from(b).unwrap())),
        _ => Err(Reject::new(format!(
            "bad {which} address length {} for {family}",
            b.len()
        ))),
    }
}

fn check_header(msg: &[u8], fp: &[u8; 8]) -> Result<(), Reject> {
    if msg.len() < 10 || msg[0] != 0xC3 || msg[1] != 0x01 {
        return Err(Reject::new("not Avro single-object encoded"));
    }
    if &msg[2..10] != fp {
        return Err(Reject::new(format!(
            "unknown schema fingerprint {}",
            msg[2..10]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )));
    }
    Ok(())
}

/// Decodes and checks one flow message (host block not shared; see [`Decoder`]).
pub fn flow(msg: &[u8], fp: &[u8; 8]) -> Result<Flow, Reject> {
    check_header(msg, fp)?;
    let r = &mut Reader { buf: msg, at: 10 };
    let host = Arc::new(Host::new(host(r)?));
    flow_body(r, host)
}

fn flow_body(r: &mut Reader, host: Arc<Host>) -> Result<Flow, Reject> {
    let msg = r.buf;
    let sequence_epoch = r.long()?;
    let sequence = r.long()?;
    let connection_id = r.long()?;
    let record_type = r.enum_sym(&["FINAL", "INTERIM"])?;
    let family = r.enum_sym(&["IPV4", "IPV6"])?;
    let direction = r.enum_sym(&["UNKNOWN", "CLIENT", "SERVER"])?;
    let local_addr = addr(family, r.bytes()?, "local")?;
    let local_port = r.int()?;
    let remote_addr = addr(family, r.bytes()?, "remote")?;
    let remote_port = r.int()?;
    let start_time_ns = r.opt_long()?;
    let end_time_ns = r.long()?;
    let f = Flow {
        host,
        sequence_epoch,
        sequence,
        connection_id,
        record_type,
        family,
        direction,
        local_addr,
        local_port,
        remote_addr,
        remote_port,
        start_time_ns,
        end_time_ns,
        bytes_sent: r.long()?,
        bytes_received: r.long()?,
        segs_in: r.long()?,
        segs_out: r.long()?,
        retransmits: r.long()?,
        srtt_us: r.int()?,
        rtt_min_us: r.int()?,
        end_reason: r.enum_sym(&[
            "OPEN",
            "NORMAL",
            "FAILED_CONNECT",
            "RESET_RECEIVED",
            "RESET_SENT",
            "TIMEOUT",
            "ERROR",
        ])?,
        error: r.opt_string()?,
        // Checked, not kept: the enriched record does not carry it.
        state_path_len: {
            let mut n = 0;
            r.blocks(|r| {
                r.str()?;
                n += 1;
                Ok(())
            })?;
            n
        },
        pid: r.int()?,
        tid: r.int()?,
        comm: r.string()?,
        owner_source: r.enum_sym(&["UNKNOWN", "OPEN", "CLOSE"])?,
        cgroup_id: r.long()?,
        netns_ino: r.long()?,
    };
    if r.at != msg.len() {
        return Err(Reject::new(format!("{} trailing bytes", msg.len() - r.at)));
    }
    if let Some(start) = f.start_time_ns {
        if start > f.end_time_ns {
            return Err(Reject::new("end before start"));
        }
    }
    if !(0..=65535).contains(&f.local_port) || !(0..=65535).contains(&f.remote_port) {
        return Err(Reject::new("port out of range"));
    }
    if f.bytes_sent < 0 || f.bytes_received < 0 || f.end_time_ns <= 0 {
        return Err(Reject::new("negative counter or time"));
    }
    Ok(f)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub host: HostIdentity,
    pub time_ns: i64,
    pub reason: &'static str,
}

pub fn identity(msg: &[u8], fp: &[u8; 8]) -> Result<Identity, Reject> {
    check_header(msg, fp)?;
    let r = &mut Reader { buf: msg, at: 10 };
    let host = host(r)?;
    let time_ns = r.long()?;
    let reason = r.enum_sym(&["START", "HEARTBEAT", "IP_CHANGE", "STOP"])?;
    r.long()?;
    r.long()?;
    r.string()?;
    Ok(Identity {
        host,
        time_ns,
        reason,
    })
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use apache_avro::types::{Record, Value};

    /// Encodes a Flow with apache-avro's generic writer (not our code).
    pub fn encode_flow(f: impl Fn(&mut Record)) -> Vec<u8> {
        let schema = Schema::parse_str(FLOW_SCHEMA).unwrap();
        let Schema::Record(rs) = &schema else {
            panic!()
        };
        let host_schema = &rs.fields[0].schema;
        let mut h = Record::new(host_schema).unwrap();
        h.put("host_id", "h1");
        h.put("hostname", "box");
        h.put("instance_id", Value::Union(0, Box::new(Value::Null)));
        h.put(
            "workload",
            Value::Union(1, Box::new(Value::String("web".into()))),
        );
        h.put(
            "labels",
            Value::Map([("team".to_string(), Value::String("net".into()))].into()),
        );
        h.put("ips", Value::Array(vec![Value::String("10.0.0.1".into())]));
        let mut r = Record::new(&schema).unwrap();
        r.put("host", h);
        r.put("sequence_epoch", 5i64);
        r.put("sequence", 9i64);
        r.put("connection_id", -3i64);
        r.put("record_type", Value::Enum(0, "FINAL".into()));
        r.put("family", Value::Enum(0, "IPV4".into()));
        r.put("direction", Value::Enum(1, "CLIENT".into()));
        r.put("local_addr", Value::Bytes(vec![10, 0, 0, 1]));
        r.put("local_port", 40000);
        r.put("remote_addr", Value::Bytes(vec![10, 0, 0, 2]));
        r.put("remote_port", 443);
        r.put(
            "start_time_ns",
            Value::Union(1, Box::new(Value::Long(1_000))),
        );
        r.put("end_time_ns", 2_000i64);
        r.put("bytes_sent", 12_345i64);
        r.put("bytes_received", 1_000_003i64);
        r.put("segs_in", 1i64);
        r.put("segs_out", 2i64);
        r.put("retransmits", 0i64);
        r.put("srtt_us", 100);
        r.put("rtt_min_us", 50);
        r.put("end_reason", Value::Enum(1, "NORMAL".into()));
        r.put("error", Value::Union(0, Box::new(Value::Null)));
        r.put(
            "state_path",
            Value::Array(vec![Value::String("CLOSE".into())]),
        );
        r.put("pid", 7);
        r.put("tid", 8);
        r.put("comm", "curl");
        r.put("owner_source", Value::Enum(1, "OPEN".into()));
        r.put("cgroup_id", 1i64);
        r.put("netns_ino", 2i64);
        f(&mut r);
        let mut out = vec![0xC3, 0x01];
        out.extend_from_slice(&fingerprint(FLOW_SCHEMA));
        out.extend(apache_avro::to_avro_datum(&schema, r).unwrap());
        out
    }

    #[test]
    fn decodes_what_apache_avro_writes() {
        let fp = fingerprint(FLOW_SCHEMA);
        let f = flow(&encode_flow(|_| {}), &fp).unwrap();
        assert_eq!(f.host.identity.host_id, "h1");
        assert_eq!(f.host.identity.workload.as_deref(), Some("web"));
        assert_eq!(f.host.identity.labels["team"], "net");
        assert_eq!(f.host.identity.ips, vec!["10.0.0.1"]);
        assert_eq!(f.host.ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(f.state_path_len, 1);
        assert_eq!((f.sequence_epoch, f.sequence, f.connection_id), (5, 9, -3));
        assert_eq!(
            (f.record_type, f.family, f.direction),
            ("FINAL", "IPV4", "CLIENT")
        );
        assert_eq!(f.local_addr.to_string(), "10.0.0.1");
        assert_eq!(f.remote_port, 443);
        assert_eq!(f.start_time_ns, Some(1_000));
        assert_eq!((f.bytes_sent, f.bytes_received), (12_345, 1_000_003));
        assert_eq!(f.end_reason, "NORMAL");
        assert_eq!(f.comm, "curl");
        assert_eq!(f.netns_ino, 2);
    }

    #[test]
    fn host_blocks_are_decoded_once_and_shared() {
        let d = Decoder::new(fingerprint(FLOW_SCHEMA));
        let a = d.flow(&encode_flow(|r| r.put("sequence", 1i64))).unwrap();
        let b = d.flow(&encode_flow(|r| r.put("sequence", 2i64))).unwrap();
        assert!(Arc::ptr_eq(&a.host, &b.host));
        assert_eq!(a.host.owner.workload.as_deref(), Some("web"));
        assert_eq!(
            (
                d.host_hits.load(Ordering::Relaxed),
                d.host_misses.load(Ordering::Relaxed)
            ),
            (1, 1)
        );
        // Same shape, invalid UTF-8 in the host id: rejected every time, never cached.
        let mut bad = encode_flow(|_| {});
        bad[11] = 0xff;
        for _ in 0..2 {
            assert_eq!(d.flow(&bad).unwrap_err().0, "invalid UTF-8");
        }
        assert_eq!(d.flow(&encode_flow(|_| {})).unwrap().sequence, 9);
    }

    #[test]
    fn rejects_nonsense() {
        let fp = fingerprint(FLOW_SCHEMA);
        let bad_len = encode_flow(|r| r.put("remote_addr", Value::Bytes(vec![1, 2, 3])));
        assert_eq!(
            flow(&bad_len, &fp).unwrap_err().0,
            "bad remote address length 3 for IPV4"
        );
        let backwards = encode_flow(|r| {
            r.put(
                "start_time_ns",
                Value::Union(1, Box::new(Value::Long(5_000))),
            )
        });
        assert_eq!(flow(&backwards, &fp).unwrap_err().0, "end before start");
        let good = encode_flow(|_| {});
        assert_eq!(
            flow(&good[..good.len() - 3], &fp).unwrap_err().0,
            "truncated"
        );
        let mut other = good.clone();
        other[5] ^= 0xff;
        assert!(flow(&other, &fp)
            .unwrap_err()
            .0
            .starts_with("unknown schema fingerprint"));
        assert_eq!(
            flow(b"hello", &fp).unwrap_err().0,
            "not Avro single-object encoded"
        );
        // A string length near i64::MAX must not overflow the reader.
        let mut huge = vec![0xC3, 0x01];
        huge.extend_from_slice(&fp);
        huge.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(flow(&huge, &fp).unwrap_err().0, "truncated");
        let mut extra = good.clone();
        extra.push(0);
        assert_eq!(flow(&extra, &fp).unwrap_err().0, "1 trailing bytes");
    }
}
