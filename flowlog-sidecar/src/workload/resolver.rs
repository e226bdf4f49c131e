//! Each flow's workload, from its cgroup id, on the capture path.
//!
//! A known cgroup is a hash hit (often not even that: consecutive flows
//! tend to come from the same cgroup). An unknown one is never looked up
//! on the capture path: its flows are held, in order, while the walking
//! thread ([`Walker`]) lists the cgroup tree, and released at a later
//! drain, resolved, or attributed to the host with a reason when the
//! cgroup is gone or the walk too slow. Nothing is dropped.
//!
//! Flows with no owning process (cgroup id 0: the socket was opened before
//! the sidecar started, or its map was full) fall back on their network
//! namespace: a namespace whose flows so far all came from one pod (or one
//! container) is that pod's. The host's own namespaces, and any namespace
//! seen with two owners, are no one's.
//!
//! With a capture scope ([`Scope`]) set, flows outside it are dropped here,
//! once their cgroup is known, and counted.
//!
//! With the Kubernetes API on, a pod's workload is named (pod name,
//! namespace, container name, owner, labels) from the [`PodIndex`] when its
//! cgroup is learned, and again when the index changes (checked once per
//! drain): never per flow, and no flow waits for the API. A pod the index
//! does not have yet goes out with reason NO_POD_METADATA.

use std::{
    collections::{hash_map::Entry, HashSet, VecDeque},
    sync::{mpsc::TryRecvError, Arc},
    time::{Duration, Instant},
};

use flowlog_schema::{Flow, Workload, WorkloadKind, WorkloadReason};
use tracing::{debug, error, warn};

use super::{
    pods::{self, PodIndex, PodMeta},
    scope::Scope,
    tree::{self, Cgroup, Request, WalkResult, Walker},
    FastMap, Stats, WorkloadConfig,
};

/// A held flow is released after this long even without an answer
/// (LOOKUP_FAILED): a few walks' time.
const HOLD_MAX: Duration = Duration::from_secs(2);
/// At most this many flows are held; past it the oldest go out unresolved.
const MAX_HELD: usize = 20_000;
/// Cgroup ids known to be gone, and network namespaces remembered, at most.
const MAX_NOT_FOUND: usize = 65_536;
const MAX_NETNS: usize = 65_536;

enum Mode {
    /// `workload.resolve = false`: flows carry no workload.
    Off,
    /// No cgroup v2 mounted: every flow is the host's (NO_CGROUP_V2).
    NoCgroupV2,
    Walking(Walker),
    /// The walking thread died: unknown cgroups get LOOKUP_FAILED.
    WalkerGone,
}

struct Held {
    flow: Flow,
    /// The request whose walk answers for this flow's cgroup.
    seq: u64,
    since: Instant,
}

/// Who a network namespace belongs to, as its flows told.
enum NetnsOwner {
    /// One pod (or container), learned from a flow of `cgroup`; forgotten
    /// when that cgroup goes (the namespace's inode may be reused).
    One {
        cgroup: u64,
        workload: Arc<Workload>,
        /// The owner's cgroup is in the capture scope.
        in_scope: bool,
    },
    Shared,
}

/// A cgroup's workload, and the network namespace its flows were last
/// seen in: a flow in the same namespace again has nothing to teach.
#[derive(Clone)]
struct Known {
    workload: Arc<Workload>,
    netns: u64,
    in_scope: bool,
    /// What the cgroup path alone says (`workload` before a pod is named).
    base: Arc<Workload>,
    /// The API's metadata a pod's `workload` was named with.
    meta: Option<Arc<PodMeta>>,
}

impl Known {
    fn of(Cgroup { workload, in_scope }: Cgroup) -> Known {
        Known { workload: workload.clone(), netns: 0, in_scope, base: workload, meta: None }
    }

    /// A pod's cgroup (parsed), whose workload the API names.
    fn is_pod(&self) -> bool {
        self.base.kind == WorkloadKind::Pod && self.base.reason.is_none()
    }

    /// This pod's entry named from `index`: unchanged while its metadata
    /// is; renamed when the metadata changed; kept as it was when the API
    /// no longer lists the pod (deleted while its cgroup lingers); else
    /// unnamed (NO_POD_METADATA).
    fn named(&self, index: &PodIndex) -> Known {
        let uid = self.base.pod_uid.as_deref().unwrap_or_default();
        match (index.get(uid), &self.meta) {
            (Some(m), Some(had)) if Arc::ptr_eq(&m, had) => self.clone(),
            (Some(m), _) => Known { workload: Arc::new(m.name(&self.base)), meta: Some(m), ..self.clone() },
            (None, Some(_)) => self.clone(),
            (None, None) => Known { workload: Arc::new(pods::unnamed(&self.base)), ..self.clone() },
        }
    }
}

/// The workloads given to flows for each reason, shared.
struct Unresolved {
    no_owner: Arc<Workload>,
    not_found: Arc<Workload>,
    lookup_failed: Arc<Workload>,
    no_cgroup_v2: Arc<Workload>,
}

pub struct Resolver {
    mode: Mode,
    /// Workloads by cgroup id, from the last walk and the one before (so
    /// the last flows of a cgroup removed in between still resolve).
    current: FastMap<u64, Known>,
    previous: FastMap<u64, Known>,
    /// Ids a walk that started after their flow did not find: they never
    /// will be (cgroup ids are not reused).
    not_found: HashSet<u64, foldhash::fast::RandomState>,
    /// The last cgroup resolved, its workload, and whether it is in scope.
    last: Option<(u64, Arc<Workload>, bool)>,
    held: VecDeque<Held>,
    /// Unknown cgroup ids being looked up, with the request that will answer.
    waiting: FastMap<u64, u64>,
    next_seq: u64,
    /// Requests up to this one are answered.
    answered: u64,
    /// The request of the current drain (one per drain at most), sent at
    /// its end with the new unknown ids.
    asking: Option<Request>,
    netns: FastMap<u64, NetnsOwner>,
    /// One or two inodes: a list is quicker to search than a hash set.
    host_netns: Vec<u64>,
    scope: Scope,
    /// Told of each pod's or container's network namespace the first time
    /// one of its flows is seen there (workload-IP discovery looks then).
    new_netns: Option<Box<dyn Fn() + Send>>,
    unresolved: Unresolved,
    stats: Stats,
    /// The Kubernetes API's pods (`workload.kubernetes`), and the index
    /// generation the known pods were last named at.
    pods: Option<Arc<PodIndex>>,
    pods_generation: u64,
}

impl Resolver {
    /// Finds the cgroup v2 tree and starts its walker (unless resolution is
    /// off). Flows outside `scope` are dropped; `pods` (the Kubernetes
    /// API's, [`pods::start`]) names pods.
    pub fn new(config: &WorkloadConfig, scope: Scope, pods: Option<Arc<PodIndex>>) -> Resolver {
        let mode = if !config.resolve {
            Mode::Off
        } else {
            let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
            match tree::find_mount(&mountinfo) {
                None => {
                    warn!("no cgroup v2 hierarchy mounted: every flow is attributed to the host (NO_CGROUP_V2)");
                    if scope.has_cgroup() {
                        warn!("scope.cgroup cannot apply without cgroup v2: only flows of scope.netns are captured");
                    }
                    Mode::NoCgroupV2
                }
                Some(mount) => {
                    debug!(dir = %mount.dir.display(), root = %mount.root, "resolving workloads from the cgroup v2 tree");
                    match Walker::start(mount, scope.clone()) {
                        Ok(w) => Mode::Walking(w),
                        Err(e) => {
                            error!("starting the cgroup walker: {e}; unknown cgroups get LOOKUP_FAILED");
                            Mode::WalkerGone
                        }
                    }
                }
            }
        };
        let reason = |r| Arc::new(Workload::unresolved(r, None));
        Resolver {
            mode,
            current: FastMap::default(),
            previous: FastMap::default(),
            not_found: HashSet::default(),
            last: None,
            held: VecDeque::new(),
            waiting: FastMap::default(),
            next_seq: 0,
            answered: 0,
            asking: None,
            netns: FastMap::default(),
            host_netns: tree::host_netns(),
            scope,
            new_netns: None,
            unresolved: Unresolved {
                no_owner: reason(WorkloadReason::NoOwner),
                not_found: reason(WorkloadReason::CgroupNotFound),
                lookup_failed: reason(WorkloadReason::LookupFailed),
                no_cgroup_v2: reason(WorkloadReason::NoCgroupV2),
            },
            stats: Stats::default(),
            pods,
            pods_generation: 0,
        }
    }

    /// Calls `f` (it must not block) when a flow shows a pod's or
    /// container's network namespace for the first time.
    pub fn on_new_netns(&mut self, f: impl Fn() + Send + 'static) {
        self.new_netns = Some(Box::new(f));
    }

    /// Gives the last flow of `out` its workload in place, or takes it out
    /// of `out`: out of scope, or held until its cgroup is known
    /// ([`Resolver::poll`] releases it). In place because a Flow is some
    /// 300 bytes: moving each one in and out again was about a tenth of the
    /// transport's CPU.
    #[inline]
    pub fn admit(&mut self, now: Instant, out: &mut Vec<Flow>) {
        let Some(flow) = out.last() else { return };
        let (id, netns) = (flow.cgroup_id as u64, flow.netns_ino as u64);
        let (w, in_scope) = match &self.mode {
            Mode::Off => {
                if !self.scope.netns_in(netns) {
                    out.pop();
                    self.stats.out_of_scope += 1;
                }
                return;
            }
            Mode::NoCgroupV2 => (self.unresolved.no_cgroup_v2.clone(), false),
            _ if id == 0 => self.by_netns(netns),
            _ => match &self.last {
                Some((last, w, in_scope)) if *last == id => (w.clone(), *in_scope),
                _ => match self.resolve(id, netns) {
                    Some((w, in_scope)) => {
                        self.last = Some((id, w.clone(), in_scope));
                        (w, in_scope)
                    }
                    None if matches!(self.mode, Mode::WalkerGone) => {
                        (self.unresolved.lookup_failed.clone(), false)
                    }
                    None => {
                        let flow = out.pop().expect("checked above");
                        return self.hold(flow, id, now);
                    }
                },
            },
        };
        self.deliver_last(w, in_scope, out);
    }

    /// Appends `flow` with its workload to `out` if it is in scope: its
    /// cgroup's, or (`in_scope` false) its network namespace's.
    fn deliver(&mut self, flow: Flow, w: Arc<Workload>, in_scope: bool, out: &mut Vec<Flow>) {
        out.push(flow);
        self.deliver_last(w, in_scope, out);
    }

    /// [`Resolver::deliver`] for the last flow of `out`, in place.
    fn deliver_last(&mut self, w: Arc<Workload>, in_scope: bool, out: &mut Vec<Flow>) {
        let Some(flow) = out.last_mut() else { return };
        if !in_scope && !self.scope.netns_in(flow.netns_ino as u64) {
            out.pop();
            self.stats.out_of_scope += 1;
            return;
        }
        self.stats.count(&w);
        flow.workload = Some(w);
    }

    /// After each drain: takes in finished walks and releases the held
    /// flows they answer (and those held too long), in order.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Flow>) {
        if let Some(r) = self.asking.take() {
            if let Mode::Walking(w) = &self.mode {
                if !w.request(r) {
                    self.walker_gone();
                }
            }
        }
        self.take_results();
        self.rename_pods();
        self.release(now, out, false);
    }

    /// At exit: waits up to `timeout` for the walks held flows wait for,
    /// then releases every held flow.
    pub fn finish(&mut self, timeout: Duration, out: &mut Vec<Flow>) {
        let deadline = Instant::now() + timeout;
        self.poll(Instant::now(), out);
        while !self.held.is_empty() {
            let Mode::Walking(w) = &self.mode else { break };
            let Some(left) = deadline.checked_duration_since(Instant::now()) else {
                break;
            };
            match w.results.recv_timeout(left) {
                Ok(r) => self.apply(r),
                Err(_) => break,
            }
            self.release(Instant::now(), out, false);
        }
        self.release(Instant::now(), out, true);
    }

    /// False with `workload.resolve = false`.
    pub fn enabled(&self) -> bool {
        !matches!(self.mode, Mode::Off)
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Flows held right now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Cgroups known from the last walk.
    pub fn cgroups_known(&self) -> usize {
        self.current.len()
    }

    /// Pods the Kubernetes API named; None with `workload.kubernetes` off.
    pub fn pods_named(&self) -> Option<usize> {
        self.pods.as_ref().map(|p| p.len())
    }

    /// When the pod index changed: names the known pods again (those the
    /// API has just named, or renamed), and the namespaces learned from them.
    fn rename_pods(&mut self) {
        let Some(index) = &self.pods else { return };
        let generation = index.generation();
        if generation == self.pods_generation {
            return;
        }
        self.pods_generation = generation;
        for k in self.current.values_mut().chain(self.previous.values_mut()) {
            if k.is_pod() {
                *k = k.named(index);
            }
        }
        self.last = None;
        let current = &self.current;
        for owner in self.netns.values_mut() {
            if let NetnsOwner::One { cgroup, workload, .. } = owner {
                if let Some(k) = current.get(cgroup).filter(|k| k.is_pod()) {
                    *workload = namespace_owner(&k.workload);
                }
            }
        }
    }

    /// The workload of a known cgroup and whether it is in scope (learning,
    /// the first time a flow of it is seen in a namespace, who owns that
    /// namespace); None if unknown.
    fn resolve(&mut self, id: u64, netns: u64) -> Option<(Arc<Workload>, bool)> {
        let known = match self.current.get_mut(&id) {
            Some(k) => k,
            None => match self.previous.get_mut(&id) {
                Some(k) => k,
                None => {
                    return self
                        .not_found
                        .contains(&id)
                        .then(|| (self.unresolved.not_found.clone(), false))
                }
            },
        };
        let (w, in_scope) = (known.workload.clone(), known.in_scope);
        if known.netns != netns {
            known.netns = netns;
            self.learn(netns, id, &w, in_scope);
        }
        Some((w, in_scope))
    }

    fn hold(&mut self, flow: Flow, id: u64, now: Instant) {
        let seq = match self.waiting.get(&id) {
            Some(seq) => *seq,
            None => {
                // One request per drain, for all its new unknown ids.
                let next = self.next_seq + 1;
                let r = self.asking.get_or_insert_with(|| Request {
                    seq: next,
                    wanted: Vec::new(),
                });
                r.wanted.push(id);
                self.next_seq = r.seq;
                self.waiting.insert(id, r.seq);
                r.seq
            }
        };
        self.held.push_back(Held {
            flow,
            seq,
            since: now,
        });
    }

    fn walker_gone(&mut self) {
        if matches!(self.mode, Mode::Walking(_)) {
            error!("the cgroup walker stopped: flows of new cgroups are attributed to the host (LOOKUP_FAILED)");
            self.mode = Mode::WalkerGone;
        }
    }

    fn take_results(&mut self) {
        let Mode::Walking(w) = &self.mode else { return };
        let mut results = Vec::new();
        let gone = loop {
            match w.results.try_recv() {
                Ok(r) => results.push(r),
                Err(TryRecvError::Empty) => break false,
                Err(TryRecvError::Disconnected) => break true,
            }
        };
        for r in results {
            self.apply(r);
        }
        if gone {
            self.walker_gone();
        }
    }

    fn apply(&mut self, r: WalkResult) {
        self.stats.walks += 1;
        let cgroups = match r.cgroups {
            Ok(c) => c,
            Err(e) => {
                self.stats.walk_errors += 1;
                warn!("walking the cgroup tree failed: {e}");
                // The flows waiting on it time out; their cgroups' next
                // flows ask again.
                self.waiting.retain(|_, seq| *seq > r.seq);
                return;
            }
        };
        debug!(
            cgroups = cgroups.len(),
            took_ms = r.took.as_millis() as u64,
            seq = r.seq,
            "cgroup tree walked"
        );
        // A pod's cgroup already known keeps its names (and namespace); a
        // new one is named from the pod index.
        let cgroups = cgroups
            .into_iter()
            .map(|(id, cgroup)| {
                let k = match self.current.get(&id) {
                    Some(before) => Known { netns: 0, ..before.clone() },
                    None => match (Known::of(cgroup), &self.pods) {
                        (k, Some(index)) if k.is_pod() => k.named(index),
                        (k, _) => k,
                    },
                };
                (id, k)
            })
            .collect();
        self.previous = std::mem::replace(&mut self.current, cgroups);
        self.answered = self.answered.max(r.seq);
        if self.not_found.len() >= MAX_NOT_FOUND {
            self.not_found.clear();
        }
        let (current, previous, not_found, answered) = (
            &self.current,
            &self.previous,
            &mut self.not_found,
            self.answered,
        );
        self.waiting.retain(|id, seq| {
            if *seq > answered {
                return true;
            }
            if !current.contains_key(id) && !previous.contains_key(id) {
                not_found.insert(*id);
            }
            false
        });
        // A namespace learned from a cgroup that is gone may be reused.
        self.netns.retain(|_, o| match o {
            NetnsOwner::One { cgroup, .. } => current.contains_key(cgroup),
            NetnsOwner::Shared => true,
        });
    }

    /// Releases held flows whose cgroup is known, whose walk has answered,
    /// or that waited too long (all of them with `all`), keeping the order.
    fn release(&mut self, now: Instant, out: &mut Vec<Flow>, all: bool) {
        if self.held.is_empty() {
            return;
        }
        let overflow = self.held.len().saturating_sub(MAX_HELD);
        let gone = !matches!(self.mode, Mode::Walking(_));
        for (i, h) in std::mem::take(&mut self.held).into_iter().enumerate() {
            let id = h.flow.cgroup_id as u64;
            let (w, in_scope) = match self.resolve(id, h.flow.netns_ino as u64) {
                Some(known) => known,
                // Answered by a walk that started after the flow: not in the tree.
                None if h.seq <= self.answered => (self.unresolved.not_found.clone(), false),
                None if all || gone || i < overflow || now.duration_since(h.since) >= HOLD_MAX => {
                    (self.unresolved.lookup_failed.clone(), false)
                }
                None => {
                    self.held.push_back(h);
                    continue;
                }
            };
            self.deliver(h.flow, w, in_scope, out);
        }
    }

    /// Remembers who owns the network namespace of a resolved flow.
    fn learn(&mut self, netns: u64, cgroup: u64, w: &Arc<Workload>, in_scope: bool) {
        // The host's namespaces are no one's; an unresolved flow says
        // nothing (a pod not named yet is still known by its UID).
        let unresolved = w.reason.is_some_and(|r| r != WorkloadReason::NoPodMetadata);
        if netns == 0 || self.host_netns.contains(&netns) || unresolved {
            return;
        }
        let own = matches!(w.kind, WorkloadKind::Pod | WorkloadKind::Container);
        if self.netns.len() >= MAX_NETNS && !self.netns.contains_key(&netns) {
            self.netns.clear();
        }
        match self.netns.entry(netns) {
            Entry::Vacant(e) => {
                e.insert(if own {
                    if let Some(tell) = &self.new_netns {
                        tell();
                    }
                    NetnsOwner::One {
                        cgroup,
                        workload: namespace_owner(w),
                        in_scope,
                    }
                } else {
                    NetnsOwner::Shared
                });
            }
            Entry::Occupied(mut e) => {
                let same = match e.get() {
                    NetnsOwner::One { workload, .. } => own && same_owner(workload, w),
                    NetnsOwner::Shared => true,
                };
                if !same {
                    e.insert(NetnsOwner::Shared);
                }
            }
        }
    }

    /// An ownerless flow's workload: its namespace's, and whether that
    /// owner is in scope.
    fn by_netns(&mut self, netns: u64) -> (Arc<Workload>, bool) {
        match self.netns.get(&netns) {
            Some(NetnsOwner::One { workload, in_scope, .. }) => {
                self.stats.by_netns += 1;
                (workload.clone(), *in_scope)
            }
            _ => (self.unresolved.no_owner.clone(), false),
        }
    }
}

/// What owns a namespace a workload's flow was in: the pod (all its
/// containers share it), or the container.
pub(super) fn namespace_owner(w: &Arc<Workload>) -> Arc<Workload> {
    if w.kind != WorkloadKind::Pod {
        return w.clone();
    }
    Arc::new(Workload {
        reason: w.reason,
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        pod_uid: w.pod_uid.clone(),
        runtime: w.runtime.clone(),
        qos_class: w.qos_class.clone(),
        owner_kind: w.owner_kind.clone(),
        owner_name: w.owner_name.clone(),
        labels: w.labels.clone(),
        ..Workload::of(WorkloadKind::Pod)
    })
}

pub(super) fn same_owner(a: &Workload, b: &Workload) -> bool {
    a.kind == b.kind
        && match a.kind {
            WorkloadKind::Pod => a.pod_uid == b.pod_uid,
            _ => a.container_id == b.container_id,
        }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::scope::ScopeConfig;
    use flowlog_schema::fixtures;

    /// A resolver on a fake tree: `tree` is what the next walk finds.
    struct Fake {
        r: Resolver,
        requests: std::sync::mpsc::Receiver<Request>,
        results: std::sync::mpsc::Sender<WalkResult>,
    }

    fn fake() -> Fake {
        let (walker, requests, results) = Walker::fake();
        let mut r = Resolver::new(&WorkloadConfig { resolve: false, ..Default::default() }, Scope::default(), None);
        r.mode = Mode::Walking(walker);
        r.host_netns = vec![1];
        Fake {
            r,
            requests,
            results,
        }
    }

    impl Fake {
        /// Answers the latest request with `tree` (cgroup id -> path);
        /// returns the ids the requests wanted.
        fn walk(&mut self, tree: &[(u64, &str)]) -> Vec<u64> {
            let (mut seq, mut wanted) = (0, Vec::new());
            while let Ok(r) = self.requests.try_recv() {
                seq = seq.max(r.seq);
                wanted.extend(r.wanted);
            }
            let cgroups = tree
                .iter()
                .map(|(id, p)| {
                    let workload = Arc::new(super::super::cgroup::classify(p));
                    (*id, Cgroup { workload, in_scope: self.r.scope.cgroup_in(p) })
                })
                .collect();
            self.results
                .send(WalkResult {
                    seq,
                    cgroups: Ok(cgroups),
                    took: Duration::ZERO,
                })
                .unwrap();
            wanted
        }
        fn admit(&mut self, cgroup: u64, netns: u64, t: Instant) -> Vec<Flow> {
            let mut out = Vec::new();
            let f = Flow {
                cgroup_id: cgroup as i64,
                netns_ino: netns as i64,
                connection_id: cgroup as i64,
                ..fixtures::flow()
            };
            out.push(f);
            self.r.admit(t, &mut out);
            out
        }
        fn poll(&mut self, t: Instant) -> Vec<Flow> {
            let mut out = Vec::new();
            self.r.poll(t, &mut out);
            out
        }
    }

    fn kind(f: &Flow) -> (WorkloadKind, Option<WorkloadReason>) {
        let w = f.workload.as_ref().unwrap();
        (w.kind, w.reason)
    }

    const POD: &str = "/kubepods/burstable/pod7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b/\
                       aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    /// Another container of the same pod.
    const POD_SIDECAR: &str = "/kubepods/burstable/pod7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b/\
                               bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    #[test]
    fn unknown_cgroups_are_held_until_a_walk_answers() {
        let mut f = fake();
        let t = Instant::now();
        f.walk(&[(1, "/"), (10, "/system.slice/nginx.service")]);
        assert!(f.poll(t).is_empty());
        // Known: straight through, again from the memo.
        for _ in 0..2 {
            assert_eq!(kind(&f.admit(10, 1, t)[0]), (WorkloadKind::Service, None));
        }
        // Unknown: held, one request for the drain, in order.
        assert!(f.admit(20, 1, t).is_empty());
        assert!(f.admit(30, 1, t).is_empty());
        assert!(f.admit(20, 1, t).is_empty());
        assert_eq!(f.r.held(), 3);
        assert!(f.poll(t).is_empty());
        // The walk (asked for both) finds 20 but not 30 (removed meanwhile).
        assert_eq!(
            f.walk(&[(1, "/"), (10, "/system.slice/nginx.service"), (20, POD)]),
            [20, 30]
        );
        let out = f.poll(t);
        assert_eq!(
            out.iter().map(|f| f.cgroup_id).collect::<Vec<_>>(),
            [20, 30, 20]
        );
        assert_eq!(kind(&out[0]), (WorkloadKind::Pod, None));
        assert_eq!(
            kind(&out[1]),
            (WorkloadKind::Host, Some(WorkloadReason::CgroupNotFound))
        );
        // Gone for good: no new walk, no wait.
        assert_eq!(
            kind(&f.admit(30, 1, t)[0]),
            (WorkloadKind::Host, Some(WorkloadReason::CgroupNotFound))
        );
        assert!(f.requests.try_recv().is_err());
        // A cgroup removed since the last walk still resolves for a walk more.
        f.walk(&[(1, "/")]);
        f.poll(t);
        assert_eq!(kind(&f.admit(20, 1, t)[0]), (WorkloadKind::Pod, None));
        let s = f.r.stats();
        assert_eq!(
            (
                s.flows[WorkloadKind::Pod.index() as usize],
                s.flows[WorkloadKind::Service.index() as usize]
            ),
            (3, 2)
        );
        assert_eq!(
            s.unresolved[WorkloadReason::CgroupNotFound.index() as usize],
            2
        );
    }

    #[test]
    fn a_walk_that_started_earlier_cannot_say_not_found() {
        let mut f = fake();
        let t = Instant::now();
        assert!(f.admit(20, 1, t).is_empty());
        // A result for an older request (seq 0) that lacks 20: keep waiting.
        f.results
            .send(WalkResult {
                seq: 0,
                cgroups: Ok(FastMap::default()),
                took: Duration::ZERO,
            })
            .unwrap();
        assert!(f.poll(t).is_empty());
        // But one that has it releases the flow at once.
        f.results
            .send(WalkResult {
                seq: 0,
                cgroups: Ok([(20, Cgroup { workload: Arc::new(Workload::of(WorkloadKind::Host)), in_scope: true })]
                    .into_iter()
                    .collect()),
                took: Duration::ZERO,
            })
            .unwrap();
        assert_eq!(kind(&f.poll(t)[0]), (WorkloadKind::Host, None));
    }

    #[test]
    fn slow_or_failed_walks_release_flows_unresolved() {
        let mut f = fake();
        let t = Instant::now();
        assert!(f.admit(20, 1, t).is_empty());
        f.results
            .send(WalkResult {
                seq: 1,
                cgroups: Err("EACCES".into()),
                took: Duration::ZERO,
            })
            .unwrap();
        assert!(f.poll(t + Duration::from_millis(10)).is_empty());
        let out = f.poll(t + HOLD_MAX);
        assert_eq!(
            kind(&out[0]),
            (WorkloadKind::Host, Some(WorkloadReason::LookupFailed))
        );
        assert_eq!(f.r.stats().walk_errors, 1);
        // The next flow of that cgroup asks again (at the end of the drain).
        while f.requests.try_recv().is_ok() {}
        assert!(f.admit(20, 1, t).is_empty());
        f.poll(t);
        assert_eq!(f.requests.try_recv().map(|r| r.wanted), Ok(vec![20]));
        // At exit, whatever is still held goes out.
        let mut out = Vec::new();
        f.r.finish(Duration::from_millis(10), &mut out);
        assert_eq!(
            kind(&out[0]),
            (WorkloadKind::Host, Some(WorkloadReason::LookupFailed))
        );
        // A dead walker: unknown cgroups are not held at all.
        f.requests = std::sync::mpsc::channel().1;
        assert_eq!(f.admit(40, 1, t).len(), 0);
        let out = f.poll(t);
        assert_eq!(
            kind(&out[0]),
            (WorkloadKind::Host, Some(WorkloadReason::LookupFailed))
        );
        assert_eq!(
            kind(&f.admit(50, 1, t)[0]),
            (WorkloadKind::Host, Some(WorkloadReason::LookupFailed))
        );
    }

    #[test]
    fn too_many_held_flows_release_the_oldest() {
        let mut f = fake();
        let t = Instant::now();
        for i in 0..MAX_HELD as u64 + 5 {
            assert!(f.admit(100 + i, 1, t).is_empty());
        }
        let out = f.poll(t);
        assert_eq!(out.len(), 5);
        assert_eq!(out[0].cgroup_id, 100);
        assert_eq!(f.r.held(), MAX_HELD);
    }

    #[test]
    fn ownerless_flows_fall_back_on_their_pods_network_namespace() {
        let mut f = fake();
        let t = Instant::now();
        f.walk(&[
            (1, "/"),
            (20, POD),
            (21, POD_SIDECAR),
            (30, "/system.slice/docker.service"),
        ]);
        f.poll(t);
        // Before any flow of the pod: no owner.
        assert_eq!(
            kind(&f.admit(0, 500, t)[0]),
            (WorkloadKind::Host, Some(WorkloadReason::NoOwner))
        );
        // Two containers of one pod in namespace 500: the pod's.
        f.admit(20, 500, t);
        f.admit(21, 500, t);
        let out = f.admit(0, 500, t);
        let w = out[0].workload.as_ref().unwrap();
        assert_eq!(
            (w.kind, w.pod_uid.as_deref(), w.container_id.as_deref()),
            (
                WorkloadKind::Pod,
                Some("7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b"),
                None
            )
        );
        assert_eq!(f.r.stats().by_netns, 1);
        // The host's namespace is no one's, even after a pod's flow in it (hostNetwork).
        f.admit(20, 1, t);
        assert_eq!(
            kind(&f.admit(0, 1, t)[0]),
            (WorkloadKind::Host, Some(WorkloadReason::NoOwner))
        );
        // A namespace with a pod and a service in it is shared.
        f.admit(20, 600, t);
        f.admit(30, 600, t);
        assert_eq!(
            kind(&f.admit(0, 600, t)[0]),
            (WorkloadKind::Host, Some(WorkloadReason::NoOwner))
        );
        // The pod's cgroups go: its namespace is forgotten.
        f.walk(&[(1, "/")]);
        f.poll(t);
        assert_eq!(
            kind(&f.admit(0, 500, t)[0]),
            (WorkloadKind::Host, Some(WorkloadReason::NoOwner))
        );
    }

    /// With a scope: flows of cgroups outside its subtree are dropped and
    /// counted, also when they were held; ownerless flows go by their
    /// namespace (named by the scope, or owned by a pod in scope).
    #[test]
    fn flows_outside_the_scope_are_dropped_and_counted() {
        let mut f = fake();
        f.r.scope = Scope::new(&ScopeConfig { cgroup: Some("/node1".into()), netns: vec!["700".into()] }).unwrap();
        let t = Instant::now();
        let pod1 = format!("/node1{POD}");
        let pod2 = format!("/node2{POD_SIDECAR}");
        f.walk(&[(1, "/"), (10, "/node1/system.slice/a.service"), (20, &pod1), (30, &pod2)]);
        f.poll(t);
        assert_eq!(kind(&f.admit(10, 1, t)[0]), (WorkloadKind::Service, None));
        assert!(f.admit(30, 1, t).is_empty(), "node2's");
        assert!(f.admit(30, 1, t).is_empty(), "node2's, from the memo");
        assert_eq!(kind(&f.admit(20, 500, t)[0]), (WorkloadKind::Pod, None));
        // Out of the subtree but in a namespace the scope names.
        assert_eq!(f.admit(30, 700, t).len(), 1);
        // Held until the walk finds it, then judged.
        assert!(f.admit(40, 1, t).is_empty() && f.admit(41, 1, t).is_empty());
        assert!(f.poll(t).is_empty());
        f.walk(&[(1, "/"), (20, &pod1), (30, &pod2), (40, "/node1/x.service"), (41, "/node2/x.service")]);
        let out = f.poll(t);
        assert_eq!(out.iter().map(|f| f.cgroup_id).collect::<Vec<_>>(), [40]);
        // Ownerless: the pod in scope owns namespace 500; 600 is node2's pod's; 1 is the host's.
        f.admit(30, 600, t);
        assert_eq!(kind(&f.admit(0, 500, t)[0]), (WorkloadKind::Pod, None));
        assert!(f.admit(0, 600, t).is_empty() && f.admit(0, 1, t).is_empty());
        assert_eq!(f.admit(0, 700, t).len(), 1);
        // Gone before any walk saw it: not known to be in scope.
        assert!(f.admit(50, 1, t).is_empty());
        assert!(f.poll(t).is_empty());
        f.walk(&[(1, "/")]);
        assert!(f.poll(t).is_empty());
        assert_eq!(f.r.held(), 0);
        assert_eq!(f.r.stats().out_of_scope, 7);
        assert_eq!(f.r.stats().flows.iter().sum::<u64>(), 6, "only flows in scope are counted by kind");
    }

    #[test]
    fn without_resolution_the_scope_is_by_namespace() {
        let mut r = Resolver::new(
            &WorkloadConfig { resolve: false, ..Default::default() },
            Scope::new(&ScopeConfig { cgroup: None, netns: vec!["700".into()] }).unwrap(),
            None,
        );
        let mut out = Vec::new();
        for netns in [700, 1, 700] {
            out.push(Flow { netns_ino: netns, ..fixtures::flow() });
            r.admit(Instant::now(), &mut out);
        }
        assert_eq!((out.len(), r.stats().out_of_scope), (2, 1));
    }

    /// What the API says of the pod of POD: one container named.
    fn pod_meta(name: &str) -> PodMeta {
        PodMeta {
            namespace: "shop".into(),
            name: name.into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            containers: [("a".repeat(64), "web".to_string())].into(),
            owner: Some(pods::Owner { kind: "Deployment".into(), name: "web".into() }),
            ..PodMeta::default()
        }
    }

    #[test]
    fn pods_are_named_once_the_api_knows_them_and_never_wait_for_it() {
        const UID: &str = "7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b";
        const OTHER_POD: &str = "/kubepods/besteffort/pod11111111-2222-3333-4444-555555555555/\
                                 cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";
        let mut f = fake();
        let index = Arc::new(PodIndex::default());
        f.r.pods = Some(index.clone());
        let t = Instant::now();
        let tree = [(1, "/"), (20, POD), (21, POD_SIDECAR)];
        f.walk(&tree);
        f.poll(t);
        let workload = |out: Vec<Flow>| out[0].workload.clone().unwrap();
        // Not named yet: the pod by its UID, with the reason, at once.
        let w = workload(f.admit(20, 500, t));
        assert_eq!((w.kind, w.reason, w.pod_uid.as_deref(), w.name.as_deref()), (WorkloadKind::Pod, Some(WorkloadReason::NoPodMetadata), Some(UID), None));
        // Its namespace is still learned: ownerless flows in it are the pod's.
        assert_eq!(kind(&f.admit(0, 500, t)[0]), (WorkloadKind::Pod, Some(WorkloadReason::NoPodMetadata)));
        // The API names it: the next drain renames what is known.
        index.insert(UID.into(), pod_meta("web-0"));
        f.poll(t);
        let w = workload(f.admit(20, 500, t));
        assert_eq!((w.reason, w.name.as_deref(), w.namespace.as_deref()), (None, Some("web-0"), Some("shop")));
        assert_eq!((w.container_name.as_deref(), w.owner_kind.as_deref(), w.owner_name.as_deref()), (Some("web"), Some("Deployment"), Some("web")));
        assert_eq!(w.labels["app"], "web");
        // A container the pod's status does not list: the pod's names only.
        let w = workload(f.admit(21, 500, t));
        assert_eq!((w.name.as_deref(), w.container_name.as_deref()), (Some("web-0"), None));
        // The namespace's owner too, without a container.
        let w = workload(f.admit(0, 500, t));
        assert_eq!((w.reason, w.name.as_deref(), w.container_id.as_deref(), w.owner_name.as_deref()), (None, Some("web-0"), None, Some("web")));
        // Renamed, and still named after a walk.
        index.insert(UID.into(), pod_meta("web-1"));
        f.poll(t);
        f.walk(&tree);
        f.poll(t);
        assert_eq!(workload(f.admit(20, 500, t)).name.as_deref(), Some("web-1"));
        // Gone from the API while its cgroup is still here: the names stay.
        index.remove(UID);
        f.poll(t);
        assert_eq!(workload(f.admit(20, 500, t)).name.as_deref(), Some("web-1"));
        // A new cgroup of a pod the API already has: named when learned.
        index.insert("11111111-2222-3333-4444-555555555555".into(), pod_meta("db-0"));
        assert!(f.admit(30, 1, t).is_empty());
        f.poll(t);
        f.walk(&[(1, "/"), (20, POD), (21, POD_SIDECAR), (30, OTHER_POD)]);
        let w = workload(f.poll(t));
        assert_eq!((w.reason, w.name.as_deref(), w.container_name.as_deref()), (None, Some("db-0"), None));
        assert_eq!(f.r.stats().unresolved[WorkloadReason::NoPodMetadata.index() as usize], 2);
        assert_eq!(f.r.pods_named(), Some(1));
    }

    #[test]
    fn off_and_without_cgroup_v2() {
        let mut r = Resolver::new(&WorkloadConfig { resolve: false, ..Default::default() }, Scope::default(), None);
        let mut out = Vec::new();
        out.push(fixtures::flow());
        r.admit(Instant::now(), &mut out);
        assert_eq!(out[0].workload, None);
        r.mode = Mode::NoCgroupV2;
        out.push(fixtures::flow());
        r.admit(Instant::now(), &mut out);
        assert_eq!(
            kind(&out[1]),
            (WorkloadKind::Host, Some(WorkloadReason::NoCgroupV2))
        );
    }
}
