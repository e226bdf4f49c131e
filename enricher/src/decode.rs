//! Decodes the flow topic's messages with the record codecs of
//! `flowlog-schema`. Every flow repeats its sidecar's host block (id, name,
//! workload, labels, IPs); it is decoded once per distinct block and shared
//! ([`Host`], from a bounded moka cache keyed by the block's bytes), so a
//! flow costs no string allocations for it and its IPs are parsed once per
//! host, not per flow.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

pub use flowlog_schema::{DecodeError, Flow, Host, HostIdentity, Identity};

/// Host blocks seen recently, by their exact bytes. Bounded: a fleet's
/// sidecars, each with a few IP changes, fit many times over.
const HOST_CACHE_ENTRIES: u64 = 200_000;

/// Decodes flow messages, sharing decoded host blocks.
pub struct Decoder {
    hosts: moka::sync::Cache<Box<[u8]>, Arc<Host>, foldhash::fast::RandomState>,
    pub host_hits: AtomicU64,
    pub host_misses: AtomicU64,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    pub fn new() -> Decoder {
        // foldhash, not SipHash: the keys are ~100-byte blocks hashed per flow.
        let hosts = moka::sync::Cache::builder().max_capacity(HOST_CACHE_ENTRIES).build_with_hasher(Default::default());
        Decoder { hosts, host_hits: AtomicU64::new(0), host_misses: AtomicU64::new(0) }
    }

    /// The host of a block: from the cache, or decoded and cached.
    fn host(&self, block: &[u8]) -> Result<Arc<Host>, DecodeError> {
        if let Some(h) = self.hosts.get(block) {
            self.host_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(h);
        }
        self.host_misses.fetch_add(1, Ordering::Relaxed);
        let h = Arc::new(Host::new(HostIdentity::decode(block)?));
        self.hosts.insert(block.into(), h.clone());
        Ok(h)
    }

    /// Decodes and checks one flow message.
    pub fn flow(&self, msg: &[u8]) -> Result<(Arc<Host>, Flow), DecodeError> {
        flowlog_schema::decode_flow(msg, |block| self.host(block))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flowlog_schema::fixtures;

    #[test]
    fn host_blocks_are_decoded_once_and_shared() {
        let d = Decoder::new();
        let h = fixtures::host();
        let msg = |seq| fixtures::flow_message(&h, &Flow { sequence: seq, ..fixtures::flow() });
        let (a, _) = d.flow(&msg(1)).unwrap();
        let (b, f) = d.flow(&msg(2)).unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(f.sequence, 2);
        assert_eq!(a.owner.workload.as_deref(), Some("web"));
        assert_eq!(a.ips, vec![std::net::IpAddr::from([10, 0, 0, 1])]);
        assert_eq!((d.host_hits.load(Ordering::Relaxed), d.host_misses.load(Ordering::Relaxed)), (1, 1));
        // Same shape, invalid UTF-8 in the host id: rejected every time, never cached.
        let mut bad = msg(3);
        bad[11] = 0xff;
        for _ in 0..2 {
            assert_eq!(d.flow(&bad).unwrap_err(), DecodeError::InvalidUtf8);
        }
        assert_eq!(d.flow(&msg(3)).unwrap().1.sequence, 3);
    }
}
