//! The `Flow` record (schemas/flow.avsc): one TCP connection seen from one
//! host. [`Flow`] holds every field but the leading host block, which a
//! sidecar encodes once ([`HostIdentity::encode`]) and an enricher decodes
//! once per distinct block ([`decode_flow`]).

use std::{net::IpAddr, sync::Arc};

use flowlog_common::tcp_state;
use smol_str::SmolStr;

use crate::{
    avro::{DecodeError, Encoder, Reader, Writer},
    enums::{Direction, EndReason, Family, OwnerSource, RecordType},
    host::HostIdentity,
    schemas::{single_object, SchemaDef, FLOW, FLOW_V1, FLOW_V2, FLOW_V3},
    workload::{Workload, WorkloadVersion},
};

/// The fields of schemas/flow.avsc after `host`, in the schema's order (see
/// the schema's docs for units and meaning).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Flow {
    pub sequence_epoch: i64,
    pub sequence: i64,
    pub connection_id: i64,
    pub record_type: RecordType,
    pub family: Family,
    pub direction: Direction,
    pub local_addr: IpAddr,
    pub local_port: u16,
    pub remote_addr: IpAddr,
    pub remote_port: u16,
    pub start_time_ns: Option<i64>,
    pub end_time_ns: i64,
    pub bytes_sent: i64,
    pub bytes_received: i64,
    pub segs_in: i64,
    pub segs_out: i64,
    pub retransmits: i64,
    pub srtt_us: i32,
    pub rtt_min_us: i32,
    pub end_reason: EndReason,
    pub error: Option<String>,
    pub state_path: StatePath,
    pub pid: i32,
    pub tid: i32,
    /// The process name: at most 15 bytes from the kernel, so it stays
    /// inline (no allocation per record).
    pub comm: SmolStr,
    pub owner_source: OwnerSource,
    pub cgroup_id: i64,
    pub netns_ino: i64,
    /// Shared by every flow of its cgroup (the sidecar resolves it once).
    pub workload: Option<Arc<Workload>>,
    pub limits: Option<Limits>,
}

/// schemas/flow.avsc's `Limits`: what held the connection back (see the
/// schema's docs). Values so far, not deltas.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Limits {
    pub busy_us: i64,
    pub rwnd_limited_us: i64,
    pub sndbuf_limited_us: i64,
    pub delivery_rate_bytes_per_s: i64,
    pub bytes_retrans: i64,
    pub reordering: i64,
    pub reord_seen: i64,
    pub rto_count: Option<i64>,
    pub rto_recoveries: Option<i64>,
    pub rto_time_ms: Option<i64>,
}

impl Limits {
    /// `["null", Limits]`, in the schema's order.
    pub fn write_opt(w: &mut impl Encoder, v: Option<&Limits>) {
        w.null_or(v.is_some());
        let Some(l) = v else { return };
        for v in [
            l.busy_us,
            l.rwnd_limited_us,
            l.sndbuf_limited_us,
            l.delivery_rate_bytes_per_s,
            l.bytes_retrans,
            l.reordering,
            l.reord_seen,
        ] {
            w.long(v);
        }
        w.opt_long(l.rto_count);
        w.opt_long(l.rto_recoveries);
        w.opt_long(l.rto_time_ms);
    }

    pub fn read_opt(r: &mut Reader) -> Result<Option<Limits>, DecodeError> {
        if r.union_index(2)? == 0 {
            return Ok(None);
        }
        Ok(Some(Limits {
            busy_us: r.long()?,
            rwnd_limited_us: r.long()?,
            sndbuf_limited_us: r.long()?,
            delivery_rate_bytes_per_s: r.long()?,
            bytes_retrans: r.long()?,
            reordering: r.long()?,
            reord_seen: r.long()?,
            rto_count: r.opt_long()?,
            rto_recoveries: r.opt_long()?,
            rto_time_ms: r.opt_long()?,
        }))
    }
}

/// The parts of a Flow datum that many records share, which a writer may
/// encode once and copy (the sidecar keeps the last workload's bytes and
/// those of the few state paths its flows go through). Each method must
/// write exactly what its default does.
pub trait Parts {
    /// `["null", Workload]`.
    fn workload(&mut self, w: &mut Writer, workload: Option<&Arc<Workload>>) {
        Workload::write_opt(w, workload.map(|a| &**a));
    }
    /// The state names, oldest first.
    fn state_path(&mut self, w: &mut Writer, path: StatePath) {
        path.write(w);
    }
}

/// Every part encoded afresh.
pub struct Fresh;

impl Parts for Fresh {}

fn write_addr(w: &mut Writer, ip: &IpAddr) {
    match ip {
        IpAddr::V4(a) => w.bytes(&a.octets()),
        IpAddr::V6(a) => w.bytes(&a.octets()),
    }
}

fn read_addr(r: &mut Reader, family: Family, side: &'static str) -> Result<IpAddr, DecodeError> {
    let b = r.bytes()?;
    match (family, b.len()) {
        (Family::Ipv4, 4) => Ok(IpAddr::from(<[u8; 4]>::try_from(b).expect("4 bytes"))),
        (Family::Ipv6, 16) => Ok(IpAddr::from(<[u8; 16]>::try_from(b).expect("16 bytes"))),
        (family, len) => Err(DecodeError::BadAddressLength { side, len, family }),
    }
}

fn read_port(r: &mut Reader) -> Result<u16, DecodeError> {
    u16::try_from(r.int()?).map_err(|_| DecodeError::PortOutOfRange)
}

impl Flow {
    /// Appends the datum: `host_block` (an encoded [`HostIdentity`]) then
    /// this record's fields.
    pub fn write(&self, host_block: &[u8], w: &mut Writer) {
        self.write_with(host_block, w, &mut Fresh);
    }

    /// [`Flow::write`] with the workload and state path written by `parts`
    /// (the sidecar copies their bytes, encoded once).
    pub fn write_with(&self, host_block: &[u8], w: &mut Writer, parts: &mut impl Parts) {
        w.0.extend_from_slice(host_block);
        self.write_body_with(w, parts);
    }

    /// The datum's fields after the host block: a FlowBatch's item
    /// ([`crate::BatchWriter::push_with`]), whose host block the batch holds once.
    pub fn write_body_with(&self, w: &mut Writer, parts: &mut impl Parts) {
        w.long(self.sequence_epoch);
        w.long(self.sequence);
        w.long(self.connection_id);
        self.record_type.write(w);
        self.family.write(w);
        self.direction.write(w);
        write_addr(w, &self.local_addr);
        w.int(self.local_port as i32);
        write_addr(w, &self.remote_addr);
        w.int(self.remote_port as i32);
        w.opt_long(self.start_time_ns);
        w.long(self.end_time_ns);
        w.long(self.bytes_sent);
        w.long(self.bytes_received);
        w.long(self.segs_in);
        w.long(self.segs_out);
        w.long(self.retransmits);
        w.int(self.srtt_us);
        w.int(self.rtt_min_us);
        self.end_reason.write(w);
        w.opt_string(self.error.as_deref());
        parts.state_path(w, self.state_path);
        w.int(self.pid);
        w.int(self.tid);
        w.string(&self.comm);
        self.owner_source.write(w);
        w.long(self.cgroup_id);
        w.long(self.netns_ino);
        parts.workload(w, self.workload.as_ref());
        Limits::write_opt(w, self.limits.as_ref());
    }

    /// A whole single-object message.
    pub fn to_message(&self, host_block: &[u8], out: &mut Vec<u8>) {
        out.extend_from_slice(&FLOW.header());
        self.write(host_block, &mut Writer(out));
    }

    /// [`Flow::to_message`] with the workload and state path written by
    /// `parts` (see [`Flow::write_with`]).
    pub fn to_message_with(&self, host_block: &[u8], out: &mut Vec<u8>, parts: &mut impl Parts) {
        out.extend_from_slice(&FLOW.header());
        self.write_with(host_block, &mut Writer(out), parts);
    }

    /// Reads the fields after the host block (current version).
    pub fn read(r: &mut Reader) -> Result<Flow, DecodeError> {
        Flow::read_version(r, Some(WorkloadVersion::Current), true)
    }

    /// Reads the fields after the host block as a version wrote them: v1
    /// (`workload` None) ends at netns_ino; v2 appended `workload`, v3
    /// appended the Kubernetes API's fields to it (defaults: null, empty),
    /// v4 appended `limits` (default null).
    fn read_version(r: &mut Reader, workload: Option<WorkloadVersion>, limits: bool) -> Result<Flow, DecodeError> {
        let mut f = Flow::read_v1(r)?;
        if let Some(v) = workload {
            f.workload = Workload::read_opt(r, v)?;
        }
        if limits {
            f.limits = Limits::read_opt(r)?;
        }
        Ok(f)
    }

    /// Reads the fields of history/flow.v1.avsc after the host block: the
    /// current fields up to netns_ino.
    fn read_v1(r: &mut Reader) -> Result<Flow, DecodeError> {
        let sequence_epoch = r.long()?;
        let sequence = r.long()?;
        let connection_id = r.long()?;
        let record_type = RecordType::read(r)?;
        let family = Family::read(r)?;
        Ok(Flow {
            sequence_epoch,
            sequence,
            connection_id,
            record_type,
            family,
            direction: Direction::read(r)?,
            local_addr: read_addr(r, family, "local")?,
            local_port: read_port(r)?,
            remote_addr: read_addr(r, family, "remote")?,
            remote_port: read_port(r)?,
            start_time_ns: r.opt_long()?,
            end_time_ns: r.long()?,
            bytes_sent: r.long()?,
            bytes_received: r.long()?,
            segs_in: r.long()?,
            segs_out: r.long()?,
            retransmits: r.long()?,
            srtt_us: r.int()?,
            rtt_min_us: r.int()?,
            end_reason: EndReason::read(r)?,
            error: r.opt_string()?,
            state_path: StatePath::read(r)?,
            pid: r.int()?,
            tid: r.int()?,
            comm: SmolStr::new(r.str()?),
            owner_source: OwnerSource::read(r)?,
            cgroup_id: r.long()?,
            netns_ino: r.long()?,
            workload: None,
            limits: None,
        })
    }

    /// What a well-formed datum can still get wrong.
    pub fn validate(&self) -> Result<(), DecodeError> {
        if self.start_time_ns.is_some_and(|start| start > self.end_time_ns) {
            return Err(DecodeError::EndBeforeStart);
        }
        if self.bytes_sent < 0 || self.bytes_received < 0 || self.end_time_ns <= 0 {
            return Err(DecodeError::NegativeCounterOrTime);
        }
        Ok(())
    }

    /// Attribution time: the flow's start, or its end when the open was not seen.
    pub fn time_ns(&self) -> i64 {
        self.start_time_ns.unwrap_or(self.end_time_ns)
    }
}

/// Decodes one Flow message: header, host block (handed to `host`, which
/// may decode it or find it in a cache), fields, checks. Messages of the
/// previous versions (history/flow.v1.avsc to v3: sidecars not yet
/// upgraded, and their spools) are read too, their missing fields empty.
pub fn decode_flow<H>(
    msg: &[u8],
    host: impl FnOnce(&[u8]) -> Result<H, DecodeError>,
) -> Result<(H, Flow), DecodeError> {
    let (fingerprint, datum) = single_object(msg)?;
    let version = FlowVersion::of(fingerprint)?;
    let mut r = Reader::new(datum);
    let block = HostIdentity::skip(&mut r)?;
    let h = host(block)?;
    version.read_body(&mut r).map(|f| (h, f))
}

/// Decodes a Flow datum's fields after its host block (a FlowBatch item),
/// written with the Flow schema of `fingerprint`; `host_block` is the
/// block the batch holds for it, handed to `host` as [`decode_flow`] does.
pub fn decode_flow_body<H>(
    fingerprint: [u8; 8],
    host_block: &[u8],
    body: &[u8],
    host: impl FnOnce(&[u8]) -> Result<H, DecodeError>,
) -> Result<(H, Flow), DecodeError> {
    let version = FlowVersion::of(fingerprint)?;
    let h = host(host_block)?;
    version.read_body(&mut Reader::new(body)).map(|f| (h, f))
}

/// What a Flow schema version wrote after the host block: the workload's
/// form (if any) and whether `limits` follows.
#[derive(Clone, Copy)]
struct FlowVersion {
    workload: Option<WorkloadVersion>,
    limits: bool,
}

impl FlowVersion {
    /// The version whose schema has this fingerprint.
    fn of(fingerprint: [u8; 8]) -> Result<FlowVersion, DecodeError> {
        /// Each version's schema, the workload form it wrote and whether it
        /// has `limits`, newest first.
        const VERSIONS: [(&SchemaDef, Option<WorkloadVersion>, bool); 4] = [
            (&FLOW, Some(WorkloadVersion::Current), true),
            (&FLOW_V3, Some(WorkloadVersion::Current), false),
            (&FLOW_V2, Some(WorkloadVersion::V2), false),
            (&FLOW_V1, None, false),
        ];
        VERSIONS
            .iter()
            .find(|(schema, ..)| schema.fingerprint() == fingerprint)
            .map(|&(_, workload, limits)| FlowVersion { workload, limits })
            .ok_or(DecodeError::UnknownFingerprint(fingerprint))
    }

    /// The fields after the host block, to the datum's end, checked.
    fn read_body(self, r: &mut Reader) -> Result<Flow, DecodeError> {
        let f = Flow::read_version(r, self.workload, self.limits)?;
        r.finish()?;
        f.validate()?;
        Ok(f)
    }
}

/// The TCP states a connection went through, oldest first: one nibble per
/// state (the kernel's numbering), the oldest in the most significant
/// non-zero nibble, as the eBPF program packs it. No TCP state is 0, so
/// there are no ambiguous zero nibbles. Holds the 16 most recent states.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatePath(pub u64);

/// The state of a name this version does not know.
const UNKNOWN_STATE: u8 = 15;

impl StatePath {
    pub fn len(&self) -> usize {
        (64 - self.0.leading_zeros() as usize).div_ceil(4)
    }
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }
    /// The state names, oldest first.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = &'static str> {
        let p = self.0;
        (0..self.len()).rev().map(move |i| tcp_state::name(((p >> (4 * i)) & 0xf) as u8))
    }
    /// As schemas/flow.avsc's `state_path`: an array of the names.
    pub fn write(&self, w: &mut Writer) {
        w.block(self.iter(), |w, s| w.string(s));
    }
    /// Appends a state (the oldest falls off past 16).
    pub fn push(&mut self, state: u8) {
        self.0 = (self.0 << 4) | (state & 0xf) as u64;
    }
    fn read(r: &mut Reader) -> Result<StatePath, DecodeError> {
        let mut p = StatePath::default();
        r.blocks(|r| {
            p.push(tcp_state::from_name(r.str()?).unwrap_or(UNKNOWN_STATE));
            Ok(())
        })?;
        Ok(p)
    }
}

impl serde::Serialize for StatePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_path_packs_like_the_kernel() {
        let p = StatePath(0x721457);
        assert_eq!(p.iter().collect::<Vec<_>>(), ["CLOSE", "SYN_SENT", "ESTABLISHED", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]);
        let mut q = StatePath::default();
        for s in [7, 2, 1, 4, 5, 7] {
            q.push(s);
        }
        assert_eq!(p, q);
        assert!(StatePath::default().is_empty());
    }
}
