//! Which IPs this host's pods and containers hold, for the identity
//! heartbeats: their addresses live in network namespaces of their own, so
//! nobody else can announce them, and without them a remote side that is a
//! pod stays unattributed.
//!
//! A thread of its own (never the capture path) lists them every
//! `workload.ips_interval_secs`, and at once when a flow shows a pod's
//! namespace for the first time ([`Announcer::poker`]). Each round walks the
//! cgroup v2 tree, finds the network namespace of every pod and container
//! cgroup in scope ([`netns::of_cgroup`]), skips the host's own, lists each
//! namespace's addresses ([`netns::addresses_in`]) and keeps those the
//! claim rules allow ([`crate::claim`]). Two more rules keep an address from
//! flapping between owners:
//! - a namespace shared by two workloads (a container joined to another's
//!   network) is nobody's;
//! - an address held by two namespaces at once is neither's.
//!
//! The result is a snapshot ([`Listing`]) in a `tokio::sync::watch`
//! channel: replaced only when it changes, which wakes the capture loop to
//! send an IP_CHANGE identity at once.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
    sync::{
        mpsc::{self, RecvTimeoutError, SyncSender},
        Arc,
    },
    time::{Duration, Instant},
};

use flowlog_schema::{Workload, WorkloadIps, WorkloadKind};
use metrics::{counter, gauge};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{
    cgroup,
    netns::{self, NetnsError},
    pods::{self, PodIndex},
    resolver::{namespace_owner, same_owner},
    scope::Scope,
    tree::{self, Mount},
    FastMap, WorkloadConfig,
};
use crate::{
    claim::{ClaimFilter, IfAddr, Unclaimed},
    metrics as m,
};

/// Rounds are at least this far apart, however often they are asked for.
const MIN_ROUND_GAP: Duration = Duration::from_millis(250);

/// Every workload with addresses, in the order of their namespaces' inodes,
/// as the identity heartbeat carries them: each namespace's owner (a pod,
/// without a container: all of a pod's containers share it; or a
/// container) and its IPs (text, sorted, never empty).
pub type Listing = Arc<Vec<WorkloadIps>>;

/// Why an address found in a workload's namespace is not announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Rule(Unclaimed),
    /// Held by two namespaces at once.
    Conflict,
    /// In a namespace two workloads share.
    SharedNamespace,
}

impl Reason {
    /// Every reason the metrics name, as they spell it.
    const LABELS: [(Reason, &'static str); 4] = [
        (Reason::Rule(Unclaimed::SharedInterface), "shared_interface"),
        (Reason::Rule(Unclaimed::LinkLocal), "link_local"),
        (Reason::Conflict, "conflict"),
        (Reason::SharedNamespace, "shared_namespace"),
    ];
}

/// A namespace found by a round: its owner (None: shared by two) and what
/// is in it.
pub struct Found {
    pub ino: u64,
    pub owner: Option<Arc<Workload>>,
    pub addresses: Vec<IfAddr>,
}

/// The claim rules over one round's namespaces: the listing, and the
/// addresses not announced by reason (each address counted once).
pub fn claim(found: Vec<Found>, filter: &ClaimFilter) -> (Vec<WorkloadIps>, BTreeMap<Reason, usize>) {
    let mut unclaimed: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut kept: BTreeMap<u64, (Arc<Workload>, Vec<IpAddr>)> = BTreeMap::new();
    // Which namespaces hold each claimable address.
    let mut holders: HashMap<IpAddr, Vec<u64>> = HashMap::new();
    for f in found {
        let mut ips: Vec<IpAddr> = Vec::new();
        for a in &f.addresses {
            match filter.judge(&a.ifname, a.ip) {
                Ok(ip) => ips.push(ip),
                Err(Unclaimed::NotAnAddress) => {}
                Err(why) => *unclaimed.entry(Reason::Rule(why)).or_default() += 1,
            }
        }
        ips.sort();
        ips.dedup();
        for ip in &ips {
            holders.entry(*ip).or_default().push(f.ino);
        }
        match f.owner {
            Some(owner) => {
                kept.insert(f.ino, (owner, ips));
            }
            None => *unclaimed.entry(Reason::SharedNamespace).or_default() += ips.len(),
        }
    }
    for (ip, inos) in holders.into_iter().filter(|(_, inos)| inos.len() > 1) {
        *unclaimed.entry(Reason::Conflict).or_default() += 1;
        for ino in inos {
            if let Some((_, ips)) = kept.get_mut(&ino) {
                ips.retain(|i| *i != ip);
            }
        }
    }
    let listing = kept
        .into_values()
        .filter(|(_, ips)| !ips.is_empty())
        .map(|(workload, ips)| {
            // Sorted as text, like the host's own.
            let mut ips: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
            ips.sort();
            WorkloadIps { workload, ips }
        })
        .collect();
    (listing, unclaimed)
}

/// The discovery thread's handle: the listing, and a way to ask for a round.
pub struct Announcer {
    listing: watch::Receiver<Listing>,
    poke: SyncSender<()>,
}

impl Announcer {
    /// Starts discovery as `config` says, if it can: None when it is off or
    /// there is no cgroup v2 tree to find workloads in (logged).
    /// `pods` (the Kubernetes API's) names the pods announced.
    pub fn from_config(config: &WorkloadConfig, scope: &Scope, filter: ClaimFilter, pods: Option<Arc<PodIndex>>) -> Option<Announcer> {
        if !config.announce_ips {
            return None;
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let Some(mount) = tree::find_mount(&mountinfo) else {
            warn!("no cgroup v2 hierarchy mounted: workload IPs are not announced");
            return None;
        };
        let interval = Duration::from_secs(config.ips_interval_secs);
        Announcer::start(mount, scope.clone(), filter, interval, pods)
            .inspect_err(|e| warn!("starting the workload-IP thread: {e}; workload IPs are not announced"))
            .ok()
    }

    /// Starts the thread (its first round runs at once).
    pub fn start(
        mount: Mount,
        scope: Scope,
        filter: ClaimFilter,
        interval: Duration,
        pods: Option<Arc<PodIndex>>,
    ) -> std::io::Result<Announcer> {
        let (tx, rx) = watch::channel(Listing::default());
        // One pending request is enough: a round answers all that came before it.
        let (poke, pokes) = mpsc::sync_channel(1);
        let mut d = Discovery {
            mount,
            scope,
            filter,
            host_netns: tree::host_netns(),
            known: FastMap::default(),
            warned: false,
            pods,
        };
        std::thread::Builder::new().name("workload-ips".into()).spawn(move || loop {
            let t0 = Instant::now();
            if let Some(listing) = d.round() {
                tx.send_if_modified(|cur| {
                    let changed = **cur != listing;
                    if changed {
                        debug!(workloads = listing.len(), "workload addresses changed");
                        *cur = Arc::new(listing);
                    }
                    changed
                });
            }
            debug!(took_ms = t0.elapsed().as_millis() as u64, "workload addresses listed");
            std::thread::sleep(MIN_ROUND_GAP.saturating_sub(t0.elapsed()));
            match pokes.recv_timeout(interval) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        })?;
        Ok(Announcer { listing: rx, poke })
    }

    /// The current listing, and (`changed().await`) word of the next.
    pub fn listing(&self) -> watch::Receiver<Listing> {
        self.listing.clone()
    }

    /// Asks for a round soon; never blocks (for the capture path).
    pub fn poker(&self) -> impl Fn() + Send + 'static {
        let poke = self.poke.clone();
        move || {
            let _ = poke.try_send(());
        }
    }
}

/// What the discovery thread keeps between rounds.
struct Discovery {
    mount: Mount,
    scope: Scope,
    filter: ClaimFilter,
    host_netns: Vec<u64>,
    /// Each cgroup's namespace owner when it is a pod's or a container's
    /// (None otherwise), by id: a cgroup id is never reused, so its path is
    /// classified once.
    known: FastMap<u64, Option<Arc<Workload>>>,
    /// A missing privilege was logged (once, then only counted).
    warned: bool,
    /// Names pods (with `workload.kubernetes`) as the flows name them.
    pods: Option<Arc<PodIndex>>,
}

impl Discovery {
    /// One round; None when the cgroup tree could not be read (the last
    /// listing stands).
    fn round(&mut self) -> Option<Vec<WorkloadIps>> {
        counter!(m::WORKLOAD_IP_ROUNDS).increment(1);
        let cgroups = match tree::walk(&self.mount, |_| true) {
            Ok(c) => c,
            Err(e) => {
                self.error("walk", &format!("reading the cgroup tree: {e}"));
                return None;
            }
        };
        // Namespaces by inode, each held open, with its owner (None: shared).
        let mut spaces: BTreeMap<u64, (netns::Netns, Option<Arc<Workload>>)> = BTreeMap::new();
        let mut known = FastMap::with_capacity_and_hasher(cgroups.len(), Default::default());
        for c in cgroups {
            let owner = self.known.get(&c.id).cloned().unwrap_or_else(|| {
                let w = Arc::new(cgroup::classify(&c.path));
                let own = matches!(w.kind, WorkloadKind::Pod | WorkloadKind::Container) && w.reason.is_none();
                own.then(|| namespace_owner(&w))
            });
            known.insert(c.id, owner.clone());
            let Some(owner) = owner else { continue };
            let cgroup_in_scope = self.scope.cgroup_in(&c.path);
            // Another scope's workloads' namespaces are not even opened.
            if !cgroup_in_scope && !self.scope.has_netns() {
                continue;
            }
            let ns = match netns::of_cgroup(&self.mount.dir_of(&c.path)) {
                Ok(Some(ns)) => ns,
                Ok(None) => continue,
                Err(e) => {
                    self.netns_error(e, &c.path);
                    continue;
                }
            };
            if self.host_netns.contains(&ns.ino) || !(cgroup_in_scope || self.scope.netns_in(ns.ino)) {
                continue;
            }
            match spaces.get_mut(&ns.ino) {
                None => {
                    spaces.insert(ns.ino, (ns, Some(owner)));
                }
                Some((_, seen)) => {
                    if seen.as_ref().is_some_and(|s| !same_owner(s, &owner)) {
                        *seen = None;
                    }
                }
            }
        }
        self.known = known;
        let fds: Vec<_> = spaces.values().map(|(ns, _)| &ns.fd).collect();
        let listed = netns::addresses_in(&fds);
        let mut found = Vec::with_capacity(spaces.len());
        for ((ino, (_, owner)), addresses) in spaces.into_iter().zip(listed) {
            match addresses {
                Ok(addresses) => found.push(Found { ino, owner, addresses }),
                Err(e) => self.netns_error(e, &format!("network namespace {ino}")),
            }
        }
        let namespaces = found.len();
        let (mut listing, unclaimed) = claim(found, &self.filter);
        if let Some(index) = &self.pods {
            for w in &mut listing {
                w.workload = pods::name_now(index, &w.workload);
            }
        }
        gauge!(m::WORKLOAD_NAMESPACES).set(namespaces as f64);
        gauge!(m::WORKLOAD_ADDRESSES).set(listing.iter().map(|w| w.ips.len()).sum::<usize>() as f64);
        for (reason, label) in Reason::LABELS {
            let n = unclaimed.get(&reason).copied().unwrap_or(0);
            gauge!(m::WORKLOAD_ADDRESSES_UNCLAIMED, "reason" => label).set(n as f64);
        }
        Some(listing)
    }

    fn netns_error(&mut self, e: NetnsError, what: &str) {
        match e {
            NetnsError::Permission => self.error("permission", &format!("{what}: {e}")),
            NetnsError::Other(_) => self.error("list", &format!("{what}: {e}")),
        }
    }

    /// Counts an error; logs the first one a warning, the rest at debug
    /// level (a missing privilege would say the same every round).
    fn error(&mut self, kind: &'static str, message: &str) {
        counter!(m::WORKLOAD_IP_ERRORS, "error" => kind).increment(1);
        if std::mem::replace(&mut self.warned, true) {
            debug!("workload addresses: {message}");
        } else {
            warn!("workload addresses: {message} (workload IPs may go unannounced; set workload.announce_ips = false to stop looking)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::claim::default_shared_interfaces;

    fn pod(uid: &str) -> Option<Arc<Workload>> {
        Some(Arc::new(Workload { pod_uid: Some(uid.into()), ..Workload::of(WorkloadKind::Pod) }))
    }

    fn addrs(list: &[(&str, &str)]) -> Vec<IfAddr> {
        list.iter().map(|(ifname, ip)| IfAddr { ifname: ifname.to_string(), ip: ip.parse().unwrap() }).collect()
    }

    fn ips(list: &[&str]) -> Vec<String> {
        list.iter().map(|ip| ip.to_string()).collect()
    }

    fn filter() -> ClaimFilter {
        ClaimFilter::new(&default_shared_interfaces()).unwrap()
    }

    #[test]
    fn each_namespace_claims_its_own_addresses() {
        let found = vec![
            Found {
                ino: 20,
                owner: pod("b"),
                addresses: addrs(&[("lo", "127.0.0.1"), ("lo", "::1"), ("eth0", "10.0.1.7"), ("eth0", "fe80::1"), ("eth0", "fd00::7"), ("eth1", "10.0.1.10")]),
            },
            Found {
                ino: 10,
                owner: pod("a"),
                addresses: addrs(&[("eth0", "10.0.1.5"), ("eth0", "169.254.1.9"), ("cni0", "10.22.0.1"), ("docker0", "172.17.0.1")]),
            },
        ];
        let (listing, unclaimed) = claim(found, &filter());
        assert_eq!(
            listing,
            [
                WorkloadIps { workload: pod("a").unwrap(), ips: ips(&["10.0.1.5"]) },
                WorkloadIps { workload: pod("b").unwrap(), ips: ips(&["10.0.1.10", "10.0.1.7", "fd00::7"]) },
            ],
            "by namespace, addresses sorted as text"
        );
        assert_eq!(
            unclaimed,
            [(Reason::Rule(Unclaimed::LinkLocal), 2), (Reason::Rule(Unclaimed::SharedInterface), 2)].into_iter().collect()
        );
    }

    #[test]
    fn an_address_in_two_namespaces_is_neithers() {
        let found = vec![
            Found { ino: 1, owner: pod("a"), addresses: addrs(&[("eth0", "10.0.0.1"), ("eth0", "10.0.0.9")]) },
            Found { ino: 2, owner: pod("b"), addresses: addrs(&[("eth0", "10.0.0.2"), ("eth1", "10.0.0.9")]) },
            // Only the duplicate: the namespace is left with nothing to announce.
            Found { ino: 3, owner: pod("c"), addresses: addrs(&[("eth0", "10.0.0.9")]) },
            // One namespace with the address twice is no conflict.
            Found { ino: 4, owner: pod("d"), addresses: addrs(&[("eth0", "10.0.0.4"), ("eth1", "10.0.0.4")]) },
        ];
        let (listing, unclaimed) = claim(found, &filter());
        let got: Vec<(&str, Vec<String>)> =
            listing.iter().map(|w| (w.workload.pod_uid.as_deref().unwrap(), w.ips.clone())).collect();
        assert_eq!(got, [("a", ips(&["10.0.0.1"])), ("b", ips(&["10.0.0.2"])), ("d", ips(&["10.0.0.4"]))]);
        assert_eq!(unclaimed, [(Reason::Conflict, 1)].into_iter().collect());
    }

    #[test]
    fn a_shared_namespace_is_nobodys() {
        let found = vec![
            Found { ino: 1, owner: None, addresses: addrs(&[("eth0", "10.0.0.1"), ("eth0", "fe80::1")]) },
            Found { ino: 2, owner: pod("b"), addresses: addrs(&[("eth0", "10.0.0.1")]) },
        ];
        let (listing, unclaimed) = claim(found, &filter());
        // Held by the shared namespace too: b cannot have it either.
        assert_eq!(listing, []);
        assert_eq!(
            unclaimed,
            [(Reason::Rule(Unclaimed::LinkLocal), 1), (Reason::Conflict, 1), (Reason::SharedNamespace, 1)]
                .into_iter()
                .collect()
        );
        assert_eq!(claim(Vec::new(), &filter()), (Vec::new(), BTreeMap::new()));
    }
}
