//! The `EnrichedFlow` record (schemas/enriched_flow.avsc): a flow with both
//! IPs attributed to their owners. Encoded field by field in the schema's
//! order; attribute blocks borrow the owner's strings (no copies per flow).

use std::{
    collections::BTreeMap,
    io::{self, Write},
    net::IpAddr,
    sync::Arc,
};

use crate::{
    avro::{Encoder, Writer},
    enums::{Source, Unattributed},
    flow::{Flow, Limits},
    host::{Host, HostIdentity},
    workload::Workload,
};

/// Workload attributes of an owner: the `Attribution` record's owner fields.
/// Shared (`Arc`) by every IP and flow the owner has.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Attrs {
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
    /// The workload that held the IP (Attribution.held_by): a pod or
    /// container its sidecar announced, or a Kubernetes Service.
    #[serde(skip)]
    pub held_by: Option<Arc<Workload>>,
}

impl Attrs {
    /// A sidecar host as an owner: its ids and workload, and the attribute
    /// fields its labels name (`app`, `team`, `zone`, ...).
    pub fn of_host(h: &HostIdentity) -> Attrs {
        let label = |k: &str| h.labels.get(k).cloned();
        Attrs {
            workload: h.workload.clone(),
            host_id: Some(h.host_id.clone()),
            instance_id: h.instance_id.clone(),
            app: label("app"),
            service: label("service"),
            cluster: label("cluster"),
            env: label("env"),
            account: label("account"),
            region: label("region"),
            zone: label("zone"),
            team: label("team"),
            eni_id: label("eni_id"),
            vpc_id: label("vpc_id"),
            subnet_id: label("subnet_id"),
            labels: h.labels.clone(),
            held_by: None,
        }
    }

    /// A workload of sidecar host `h` as an owner: the host's attributes
    /// (zone, cluster, ... apply to its workloads too), named after the
    /// workload, which is `held_by`.
    pub fn of_workload(h: &HostIdentity, w: Arc<Workload>) -> Attrs {
        Attrs { workload: w.display_name().map(str::to_string).or_else(|| h.workload.clone()), held_by: Some(w), ..Attrs::of_host(h) }
    }

    fn write(&self, w: &mut impl Encoder) {
        for s in [
            &self.workload,
            &self.host_id,
            &self.instance_id,
            &self.app,
            &self.service,
            &self.cluster,
            &self.env,
            &self.account,
            &self.region,
            &self.zone,
            &self.team,
        ] {
            w.opt_string(s.as_deref());
        }
        w.string_map(self.labels.iter());
        for s in [&self.eni_id, &self.vpc_id, &self.subnet_id] {
            w.opt_string(s.as_deref());
        }
    }
}

/// One side of a flow: the `Attribution` record.
#[derive(Debug, Clone, PartialEq)]
pub struct Attribution {
    pub source: Source,
    pub reason: Option<Unattributed>,
    pub owner: Option<Arc<Attrs>>,
    pub confidence: f32,
}

impl Attribution {
    /// Attributed by `source`, with that source's confidence.
    pub fn of(owner: &Arc<Attrs>, source: Source) -> Attribution {
        let confidence = match source {
            Source::Sidecar => 1.0,
            Source::Ec2 | Source::Kubernetes => 0.9,
            _ => 0.7,
        };
        Attribution { source, reason: None, owner: Some(owner.clone()), confidence }
    }

    pub fn none(reason: Unattributed) -> Attribution {
        Attribution { source: Source::None, reason: Some(reason), owner: None, confidence: 0.0 }
    }

    pub fn attributed(&self) -> bool {
        self.owner.is_some()
    }

    fn write(&self, w: &mut impl Encoder) {
        w.boolean(self.attributed());
        w.string(self.source.symbol());
        w.opt_string(self.reason.map(Unattributed::symbol));
        match &self.owner {
            Some(o) => o.write(w),
            None => Attrs::default().write(w),
        }
        w.float(self.confidence);
        Workload::write_opt_text(w, self.owner.as_ref().and_then(|o| o.held_by.as_deref()));
    }
}

/// schemas/enriched_flow.avsc: the decoded flow, its host, a flow_id shared
/// by both ends of the connection, and both sides' attribution.
#[derive(Debug, Clone, PartialEq)]
pub struct EnrichedFlow {
    pub flow_id: u64,
    pub host: Arc<Host>,
    pub flow: Flow,
    pub local: Attribution,
    pub remote: Attribution,
}

impl EnrichedFlow {
    /// Appends the record's Avro binary datum.
    pub fn write(&self, out: &mut Vec<u8>) {
        self.encode(&mut Writer(out))
    }

    /// Gives the record's fields to `w`, in the schema's order.
    pub fn encode(&self, w: &mut impl Encoder) {
        let (f, h) = (&self.flow, &self.host.identity);
        let id = hex16(self.flow_id);
        w.string(std::str::from_utf8(&id).expect("hex digits are ASCII"));
        w.string(&h.host_id);
        w.opt_string(h.workload.as_deref());
        w.long(f.sequence_epoch);
        w.long(f.sequence);
        w.long(f.connection_id);
        w.string(f.record_type.symbol());
        w.string(f.family.symbol());
        w.string(f.direction.symbol());
        write_ip(w, f.local_addr);
        w.int(f.local_port as i32);
        write_ip(w, f.remote_addr);
        w.int(f.remote_port as i32);
        w.opt_long(f.start_time_ns);
        for v in [f.end_time_ns, f.bytes_sent, f.bytes_received, f.segs_in, f.segs_out, f.retransmits] {
            w.long(v);
        }
        w.int(f.srtt_us);
        w.int(f.rtt_min_us);
        w.string(f.end_reason.symbol());
        w.opt_string(f.error.as_deref());
        w.int(f.pid);
        w.string(&f.comm);
        w.long(f.cgroup_id);
        w.long(f.netns_ino);
        Workload::write_opt_text(w, f.workload.as_deref());
        self.local.write(w);
        self.remote.write(w);
        Limits::write_opt(w, f.limits.as_ref());
    }
}

fn hex16(v: u64) -> [u8; 16] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [0u8; 16];
    for (i, d) in id.iter_mut().enumerate() {
        *d = HEX[(v >> (60 - 4 * i) & 0xf) as usize];
    }
    id
}

/// An IP address as its usual text form (dotted quad / RFC 5952).
fn write_ip(w: &mut impl Encoder, ip: IpAddr) {
    match ip {
        IpAddr::V4(a) => {
            // Hand-formatted: the common case, and several times cheaper
            // than Display (a test compares the two).
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
            w.string(std::str::from_utf8(&buf[..n]).expect("digits and dots are ASCII"));
        }
        IpAddr::V6(a) => {
            let mut buf = [0u8; 48];
            let mut c = io::Cursor::new(&mut buf[..]);
            write!(c, "{a}").expect("an IPv6 address fits in 48 bytes");
            let n = c.position() as usize;
            w.string(std::str::from_utf8(&buf[..n]).expect("an IPv6 address is ASCII"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_text_matches_display() {
        for a in ["0.0.0.0", "1.2.3.4", "10.0.100.255", "255.255.255.255", "192.168.9.90"] {
            let mut out = Vec::new();
            write_ip(&mut Writer(&mut out), a.parse().unwrap());
            assert_eq!(&out[1..], a.as_bytes());
        }
    }

    #[test]
    fn flow_id_is_16_hex_digits() {
        assert_eq!(&hex16(0x0123_4567_89ab_cdef), b"0123456789abcdef");
    }
}
