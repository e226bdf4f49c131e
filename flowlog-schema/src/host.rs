//! The `HostIdentity` record: who a sidecar's host is. It leads every Flow
//! and Identity message; Avro records have no framing, so the sidecar encodes
//! the block once per identity change and copies its bytes into every
//! message, and the enricher decodes each distinct block once ([`Host`]).

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use crate::{
    avro::{DecodeError, Encoder, Reader, Writer},
    enriched::Attrs,
};

#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HostIdentity {
    pub host_id: String,
    pub hostname: String,
    pub instance_id: Option<String>,
    pub workload: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<String>,
}

impl HostIdentity {
    /// The record's Avro bytes (to be copied into messages).
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(128);
        self.write(&mut Writer(&mut buf));
        buf
    }

    pub fn write(&self, w: &mut Writer) {
        w.string(&self.host_id);
        w.string(&self.hostname);
        w.opt_string(self.instance_id.as_deref());
        w.opt_string(self.workload.as_deref());
        w.string_map(self.labels.iter());
        w.string_array(self.ips.iter().map(String::as_str));
    }

    pub fn read(r: &mut Reader) -> Result<HostIdentity, DecodeError> {
        let mut h = HostIdentity {
            host_id: r.string()?,
            hostname: r.string()?,
            instance_id: r.opt_string()?,
            workload: r.opt_string()?,
            ..Default::default()
        };
        r.blocks(|r| {
            let k = r.string()?;
            h.labels.insert(k, r.string()?);
            Ok(())
        })?;
        r.blocks(|r| {
            h.ips.push(r.string()?);
            Ok(())
        })?;
        Ok(h)
    }

    /// Decodes a whole block (exactly one record).
    pub fn decode(block: &[u8]) -> Result<HostIdentity, DecodeError> {
        let mut r = Reader::new(block);
        let h = HostIdentity::read(&mut r)?;
        r.finish()?;
        Ok(h)
    }

    /// Walks over a block, checking its structure but building nothing;
    /// returns its bytes.
    pub fn skip<'a>(r: &mut Reader<'a>) -> Result<&'a [u8], DecodeError> {
        let start = r.at;
        r.bytes()?;
        r.bytes()?;
        for _ in 0..2 {
            if r.union_index(2)? == 1 {
                r.bytes()?;
            }
        }
        r.blocks(|r| r.bytes().and_then(|_| r.bytes()).map(|_| ()))?;
        r.blocks(|r| r.bytes().map(|_| ()))?;
        Ok(&r.buf[start..r.at])
    }
}

/// A decoded host block with the forms consumers need, built once per
/// distinct block and shared by all its flows.
#[derive(Debug, PartialEq)]
pub struct Host {
    pub identity: HostIdentity,
    /// The host as the owner of its own IPs.
    pub owner: Arc<Attrs>,
    /// `identity.ips` parsed (unparseable entries left out).
    pub ips: Vec<IpAddr>,
}

impl Host {
    pub fn new(identity: HostIdentity) -> Host {
        Host {
            owner: Arc::new(Attrs::of_host(&identity)),
            ips: identity.ips.iter().filter_map(|s| s.parse().ok()).collect(),
            identity,
        }
    }
}
