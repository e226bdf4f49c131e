//! Decodes the flow topic's messages with the record codecs of
//! `flowlog-schema`. Every flow has its sidecar's host block (id, name,
//! workload, labels, IPs: in each Flow message, once per FlowBatch); it is
//! decoded once per distinct block and shared
//! ([`Host`], from a bounded moka cache keyed by the block's bytes), so a
//! flow costs no string allocations for it and its IPs are parsed once per
//! host, not per flow.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

pub use flowlog_schema::{DecodeError, Flow, Host, HostIdentity, Identity};

/// Host blocks seen recently, by their exact bytes, bounded by their
/// memory (the key plus the decoded host, about twice the block), not by
/// their number: a fleet's sidecars (~100-byte to few-KB blocks), each with
/// a few IP changes, fit many times over, and hostile producers sending
/// huge distinct blocks cannot grow it past this.
pub const HOST_CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// What one cached host block costs: its bytes as the key, about twice that
/// decoded (strings, parsed IPs), and the entry's fixed overhead.
fn host_weight(block: &[u8]) -> u32 {
    u32::try_from(block.len().saturating_mul(3).saturating_add(256)).unwrap_or(u32::MAX)
}

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
        Decoder::with_capacity(HOST_CACHE_BYTES)
    }

    /// A decoder whose host cache holds at most about `bytes`.
    // moka's weigher takes `&K`, and the key is the boxed block.
    #[allow(clippy::borrowed_box)]
    pub fn with_capacity(bytes: u64) -> Decoder {
        // foldhash, not SipHash: the keys are ~100-byte blocks hashed per flow.
        let hosts = moka::sync::Cache::builder()
            .max_capacity(bytes)
            .weigher(|k: &Box<[u8]>, _: &Arc<Host>| host_weight(k))
            .build_with_hasher(Default::default());
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

    /// Decodes and checks one record of a flow topic message.
    pub fn item(&self, record: &flowlog_schema::FlowItem) -> Result<(Arc<Host>, Flow), DecodeError> {
        record.decode(|block| self.host(block))
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

    /// Distinct host blocks with 100 KB labels (a hostile or broken
    /// producer): the cache stays within its byte bound.
    #[test]
    fn the_host_cache_is_bounded_in_bytes() {
        let bound = 4 * 1024 * 1024;
        let d = Decoder::with_capacity(bound);
        for i in 0..200 {
            let mut h = fixtures::host();
            h.labels.insert("big".into(), format!("{i}{}", "x".repeat(100_000)));
            d.flow(&fixtures::flow_message(&h, &fixtures::flow())).unwrap();
        }
        d.hosts.run_pending_tasks();
        assert!(d.hosts.weighted_size() <= bound, "{} > {bound}", d.hosts.weighted_size());
        assert!(d.hosts.entry_count() >= 10, "still caches what fits");
    }
}
