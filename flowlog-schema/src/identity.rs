//! The `Identity` record (schemas/identity.avsc): a sidecar's heartbeat,
//! naming its host, its IPs and where its flow sequence stands.

use std::sync::Arc;

use crate::{
    avro::{DecodeError, Encoder, Reader, Writer},
    enums::IdentityReason,
    host::HostIdentity,
    schemas::IDENTITY,
    workload::Workload,
};

/// One workload of the host and the IPs it holds (Identity.workloads).
#[derive(Debug, Clone, PartialEq)]
pub struct WorkloadIps {
    pub workload: Arc<Workload>,
    /// Sorted, in text form (as HostIdentity.ips).
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub host: HostIdentity,
    pub time_ns: i64,
    pub reason: IdentityReason,
    pub sequence_epoch: i64,
    pub next_sequence: i64,
    /// The sidecar's version.
    pub version: String,
    /// The IPs the host's workloads hold in their own network namespaces.
    pub workloads: Vec<WorkloadIps>,
}

impl Identity {
    /// A whole single-object message.
    pub fn to_message(&self) -> Vec<u8> {
        let mut out = IDENTITY.header().to_vec();
        let w = &mut Writer(&mut out);
        self.host.write(w);
        w.long(self.time_ns);
        self.reason.write(w);
        w.long(self.sequence_epoch);
        w.long(self.next_sequence);
        w.string(&self.version);
        w.block(self.workloads.iter(), |w, e| {
            e.workload.write(w);
            w.string_array(e.ips.iter().map(String::as_str));
        });
        out
    }

    pub fn decode(msg: &[u8]) -> Result<Identity, DecodeError> {
        let r = &mut Reader::new(IDENTITY.datum(msg)?);
        let mut id = Identity {
            host: HostIdentity::read(r)?,
            time_ns: r.long()?,
            reason: IdentityReason::read(r)?,
            sequence_epoch: r.long()?,
            next_sequence: r.long()?,
            version: r.string()?,
            workloads: Vec::new(),
        };
        r.blocks(|r| {
            let workload = Arc::new(Workload::read(r)?);
            let mut ips = Vec::new();
            r.blocks(|r| {
                ips.push(r.string()?);
                Ok(())
            })?;
            id.workloads.push(WorkloadIps { workload, ips });
            Ok(())
        })?;
        r.finish()?;
        Ok(id)
    }
}
