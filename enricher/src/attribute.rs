//! Turns a decoded flow into an enriched record: both IPs attributed to the
//! owner at the flow's start time (the local side from the record's own
//! sidecar first), plus a flow_id shared by both ends of a connection.

use std::{net::IpAddr, sync::Arc};

pub use flowlog_schema::{Attribution, EnrichedFlow};
use flowlog_schema::{Direction, Host, Source, Unattributed};

use crate::{
    decode::Flow,
    sources::{
        cidr::CidrMap,
        identity::{IdentityStore, Miss},
        Sources,
    },
};

/// FNV-1a over the client->server 5-tuple and the start time in 10 s buckets:
/// the same value on both ends of a connection.
pub fn flow_id(f: &Flow) -> u64 {
    let (l, r) = ((f.local_addr, f.local_port), (f.remote_addr, f.remote_port));
    let (client, server) = match f.direction {
        Direction::Client => (l, r),
        Direction::Server => (r, l),
        Direction::Unknown => {
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
        // As a 4-byte Avro int, so ids stay what they were before ports were u16.
        eat(&(port as i32).to_le_bytes());
    }
    eat(&bucket.to_le_bytes());
    h
}

/// Sources in order of authority: the sidecars' own heartbeats (hosts and
/// their workloads), Kubernetes Services' ClusterIPs, EC2 network
/// interfaces, the static map.
pub struct Attributor<'a> {
    pub identity: &'a IdentityStore,
    pub kubernetes: &'a IdentityStore,
    pub ec2: &'a IdentityStore,
    pub cidr: &'a CidrMap,
}

impl Attributor<'_> {
    fn side(&self, host: &Host, ip: IpAddr, t: i64, is_local: bool) -> Attribution {
        // The sidecar that saw the flow owns its own IPs (and loopback).
        if ip.is_loopback() || is_local && host.ips.contains(&ip) {
            return Attribution::of(&host.owner, Source::Sidecar);
        }
        let mut miss = match self.identity.owner_at(ip, t) {
            Ok(o) => return Attribution::of(o, Source::Sidecar),
            Err(m) => m,
        };
        // A source that knew the IP but not then makes it NO_OWNER_AT_TIME.
        for (store, source) in [(self.kubernetes, Source::Kubernetes), (self.ec2, Source::Ec2)] {
            match store.owner_at(ip, t) {
                Ok(o) => return Attribution::of(o, source),
                Err(Miss::NoOwnerAtTime) => miss = Miss::NoOwnerAtTime,
                Err(Miss::UnknownIp) => {}
            }
        }
        match self.cidr.lookup(ip) {
            Some(o) => Attribution::of(o, Source::Static),
            None => Attribution::none(match miss {
                Miss::UnknownIp => Unattributed::UnknownIp,
                Miss::NoOwnerAtTime => Unattributed::NoOwnerAtTime,
            }),
        }
    }

    /// Attributes both sides at the flow's start (without one, at its end).
    pub fn enrich(&self, host: Arc<Host>, flow: Flow) -> EnrichedFlow {
        let t = flow.time_ns();
        EnrichedFlow {
            flow_id: flow_id(&flow),
            local: self.side(&host, flow.local_addr, t, true),
            remote: self.side(&host, flow.remote_addr, t, false),
            host,
            flow,
        }
    }

    /// Attributes a record again (late metadata may have arrived).
    pub fn settle(&self, e: &mut EnrichedFlow) {
        let t = e.flow.time_ns();
        e.local = self.side(&e.host, e.flow.local_addr, t, true);
        e.remote = self.side(&e.host, e.flow.remote_addr, t, false);
    }
}

impl Sources {
    /// Runs `f` with an attributor over the sources as they are now.
    pub fn attribute<R>(&self, f: impl FnOnce(&Attributor) -> R) -> R {
        let (identity, kubernetes) = (self.identity.read().unwrap(), self.kubernetes.read().unwrap());
        let (ec2, cidr) = (self.ec2.read().unwrap(), self.cidr.read().unwrap());
        f(&Attributor { identity: &identity, kubernetes: &kubernetes, ec2: &ec2, cidr: &cidr })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlog_schema::fixtures;

    /// flow_id is part of the enriched files: its value must never change
    /// (the figure is FNV-1a of the 5-tuple computed independently, in Python).
    #[test]
    fn flow_id_is_stable_and_shared_by_both_ends() {
        let client = fixtures::flow();
        assert_eq!(flow_id(&client), 0x306b_71f4_1571_cb0c);
        let server = Flow {
            direction: Direction::Server,
            local_addr: client.remote_addr,
            local_port: client.remote_port,
            remote_addr: client.local_addr,
            remote_port: client.local_port,
            ..client.clone()
        };
        assert_eq!(flow_id(&server), flow_id(&client));
    }
}
