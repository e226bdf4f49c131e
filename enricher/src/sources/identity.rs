//! IP ownership history built from [`Event`]s (the sidecars' heartbeats and
//! their workloads, Kubernetes Services, EC2 network interfaces): each IP
//! maps to the intervals during which some announcer held it. A flow is
//! attributed to the owner at its start time, never to a later owner.
//!
//! Each announcer's own events come in order (one host's heartbeats share a
//! partition), but different announcers' events may not: a new owner's
//! claim of an IP can be read before the old owner's release. So claims
//! never rewrite history by the order they are read in: an IP's intervals
//! of different announcers never overlap, each claim ending another
//! announcer's interval that spans it, and a claim read after a later one
//! ending where that one starts; a release read late still ends its own
//! interval at its own time.
//!
//! An IP two announcers list at once (a shared address that slipped
//! through) goes to the one that claimed it last, and stays there: the
//! other one's later listings of it do not take it back (no flapping), but
//! are counted ([`IdentityStore::apply`] returns them). So an address every
//! host lists (the sidecars filter those out, `identity.shared_interfaces`,
//! but one may slip through) keeps one interval, not one per heartbeat that
//! [`MAX_INTERVALS_PER_IP`] would cut down to minutes of history.
//!
//! Announcers that go silent: with a grace ([`IdentityStore::expiring`];
//! the heartbeats' store has one), an announcer holds its IPs until its last
//! event plus the grace, not for ever: a host that dies without a STOP
//! heartbeat stops owning its IPs then. Answers follow from the events'
//! times, not from when they are read. A later event of the announcer opens
//! new intervals at its time (the gap stays unowned).

use std::net::IpAddr;

use foldhash::HashMap;
use smallvec::SmallVec;

use super::{
    ownership::{Change, Event},
    Owner,
};

/// Intervals kept per IP; older ones are forgotten (bounded memory).
const MAX_INTERVALS_PER_IP: usize = 32;
/// `to_ns` of an interval still held.
const OPEN: i64 = i64::MAX;

/// 32 bytes: the owner is shared by all the IPs of one event, so memory per
/// tracked IP stays small.
#[derive(Debug, Clone)]
struct Interval {
    from_ns: i64,
    /// [`OPEN`] while the announcer still holds the IP.
    to_ns: i64,
    /// The announcer's [`Holding::id`].
    holder: u64,
    owner: Owner,
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
    /// Names its intervals (a number, not the key: 8 bytes per interval).
    id: u64,
    /// Sorted.
    ips: Box<[IpAddr]>,
}

#[derive(Default)]
pub struct IdentityStore {
    /// Most IPs only ever had one owner: that interval is stored inline.
    by_ip: HashMap<IpAddr, SmallVec<[Interval; 1]>>,
    /// By announcer key: what it holds.
    holders: HashMap<String, Holding>,
    /// The last [`Holding::id`] given out.
    last_id: u64,
    /// With a grace: each holding announcer's last event time, by id (its
    /// open intervals end at that time + the grace).
    seen_ns: HashMap<u64, i64>,
    /// How long an announcer holds its IPs after its last event, ns; None:
    /// until it releases them.
    grace_ns: Option<i64>,
}

impl IdentityStore {
    /// A store whose announcers hold their IPs until their last event plus
    /// `grace` (the sidecars' heartbeats: a host that dies without STOP).
    pub fn expiring(grace: std::time::Duration) -> IdentityStore {
        let mut s = IdentityStore::default();
        s.set_grace(grace);
        s
    }

    /// See [`IdentityStore::expiring`]; applies to the events that follow.
    pub fn set_grace(&mut self, grace: std::time::Duration) {
        self.grace_ns = Some(i64::try_from(grace.as_nanos()).unwrap_or(i64::MAX));
    }

    /// Where interval `i` ends: its end, or for one still held, its
    /// holder's last event plus the grace.
    fn end_of(&self, i: &Interval) -> i64 {
        end_of(i, &self.seen_ns, self.grace_ns)
    }

    pub fn tracked_ips(&self) -> usize {
        self.by_ip.len()
    }

    /// Announcers holding IPs now.
    pub fn holders(&self) -> usize {
        self.holders.len()
    }

    /// Applies one event. Returns how many of its IPs another announcer
    /// had claimed since this one did (shared addresses: see the module
    /// docs); the caller counts them.
    pub fn apply(&mut self, e: Event) -> usize {
        let mut before = self.holders.remove(&e.key);
        let (owner, mut ips) = match e.change {
            Change::Holds { owner, ips } => (Some(owner), ips),
            Change::Released => (None, Vec::new()),
        };
        ips.sort();
        ips.dedup();
        let t = e.time_ns;
        let id = match &before {
            Some(b) => b.id,
            None => {
                self.last_id += 1;
                self.last_id
            }
        };
        if let Some(b) = before.as_mut() {
            let lapsed = self.seen_ns.get(&id).zip(self.grace_ns).map(|(seen, g)| seen.saturating_add(g)).filter(|end| *end < t);
            if let Some(end) = lapsed {
                // Silent for longer than the grace: what it held ended then,
                // and this event claims its IPs anew.
                for ip in std::mem::take(&mut b.ips).iter() {
                    self.release(*ip, id, end);
                }
            }
        }
        if self.grace_ns.is_some() {
            self.seen_ns.insert(id, t);
        }
        let listed = |ip: &IpAddr| before.as_ref().is_some_and(|b| b.ips.binary_search(ip).is_ok());
        if let Some(b) = &before {
            for ip in b.ips.iter().filter(|ip| ips.binary_search(ip).is_err()) {
                self.release(*ip, id, t);
            }
        }
        let Some(owner) = owner.filter(|_| !ips.is_empty()) else {
            self.seen_ns.remove(&id);
            return 0;
        };
        let mut conflicts = 0;
        for ip in &ips {
            let iv = self.by_ip.entry(*ip).or_default();
            if !listed(ip) {
                claim(iv, id, &owner, t, &self.seen_ns, self.grace_ns);
                continue;
            }
            // Listed again: keep the interval and refresh its attributes
            // (workload, labels may change), unless another announcer has
            // claimed the IP since.
            match iv.iter_mut().filter(|i| i.holder == id).max_by_key(|i| i.from_ns) {
                Some(i) if i.to_ns == OPEN => i.owner = owner.clone(),
                Some(i) if i.to_ns <= t => conflicts += 1,
                _ => {}
            }
        }
        let ips = ips.into_boxed_slice();
        self.holders.insert(e.key, Holding { id, ips });
        conflicts
    }

    /// Announcer `id` no longer holds `ip` from `t` on (nor later, if
    /// another announcer's claim already ended its interval).
    fn release(&mut self, ip: IpAddr, id: u64, t: i64) {
        if let Some(iv) = self.by_ip.get_mut(&ip) {
            for i in iv.iter_mut().filter(|i| i.holder == id) {
                let end = end_of(i, &self.seen_ns, self.grace_ns);
                i.to_ns = end.min(t.max(i.from_ns));
            }
        }
    }

    /// The owner of `ip` at `t_ns`.
    pub fn owner_at(&self, ip: IpAddr, t_ns: i64) -> Result<&Owner, Miss> {
        let iv = self.by_ip.get(&ip).ok_or(Miss::UnknownIp)?;
        iv.iter()
            .rev()
            .find(|i| i.from_ns <= t_ns && t_ns < self.end_of(i))
            .map(|i| &i.owner)
            .ok_or(Miss::NoOwnerAtTime)
    }
}

/// Where interval `i` ends (see [`IdentityStore::end_of`]).
fn end_of(i: &Interval, seen_ns: &HashMap<u64, i64>, grace_ns: Option<i64>) -> i64 {
    match (i.to_ns, grace_ns) {
        (OPEN, Some(g)) => seen_ns.get(&i.holder).map_or(OPEN, |seen| seen.saturating_add(g)),
        (to, _) => to,
    }
}

/// Announcer `id` claims an IP (intervals `iv`) at `t`: another announcer's
/// interval that spans `t` ends there (the IP moved), one whose holder went
/// silent ends at its expiry; one that starts after `t` (read before this
/// claim) ends this one.
fn claim(iv: &mut SmallVec<[Interval; 1]>, id: u64, owner: &Owner, t: i64, seen_ns: &HashMap<u64, i64>, grace_ns: Option<i64>) {
    let mut to_ns = OPEN;
    for i in iv.iter_mut().filter(|i| i.holder != id) {
        let end = end_of(i, seen_ns, grace_ns);
        if i.from_ns <= t && t < end {
            i.to_ns = t;
        } else if i.from_ns > t {
            to_ns = to_ns.min(i.from_ns);
        }
    }
    iv.push(Interval { from_ns: t, to_ns, holder: id, owner: owner.clone() });
    iv.sort_by_key(|i| i.from_ns);
    if iv.len() > MAX_INTERVALS_PER_IP {
        iv.remove(0);
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

    /// Pod B holds the IP until 200, pod C from 300 (another host): by
    /// time, whichever of the two hosts' heartbeats is read first.
    #[test]
    fn a_handover_read_in_either_order_is_attributed_by_time() {
        let b_holds = || holds("h1/pod-b", "b", &["10.1.0.5"], 100);
        let b_leaves = || released("h1/pod-b", 200);
        let c_holds = || holds("h2/pod-c", "c", &["10.1.0.5"], 300);
        let in_order = store([b_holds(), b_leaves(), c_holds()]);
        let c_first = store([b_holds(), c_holds(), b_leaves()]);
        let c_before_all = store([c_holds(), b_holds(), b_leaves()]);
        let ip: IpAddr = "10.1.0.5".parse().unwrap();
        for s in [&in_order, &c_first, &c_before_all] {
            let wl = |t| s.owner_at(ip, t).map(|o| o.workload.clone().unwrap());
            assert_eq!(wl(150), Ok("b".into()));
            assert_eq!(wl(250), Err(Miss::NoOwnerAtTime), "nobody held it between");
            assert_eq!(wl(350), Ok("c".into()));
            assert_eq!(wl(50), Err(Miss::NoOwnerAtTime));
        }
        // B's heartbeats from before it left, read after C's claim: no conflict.
        let mut s = store([b_holds(), c_holds()]);
        assert_eq!(s.apply(holds("h1/pod-b", "b", &["10.1.0.5"], 150)), 0);
        assert_eq!(s.owner_at(ip, 350).unwrap().workload.as_deref(), Some("c"));
    }

    /// A claim read after a later claim of the same IP ends where that one
    /// starts: the later claimant keeps it.
    #[test]
    fn a_claim_read_late_does_not_take_a_later_claim_over() {
        let s = store([holds("d", "d", &["10.0.0.9"], 500), holds("c", "c", &["10.0.0.9"], 300), released("d", 600)]);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let wl = |t| s.owner_at(ip, t).map(|o| o.workload.clone().unwrap());
        assert_eq!(wl(400), Ok("c".into()));
        assert_eq!(wl(550), Ok("d".into()));
        assert_eq!(wl(650), Err(Miss::NoOwnerAtTime), "c was superseded at 500");
    }

    /// Two announcers list one IP at once: the later claimant keeps it,
    /// the other's listings do not take it back and are counted. However
    /// many heartbeats list it, it keeps its two intervals: the history is
    /// not cut short by [`MAX_INTERVALS_PER_IP`].
    #[test]
    fn a_shared_address_does_not_flap_and_is_counted() {
        let mut s = store([holds("a", "a", &["10.0.0.9", "10.0.0.1"], 100), holds("b", "b", &["10.0.0.9"], 200)]);
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        for t in (300..=400).step_by(1) {
            assert_eq!(s.apply(holds("a", "a", &["10.0.0.9", "10.0.0.1"], t)), 1);
            assert_eq!(s.apply(holds("b", "b", &["10.0.0.9"], t)), 0);
        }
        assert_eq!(s.by_ip[&ip].len(), 2, "one interval per owner, not per heartbeat");
        let wl = |s: &IdentityStore, t| s.owner_at(ip, t).map(|o| o.workload.clone().unwrap());
        assert_eq!(wl(&s, 150), Ok("a".into()));
        assert_eq!(wl(&s, 450), Ok("b".into()));
        assert_eq!(s.owner_at("10.0.0.1".parse().unwrap(), 450).unwrap().workload.as_deref(), Some("a"));
        // b lets go: nobody holds it (a stopped holding it when b claimed it).
        s.apply(released("b", 500));
        assert_eq!(wl(&s, 550), Err(Miss::NoOwnerAtTime));
        assert_eq!(s.holders(), 1);
    }

    fn ns(n: u64) -> std::time::Duration {
        std::time::Duration::from_nanos(n)
    }

    /// A host that dies without STOP: its IPs are its own until its last
    /// heartbeat plus the grace, then nobody's; a later heartbeat claims
    /// them again from its time on (the gap stays unowned).
    #[test]
    fn a_silent_announcer_stops_owning_its_ips_after_the_grace() {
        let mut s = IdentityStore::expiring(ns(100));
        s.apply(holds("a", "web", &["10.0.0.9"], 1000));
        s.apply(holds("a", "web", &["10.0.0.9"], 1050));
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let wl = |s: &IdentityStore, t| s.owner_at(ip, t).map(|o| o.workload.clone().unwrap());
        assert_eq!(wl(&s, 1100), Ok("web".into()));
        assert_eq!(wl(&s, 1149), Ok("web".into()));
        assert_eq!(wl(&s, 1150), Err(Miss::NoOwnerAtTime), "last heartbeat 1050 + grace 100");
        assert_eq!(wl(&s, 5000), Err(Miss::NoOwnerAtTime));
        // Back at 2000 (a new process, same host): its again from then on.
        s.apply(holds("a", "web2", &["10.0.0.9"], 2000));
        assert_eq!(wl(&s, 1100), Ok("web".into()));
        assert_eq!(wl(&s, 1500), Err(Miss::NoOwnerAtTime), "the silence stays unowned");
        assert_eq!(wl(&s, 2000), Ok("web2".into()));
        assert_eq!(wl(&s, 2099), Ok("web2".into()));
        assert_eq!(wl(&s, 2100), Err(Miss::NoOwnerAtTime));
        // A store without a grace (Services, EC2) keeps them until released.
        let forever = store([holds("a", "web", &["10.0.0.9"], 1000)]);
        assert_eq!(wl(&forever, 1_000_000), Ok("web".into()));
    }

    /// After a silent announcer's grace, another's claim does not extend
    /// the silent one's interval to the claim; a STOP read late ends nothing
    /// later than the expiry; the silent one coming back claims anew.
    #[test]
    fn claims_and_releases_after_a_silence_respect_the_expiry() {
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let wl = |s: &IdentityStore, t| s.owner_at(ip, t).map(|o| o.workload.clone().unwrap());
        let mut s = IdentityStore::expiring(ns(100));
        s.apply(holds("a", "a", &["10.0.0.9"], 1000));
        s.apply(holds("b", "b", &["10.0.0.9"], 3000));
        assert_eq!(wl(&s, 1050), Ok("a".into()));
        assert_eq!(wl(&s, 2000), Err(Miss::NoOwnerAtTime));
        assert_eq!(wl(&s, 3050), Ok("b".into()));
        // b keeps beating; a comes back at 4000 listing the IP: a fresh claim.
        s.apply(holds("b", "b", &["10.0.0.9"], 3900));
        assert_eq!(s.apply(holds("a", "a", &["10.0.0.9"], 4000)), 0);
        assert_eq!(wl(&s, 3950), Ok("b".into()));
        assert_eq!(wl(&s, 4050), Ok("a".into()));
        // A STOP long after the silence: the IP was nobody's since the expiry.
        let mut s = IdentityStore::expiring(ns(100));
        s.apply(holds("c", "c", &["10.0.0.9"], 1000));
        s.apply(released("c", 5000));
        assert_eq!(wl(&s, 1050), Ok("c".into()));
        assert_eq!(wl(&s, 2000), Err(Miss::NoOwnerAtTime));
        assert_eq!(s.holders(), 0);
    }
}
