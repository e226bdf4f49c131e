//! IP ownership history built from the sidecars' identity heartbeats: each
//! IP maps to the intervals during which some host announced it. A flow is
//! attributed to the owner at its start time, never to a later owner.

use std::{collections::HashSet, net::IpAddr, sync::Arc};

use foldhash::HashMap;
use smallvec::SmallVec;

use super::{Attrs, Owner};
use flowlog_schema::{Identity, IdentityReason};

/// Intervals kept per IP; older ones are forgotten (bounded memory).
const MAX_INTERVALS_PER_IP: usize = 32;

/// 24 bytes: the owner (with its host id) is shared by all the IPs of one
/// heartbeat, so memory per tracked IP stays small.
#[derive(Debug, Clone)]
struct Interval {
    from_ns: i64,
    /// i64::MAX while the host still announces the IP.
    to_ns: i64,
    owner: Owner,
}

impl Interval {
    fn open_by(&self, host_id: &str) -> bool {
        self.to_ns == i64::MAX && self.owner.host_id.as_deref() == Some(host_id)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No heartbeat ever named this IP.
    UnknownIp,
    /// Known, but nobody owned it at that time.
    NoOwnerAtTime,
}

#[derive(Default)]
pub struct IdentityStore {
    /// Most IPs only ever had one owner: that interval is stored inline.
    by_ip: HashMap<IpAddr, SmallVec<[Interval; 1]>>,
    /// The IPs each host announced last (sorted).
    hosts: HashMap<String, Box<[IpAddr]>>,
}

impl IdentityStore {
    pub fn tracked_ips(&self) -> usize {
        self.by_ip.len()
    }

    fn close(&mut self, ip: IpAddr, host_id: &str, at: i64) {
        if let Some(iv) = self.by_ip.get_mut(&ip) {
            for i in iv.iter_mut().filter(|i| i.open_by(host_id)) {
                i.to_ns = at.max(i.from_ns);
            }
        }
    }

    /// Applies one heartbeat.
    pub fn apply(&mut self, id: &Identity) {
        let h = &id.host;
        let now: HashSet<IpAddr> = if id.reason == IdentityReason::Stop {
            HashSet::new()
        } else {
            h.ips.iter().filter_map(|s| s.parse().ok()).collect()
        };
        let before = self.hosts.remove(&h.host_id).unwrap_or_default();
        for ip in before.iter().filter(|ip| !now.contains(ip)) {
            self.close(*ip, &h.host_id, id.time_ns);
        }
        let owner: Owner = Arc::new(Attrs::of_host(h));
        for ip in now.iter() {
            let iv = self.by_ip.entry(*ip).or_default();
            if let Some(i) = iv.iter_mut().rev().find(|i| i.open_by(&h.host_id)) {
                // Keep the interval; refresh attributes (workload/labels may change).
                i.owner = owner.clone();
                continue;
            }
            // The IP moved here: whoever held it stops holding it now.
            for i in iv.iter_mut().filter(|i| i.to_ns == i64::MAX) {
                i.to_ns = id.time_ns.max(i.from_ns);
            }
            iv.push(Interval {
                from_ns: id.time_ns,
                to_ns: i64::MAX,
                owner: owner.clone(),
            });
            iv.sort_by_key(|i| i.from_ns);
            if iv.len() > MAX_INTERVALS_PER_IP {
                iv.remove(0);
            }
        }
        if !now.is_empty() {
            let mut ips: Vec<IpAddr> = now.into_iter().collect();
            ips.sort();
            self.hosts.insert(h.host_id.clone(), ips.into());
        }
    }

    /// The owner of `ip` at `t_ns`.
    pub fn owner_at(&self, ip: IpAddr, t_ns: i64) -> Result<&Owner, Miss> {
        let iv = self.by_ip.get(&ip).ok_or(Miss::UnknownIp)?;
        iv.iter()
            .rev()
            .find(|i| i.from_ns <= t_ns && t_ns < i.to_ns)
            .map(|i| &i.owner)
            .ok_or(Miss::NoOwnerAtTime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(host: &str, workload: &str, ips: &[&str], t: i64, reason: &str) -> Identity {
        let reason = IdentityReason::from_symbol(reason).unwrap();
        flowlog_schema::fixtures::identity(&flowlog_schema::fixtures::host_with(host, workload, ips), t, reason)
    }

    #[test]
    fn ip_reuse_is_attributed_by_time() {
        let mut s = IdentityStore::default();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        s.apply(&hb("a", "billing", &["10.0.0.9"], 100, "START"));
        s.apply(&hb("a", "billing", &["10.0.0.9"], 130, "HEARTBEAT"));
        // Released at 200 (the ENI moved away) ...
        s.apply(&hb("a", "billing", &[], 200, "IP_CHANGE"));
        // ... and reassigned to another workload at 300.
        s.apply(&hb("b", "search", &["10.0.0.9"], 300, "START"));
        let wl = |t| s.owner_at(ip, t).map(|o| o.workload.clone().unwrap());
        assert_eq!(wl(50), Err(Miss::NoOwnerAtTime));
        assert_eq!(wl(150), Ok("billing".into()));
        assert_eq!(wl(250), Err(Miss::NoOwnerAtTime));
        assert_eq!(wl(350), Ok("search".into()));
        assert_eq!(
            s.owner_at("10.9.9.9".parse().unwrap(), 150).unwrap_err(),
            Miss::UnknownIp
        );
    }

    #[test]
    fn moved_ip_closes_the_previous_owner() {
        let mut s = IdentityStore::default();
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        s.apply(&hb("a", "one", &["10.0.0.9"], 100, "START"));
        s.apply(&hb("b", "two", &["10.0.0.9"], 200, "IP_CHANGE"));
        assert_eq!(
            s.owner_at(ip, 150).unwrap().workload.as_deref(),
            Some("one")
        );
        assert_eq!(
            s.owner_at(ip, 250).unwrap().workload.as_deref(),
            Some("two")
        );
        s.apply(&hb("b", "two", &["10.0.0.9"], 300, "STOP"));
        assert_eq!(s.owner_at(ip, 350).unwrap_err(), Miss::NoOwnerAtTime);
    }
}
