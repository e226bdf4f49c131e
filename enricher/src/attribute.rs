//! Turns a decoded flow into an enriched record: both IPs attributed to the
//! owner at the flow's start time (the local side from the record's own
//! sidecar first), plus a flow_id shared by both ends of a connection.

use std::net::IpAddr;

use crate::{
    decode::Flow,
    sources::{
        cidr::CidrMap,
        identity::{IdentityStore, Miss},
        Owner,
    },
};

pub const ENRICHED_SCHEMA: &str = include_str!("../../schemas/enriched_flow.avsc");

/// One side of a flow: the Attribution record of schemas/enriched_flow.avsc.
/// The owner's attributes are shared with the metadata source, not copied.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribution {
    pub attributed: bool,
    pub source: &'static str,
    pub reason: Option<&'static str>,
    pub owner: Option<Owner>,
    pub confidence: f32,
}

impl Attribution {
    fn of(o: &Owner, source: &'static str) -> Attribution {
        let confidence = match source {
            "SIDECAR" => 1.0,
            "EC2" => 0.9,
            _ => 0.7,
        };
        Attribution {
            attributed: true,
            source,
            reason: None,
            owner: Some(o.clone()),
            confidence,
        }
    }
    fn none(reason: &'static str) -> Attribution {
        Attribution {
            attributed: false,
            source: "NONE",
            reason: Some(reason),
            owner: None,
            confidence: 0.0,
        }
    }
}

/// schemas/enriched_flow.avsc: the decoded flow (its host is the record's
/// host identity), its flow_id and both sides' attribution. Encoded by
/// [`crate::encode`].
#[derive(Debug, Clone, PartialEq)]
pub struct EnrichedFlow {
    pub flow: Flow,
    pub flow_id: u64,
    pub local: Attribution,
    pub remote: Attribution,
}

/// FNV-1a over the client->server 5-tuple and the start time in 10 s buckets:
/// the same value on both ends of a connection.
pub fn flow_id(f: &Flow) -> u64 {
    let (l, r) = ((f.local_addr, f.local_port), (f.remote_addr, f.remote_port));
    let (client, server) = match f.direction {
        "CLIENT" => (l, r),
        "SERVER" => (r, l),
        _ => {
            if (l.0, l.1) <= (r.0, r.1) {
                (l, r)
            } else {
                (r, l)
            }
        }
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
    h
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
        if ip.is_loopback() || is_local && f.host.ips.contains(&ip) {
            return Attribution::of(&f.host.owner, "SIDECAR");
        }
        let miss = match self.identity.owner_at(ip, t) {
            Ok(o) => return Attribution::of(o, "SIDECAR"),
            Err(m) => m,
        };
        let miss = match self.ec2.owner_at(ip, t) {
            Ok(o) => return Attribution::of(o, "EC2"),
            Err(Miss::NoOwnerAtTime) => Miss::NoOwnerAtTime,
            Err(Miss::UnknownIp) => miss,
        };
        match self.cidr.lookup(ip) {
            Some(o) => Attribution::of(o, "STATIC"),
            None => Attribution::none(match miss {
                Miss::UnknownIp => "UNKNOWN_IP",
                Miss::NoOwnerAtTime => "NO_OWNER_AT_TIME",
            }),
        }
    }

    pub fn enrich(&self, flow: Flow) -> EnrichedFlow {
        // Attribution is at the flow's start; without one, at its end.
        let t = flow.start_time_ns.unwrap_or(flow.end_time_ns);
        EnrichedFlow {
            flow_id: flow_id(&flow),
            local: self.side(&flow, flow.local_addr, t, true),
            remote: self.side(&flow, flow.remote_addr, t, false),
            flow,
        }
    }

    /// Attributes a record again (late metadata may have arrived).
    pub fn settle(&self, e: &mut EnrichedFlow) {
        let t = e.flow.start_time_ns.unwrap_or(e.flow.end_time_ns);
        e.local = self.side(&e.flow, e.flow.local_addr, t, true);
        e.remote = self.side(&e.flow, e.flow.remote_addr, t, false);
    }
}

#[cfg(test)]
mod tests {
    // The record's encoding is tested in crate::encode.
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
            if p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("enriched_flow.")
            {
                let old = Schema::parse_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
                SchemaCompatibility::can_read(&old, &current)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 1);
    }
}
