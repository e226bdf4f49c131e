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
    // No labels allowed, no UID: nothing, or no pod.
    assert!(PodMeta::of(&pod(), &[]).unwrap().1.labels.is_empty());
    let mut p = pod();
    p.metadata.uid = None;
    assert_eq!(PodMeta::of(&p, &allowed), None);
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
