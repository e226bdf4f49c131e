//! Which IPs this host's pods and containers hold, for the identity
//! heartbeats: their addresses live in network namespaces of their own, so
//! nobody else can announce them, and without them a remote side that is a
//! pod stays unattributed.
//!
//! A thread of its own (never the capture path) lists them every
//! `workload.ips_interval_secs`, at once when the Kubernetes API's pods
//! change ([`PodIndex::on_change`]), and soon when a flow shows a pod's
//! namespace for the first time ([`Announcer::poker`]). Two sources:
//! - **The Kubernetes API** (`workload.kubernetes`): every pod of this node
//!   the pod index lists with IPs (`status.podIPs`), named as its flows
//!   are, except hostNetwork pods (their IPs are the node's) and pods that
//!   have ended ([`PodMeta::held_ips`]). No privilege beyond the RBAC the
//!   watch has: no namespace is entered. The node's pods are what the
//!   watch selects (`spec.nodeName`); `[scope]` does not apply to them.
//! - **The pods' and containers' network namespaces**, for the workloads
//!   the API does not cover (plain containers, pods it does not list or
//!   lists without IPs yet): each round walks the cgroup v2 tree, finds the
//!   network namespace of every pod and container cgroup in scope
//!   ([`netns::of_cgroup`]), skips the host's own, and lists each
//!   namespace's addresses from inside ([`netns::addresses_in`]). That needs
//!   CAP_SYS_ADMIN and CAP_SYS_PTRACE; without them these workloads are
//!   skipped (counted; said once, as info when the API covers the pods).
//!
//! Both go through the claim rules ([`crate::claim`]; the API's IPs have no
//! interface, so only the address rules apply to them), and two more keep
//! an address from flapping between owners:
//! - a namespace shared by two workloads (a container joined to another's
//!   network) is nobody's;
//! - an address held by two workloads at once is neither's.
//!
//! The result is a snapshot ([`Listing`]) in a `tokio::sync::watch`
//! channel: replaced only when it changes, which wakes the capture loop to
//! send an IP_CHANGE identity at once. So a pod's IP is announced, and a
//! deleted pod's released, within about a second of the watch seeing it.

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
use tracing::{debug, info, warn};

use super::{
    cgroup,
    netns::{self, NetnsError},
    pods::{self, PodIndex, PodMeta},
    resolver::{namespace_owner, same_owner},
    scope::Scope,
    tree::{self, Mount},
    FastMap, WorkloadConfig,
};
use crate::{
    claim::{judge_ip, ClaimFilter, IfAddr, Unclaimed},
    metrics as m,
};

/// Rounds are at least this far apart, however often they are asked for.
const MIN_ROUND_GAP: Duration = Duration::from_millis(250);

/// Every workload with addresses, as the identity heartbeat carries them:
/// each namespace's owner (a pod, without a container: all of a pod's
/// containers share it; or a container), in the order of their namespaces'
/// inodes, then the pods the Kubernetes API gives, by UID; each with its
/// IPs (text, sorted, never empty).
pub type Listing = Arc<Vec<WorkloadIps>>;

/// Why an address found for a workload is not announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    Rule(Unclaimed),
    /// Held by two workloads at once.
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

/// What a workload found by a round holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// Its network namespace's interface addresses, listed from inside.
    Interfaces(Vec<IfAddr>),
    /// Its IPs as the Kubernetes API gives them (no interface names).
    Ips(Vec<IpAddr>),
}

/// A workload found by a round: its owner (None: a namespace two
/// workloads share) and what it holds.
pub struct Found {
    pub owner: Option<Arc<Workload>>,
    pub held: Held,
}

/// The claim rules over one round's workloads: the listing (in the order
/// found), and the addresses not announced by reason (each address counted
/// once).
pub fn claim(found: Vec<Found>, filter: &ClaimFilter) -> (Vec<WorkloadIps>, BTreeMap<Reason, usize>) {
    let mut unclaimed: BTreeMap<Reason, usize> = BTreeMap::new();
    let mut kept: Vec<Option<(Arc<Workload>, Vec<IpAddr>)>> = Vec::with_capacity(found.len());
    // Which workloads (by position) hold each claimable address.
    let mut holders: HashMap<IpAddr, Vec<usize>> = HashMap::new();
    for (i, f) in found.into_iter().enumerate() {
        let judged: Vec<Result<IpAddr, Unclaimed>> = match &f.held {
            Held::Interfaces(addresses) => addresses.iter().map(|a| filter.judge(&a.ifname, a.ip)).collect(),
            Held::Ips(ips) => ips.iter().map(|ip| judge_ip(*ip)).collect(),
        };
        let mut ips: Vec<IpAddr> = Vec::new();
        for j in judged {
            match j {
                Ok(ip) => ips.push(ip),
                Err(Unclaimed::NotAnAddress) => {}
                Err(why) => *unclaimed.entry(Reason::Rule(why)).or_default() += 1,
            }
        }
        ips.sort();
        ips.dedup();
        for ip in &ips {
            holders.entry(*ip).or_default().push(i);
        }
        if f.owner.is_none() {
            *unclaimed.entry(Reason::SharedNamespace).or_default() += ips.len();
        }
        kept.push(f.owner.map(|owner| (owner, ips)));
    }
    for (ip, at) in holders.into_iter().filter(|(_, at)| at.len() > 1) {
        *unclaimed.entry(Reason::Conflict).or_default() += 1;
        for i in at {
            if let Some((_, ips)) = &mut kept[i] {
                ips.retain(|held| *held != ip);
            }
        }
    }
    let listing = kept
        .into_iter()
        .flatten()
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

/// The pods whose IPs the Kubernetes API says, by UID: each one's workload
/// (named) and IPs (empty: it holds none of its own, see
/// [`PodMeta::held_ips`]). Pods it lists without IPs yet are left out:
/// their namespaces may be looked in.
fn api_pods(listed: &[(String, Arc<PodMeta>)]) -> BTreeMap<String, (Arc<Workload>, Vec<IpAddr>)> {
    listed
        .iter()
        .filter_map(|(uid, meta)| {
            let ips = meta.held_ips()?.to_vec();
            let workload = Arc::new(meta.workload(uid));
            Some((uid.clone(), (workload, ips)))
        })
        .collect()
}

/// The discovery thread's handle: the listing, and a way to ask for a round.
pub struct Announcer {
    listing: watch::Receiver<Listing>,
    poke: SyncSender<()>,
}

impl Announcer {
    /// Starts discovery as `config` says, if it can: None when it is off, or
    /// when there is neither a cgroup v2 tree to find workloads in nor the
    /// Kubernetes API's pods (logged). `pods` (the Kubernetes API's) gives
    /// its pods' IPs and names the pods announced.
    pub fn from_config(config: &WorkloadConfig, scope: &Scope, filter: ClaimFilter, pods: Option<Arc<PodIndex>>) -> Option<Announcer> {
        if !config.announce_ips {
            return None;
        }
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mount = tree::find_mount(&mountinfo);
        match (&mount, &pods) {
            (Some(_), _) => {}
            (None, Some(_)) => warn!("no cgroup v2 hierarchy mounted: only the IPs of pods the Kubernetes API lists are announced"),
            (None, None) => {
                warn!("no cgroup v2 hierarchy mounted: workload IPs are not announced");
                return None;
            }
        }
        let interval = Duration::from_secs(config.ips_interval_secs);
        Announcer::start(mount, scope.clone(), filter, interval, pods)
            .inspect_err(|e| warn!("starting the workload-IP thread: {e}; workload IPs are not announced"))
            .ok()
    }

    /// Starts the thread (its first round runs at once); `mount` None: only
    /// the pods of `pods` are announced.
    pub fn start(
        mount: Option<Mount>,
        scope: Scope,
        filter: ClaimFilter,
        interval: Duration,
        pods: Option<Arc<PodIndex>>,
    ) -> std::io::Result<Announcer> {
        let (tx, rx) = watch::channel(Listing::default());
        // One pending request is enough: a round answers all that came before it.
        let (poke, pokes) = mpsc::sync_channel(1);
        let pods_to_watch = pods.clone();
        let mut d = Discovery {
            mount,
            scope,
            filter,
            host_netns: tree::host_netns(),
            known: FastMap::default(),
            logged: Vec::new(),
            pods,
            last_meta: HashMap::new(),
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
            // Nobody reads the listings any more (the pod index may still
            // poke, for as long as it lives).
            if tx.is_closed() {
                return;
            }
            std::thread::sleep(MIN_ROUND_GAP.saturating_sub(t0.elapsed()));
            match pokes.recv_timeout(interval) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        })?;
        let announcer = Announcer { listing: rx, poke };
        if let Some(index) = &pods_to_watch {
            // A pod added or deleted (or its IP changed) is listed at once.
            index.on_change(Box::new(announcer.poker()));
        }
        Ok(announcer)
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
    /// None: no cgroup v2 tree; only the Kubernetes API's pods are listed.
    mount: Option<Mount>,
    scope: Scope,
    filter: ClaimFilter,
    host_netns: Vec<u64>,
    /// Each cgroup's namespace owner when it is a pod's or a container's
    /// (None otherwise), by id: a cgroup id is never reused, so its path is
    /// classified once.
    known: FastMap<u64, Option<Arc<Workload>>>,
    /// The kinds of error logged so far (each once, then only counted).
    logged: Vec<&'static str>,
    /// The Kubernetes API's pods (with `workload.kubernetes`): their IPs,
    /// and the names of the pods announced.
    pods: Option<Arc<PodIndex>>,
    /// The last metadata the API gave each pod whose cgroup is still here:
    /// a pod deleted from the API while its namespace lingers keeps its
    /// name, as its flows do ([`super::resolver`]); announced unnamed, its
    /// IP's last flows were attributed to its UID alone.
    last_meta: HashMap<String, Arc<PodMeta>>,
}

impl Discovery {
    /// One round; None when the cgroup tree could not be read (the last
    /// listing stands).
    fn round(&mut self) -> Option<Vec<WorkloadIps>> {
        counter!(m::WORKLOAD_IP_ROUNDS).increment(1);
        // The API's pods, read once a round: their IPs, and their names.
        let listed = self.pods.as_deref().map(PodIndex::all).unwrap_or_default();
        let api = api_pods(&listed);
        let mut found = match self.mount.clone() {
            Some(mount) => self.namespaces(&mount, &api, listed)?,
            None => Vec::new(),
        };
        let namespaces = found.len();
        let mut from_api = 0;
        for (workload, ips) in api.into_values().filter(|(_, ips)| !ips.is_empty()) {
            from_api += 1;
            found.push(Found { owner: Some(workload), held: Held::Ips(ips) });
        }
        let (listing, unclaimed) = claim(found, &self.filter);
        gauge!(m::WORKLOAD_NAMESPACES).set(namespaces as f64);
        gauge!(m::WORKLOAD_API_PODS).set(from_api as f64);
        gauge!(m::WORKLOAD_ADDRESSES).set(listing.iter().map(|w| w.ips.len()).sum::<usize>() as f64);
        for (reason, label) in Reason::LABELS {
            let n = unclaimed.get(&reason).copied().unwrap_or(0);
            gauge!(m::WORKLOAD_ADDRESSES_UNCLAIMED, "reason" => label).set(n as f64);
        }
        Some(listing)
    }

    /// The network namespaces of the pod and container cgroups in scope
    /// (the host's own skipped), each with its owner, named, and its
    /// addresses; in the order of their inodes. The pods in `api` are left
    /// out: the API's IPs win over what their namespaces hold, as they are
    /// what the cluster routes to the pod (a secondary network's addresses
    /// in the namespace are not the pod's to announce to the cluster), and
    /// leaving them out needs no privilege. The owners are named from
    /// `listed`, the API's pods ([`Discovery::named`]). None when the cgroup
    /// tree could not be read.
    fn namespaces(
        &mut self,
        mount: &Mount,
        api: &BTreeMap<String, (Arc<Workload>, Vec<IpAddr>)>,
        listed: Vec<(String, Arc<PodMeta>)>,
    ) -> Option<Vec<Found>> {
        let cgroups = match tree::walk(mount, |_| true) {
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
            if owner.kind == WorkloadKind::Pod && owner.pod_uid.as_ref().is_some_and(|uid| api.contains_key(uid)) {
                continue;
            }
            let cgroup_in_scope = self.scope.cgroup_in(&c.path);
            // Another scope's workloads' namespaces are not even opened.
            if !cgroup_in_scope && !self.scope.has_netns() {
                continue;
            }
            let ns = match netns::of_cgroup(&mount.dir_of(&c.path)) {
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
        self.remember_pods(listed);
        let fds: Vec<_> = spaces.values().map(|(ns, _)| &ns.fd).collect();
        let listed = netns::addresses_in(&fds);
        let mut found = Vec::with_capacity(spaces.len());
        for ((ino, (_, owner)), addresses) in spaces.into_iter().zip(listed) {
            match addresses {
                Ok(addresses) => {
                    let owner = owner.map(|o| self.named(&o));
                    found.push(Found { owner, held: Held::Interfaces(addresses) });
                }
                Err(e) => self.netns_error(e, &format!("network namespace {ino}")),
            }
        }
        Some(found)
    }

    /// Notes the API's metadata of every pod it lists (`listed`), and
    /// forgets that of pods neither listed nor with a cgroup left
    /// ([`Discovery::last_meta`]).
    fn remember_pods(&mut self, listed: Vec<(String, Arc<PodMeta>)>) {
        let here: std::collections::HashSet<&str> = self.known.values().flatten().filter_map(|w| w.pod_uid.as_deref()).collect();
        self.last_meta.retain(|uid, _| here.contains(uid.as_str()));
        self.last_meta.extend(listed);
    }

    /// A namespace owner as the API names it now, or as it last did for a
    /// pod deleted from it since; a pod it never listed unnamed.
    fn named(&self, owner: &Arc<Workload>) -> Arc<Workload> {
        let Some(index) = &self.pods else { return owner.clone() };
        let is_pod = owner.kind == WorkloadKind::Pod && owner.reason.is_none();
        let uid = owner.pod_uid.as_deref().unwrap_or_default();
        match self.last_meta.get(uid) {
            Some(meta) if is_pod && index.get(uid).is_none() => Arc::new(meta.name(owner)),
            _ => pods::name_now(index, owner),
        }
    }

    fn netns_error(&mut self, e: NetnsError, what: &str) {
        match e {
            NetnsError::Permission => self.error("permission", &format!("{what}: {e}")),
            NetnsError::Other(_) => self.error("list", &format!("{what}: {e}")),
        }
    }

    /// Counts an error; logs the first of each kind, the rest at debug
    /// level (a missing privilege would say the same every round). Not
    /// being allowed into the namespaces is only news (info) when the
    /// Kubernetes API gives the pods' IPs: then only plain containers and
    /// pods the API does not list go unannounced.
    fn error(&mut self, kind: &'static str, message: &str) {
        counter!(m::WORKLOAD_IP_ERRORS, "error" => kind).increment(1);
        if self.logged.contains(&kind) {
            debug!("workload addresses: {message}");
            return;
        }
        self.logged.push(kind);
        if kind == "permission" && self.pods.is_some() {
            info!(
                "workload addresses: {message}; the pods' IPs come from the Kubernetes API, but plain containers \
                 and pods the API does not list are not announced (counted in {})",
                m::WORKLOAD_IP_ERRORS
            );
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

    /// A namespace of `owner` with these (interface, address) pairs.
    fn ns(owner: Option<Arc<Workload>>, list: &[(&str, &str)]) -> Found {
        let addresses = list.iter().map(|(ifname, ip)| IfAddr { ifname: ifname.to_string(), ip: ip.parse().unwrap() }).collect();
        Found { owner, held: Held::Interfaces(addresses) }
    }

    /// A pod with these IPs from the Kubernetes API.
    fn api(uid: &str, list: &[&str]) -> Found {
        Found { owner: pod(uid), held: Held::Ips(list.iter().map(|ip| ip.parse().unwrap()).collect()) }
    }

    fn ips(list: &[&str]) -> Vec<String> {
        list.iter().map(|ip| ip.to_string()).collect()
    }

    fn filter() -> ClaimFilter {
        ClaimFilter::new(&default_shared_interfaces()).unwrap()
    }

    fn uids_and_ips(listing: &[WorkloadIps]) -> Vec<(&str, Vec<String>)> {
        listing.iter().map(|w| (w.workload.pod_uid.as_deref().unwrap(), w.ips.clone())).collect()
    }

    #[test]
    fn each_namespace_claims_its_own_addresses() {
        let found = vec![
            ns(pod("a"), &[("eth0", "10.0.1.5"), ("eth0", "169.254.1.9"), ("cni0", "10.22.0.1"), ("docker0", "172.17.0.1")]),
            ns(
                pod("b"),
                &[("lo", "127.0.0.1"), ("lo", "::1"), ("eth0", "10.0.1.7"), ("eth0", "fe80::1"), ("eth0", "fd00::7"), ("eth1", "10.0.1.10")],
            ),
        ];
        let (listing, unclaimed) = claim(found, &filter());
        assert_eq!(
            listing,
            [
                WorkloadIps { workload: pod("a").unwrap(), ips: ips(&["10.0.1.5"]) },
                WorkloadIps { workload: pod("b").unwrap(), ips: ips(&["10.0.1.10", "10.0.1.7", "fd00::7"]) },
            ],
            "in the order found, addresses sorted as text"
        );
        assert_eq!(
            unclaimed,
            [(Reason::Rule(Unclaimed::LinkLocal), 2), (Reason::Rule(Unclaimed::SharedInterface), 2)].into_iter().collect()
        );
    }

    #[test]
    fn an_address_in_two_namespaces_is_neithers() {
        let found = vec![
            ns(pod("a"), &[("eth0", "10.0.0.1"), ("eth0", "10.0.0.9")]),
            ns(pod("b"), &[("eth0", "10.0.0.2"), ("eth1", "10.0.0.9")]),
            // Only the duplicate: the namespace is left with nothing to announce.
            ns(pod("c"), &[("eth0", "10.0.0.9")]),
            // One namespace with the address twice is no conflict.
            ns(pod("d"), &[("eth0", "10.0.0.4"), ("eth1", "10.0.0.4")]),
        ];
        let (listing, unclaimed) = claim(found, &filter());
        assert_eq!(uids_and_ips(&listing), [("a", ips(&["10.0.0.1"])), ("b", ips(&["10.0.0.2"])), ("d", ips(&["10.0.0.4"]))]);
        assert_eq!(unclaimed, [(Reason::Conflict, 1)].into_iter().collect());
    }

    #[test]
    fn a_shared_namespace_is_nobodys() {
        let found = vec![ns(None, &[("eth0", "10.0.0.1"), ("eth0", "fe80::1")]), ns(pod("b"), &[("eth0", "10.0.0.1")])];
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

    /// The API's IPs have no interface: the address rules apply (even with
    /// a shared-interface pattern matching every name), and so does the
    /// conflict rule, with namespaces and between pods.
    #[test]
    fn the_apis_pod_ips_follow_the_same_rules() {
        let everything = ClaimFilter::new(&["*".to_string()]).unwrap();
        let found = vec![
            ns(pod("ctr"), &[("eth0", "10.0.0.7")]),
            api("a", &["10.0.0.1", "fd00::1"]),
            api("b", &["169.254.3.3", "10.0.0.2"]),
            api("c", &["127.0.0.1"]),
            // Two pods with one IP (the API lagging behind a reuse), and a
            // pod holding what a namespace holds: neither.
            api("d", &["10.0.0.2"]),
            api("e", &["10.0.0.7", "10.0.0.5"]),
        ];
        let (listing, unclaimed) = claim(found, &filter());
        assert_eq!(uids_and_ips(&listing), [("a", ips(&["10.0.0.1", "fd00::1"])), ("e", ips(&["10.0.0.5"]))]);
        assert_eq!(unclaimed, [(Reason::Rule(Unclaimed::LinkLocal), 1), (Reason::Conflict, 2)].into_iter().collect());
        let (listing, unclaimed) = claim(vec![api("a", &["10.0.0.1"])], &everything);
        assert_eq!((uids_and_ips(&listing), unclaimed), (vec![("a", ips(&["10.0.0.1"]))], BTreeMap::new()));
    }

    /// A pod as the API sends it, on this node.
    fn api_pod(uid: &str, name: &str, status: serde_json::Value, host_network: bool) -> k8s_openapi::api::core::v1::Pod {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "shop", "uid": uid},
            "spec": {"nodeName": "n1", "hostNetwork": host_network, "containers": []},
            "status": status,
        }))
        .unwrap()
    }

    fn index_of(pods: &[k8s_openapi::api::core::v1::Pod]) -> Arc<PodIndex> {
        let index = Arc::new(PodIndex::default());
        for p in pods {
            let (uid, meta) = PodMeta::of(p, &[]).unwrap();
            index.insert(uid, meta);
        }
        index
    }

    /// A cgroup tree in a temporary directory, as a walk sees it: a pod
    /// container's cgroup for each UID, each with this process in it.
    struct FakeTree(std::path::PathBuf);

    impl FakeTree {
        fn new(name: &str, uids: &[&str]) -> FakeTree {
            let dir = std::env::temp_dir().join(format!("flowlog-addresses-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            for (i, uid) in uids.iter().enumerate() {
                let c = dir.join(format!("kubepods/besteffort/pod{uid}/{}", format!("{i:x}").repeat(64).get(..64).unwrap()));
                std::fs::create_dir_all(&c).unwrap();
                std::fs::write(c.join("cgroup.procs"), format!("{}\n", std::process::id())).unwrap();
            }
            FakeTree(dir)
        }

        fn discovery(&self, pods: Option<Arc<PodIndex>>) -> Discovery {
            Discovery {
                mount: Some(Mount { dir: self.0.clone(), root: "/".into() }),
                scope: Scope::default(),
                filter: filter(),
                // This process's namespace is the "pods'" here.
                host_netns: Vec::new(),
                known: FastMap::default(),
                logged: Vec::new(),
                pods,
                last_meta: HashMap::new(),
            }
        }
    }

    impl Drop for FakeTree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const UID_A: &str = "0a0a0a0a-0000-4000-8000-00000000000a";
    const UID_B: &str = "0b0b0b0b-0000-4000-8000-00000000000b";

    /// The pods the API gives IPs for are announced from it, named, and
    /// their namespaces are never opened: no privilege needed (unprivileged,
    /// opening or entering one would be refused and logged; as root, this
    /// process's own addresses would show up as the pod's).
    #[test]
    fn the_apis_pods_are_announced_without_entering_their_namespaces() {
        let tree = FakeTree::new("api", &[UID_A]);
        let index = index_of(&[
            api_pod(UID_A, "web-0", serde_json::json!({"phase": "Running", "podIP": "10.9.0.1", "qosClass": "BestEffort"}), false),
            // No cgroup here: announced all the same (the API is the source).
            api_pod(UID_B, "db-0", serde_json::json!({"phase": "Running", "podIPs": [{"ip": "10.9.0.2"}, {"ip": "fd00:9::2"}]}), false),
        ]);
        let mut d = tree.discovery(Some(index.clone()));
        let listing = d.round().unwrap();
        let want = |uid: &str, name: &str, qos: Option<&str>, ips_: &[&str]| WorkloadIps {
            workload: Arc::new(Workload {
                pod_uid: Some(uid.into()),
                name: Some(name.into()),
                namespace: Some("shop".into()),
                qos_class: qos.map(Into::into),
                ..Workload::of(WorkloadKind::Pod)
            }),
            ips: ips(ips_),
        };
        assert_eq!(listing, [want(UID_A, "web-0", Some("BestEffort"), &["10.9.0.1"]), want(UID_B, "db-0", None, &["10.9.0.2", "fd00:9::2"])]);
        assert!(d.logged.is_empty(), "no namespace was opened: {:?}", d.logged);
        // Deleted from the API: gone from the next listing.
        index.remove(UID_B);
        assert_eq!(d.round().unwrap(), [want(UID_A, "web-0", Some("BestEffort"), &["10.9.0.1"])]);
    }

    /// A pod deleted from the API while its cgroup (and namespace) lingers
    /// keeps the name the API gave it, as its flows do: announced unnamed,
    /// its IP's last flows were attributed to its UID alone. Forgotten once
    /// its cgroup is gone.
    #[test]
    fn a_pod_deleted_from_the_api_keeps_its_name_while_its_cgroup_lingers() {
        let tree = FakeTree::new("deleted", &[UID_A]);
        let index = index_of(&[api_pod(UID_A, "web-0", serde_json::json!({"phase": "Running", "podIP": "10.9.0.1"}), false)]);
        let mut d = tree.discovery(Some(index.clone()));
        d.round().unwrap();
        let owner = d.known.values().flatten().next().expect("the pod's cgroup walked").clone();
        let name = |d: &Discovery| (d.named(&owner).name.clone(), d.named(&owner).reason);
        assert_eq!(name(&d), (Some("web-0".into()), None));
        index.remove(UID_A);
        d.round().unwrap();
        assert_eq!(name(&d), (Some("web-0".into()), None), "deleted from the API, its cgroup still here");
        std::fs::remove_dir_all(tree.0.join("kubepods")).unwrap();
        d.round().unwrap();
        assert_eq!(name(&d), (None, Some(flowlog_schema::WorkloadReason::NoPodMetadata)), "its cgroup gone too");
    }

    /// What the API says a pod holds: hostNetwork pods and ended ones
    /// nothing, a pod being deleted still its IP; a pod without IPs yet is
    /// not the API's to say (its namespace is looked in).
    #[test]
    fn only_pods_holding_their_own_ip_are_the_apis() {
        let index = index_of(&[
            api_pod("u-host", "node-exporter", serde_json::json!({"phase": "Running", "podIP": "10.0.0.10"}), true),
            api_pod("u-done", "job-1", serde_json::json!({"phase": "Succeeded", "podIP": "10.9.0.3"}), false),
            api_pod("u-failed", "job-2", serde_json::json!({"phase": "Failed", "podIP": "10.9.0.4"}), false),
            api_pod("u-pending", "starting", serde_json::json!({"phase": "Pending"}), false),
            api_pod("u-run", "web-1", serde_json::json!({"phase": "Running", "podIP": "10.9.0.5"}), false),
        ]);
        let mut terminating = api_pod("u-term", "web-2", serde_json::json!({"phase": "Running", "podIP": "10.9.0.6"}), false);
        terminating.metadata.deletion_timestamp = serde_json::from_value(serde_json::json!("2026-01-01T00:00:00Z")).unwrap();
        let (uid, meta) = PodMeta::of(&terminating, &[]).unwrap();
        index.insert(uid, meta);
        let got: Vec<(String, Vec<IpAddr>)> = api_pods(&index.all()).into_iter().map(|(uid, (_, ips))| (uid, ips)).collect();
        let ip = |s: &str| vec![s.parse::<IpAddr>().unwrap()];
        assert_eq!(
            got,
            [
                ("u-done".to_string(), vec![]),
                ("u-failed".to_string(), vec![]),
                ("u-host".to_string(), vec![]),
                ("u-run".to_string(), ip("10.9.0.5")),
                ("u-term".to_string(), ip("10.9.0.6")),
            ]
        );
    }

    /// Each change of the index asks for a round at once.
    #[test]
    fn a_change_of_the_pods_lists_them_again_at_once() {
        let tree = FakeTree::new("change", &[]);
        let index = Arc::new(PodIndex::default());
        let mount = Mount { dir: tree.0.clone(), root: "/".into() };
        // An hour between rounds: only the index can bring the next one.
        let a = Announcer::start(Some(mount), Scope::default(), filter(), Duration::from_secs(3600), Some(index.clone())).unwrap();
        let mut rx = a.listing();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let pod = api_pod(UID_A, "web-0", serde_json::json!({"phase": "Running", "podIP": "10.9.0.1"}), false);
        let (uid, meta) = PodMeta::of(&pod, &[]).unwrap();
        index.insert(uid, meta);
        let listed = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|l| !l.is_empty())).await.map(|l| l.as_ref().map(|l| l.len()).ok())
        });
        assert_eq!(listed.expect("listed within seconds"), Some(1));
        index.remove(UID_A);
        let emptied = rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|l| l.is_empty())).await.is_ok() });
        assert!(emptied, "released within seconds");
    }
}
