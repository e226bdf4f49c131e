//! Pod names from the Kubernetes API: a watch of this node's pods
//! ([`watch`], on its own thread) keeps, per pod UID, the pod's namespace,
//! name, allow-listed labels, container names and top owner in a shared
//! [`PodIndex`]. The resolver reads the index only when it learns a new
//! cgroup, or when the index changed ([`PodIndex::generation`]), never per
//! flow, and never waits for it: a pod the index does not name yet is
//! reported with its UID and reason NO_POD_METADATA, and named as soon as
//! the watch delivers it.
//!
//! The index also says which IPs each pod holds ([`PodMeta::held_ips`]):
//! the workload-IP announcer (`workload::addresses`) takes them from here,
//! without entering the pods' network namespaces, and is told of every
//! change ([`PodIndex::on_change`]).

pub mod watch;

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
};

use flowlog_schema::{Workload, WorkloadKind, WorkloadReason};
use k8s_openapi::{
    api::core::v1::{ContainerStatus, Pod, PodStatus},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};

use super::FastMap;
use crate::config::ConfigError;

/// At most this many label keys in the allow-list: each record carries them.
pub const MAX_LABELS: usize = 32;

flowlog_settings::settings! {
    /// Pod names, namespaces, containers, owners and labels from the
    /// Kubernetes API (`[workload.kubernetes]`).
    pub struct KubernetesConfig {
        /// Name each pod's flows from a watch of this node's pods in the
        /// Kubernetes API (needs workload.resolve, node_name, and RBAC: get,
        /// list, watch pods; get replicasets and jobs).
        #[flag(long = "workload-kubernetes", env = "FLOWLOG_WORKLOAD_KUBERNETES")]
        pub enabled: bool = false,
        /// This node's name (the pods watched are those with spec.nodeName
        /// equal to it); in a DaemonSet, from the Downward API (spec.nodeName).
        #[flag(long = "node-name", env = "FLOWLOG_NODE_NAME")]
        pub node_name: Option<String> = None,
        /// The pod label keys copied into records (an allow-list, at most 32;
        /// other labels are left out).
        #[flag(long = "workload-kubernetes-labels", env = "FLOWLOG_WORKLOAD_KUBERNETES_LABELS")]
        pub labels: Vec<String> = default_labels(),
        /// The API server's URL, plain http without authentication (tests,
        /// a local proxy); unset: the in-cluster service account (else
        /// ~/.kube/config), as kube-rs infers it.
        #[flag(long = "workload-kubernetes-api-url", env = "FLOWLOG_WORKLOAD_KUBERNETES_API_URL")]
        pub api_url: Option<String> = None,
    }
}

/// The labels most workloads are named by (Kubernetes' recommended labels
/// and the older `app`/`version`).
fn default_labels() -> Vec<String> {
    ["app", "app.kubernetes.io/name", "app.kubernetes.io/component", "version"].map(String::from).to_vec()
}

impl KubernetesConfig {
    pub fn validate(&self, resolve: bool) -> Result<(), ConfigError> {
        let invalid = |name, reason: &str| Err(ConfigError::Invalid { name, reason: reason.into() });
        if !self.enabled {
            return Ok(());
        }
        if !resolve {
            return invalid("workload.kubernetes.enabled", "needs workload.resolve = true (pods are found by their cgroup)");
        }
        if self.node_name.as_deref().is_none_or(|n| n.trim().is_empty()) {
            return invalid(
                "workload.kubernetes.node_name",
                "needed with workload.kubernetes.enabled: set FLOWLOG_NODE_NAME from the Downward API (fieldRef spec.nodeName) or --node-name",
            );
        }
        if self.labels.len() > MAX_LABELS {
            return invalid("workload.kubernetes.labels", &format!("{} keys: at most {MAX_LABELS}", self.labels.len()));
        }
        if let Some(bad) = self.labels.iter().find(|k| k.is_empty() || k.len() > 317 || k.contains(char::is_whitespace)) {
            return invalid("workload.kubernetes.labels", &format!("{bad:?} is not a label key"));
        }
        if let Some(url) = self.api_url.as_deref().filter(|u| !flowlog_runtime::kube::api_url_ok(u)) {
            return invalid("workload.kubernetes.api_url", &format!("{url:?} is not an http://host:port URL"));
        }
        Ok(())
    }
}

/// A pod's controller, as its owner references name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    pub kind: String,
    pub name: String,
}

/// What the API says about one pod, as records carry it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    /// The allow-listed labels.
    pub labels: BTreeMap<String, String>,
    /// Container id (as the cgroup path gives it: without the runtime's
    /// `containerd://` prefix) to the container's name.
    pub containers: BTreeMap<String, String>,
    /// The top controller (see [`top_owner`]); None for a bare pod.
    pub owner: Option<Owner>,
    /// The pod's IPs: `status.podIPs`, else `status.podIP` (unparsable ones
    /// left out); empty until the pod's network is set up.
    pub ips: Vec<IpAddr>,
    /// `spec.hostNetwork`: the pod is in the node's network namespace, and
    /// its IPs are the node's.
    pub host_network: bool,
    /// `status.phase`: Pending, Running, Succeeded, Failed or Unknown.
    pub phase: Option<String>,
    /// `status.qosClass` (Guaranteed, Burstable, BestEffort: as kubelet's
    /// cgroup names spell it).
    pub qos_class: Option<String>,
    /// The container runtime, from the scheme of the containers' ids (as
    /// the cgroup names spell it: containerd, crio, docker).
    pub runtime: Option<String>,
}

impl PodMeta {
    /// The pod's UID and what records carry of it, with its direct owner
    /// (the watch then looks up the top one). None for a pod without a UID
    /// or a name (not a pod the API would send).
    pub fn of(pod: &Pod, allowed: &[String]) -> Option<(String, PodMeta)> {
        let m = &pod.metadata;
        let uid = m.uid.clone().filter(|u| !u.is_empty())?;
        let name = m.name.clone()?;
        let labels = m
            .labels
            .iter()
            .flatten()
            .filter(|(k, _)| allowed.contains(k))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let status = pod.status.as_ref();
        let statuses: [Option<&Vec<ContainerStatus>>; 3] = [
            status.and_then(|s| s.container_statuses.as_ref()),
            status.and_then(|s| s.init_container_statuses.as_ref()),
            status.and_then(|s| s.ephemeral_container_statuses.as_ref()),
        ];
        let containers = statuses
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|c| Some((container_id(c.container_id.as_deref()?)?.to_string(), c.name.clone())))
            .collect();
        let meta = PodMeta {
            namespace: m.namespace.clone().unwrap_or_default(),
            name,
            labels,
            containers,
            owner: m.owner_references.as_deref().and_then(controller),
            ips: status.map(pod_ips).unwrap_or_default(),
            host_network: pod.spec.as_ref().and_then(|s| s.host_network).unwrap_or(false),
            phase: status.and_then(|s| s.phase.clone()),
            qos_class: status.and_then(|s| s.qos_class.clone()),
            runtime: statuses.into_iter().flatten().flatten().find_map(|c| runtime_of(c.container_id.as_deref()?)).map(str::to_owned),
        };
        Some((uid, meta))
    }

    /// `base` (a pod's workload from its cgroup path) named by the API.
    pub fn name(&self, base: &Workload) -> Workload {
        Workload {
            reason: None,
            name: Some(self.name.clone()),
            namespace: Some(self.namespace.clone()),
            container_name: base.container_id.as_ref().and_then(|id| self.containers.get(id)).cloned(),
            owner_kind: self.owner.as_ref().map(|o| o.kind.clone()),
            owner_name: self.owner.as_ref().map(|o| o.name.clone()),
            labels: self.labels.clone(),
            ..base.clone()
        }
    }

    /// The pod as the identity heartbeats announce it, named as its flows
    /// are: the owner of its network namespace (all its containers share
    /// it), so no container.
    pub fn workload(&self, uid: &str) -> Workload {
        let base = Workload {
            pod_uid: Some(uid.to_owned()),
            qos_class: self.qos_class.clone(),
            runtime: self.runtime.clone(),
            ..Workload::of(WorkloadKind::Pod)
        };
        self.name(&base)
    }

    /// The IPs the pod holds, as the API says: None while it says none
    /// (the pod's network is not set up yet, or the API has not caught up:
    /// the pod's namespace may still be looked in); empty for a hostNetwork
    /// pod (its IPs are the node's, never the pod's own) and for a pod that
    /// has ended (Succeeded, Failed: its IP is free for another pod though
    /// the status still shows it). A pod being deleted (deletionTimestamp
    /// set) holds its IP until the API no longer lists it: its containers
    /// may still be answering on it meanwhile.
    pub fn held_ips(&self) -> Option<&[IpAddr]> {
        if self.host_network || matches!(self.phase.as_deref(), Some("Succeeded" | "Failed")) {
            return Some(&[]);
        }
        (!self.ips.is_empty()).then_some(&self.ips[..])
    }
}

/// `status.podIPs` (every IP family's), else `status.podIP` (older API
/// servers); what does not parse as an IP is left out.
fn pod_ips(status: &PodStatus) -> Vec<IpAddr> {
    let listed: Vec<&str> = status.pod_ips.iter().flatten().map(|p| p.ip.as_str()).collect();
    let ips = if listed.is_empty() { status.pod_ip.as_deref().into_iter().collect() } else { listed };
    let mut ips: Vec<IpAddr> = ips.into_iter().filter_map(|ip| ip.trim().parse().ok()).collect();
    ips.sort();
    ips.dedup();
    ips
}

/// The runtime a status' `containerID` names (`containerd://<id>`), as the
/// cgroup names spell it (`cri-o` is `crio` there).
fn runtime_of(container_id: &str) -> Option<&str> {
    match container_id.split_once("://")?.0 {
        "" => None,
        "cri-o" => Some("crio"),
        scheme => Some(scheme),
    }
}

/// Starts the watch of this node's pods when `workload.kubernetes` is on
/// (and workloads are resolved); its index names pods for the resolver
/// and the workload-IP announcements.
pub fn start(config: &super::WorkloadConfig) -> Option<Arc<PodIndex>> {
    (config.resolve && config.kubernetes.enabled).then(|| watch::start(&config.kubernetes))
}

/// A pod's workload (`w`, kind POD, from its cgroup path) as `index` names
/// it now; any other workload as it is.
pub fn name_now(index: &PodIndex, w: &Arc<Workload>) -> Arc<Workload> {
    if w.kind != WorkloadKind::Pod || w.reason.is_some() {
        return w.clone();
    }
    match index.get(w.pod_uid.as_deref().unwrap_or_default()) {
        Some(meta) => Arc::new(meta.name(w)),
        None => Arc::new(unnamed(w)),
    }
}

/// A pod's workload while the API has not named it: what the cgroup path
/// says, and why the names are missing.
pub fn unnamed(base: &Workload) -> Workload {
    Workload { reason: Some(WorkloadReason::NoPodMetadata), ..base.clone() }
}

/// The container id in a status' `containerID` (`containerd://<id>`,
/// `cri-o://<id>`, `docker://<id>`): what follows the scheme.
pub fn container_id(s: &str) -> Option<&str> {
    s.split_once("://").map(|(_, id)| id).filter(|id| !id.is_empty())
}

/// The controlling owner reference (`controller: true`), else the first
/// one (hand-made references may lack the flag).
pub fn controller(refs: &[OwnerReference]) -> Option<Owner> {
    refs.iter()
        .find(|r| r.controller == Some(true))
        .or(refs.first())
        .map(|r| Owner { kind: r.kind.clone(), name: r.name.clone() })
}

/// Whether the owner's own controller is looked up: a ReplicaSet's
/// (normally a Deployment) and a Job's (a CronJob). Other controllers
/// (StatefulSet, DaemonSet, Node for static pods, ...) are the top.
pub fn has_parent(o: &Owner) -> bool {
    o.kind == "ReplicaSet" || o.kind == "Job"
}

/// The top controller: the direct owner's own controller when it has one
/// (`parent_refs`: the direct owner's owner references, None when it could
/// not be read), else the direct owner.
pub fn top_owner(direct: Owner, parent_refs: Option<&[OwnerReference]>) -> Owner {
    parent_refs.and_then(controller).unwrap_or(direct)
}

/// Called after each change of the index (from the watch's thread: it
/// must not block).
pub type OnChange = Box<dyn Fn() + Send + Sync>;

/// The pods the watch knows, by UID, shared by the watch (writer) and the
/// resolver and the workload-IP announcer (readers, off the capture path).
#[derive(Default)]
pub struct PodIndex {
    pods: RwLock<FastMap<String, Arc<PodMeta>>>,
    /// Bumped on every change: the resolver renames its pods when it moves.
    generation: AtomicU64,
    /// Told of every change: the announcer lists the pods' IPs again at
    /// once, so a new pod's IP is announced, and a deleted one's released,
    /// within a moment of the watch seeing it.
    on_change: Mutex<Vec<OnChange>>,
}

impl std::fmt::Debug for PodIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodIndex").field("pods", &self.len()).field("generation", &self.generation()).finish()
    }
}

impl PodIndex {
    pub fn get(&self, uid: &str) -> Option<Arc<PodMeta>> {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).get(uid).cloned()
    }

    /// Every pod, by UID (sorted).
    pub fn all(&self) -> Vec<(String, Arc<PodMeta>)> {
        let mut all: Vec<_> =
            self.pods.read().unwrap_or_else(|e| e.into_inner()).iter().map(|(u, m)| (u.clone(), m.clone())).collect();
        all.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        all
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Calls `f` after every change from now on.
    pub fn on_change(&self, f: OnChange) {
        self.on_change.lock().unwrap_or_else(|e| e.into_inner()).push(f);
    }

    /// A change is in: the generation moves, then whoever asked is told.
    fn changed(&self) {
        self.generation.fetch_add(1, Ordering::Release);
        for f in self.on_change.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            f();
        }
    }

    pub fn len(&self) -> usize {
        self.pods.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Adds or replaces a pod; an unchanged pod changes nothing.
    pub fn insert(&self, uid: String, meta: PodMeta) {
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        if pods.get(&uid).is_some_and(|old| **old == meta) {
            return;
        }
        pods.insert(uid, Arc::new(meta));
        drop(pods);
        self.changed();
    }

    pub fn remove(&self, uid: &str) {
        let removed = self.pods.write().unwrap_or_else(|e| e.into_inner()).remove(uid).is_some();
        if removed {
            self.changed();
        }
    }

    /// After a (re-)list: exactly these pods. Unchanged ones keep their entry.
    pub fn replace_all(&self, listed: FastMap<String, PodMeta>) {
        let mut pods = self.pods.write().unwrap_or_else(|e| e.into_inner());
        let old = std::mem::take(&mut *pods);
        *pods = listed
            .into_iter()
            .map(|(uid, meta)| {
                let kept = old.get(&uid).filter(|o| ***o == meta).cloned();
                let meta = kept.unwrap_or_else(|| Arc::new(meta));
                (uid, meta)
            })
            .collect();
        drop(pods);
        self.changed();
    }
}

#[cfg(test)]
mod tests;
