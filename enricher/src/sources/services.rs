//! Kubernetes Services as an ownership source: a watch of every Service
//! (all namespaces) turns each one's ClusterIPs into ownership events
//! keyed `svc/{namespace}/{name}`, owned by the Service (`held_by`: kind
//! CLUSTER_IP). One watch per enricher instance: the sidecars do not watch
//! Services, so this scales with the number of Services, not of nodes.
//!
//! A Service newly seen holds its ClusterIPs from its creationTimestamp (a
//! ClusterIP is allocated at creation and never changes), one already known
//! from when the change is received; a deleted Service releases them when
//! the deletion is received, and so does one missing from a new list (the
//! watch was cut and its history compacted: 410 Gone). Headless Services
//! (`None`) and ExternalName ones (no ClusterIP) hold nothing.
//!
//! kube-runtime's `watcher` lists, then watches from the list's
//! resourceVersion; lists again on 410 Gone; retries errors with
//! exponential backoff (`default_backoff`). The watch runs on its own
//! thread with its own tokio runtime (`flowlog_runtime::kube`, as the
//! sidecar's pod watch): nothing here ever stops the enricher. While the API is down, slow or answering garbage, what is
//! known stays in force, and flows to unknown ClusterIPs fall back to the
//! other sources (the errors and `api_up` say so).

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
    sync::{mpsc, Arc, RwLock},
    time::{Duration, SystemTime},
};

use flowlog_schema::{Workload, WorkloadKind};
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::Service;
use flowlog_runtime::kube::{self, WatchMetrics};
use ::kube::{
    runtime::{
        watcher::{self, watcher},
        WatchStreamExt,
    },
    Api,
};
use tracing::{error, info, warn};

use super::{
    identity::IdentityStore,
    ownership::{Change, Event},
    Attrs,
};
pub use crate::config::KubernetesSettings;
use crate::metrics;

/// A Service's labels copied into records, at most (the first, by key).
pub const MAX_LABELS: usize = 32;
/// How long the enricher waits at start for the first list (so attribution
/// starts complete), before it goes on without it.
const FIRST_LIST_WAIT: Duration = Duration::from_secs(10);

/// The announcer key of a Service.
fn key(namespace: &str, name: &str) -> String {
    format!("svc/{namespace}/{name}")
}

/// A Service as an owner: named after it, its labels (bounded), held by
/// the Service itself (kind CLUSTER_IP).
pub fn owner(namespace: &str, name: &str, labels: Option<&BTreeMap<String, String>>) -> Attrs {
    let labels = labels.into_iter().flatten().take(MAX_LABELS).map(|(k, v)| (k.clone(), v.clone())).collect();
    let held_by = Workload { name: Some(name.into()), namespace: Some(namespace.into()), ..Workload::of(WorkloadKind::ClusterIp) };
    Attrs { workload: Some(name.into()), labels, held_by: Some(Arc::new(held_by)), ..Attrs::default() }
}

/// The Service's ClusterIPs (`spec.clusterIPs`, else `spec.clusterIP`),
/// without `None` (headless) and what does not parse.
fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = &svc.spec else { return Vec::new() };
    let listed = spec.cluster_ips.as_deref().filter(|l| !l.is_empty());
    let ips = listed.map(<[String]>::to_vec).or_else(|| spec.cluster_ip.clone().map(|ip| vec![ip]));
    ips.unwrap_or_default().iter().filter_map(|s| s.parse().ok()).collect()
}

/// The Service's creation time, Unix ns.
fn created_ns(svc: &Service) -> Option<i64> {
    let t = svc.metadata.creation_timestamp.as_ref()?;
    i64::try_from(t.0.as_nanosecond()).ok()
}

/// The Service's key and its event at `t`: it holds its ClusterIPs (none
/// for a headless Service). None for an object without a name.
pub fn event(svc: &Service, t: i64) -> Option<Event> {
    let (ns, name) = (svc.metadata.namespace.as_deref().unwrap_or("default"), svc.metadata.name.as_deref()?);
    let owner = Arc::new(owner(ns, name, svc.metadata.labels.as_ref()));
    Some(Event { key: key(ns, name), time_ns: t, change: Change::Holds { owner, ips: cluster_ips(svc) } })
}

fn deleted(svc: &Service, t: i64) -> Option<Event> {
    let (ns, name) = (svc.metadata.namespace.as_deref().unwrap_or("default"), svc.metadata.name.as_deref()?);
    Some(Event { key: key(ns, name), time_ns: t, change: Change::Released })
}

/// The watch's events as ownership events.
#[derive(Default)]
pub struct Services {
    /// Keys of the Services known (from the last list and the events since).
    known: HashSet<String>,
    /// A list in progress: its Services' events, applied when it is done.
    listing: Option<Vec<Event>>,
}

impl Services {
    /// A Service's event, received at `now`: a new one from its creation.
    fn apply(&self, svc: &Service, now: i64) -> Option<Event> {
        let e = event(svc, now)?;
        let since = if self.known.contains(&e.key) { now } else { created_ns(svc).map_or(now, |c| c.min(now)) };
        Some(Event { time_ns: since, ..e })
    }

    /// The ownership events of one watcher event received at `now` (Unix ns).
    pub fn on(&mut self, event: watcher::Event<Service>, now: i64) -> Vec<Event> {
        match event {
            watcher::Event::Init => {
                self.listing = Some(Vec::new());
                Vec::new()
            }
            watcher::Event::InitApply(svc) => {
                let e = self.apply(&svc, now);
                self.listing.get_or_insert_default().extend(e);
                Vec::new()
            }
            watcher::Event::InitDone => {
                let listed = self.listing.take().unwrap_or_default();
                let now_known: HashSet<String> = listed.iter().map(|e| e.key.clone()).collect();
                let gone = self.known.iter().filter(|k| !now_known.contains(*k));
                let mut events: Vec<Event> =
                    gone.map(|k| Event { key: k.clone(), time_ns: now, change: Change::Released }).collect();
                events.extend(listed);
                self.known = now_known;
                events
            }
            watcher::Event::Apply(svc) => {
                let e = self.apply(&svc, now);
                self.known.extend(e.as_ref().map(|e| e.key.clone()));
                e.into_iter().collect()
            }
            watcher::Event::Delete(svc) => {
                let e = deleted(&svc, now);
                if let Some(e) = &e {
                    self.known.remove(&e.key);
                }
                e.into_iter().collect()
            }
        }
    }
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or(0)
}

/// The Services watch's metrics.
const WATCH_METRICS: WatchMetrics = WatchMetrics { up: metrics::KUBE_API_UP, errors: metrics::KUBE_WATCH_ERRORS };
/// What stays in force while the watch does not work.
const MEANWHILE: &str = "the Services known stay in force; ClusterIPs of others are not attributed to them";

/// Starts the watch (when `[kubernetes] services` is on) and waits up to
/// [`FIRST_LIST_WAIT`] for its first list. Never fails: a client that
/// cannot be built is retried on the watch's thread (logged and counted).
pub fn start(settings: &KubernetesSettings, store: Arc<RwLock<IdentityStore>>) {
    if !settings.services {
        return;
    }
    ::metrics::gauge!(metrics::KUBE_API_UP).set(0.0);
    ::metrics::gauge!(metrics::KUBE_SERVICES).set(0.0);
    let (listed, first_list) = mpsc::sync_channel(1);
    let api_url = settings.api_url.clone();
    kube::spawn("kube-services", MEANWHILE, move || run(api_url, store, listed));
    if first_list.recv_timeout(FIRST_LIST_WAIT).is_err() {
        warn!("the Kubernetes API has not listed Services in {FIRST_LIST_WAIT:?}; going on, Services are attributed once it does");
    }
}

async fn run(api_url: Option<String>, store: Arc<RwLock<IdentityStore>>, listed: mpsc::SyncSender<()>) {
    let client = kube::connect(api_url.as_deref(), &WATCH_METRICS, MEANWHILE).await;
    info!("watching the Kubernetes API's Services");
    let wc = watcher::Config::default().timeout(kube::WATCH_TIMEOUT_SECS);
    let mut services = Services::default();
    let mut events = std::pin::pin!(watcher(Api::<Service>::all(client), wc).default_backoff());
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(e) => e,
            Err(e) => {
                kube::watch_error(&e, &WATCH_METRICS, "Services watch", MEANWHILE);
                continue;
            }
        };
        let done = matches!(event, watcher::Event::InitDone);
        let changes = services.on(event, now_ns());
        if !changes.is_empty() {
            let mut s = store.write().unwrap();
            let conflicts: usize = changes.into_iter().map(|e| s.apply(e)).sum();
            metrics::count_conflicts("kubernetes", conflicts);
            ::metrics::gauge!(metrics::KUBE_SERVICES).set(s.holders() as f64);
        }
        if services.listing.is_none() {
            ::metrics::gauge!(metrics::KUBE_API_UP).set(1.0);
        }
        if done {
            info!(services = services.known.len(), "Services listed");
            let _ = listed.try_send(());
        }
    }
    // The watcher's stream does not end; if it ever did, say so.
    error!("the Services watch ended: Services changed from now on are not seen");
}

#[cfg(test)]
mod tests {
    use k8s_openapi::{api::core::v1::ServiceSpec, apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
    use ::kube::api::ObjectMeta;

    use super::*;

    const S: i64 = 1_000_000_000;

    fn service(name: &str, ips: &[&str], created_s: i64) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some("shop".into()),
                labels: Some((0..40).map(|i| (format!("l{i:02}"), "v".to_string())).collect()),
                creation_timestamp: Some(Time(Timestamp::from_second(created_s).unwrap())),
                ..ObjectMeta::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: ips.first().map(|s| s.to_string()),
                cluster_ips: Some(ips.iter().map(|s| s.to_string()).collect()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn ips(e: &Event) -> Option<Vec<IpAddr>> {
        match &e.change {
            Change::Holds { ips, .. } => Some(ips.clone()),
            Change::Released => None,
        }
    }

    #[test]
    fn a_service_is_an_owner_of_its_cluster_ips() {
        let e = event(&service("api", &["10.96.0.10", "fd00::10"], 100), 7).unwrap();
        assert_eq!((e.key.as_str(), e.time_ns), ("svc/shop/api", 7));
        assert_eq!(ips(&e).unwrap(), ["10.96.0.10".parse::<IpAddr>().unwrap(), "fd00::10".parse().unwrap()]);
        let Change::Holds { owner, .. } = &e.change else { panic!() };
        assert_eq!(owner.workload.as_deref(), Some("api"));
        assert_eq!(owner.labels.len(), MAX_LABELS);
        let held = owner.held_by.as_deref().unwrap();
        assert_eq!((held.kind, held.name.as_deref(), held.namespace.as_deref()), (WorkloadKind::ClusterIp, Some("api"), Some("shop")));
        // Headless: holds nothing.
        assert_eq!(ips(&event(&service("db", &["None"], 100), 7).unwrap()).unwrap(), Vec::<IpAddr>::new());
        let mut old = service("old", &[], 100);
        old.spec.as_mut().unwrap().cluster_ips = None;
        old.spec.as_mut().unwrap().cluster_ip = Some("10.96.0.11".into());
        assert_eq!(ips(&event(&old, 7).unwrap()).unwrap(), ["10.96.0.11".parse::<IpAddr>().unwrap()]);
    }

    /// A list holds each Service from its creation; later events from
    /// when they are received; a Service deleted, or missing from a later
    /// list, is released then.
    #[test]
    fn watch_events_become_ownership_events() {
        let mut s = Services::default();
        let summary = |events: Vec<Event>| events.iter().map(|e| (e.key.clone(), e.time_ns, ips(e).map(|i| i.len()))).collect::<Vec<_>>();
        assert!(s.on(watcher::Event::Init, 1000 * S).is_empty());
        assert!(s.on(watcher::Event::InitApply(service("api", &["10.96.0.10"], 100)), 1000 * S).is_empty());
        assert!(s.on(watcher::Event::InitApply(service("web", &["10.96.0.12"], 5000)), 1000 * S).is_empty());
        assert_eq!(
            summary(s.on(watcher::Event::InitDone, 1000 * S)),
            [("svc/shop/api".into(), 100 * S, Some(1)), ("svc/shop/web".into(), 1000 * S, Some(1))]
        );
        // Created while watched: from its creation; changed: from now.
        assert_eq!(summary(s.on(watcher::Event::Apply(service("new", &["10.96.0.13"], 1001)), 1002 * S)), [("svc/shop/new".into(), 1001 * S, Some(1))]);
        assert_eq!(summary(s.on(watcher::Event::Apply(service("api", &["10.96.0.10"], 100)), 1003 * S)), [("svc/shop/api".into(), 1003 * S, Some(1))]);
        assert_eq!(summary(s.on(watcher::Event::Delete(service("web", &["10.96.0.12"], 5000)), 1004 * S)), [("svc/shop/web".into(), 1004 * S, None)]);
        // A new list (after 410 Gone) without "new": released.
        s.on(watcher::Event::Init, 1010 * S);
        s.on(watcher::Event::InitApply(service("api", &["10.96.0.10"], 100)), 1010 * S);
        assert_eq!(
            summary(s.on(watcher::Event::InitDone, 1010 * S)),
            [("svc/shop/new".into(), 1010 * S, None), ("svc/shop/api".into(), 1010 * S, Some(1))]
        );
    }

    /// Through the ownership history: a flow to the ClusterIP before the
    /// deletion is the Service's, after it nobody's.
    #[test]
    fn a_deleted_service_no_longer_owns_its_ip() {
        let mut s = Services::default();
        let mut store = IdentityStore::default();
        let events = [
            watcher::Event::Init,
            watcher::Event::InitApply(service("api", &["10.96.0.10"], 100)),
            watcher::Event::InitDone,
            watcher::Event::Delete(service("api", &["10.96.0.10"], 100)),
        ];
        for (i, e) in events.into_iter().enumerate() {
            for o in s.on(e, (200 + i as i64) * S) {
                store.apply(o);
            }
        }
        let ip = "10.96.0.10".parse().unwrap();
        assert_eq!(store.owner_at(ip, 150 * S).unwrap().workload.as_deref(), Some("api"));
        assert!(store.owner_at(ip, 204 * S).is_err());
        assert_eq!(store.holders(), 0);
    }
}
