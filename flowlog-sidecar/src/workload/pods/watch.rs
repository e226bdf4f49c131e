//! The watch of this node's pods, on its own thread with its own tokio
//! runtime (the capture path is synchronous and must never wait for it;
//! `flowlog_runtime::kube`, as the enricher's Services watch).
//!
//! kube-runtime's `watcher` gives the semantics: a paginated list, then a
//! watch from its resourceVersion with bookmarks; on 410 Gone (history
//! compacted) a fresh list; on errors a retry with exponential backoff
//! (`default_backoff`: 0.8 s doubling to 30 s). Every list replaces the
//! index at once (pods missing from it are gone); events in between change
//! one pod each. A pod's top owner is looked up once per ReplicaSet or Job
//! (cached); a failed lookup leaves the pod's direct owner.

use std::{collections::HashMap, sync::Arc};

use futures_util::StreamExt;
use k8s_openapi::{
    api::{apps::v1::ReplicaSet, batch::v1::Job, core::v1::Pod},
    apimachinery::pkg::apis::meta::v1::OwnerReference,
};
use flowlog_runtime::kube::{self as runtime_kube, WatchMetrics};
use kube::{
    runtime::{
        watcher::{self, watcher, Event},
        WatchStreamExt,
    },
    Api, Client, Resource, ResourceExt,
};
use metrics::{counter, gauge};
use serde::de::DeserializeOwned;
use tracing::{debug, error, info, warn};

use super::{has_parent, top_owner, KubernetesConfig, Owner, PodIndex, PodMeta};
use crate::{metrics as m, workload::FastMap};

/// The pod watch's metrics.
const WATCH_METRICS: WatchMetrics = WatchMetrics { up: m::KUBE_API_UP, errors: m::KUBE_WATCH_ERRORS };
/// Owners remembered (a node has far fewer ReplicaSets and Jobs); past it
/// the cache starts over.
const MAX_OWNERS: usize = 4096;

/// Starts the watch thread; returns the index it fills. Nothing here
/// fails: a client that cannot be built is retried on the thread (logged
/// and counted), and flows meanwhile carry NO_POD_METADATA.
pub fn start(config: &KubernetesConfig) -> Arc<PodIndex> {
    let index = Arc::new(PodIndex::default());
    let (config, shared) = (config.clone(), index.clone());
    runtime_kube::spawn("kube-pods", "pods stay unnamed (NO_POD_METADATA)", move || run(config, shared));
    index
}

async fn run(config: KubernetesConfig, index: Arc<PodIndex>) {
    gauge!(m::KUBE_API_UP).set(0.0);
    let client = runtime_kube::connect(config.api_url.as_deref(), &WATCH_METRICS, "pods stay unnamed meanwhile").await;
    let node = config.node_name.clone().unwrap_or_default();
    info!(node, "watching this node's pods in the Kubernetes API");
    let wc = watcher::Config::default().fields(&format!("spec.nodeName={node}")).timeout(runtime_kube::WATCH_TIMEOUT_SECS);
    let mut owners = Owners { client: client.clone(), top: HashMap::new() };
    // The pods of a list in progress; the index keeps the last full one.
    let mut listing: Option<FastMap<String, PodMeta>> = None;
    let mut events = std::pin::pin!(watcher(Api::<Pod>::all(client), wc).default_backoff());
    while let Some(event) = events.next().await {
        match event {
            Ok(Event::Init) => listing = Some(FastMap::default()),
            Ok(Event::InitApply(pod)) => {
                if let Some((uid, meta)) = owners.named(&pod, &config.labels).await {
                    listing.get_or_insert_default().insert(uid, meta);
                }
                count_event("relist_pod");
            }
            // The index changes first, then the metrics say so.
            Ok(Event::InitDone) => {
                let pods = listing.take().unwrap_or_default();
                debug!(pods = pods.len(), "pods listed");
                index.replace_all(pods);
                count_event("relist_done");
                gauge!(m::KUBE_API_UP).set(1.0);
            }
            Ok(Event::Apply(pod)) => {
                if let Some((uid, meta)) = owners.named(&pod, &config.labels).await {
                    index.insert(uid, meta);
                }
                count_event("apply");
                gauge!(m::KUBE_API_UP).set(1.0);
            }
            Ok(Event::Delete(pod)) => {
                if let Some(uid) = pod.metadata.uid.as_deref() {
                    index.remove(uid);
                }
                count_event("delete");
                gauge!(m::KUBE_API_UP).set(1.0);
            }
            Err(e) => runtime_kube::watch_error(&e, &WATCH_METRICS, "pod watch", "pods already named keep their names"),
        }
        gauge!(m::KUBE_PODS).set(index.len() as f64);
    }
    // The watcher's stream does not end; if it ever did, say so.
    error!("the pod watch ended: pods seen from now on stay unnamed");
}

fn count_event(kind: &'static str) {
    counter!(m::KUBE_WATCH_EVENTS, "type" => kind).increment(1);
}

/// Top owners of ReplicaSets and Jobs, looked up once each.
struct Owners {
    client: Client,
    /// (kind, namespace, name) of a direct owner to its top owner.
    top: HashMap<(String, String, String), Owner>,
}

impl Owners {
    /// The pod's metadata with its top owner.
    async fn named(&mut self, pod: &Pod, labels: &[String]) -> Option<(String, PodMeta)> {
        let (uid, mut meta) = PodMeta::of(pod, labels)?;
        if let Some(direct) = meta.owner.take() {
            meta.owner = Some(self.top(&meta.namespace, direct).await);
        }
        Some((uid, meta))
    }

    async fn top(&mut self, ns: &str, direct: Owner) -> Owner {
        if !has_parent(&direct) {
            return direct;
        }
        let key = (direct.kind.clone(), ns.to_string(), direct.name.clone());
        if let Some(top) = self.top.get(&key) {
            return top.clone();
        }
        let refs = match direct.kind.as_str() {
            "ReplicaSet" => owner_refs(Api::<ReplicaSet>::namespaced(self.client.clone(), ns), &direct.name).await,
            _ => owner_refs(Api::<Job>::namespaced(self.client.clone(), ns), &direct.name).await,
        };
        let result = match &refs {
            Ok(Some(_)) => "ok",
            Ok(None) => "not_found",
            Err(e) => {
                warn!(kind = direct.kind, namespace = ns, name = direct.name, "looking up a pod's owner: {e}; using the direct owner");
                "error"
            }
        };
        counter!(m::KUBE_OWNER_LOOKUPS, "result" => result).increment(1);
        let Ok(Some(refs)) = refs else { return direct };
        let top = top_owner(direct, Some(&refs));
        if self.top.len() >= MAX_OWNERS {
            self.top.clear();
        }
        self.top.insert(key, top.clone());
        top
    }
}

/// An object's owner references; None when it does not exist.
async fn owner_refs<K>(api: Api<K>, name: &str) -> kube::Result<Option<Vec<OwnerReference>>>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    Ok(api.get_opt(name).await?.map(|o| o.owner_references().to_vec()))
}
