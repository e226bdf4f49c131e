//! Turns a decoded flow into an enriched record: both IPs attributed to the
//! owner at the flow's start time (the local side from the record's own
//! sidecar first), plus a flow_id shared by both ends of a connection.

use std::{collections::BTreeMap, net::IpAddr};

use serde::Serialize;

use crate::{
    decode::Flow,
    sources::{cidr::CidrMap, identity::{owner_of, IdentityStore, Miss}, Owner},
};

pub const ENRICHED_SCHEMA: &str = include_str!("../../schemas/enriched_flow.avsc");

/// Mirrors the Attribution record of schemas/enriched_flow.avsc.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Attribution {
    pub attributed: bool,
    pub source: &'static str,
    pub reason: Option<&'static str>,
    pub workload: Option<String>,
    pub host_id: Option<String>,
    pub instance_id: Option<String>,
    pub app: Option<String>,
    pub service: Option<String>,
    pub cluster: Option<String>,
    pub env: Option<String>,
    pub account: Option<String>,
    pub region: Option<String>,
    pub zone: Option<String>,
    pub team: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub eni_id: Option<String>,
    pub vpc_id: Option<String>,
    pub subnet_id: Option<String>,
    pub confidence: f32,
}

impl Attribution {
    fn of(o: &Owner, source: &'static str) -> Attribution {
        Attribution {
            attributed: true,
            source,
            reason: None,
            workload: o.workload.clone(),
            host_id: o.host_id.clone(),
            instance_id: o.instance_id.clone(),
            app: o.app.clone(),
            service: o.service.clone(),
            cluster: o.cluster.clone(),
            env: o.env.clone(),
            account: o.account.clone(),
            region: o.region.clone(),
            zone: o.zone.clone(),
            team: o.team.clone(),
            labels: o.labels.clone(),
            eni_id: o.eni_id.clone(),
            vpc_id: o.vpc_id.clone(),
            subnet_id: o.subnet_id.clone(),
            confidence: match source {
                "SIDECAR" => 1.0,
                "EC2" => 0.9,
                _ => 0.7,
            },
        }
    }
    fn none(reason: &'static str) -> Attribution {
        Attribution {
            attributed: false,
            source: "NONE",
            reason: Some(reason),
            workload: None,
            host_id: None,
            instance_id: None,
            app: None,
            service: None,
            cluster: None,
            env: None,
            account: None,
            region: None,
            zone: None,
            team: None,
            labels: BTreeMap::new(),
            eni_id: None,
            vpc_id: None,
            subnet_id: None,
            confidence: 0.0,
        }
    }
}

/// Mirrors schemas/enriched_flow.avsc, field for field, in order.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EnrichedFlow {
    pub flow_id: String,
    pub host_id: String,
    pub host_workload: Option<String>,
    pub sequence_epoch: i64,
    pub sequence: i64,
    pub connection_id: i64,
    pub record_type: &'static str,
    pub family: &'static str,
    pub direction: &'static str,
    pub local_ip: String,
    pub local_port: i32,
    pub remote_ip: String,
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
    pub pid: i32,
    pub comm: String,
    pub cgroup_id: i64,
    pub netns_ino: i64,
    pub local: Attribution,
    pub remote: Attribution,
}

/// FNV-1a over the client->server 5-tuple and the start time in 10 s buckets:
/// the same value on both ends of a connection.
pub fn flow_id(f: &Flow) -> String {
    let (l, r) = ((f.local_addr, f.local_port), (f.remote_addr, f.remote_port));
    let (client, server) = match f.direction {
        "CLIENT" => (l, r),
        "SERVER" => (r, l),
        _ => if (l.0, l.1) <= (r.0, r.1) { (l, r) } else { (r, l) },
    };
    let bucket = f.start_time_ns.unwrap_or(0) / 10_000_000_000;
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: &[u8]| {
        for x in b {
            h ^= *x as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    };
    for (ip, port) in [client, server] {
        match ip {
            IpAddr::V4(a) => eat(&a.octets()),
            IpAddr::V6(a) => eat(&a.octets()),
        }
        eat(&port.to_le_bytes());
    }
    eat(&bucket.to_le_bytes());
    format!("{h:016x}")
}

/// Sources in order of authority: the sidecars' own heartbeats, EC2
/// network interfaces, the static map.
pub struct Attributor<'a> {
    pub identity: &'a IdentityStore,
    pub ec2: &'a IdentityStore,
    pub cidr: &'a CidrMap,
}

impl Attributor<'_> {
    fn side(&self, f: &Flow, ip: IpAddr, t: i64, is_local: bool) -> Attribution {
        // The sidecar that saw the flow owns its own IPs (and loopback).
        let own = ip.is_loopback() || f.host.ips.iter().any(|s| s.parse::<IpAddr>().ok() == Some(ip));
        if is_local && own || !is_local && ip.is_loopback() {
            return Attribution::of(&owner_of(&f.host), "SIDECAR");
        }
        let miss = match self.identity.owner_at(ip, t) {
            Ok(o) => return Attribution::of(&o, "SIDECAR"),
            Err(m) => m,
        };
        let miss = match self.ec2.owner_at(ip, t) {
            Ok(o) => return Attribution::of(&o, "EC2"),
            Err(Miss::NoOwnerAtTime) => Miss::NoOwnerAtTime,
            Err(Miss::UnknownIp) => miss,
        };
        match self.cidr.lookup(ip) {
            Some(o) => Attribution::of(&o, "STATIC"),
            None => Attribution::none(match miss {
                Miss::UnknownIp => "UNKNOWN_IP",
                Miss::NoOwnerAtTime => "NO_OWNER_AT_TIME",
            }),
        }
    }

    pub fn enrich(&self, f: Flow) -> EnrichedFlow {
        // Attribution is at the flow's start; without one, at its end.
        let t = f.start_time_ns.unwrap_or(f.end_time_ns);
        let local = self.side(&f, f.local_addr, t, true);
        let remote = self.side(&f, f.remote_addr, t, false);
        EnrichedFlow {
            flow_id: flow_id(&f),
            host_workload: f.host.workload.clone(),
            sequence_epoch: f.sequence_epoch,
            sequence: f.sequence,
            connection_id: f.connection_id,
            record_type: f.record_type,
            family: f.family,
            direction: f.direction,
            local_ip: f.local_addr.to_string(),
            local_port: f.local_port,
            remote_ip: f.remote_addr.to_string(),
            remote_port: f.remote_port,
            start_time_ns: f.start_time_ns,
            end_time_ns: f.end_time_ns,
            bytes_sent: f.bytes_sent,
            bytes_received: f.bytes_received,
            segs_in: f.segs_in,
            segs_out: f.segs_out,
            retransmits: f.retransmits,
            srtt_us: f.srtt_us,
            rtt_min_us: f.rtt_min_us,
            end_reason: f.end_reason,
            error: f.error,
            pid: f.pid,
            comm: f.comm,
            cgroup_id: f.cgroup_id,
            netns_ino: f.netns_ino,
            local,
            remote,
            host_id: f.host.host_id,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use apache_avro::{schema_compatibility::SchemaCompatibility, Schema};

    /// Every committed version of the enriched schema stays readable.
    #[test]
    fn enriched_schema_stays_backward_compatible() {
        let current = Schema::parse_str(ENRICHED_SCHEMA).unwrap();
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/history");
        let mut n = 0;
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.file_name().unwrap().to_string_lossy().starts_with("enriched_flow.") {
                let old = Schema::parse_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                SchemaCompatibility::can_read(&old, &current).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 1);
    }

    /// What serde writes is what the schema says: a record round-trips
    /// through apache-avro's container writer and reader.
    #[test]
    fn enriched_record_matches_the_schema() {
        let schema = Schema::parse_str(ENRICHED_SCHEMA).unwrap();
        let f = crate::decode::flow(&crate::decode::tests::encode_flow(|_| {}), &crate::decode::fingerprint(crate::decode::FLOW_SCHEMA)).unwrap();
        let ids = IdentityStore::default();
        let e = Attributor { identity: &ids, ec2: &ids, cidr: &CidrMap::default() }.enrich(f);
        let mut w = apache_avro::Writer::new(&schema, Vec::new());
        w.append_ser(&e).unwrap();
        let bytes = w.into_inner().unwrap();
        let recs: Vec<_> = apache_avro::Reader::new(&bytes[..]).unwrap().collect();
        assert_eq!(recs.len(), 1);
        assert!(recs[0].is_ok());
    }
}
