//! IP ownership history built from [`Event`]s (the sidecars' heartbeats,
//! EC2 network interfaces): each IP maps to the intervals during which some
//! owner held it. A flow is attributed to the owner at its start time, never
//! to a later owner.

use std::net::IpAddr;

use foldhash::HashMap;
use smallvec::SmallVec;

use super::{
    ownership::{Change, Event},
    Owner,
};

/// Intervals kept per IP; older ones are forgotten (bounded memory).
const MAX_INTERVALS_PER_IP: usize = 32;

/// 24 bytes: the owner is shared by all the IPs of one event, so memory per
/// tracked IP stays small.
#[derive(Debug, Clone)]
struct Interval {
    from_ns: i64,
    /// i64::MAX while the owner still holds the IP.
    to_ns: i64,
    owner: Owner,
}

impl Interval {
    /// Still held by the announcer whose current owner is `owner` (every open
    /// interval of a key shares the key's latest owner, see `apply`).
    fn open_by(&self, owner: &Owner) -> bool {
        self.to_ns == i64::MAX && std::sync::Arc::ptr_eq(&self.owner, owner)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Miss {
    /// No event ever named this IP.
    UnknownIp,
    /// Known, but nobody owned it at that time.
    NoOwnerAtTime,
}

/// What one announcer holds now.
struct Holding {
    owner: Owner,
    /// Sorted.
    ips: Box<[IpAddr]>,
}

#[derive(Default)]
pub struct IdentityStore {
    /// Most IPs only ever had one owner: that interval is stored inline.
    by_ip: HashMap<IpAddr, SmallVec<[Interval; 1]>>,
    /// By announcer key: its latest owner and IPs.
    holders: HashMap<String, Holding>,
}

impl IdentityStore {
    pub fn tracked_ips(&self) -> usize {
        self.by_ip.len()
    }

    fn close(&mut self, ip: IpAddr, owner: &Owner, at: i64) {
        if let Some(iv) = self.by_ip.get_mut(&ip) {
            for i in iv.iter_mut().filter(|i| i.open_by(owner)) {
                i.to_ns = at.max(i.from_ns);
            }
        }
    }

    /// Applies one event.
    pub fn apply(&mut self, e: Event) {
        let before = self.holders.remove(&e.key);
        let (owner, mut ips) = match e.change {
            Change::Holds { owner, ips } => (Some(owner), ips),
            Change::Released => (None, Vec::new()),
        };
        ips.sort();
        ips.dedup();
        if let Some(b) = &before {
            for ip in b.ips.iter().filter(|ip| ips.binary_search(ip).is_err()) {
                self.close(*ip, &b.owner, e.time_ns);
            }
        }
        let Some(owner) = owner.filter(|_| !ips.is_empty()) else {
            return;
        };
        for ip in &ips {
            let iv = self.by_ip.entry(*ip).or_default();
            let open = before
                .as_ref()
                .and_then(|b| iv.iter_mut().rev().find(|i| i.open_by(&b.owner)));
            if let Some(i) = open {
                // Keep the interval; refresh attributes (workload/labels may change).
                i.owner = owner.clone();
                continue;
            }
            // The IP moved here: whoever held it stops holding it now.
            for i in iv.iter_mut().filter(|i| i.to_ns == i64::MAX) {
                i.to_ns = e.time_ns.max(i.from_ns);
            }
            iv.push(Interval {
                from_ns: e.time_ns,
                to_ns: i64::MAX,
                owner: owner.clone(),
            });
            iv.sort_by_key(|i| i.from_ns);
            if iv.len() > MAX_INTERVALS_PER_IP {
                iv.remove(0);
            }
        }
        let ips = ips.into_boxed_slice();
        self.holders.insert(e.key, Holding { owner, ips });
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
    use crate::sources::Attrs;

    fn holds(key: &str, workload: &str, ips: &[&str], t: i64) -> Event {
        let owner = Attrs {
            workload: Some(workload.into()),
            ..Default::default()
        };
        Event {
            key: key.into(),
            time_ns: t,
            change: Change::Holds {
                owner: owner.into(),
                ips: ips.iter().map(|s| s.parse().unwrap()).collect(),
            },
        }
    }

    /// A store that has applied `events`, in order.
    fn store<const N: usize>(events: [Event; N]) -> IdentityStore {
        let mut s = IdentityStore::default();
        for e in events {
            s.apply(e);
        }
        s
    }

    fn released(key: &str, t: i64) -> Event {
        Event {
            key: key.into(),
            time_ns: t,
            change: Change::Released,
        }
    }

    #[test]
    fn ip_reuse_is_attributed_by_time() {
        let s = store([
            holds("a", "billing", &["10.0.0.9"], 100),
            holds("a", "billing", &["10.0.0.9"], 130),
            // Released at 200 (the ENI moved away) ...
            holds("a", "billing", &[], 200),
            // ... and reassigned to another workload at 300.
            holds("b", "search", &["10.0.0.9"], 300),
        ]);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
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
        let mut s = store([
            holds("a", "one", &["10.0.0.9"], 100),
            holds("b", "two", &["10.0.0.9"], 200),
        ]);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        assert_eq!(
            s.owner_at(ip, 150).unwrap().workload.as_deref(),
            Some("one")
        );
        assert_eq!(
            s.owner_at(ip, 250).unwrap().workload.as_deref(),
            Some("two")
        );
        s.apply(released("b", 300));
        assert_eq!(s.owner_at(ip, 350).unwrap_err(), Miss::NoOwnerAtTime);
    }

    /// A key's later event refreshes the attributes of the IPs it keeps,
    /// without a new interval, and releases only what it no longer lists.
    #[test]
    fn later_events_refresh_the_owner_and_release_dropped_ips() {
        let mut s = store([
            holds("h", "old", &["10.0.0.1", "10.0.0.2"], 100),
            holds("h", "new", &["10.0.0.1"], 200),
        ]);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        assert_eq!(s.owner_at(a, 150).unwrap().workload.as_deref(), Some("new"));
        assert_eq!(s.owner_at(a, 250).unwrap().workload.as_deref(), Some("new"));
        assert_eq!(s.owner_at(b, 150).unwrap().workload.as_deref(), Some("old"));
        assert_eq!(s.owner_at(b, 250).unwrap_err(), Miss::NoOwnerAtTime);
        // Another key holding the same name of workload is another owner.
        s.apply(holds("g", "new", &["10.0.0.2"], 300));
        s.apply(released("h", 400));
        assert_eq!(s.owner_at(a, 450).unwrap_err(), Miss::NoOwnerAtTime);
        assert_eq!(s.owner_at(b, 450).unwrap().workload.as_deref(), Some("new"));
    }
}
