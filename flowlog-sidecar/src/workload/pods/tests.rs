use std::path::Path;

use flowlog_schema::{fixtures, WorkloadKind};
use serde_json::json;

use super::*;
use crate::config::Config;

/// A pod as the API sends it: a Deployment's (through ReplicaSet
/// web-7d9f8b6c5), two containers and an init container, three labels.
fn pod() -> Pod {
    let cid = fixtures::pod_workload().container_id.unwrap();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": "web-7d9f8b6c5-x2x9z", "namespace": "shop", "uid": "7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b",
            "labels": {"app": "web", "pod-template-hash": "7d9f8b6c5", "team": "a"},
            "ownerReferences": [
                {"apiVersion": "v1", "kind": "Other", "name": "not-the-controller", "uid": "u0"},
                {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8b6c5", "uid": "u1", "controller": true},
            ],
        },
        "spec": {"nodeName": "n1", "containers": [{"name": "web"}, {"name": "proxy"}]},
        "status": {
            "phase": "Running", "qosClass": "Burstable",
            "podIP": "10.0.1.7", "podIPs": [{"ip": "10.0.1.7"}, {"ip": "fd00::7"}],
            "containerStatuses": [
                {"name": "web", "containerID": format!("containerd://{cid}"), "image": "", "imageID": "", "ready": true, "restartCount": 0},
                {"name": "proxy", "containerID": "containerd://bbbb", "image": "", "imageID": "", "ready": true, "restartCount": 0},
                {"name": "starting", "image": "", "imageID": "", "ready": false, "restartCount": 0},
            ],
            "initContainerStatuses": [
                {"name": "init", "containerID": "cri-o://cccc", "image": "", "imageID": "", "ready": false, "restartCount": 0},
            ],
        },
    }))
    .unwrap()
}

fn owner(kind: &str, name: &str) -> Owner {
    Owner { kind: kind.into(), name: name.into() }
}

fn refs(v: serde_json::Value) -> Vec<OwnerReference> {
    serde_json::from_value(v).unwrap()
}

#[test]
fn container_ids_lose_the_runtime_scheme() {
    assert_eq!(container_id("containerd://4c01"), Some("4c01"));
    assert_eq!(container_id("cri-o://ab"), Some("ab"));
    assert_eq!(container_id("docker://ff"), Some("ff"));
    assert_eq!(container_id("docker://"), None);
    assert_eq!(container_id("4c01"), None);
}

#[test]
fn a_pods_metadata_keeps_allowed_labels_and_every_containers_name() {
    let allowed = ["app".to_string(), "version".to_string()];
    let (uid, m) = PodMeta::of(&pod(), &allowed).unwrap();
    assert_eq!(uid, "7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b");
    assert_eq!((m.namespace.as_str(), m.name.as_str()), ("shop", "web-7d9f8b6c5-x2x9z"));
    assert_eq!(m.labels, BTreeMap::from([("app".into(), "web".into())]));
    let cid = fixtures::pod_workload().container_id.unwrap();
    assert_eq!(
        m.containers,
        BTreeMap::from([(cid, "web".into()), ("bbbb".into(), "proxy".into()), ("cccc".into(), "init".into())]),
        "a container without an id yet is left out"
    );
    // The controller reference, not the first one: the watch then looks
    // up the ReplicaSet's own owner.
    assert_eq!(m.owner, Some(owner("ReplicaSet", "web-7d9f8b6c5")));
    assert!(has_parent(m.owner.as_ref().unwrap()));
    // What the workload-IP announcements need.
    assert_eq!(m.ips, ["10.0.1.7".parse::<IpAddr>().unwrap(), "fd00::7".parse().unwrap()]);
    assert_eq!((m.host_network, m.phase.as_deref(), m.qos_class.as_deref()), (false, Some("Running"), Some("Burstable")));
    assert_eq!(m.runtime.as_deref(), Some("containerd"), "the first container with an id says it");
    // No labels allowed, no UID: nothing, or no pod.
    assert!(PodMeta::of(&pod(), &[]).unwrap().1.labels.is_empty());
    let mut p = pod();
    p.metadata.uid = None;
    assert_eq!(PodMeta::of(&p, &allowed), None);
}

/// A pod's IPs: `podIPs` (both families), else `podIP` (older servers);
/// none before its network is up; garbage left out. The runtime as the
/// cgroup names spell it.
#[test]
fn a_pods_ips_and_runtime_come_from_its_status() {
    let with = |status: serde_json::Value| {
        let mut p = pod();
        p.status = Some(serde_json::from_value(status).unwrap());
        PodMeta::of(&p, &[]).unwrap().1
    };
    let ips = |list: &[&str]| list.iter().map(|s| s.parse::<IpAddr>().unwrap()).collect::<Vec<_>>();
    assert_eq!(with(json!({"podIP": "10.0.0.1"})).ips, ips(&["10.0.0.1"]));
    assert_eq!(with(json!({"podIP": "10.0.0.1", "podIPs": [{"ip": "fd00::1"}, {"ip": "10.0.0.1"}]})).ips, ips(&["10.0.0.1", "fd00::1"]));
    assert_eq!(with(json!({"podIPs": [{"ip": "not-an-ip"}, {"ip": "10.0.0.2"}]})).ips, ips(&["10.0.0.2"]));
    assert!(with(json!({"phase": "Pending"})).ips.is_empty());
    let runtime = |id: &str| with(json!({"containerStatuses": [{"name": "c", "containerID": id, "image": "", "imageID": "", "ready": true, "restartCount": 0}]})).runtime;
    assert_eq!(runtime("cri-o://ab").as_deref(), Some("crio"));
    assert_eq!(runtime("docker://ab").as_deref(), Some("docker"));
    assert_eq!(runtime("ab"), None);
    assert_eq!(with(json!({})).runtime, None);
}

/// Which IPs a pod holds as the API says: its own, unless it is on the
/// node's network or has ended; nothing to say before it has any.
#[test]
fn a_pod_holds_its_ips_while_it_runs_on_its_own_network() {
    let (_, m) = PodMeta::of(&pod(), &[]).unwrap();
    assert_eq!(m.held_ips(), Some(&m.ips[..]));
    let host = PodMeta { host_network: true, ..m.clone() };
    assert_eq!(host.held_ips(), Some(&[][..]));
    for phase in ["Succeeded", "Failed"] {
        assert_eq!(PodMeta { phase: Some(phase.into()), ..m.clone() }.held_ips(), Some(&[][..]), "{phase}");
    }
    for phase in ["Pending", "Running", "Unknown"] {
        assert_eq!(PodMeta { phase: Some(phase.into()), ..m.clone() }.held_ips(), Some(&m.ips[..]), "{phase}");
    }
    assert_eq!(PodMeta { ips: vec![], ..m.clone() }.held_ips(), None);
    // As announced: the namespace's owner, named as its flows are, from
    // the API alone.
    let mut named = m.clone();
    named.owner = Some(owner("Deployment", "web"));
    let w = named.workload("7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b");
    let base = fixtures::named_pod_workload();
    assert_eq!(w, Workload { container_id: None, container_name: None, unit: None, labels: BTreeMap::new(), ..base });
}

#[test]
fn owners_resolve_to_the_top_controller() {
    let deployment = refs(json!([{"apiVersion": "apps/v1", "kind": "Deployment", "name": "web", "uid": "d", "controller": true}]));
    let rs = owner("ReplicaSet", "web-7d9f8b6c5");
    assert_eq!(top_owner(rs.clone(), Some(&deployment)), owner("Deployment", "web"));
    // A ReplicaSet of its own, or one that could not be read: itself.
    assert_eq!(top_owner(rs.clone(), Some(&[])), rs);
    assert_eq!(top_owner(rs.clone(), None), rs);
    let cron = refs(json!([{"apiVersion": "batch/v1", "kind": "CronJob", "name": "nightly", "uid": "c", "controller": true}]));
    assert_eq!(top_owner(owner("Job", "nightly-28000"), Some(&cron)), owner("CronJob", "nightly"));
    // StatefulSets, DaemonSets and a static pod's Node are the top; a bare pod has none.
    for kind in ["StatefulSet", "DaemonSet", "Node"] {
        assert!(!has_parent(&owner(kind, "x")), "{kind}");
    }
    let node = refs(json!([{"apiVersion": "v1", "kind": "Node", "name": "n1", "uid": "n", "controller": true}]));
    assert_eq!(controller(&node), Some(owner("Node", "n1")));
    assert_eq!(controller(&[]), None);
}

#[test]
fn metadata_names_the_pods_workload() {
    let (_, mut m) = PodMeta::of(&pod(), &["app".to_string()]).unwrap();
    m.owner = Some(owner("Deployment", "web"));
    let base = fixtures::pod_workload();
    assert_eq!(m.name(&base), fixtures::named_pod_workload());
    // Another container of the pod, not in its status yet: no container name.
    let other = Workload { container_id: Some("dddd".into()), ..base.clone() };
    assert_eq!(m.name(&other).container_name, None);
    assert_eq!(m.name(&other).name.as_deref(), Some("web-7d9f8b6c5-x2x9z"));
    // Not named: still the pod, with its UID and the reason.
    let u = unnamed(&base);
    assert_eq!((u.kind, u.reason, u.pod_uid.clone()), (WorkloadKind::Pod, Some(WorkloadReason::NoPodMetadata), base.pod_uid.clone()));
    // A pod named before that the API no longer has... is the resolver's
    // business (it keeps the names); the name clears the reason.
    assert_eq!(m.name(&u).reason, None);
}

#[test]
fn the_index_moves_only_on_real_changes() {
    let index = PodIndex::default();
    let (uid, m) = PodMeta::of(&pod(), &[]).unwrap();
    index.insert(uid.clone(), m.clone());
    let (g, first) = (index.generation(), index.get(&uid).unwrap());
    index.insert(uid.clone(), m.clone());
    assert_eq!(index.generation(), g, "an unchanged pod is no change");
    // A list with the same pod keeps its entry (the resolver's names stay).
    index.replace_all([(uid.clone(), m.clone())].into_iter().collect());
    assert!(Arc::ptr_eq(&first, &index.get(&uid).unwrap()));
    let renamed = PodMeta { name: "other".into(), ..m };
    index.insert(uid.clone(), renamed);
    assert!(index.generation() > g);
    assert_eq!(index.get(&uid).unwrap().name, "other");
    index.replace_all(FastMap::default());
    assert_eq!((index.get(&uid), index.len()), (None, 0));
}

/// Whoever asked is told of each change, and only of changes.
#[test]
fn the_index_tells_of_its_changes() {
    let index = PodIndex::default();
    let told = Arc::new(AtomicU64::new(0));
    let t = told.clone();
    index.on_change(Box::new(move || {
        t.fetch_add(1, Ordering::Relaxed);
    }));
    let (uid, m) = PodMeta::of(&pod(), &[]).unwrap();
    index.insert(uid.clone(), m.clone());
    index.insert(uid.clone(), m.clone());
    assert_eq!(told.load(Ordering::Relaxed), 1);
    index.insert(uid.clone(), PodMeta { ips: vec![], ..m.clone() });
    index.remove(&uid);
    index.remove(&uid);
    assert_eq!(told.load(Ordering::Relaxed), 3);
    index.replace_all([(uid.clone(), m)].into_iter().collect());
    assert_eq!((told.load(Ordering::Relaxed), index.all().len()), (4, 1));
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    let c: Config = flowlog_settings::parse_toml(text, Path::new("test.toml"))?;
    c.validate()?;
    Ok(c)
}

fn invalid(text: &str) -> (&'static str, String) {
    match parse(text) {
        Err(ConfigError::Invalid { name, reason }) => (name, reason),
        other => panic!("{text:?} gave {other:?}"),
    }
}

#[test]
fn settings_say_what_is_missing() {
    let c = parse("[workload.kubernetes]\nenabled = true\nnode_name = \"n1\"\napi_url = \"http://127.0.0.1:8001\"\n").unwrap();
    let k = &c.workload.kubernetes;
    assert!(k.enabled);
    assert_eq!(k.labels, default_labels());
    assert!(!KubernetesConfig::default().enabled);
    let (name, reason) = invalid("[workload.kubernetes]\nenabled = true\n");
    assert_eq!(name, "workload.kubernetes.node_name");
    assert!(reason.contains("FLOWLOG_NODE_NAME"), "{reason}");
    assert_eq!(invalid("[workload]\nresolve = false\n[workload.kubernetes]\nenabled = true\nnode_name = \"n\"\n").0, "workload.kubernetes.enabled");
    let many: Vec<String> = (0..=MAX_LABELS).map(|i| format!("\"l{i}\"")).collect();
    let text = format!("[workload.kubernetes]\nenabled = true\nnode_name = \"n\"\nlabels = [{}]\n", many.join(","));
    assert_eq!(invalid(&text).0, "workload.kubernetes.labels");
    assert_eq!(invalid("[workload.kubernetes]\nenabled = true\nnode_name = \"n\"\nlabels = [\"\"]\n").0, "workload.kubernetes.labels");
    for url in ["127.0.0.1:8001", "https://api:6443", "http://"] {
        let text = format!("[workload.kubernetes]\nenabled = true\nnode_name = \"n\"\napi_url = \"{url}\"\n");
        assert_eq!(invalid(&text).0, "workload.kubernetes.api_url", "{url}");
    }
    // Off: nothing is checked.
    parse("[workload.kubernetes]\napi_url = \"nonsense\"\n").unwrap();
}

/// What the workload-IP announcements carry: a pod named as the index has
/// it now, unnamed (with the reason) when it has not; anything else as is.
#[test]
fn announced_pods_are_named_now() {
    let index = PodIndex::default();
    let owner = Arc::new(Workload { container_id: None, unit: None, ..fixtures::pod_workload() });
    let w = name_now(&index, &owner);
    assert_eq!((w.kind, w.reason, w.name.clone()), (WorkloadKind::Pod, Some(WorkloadReason::NoPodMetadata), None));
    let (uid, m) = PodMeta::of(&pod(), &["app".to_string()]).unwrap();
    index.insert(uid, m);
    let w = name_now(&index, &owner);
    assert_eq!((w.reason, w.name.as_deref(), w.namespace.as_deref(), w.container_name.as_deref()), (None, Some("web-7d9f8b6c5-x2x9z"), Some("shop"), None));
    let container = Arc::new(Workload::of(WorkloadKind::Container));
    assert!(Arc::ptr_eq(&name_now(&index, &container), &container));
}
