//! Pods named from the Kubernetes API, on the real kernel: kubelet-style
//! cgroups with real processes in them making real connections, and the
//! real client (kube-rs, in the sidecar) watching a local server that
//! serves the API's real JSON (scripts/kube_api_fixture.py: no API server
//! can be installed here). Root only, like tests/workload.rs.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{workloads::*, *};
use flowlog_runtime::testkit::{free_port, kube_api::KubeApi, sample};
use serde_json::{json, Value};

/// The watcher's backoff after errors grows to 30 s: recovering may take a while.
const RECOVERY: Duration = Duration::from_secs(60);

/// Waits until the sample `series` of the sidecar's metrics satisfies `ok`.
fn wait_metric(addr: &str, series: &str, timeout: Duration, ok: impl Fn(f64) -> bool) {
    let t0 = Instant::now();
    loop {
        let body = scrape(addr);
        if ok(sample(&body, series)) {
            return;
        }
        assert!(t0.elapsed() < timeout, "timed out waiting for {series}:\n{body}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A pod of `node` as the API sends it: its containers (name, runtime id)
/// in its status, owned by `owner` (kind, name) when given.
fn pod(name: &str, uid: &str, node: &str, owner: Option<(&str, &str)>, containers: &[(&str, &str)], labels: Value) -> Value {
    let refs: Vec<Value> = owner
        .iter()
        .map(|(kind, name)| json!({"apiVersion": "apps/v1", "kind": kind, "name": name, "uid": format!("uid-{name}"), "controller": true}))
        .collect();
    let statuses: Vec<Value> = containers
        .iter()
        .map(|(name, id)| json!({"name": name, "containerID": format!("containerd://{id}"), "image": "img", "imageID": "", "ready": true, "restartCount": 0}))
        .collect();
    json!({
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": uid, "labels": labels, "ownerReferences": refs},
        "spec": {"nodeName": node, "containers": containers.iter().map(|(n, _)| json!({"name": n})).collect::<Vec<_>>()},
        "status": {"phase": "Running", "containerStatuses": statuses},
    })
}

/// A controller object (`kind` in `api_version`) owned by `owner`, if any.
fn controller(kind: &str, api_version: &str, name: &str, owner: Option<(&str, &str)>) -> Value {
    let refs: Vec<Value> = owner
        .iter()
        .map(|(k, n)| json!({"apiVersion": api_version, "kind": k, "name": n, "uid": format!("uid-{n}"), "controller": true}))
        .collect();
    json!({"kind": kind, "metadata": {"name": name, "namespace": "shop", "ownerReferences": refs}})
}

/// kubelet's systemd-driver cgroup of a containerd container of pod `uid_`.
fn pod_cgroup(uid_: &str, cid: &str) -> String {
    format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{cid}.scope")
}

/// A pod container's workload as the cgroup path gives it, with the API's
/// `names` (name, namespace, container_name, owner_kind, owner_name) and labels.
fn pod_wl(uid: &str, cid: &str, names: &[(&str, &str)], labels: Value) -> Value {
    let unit = format!("cri-containerd-{cid}.scope");
    let mut fields = vec![("pod_uid", uid), ("container_id", cid), ("runtime", "containerd"), ("qos_class", "Burstable"), ("unit", unit.as_str())];
    fields.extend_from_slice(names);
    let mut w = wl("pod", &fields);
    w["labels"] = labels;
    w
}

/// A client in cgroup `path` connects to the test's server; its port.
fn connect_from(cg: &Cgroups, path: &str, server: u16) -> u16 {
    let mut p = Proc::start(None, CLIENT, &[&server.to_string()]);
    cg.enter(path, p.pid());
    p.go();
    let port = p.port();
    p.wait_success();
    port
}

/// Connects from `path` until the client's record satisfies `ok` (the
/// resolver renames a known pod within a drain of the index changing);
/// returns that record.
fn connect_until(sc: &Sidecar, cg: &Cgroups, path: &str, server: u16, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let port = connect_from(cg, path, server);
        sc.wait_for("the client's record", WAIT, |r| !by_ports(r, port, server).is_empty());
        let rec = sc.records(|r| one(r, port, server));
        if ok(&rec["workload"]) {
            return rec;
        }
        assert!(t0.elapsed() < WAIT, "{what}: {:#}", rec["workload"]);
    }
}

/// What each test starts from: the API fixture, this test's node name, a
/// metrics address, the cgroups it makes, and a server to connect to.
struct Setup {
    api: KubeApi,
    node: String,
    metrics: String,
    cg: Cgroups,
    sport: u16,
    _server: Proc,
}

fn setup() -> Setup {
    let mut server = Proc::start(None, SERVER, &[]);
    server.go();
    Setup {
        api: KubeApi::start().expect("the Kubernetes API fixture"),
        node: format!("node-{}", std::process::id()),
        metrics: format!("127.0.0.1:{}", free_port()),
        cg: Cgroups::new(),
        sport: server.port(),
        _server: server,
    }
}

/// The sidecar watching `api` for the pods of `node`, with metrics.
fn sidecar(api: &KubeApi, node: &str, metrics: &str) -> Sidecar {
    Sidecar::start(&[
        "--workload-kubernetes",
        "true",
        "--node-name",
        node,
        "--workload-kubernetes-api-url",
        &api.url(),
        "--metrics-listen",
        metrics,
        "--stats-interval-secs",
        "1",
    ])
}

/// A Deployment's pod, a CronJob's pod added later and a pod the API names
/// only after its first flow, each named in its records; a compacted
/// history (410 Gone) makes the watcher list again and the names follow.
#[test]
fn pods_are_named_from_the_kubernetes_api() {
    let Some(_one_at_a_time) = cgroup_test() else {
        return;
    };
    let Setup { api, node, metrics, mut cg, sport, _server } = setup();
    let (uid1, uid1_) = pod_uid(100);
    let (c1, c1b) = (container_id(100), container_id(101));
    let labels_v1 = json!({"app": "web", "version": "v1", "tier": "front"});
    api.apply(&json!([
        controller("Deployment", "apps/v1", "web", None),
        controller("ReplicaSet", "apps/v1", "web-5d8f7", Some(("Deployment", "web"))),
        pod("web-5d8f7-abcde", &uid1, &node, Some(("ReplicaSet", "web-5d8f7")), &[("web", &c1)], labels_v1),
        // Another node's pod: not watched.
        pod("elsewhere", &pod_uid(199).0, "other-node", None, &[], json!({})),
    ]))
    .unwrap();
    let path1 = pod_cgroup(&uid1_, &c1);
    cg.make(&path1);

    let sc = sidecar(&api, &node, &metrics);
    wait_metric(&metrics, "flowlog_sidecar_kubernetes_pods", WAIT, |n| n == 1.0);
    wait_metric(&metrics, "flowlog_sidecar_kubernetes_api_up", WAIT, |v| v == 1.0);
    let names1 = [("name", "web-5d8f7-abcde"), ("namespace", "shop"), ("owner_kind", "Deployment"), ("owner_name", "web")];
    let port = connect_from(&cg, &path1, sport);
    sc.wait_for("the Deployment pod's record", WAIT, |r| !by_ports(r, port, sport).is_empty());
    let want = pod_wl(&uid1, &c1, &[&names1[..], &[("container_name", "web")]].concat(), json!({"app": "web", "version": "v1"}));
    assert_eq!(sc.records(|r| one(r, port, sport))["workload"], want, "labels outside the allow-list are left out");
    assert!(api.requests("get replicasets") >= 1, "the ReplicaSet was looked up for its Deployment");

    // History compacted: the watch is cut, comes back with an old
    // resourceVersion, gets 410 Gone and lists again; the pod changed in
    // between (a new label value, a second container).
    let lists = api.requests("list pods");
    api.compact().unwrap();
    api.apply(&pod("web-5d8f7-abcde", &uid1, &node, Some(("ReplicaSet", "web-5d8f7")), &[("web", &c1), ("proxy", &c1b)], json!({"app": "web", "version": "v2"})))
        .unwrap();
    wait_metric(&metrics, "flowlog_sidecar_kubernetes_watch_errors_total{error=\"expired\"}", WAIT, |n| n >= 1.0);
    wait_metric(&metrics, "flowlog_sidecar_kubernetes_watch_events_total{type=\"relist_done\"}", WAIT, |n| n >= 2.0);
    assert!(api.requests("list pods") > lists);
    // The new container's cgroup is learned now: named from the new list.
    let path1b = pod_cgroup(&uid1_, &c1b);
    cg.make(&path1b);
    let port = connect_from(&cg, &path1b, sport);
    sc.wait_for("the second container's record", WAIT, |r| !by_ports(r, port, sport).is_empty());
    let want = pod_wl(&uid1, &c1b, &[&names1[..], &[("container_name", "proxy")]].concat(), json!({"app": "web", "version": "v2"}));
    assert_eq!(sc.records(|r| one(r, port, sport))["workload"], want);

    // A pod added after the sidecar started (a CronJob's, through its Job).
    let (uid2, uid2_) = pod_uid(102);
    let c2 = container_id(102);
    api.apply(&json!([
        controller("CronJob", "batch/v1", "nightly", None),
        controller("Job", "batch/v1", "nightly-29000", Some(("CronJob", "nightly"))),
        pod("nightly-29000-q7", &uid2, &node, Some(("Job", "nightly-29000")), &[("report", &c2)], json!({"app": "report"})),
    ]))
    .unwrap();
    wait_metric(&metrics, "flowlog_sidecar_kubernetes_pods", WAIT, |n| n == 2.0);
    let path2 = pod_cgroup(&uid2_, &c2);
    cg.make(&path2);
    let port = connect_from(&cg, &path2, sport);
    sc.wait_for("the CronJob pod's record", WAIT, |r| !by_ports(r, port, sport).is_empty());
    let names2 = [("name", "nightly-29000-q7"), ("namespace", "shop"), ("container_name", "report"), ("owner_kind", "CronJob"), ("owner_name", "nightly")];
    assert_eq!(sc.records(|r| one(r, port, sport))["workload"], pod_wl(&uid2, &c2, &names2, json!({"app": "report"})));

    // A pod whose flow comes before the API names it: its UID and the
    // reason at once (never held), its names once the API has them.
    let (uid3, uid3_) = pod_uid(103);
    let c3 = container_id(103);
    let path3 = pod_cgroup(&uid3_, &c3);
    cg.make(&path3);
    let port = connect_from(&cg, &path3, sport);
    sc.wait_for("the unnamed pod's record", WAIT, |r| !by_ports(r, port, sport).is_empty());
    let unnamed = pod_wl(&uid3, &c3, &[("reason", "no_pod_metadata")], json!({}));
    assert_eq!(sc.records(|r| one(r, port, sport))["workload"], unnamed);
    // A bare pod (no owner).
    api.apply(&pod("debug", &uid3, &node, None, &[("sh", &c3)], json!({}))).unwrap();
    let named = connect_until(&sc, &cg, &path3, sport, "the pod named after its first flow", |w| w["name"] == "debug");
    let names3 = [("name", "debug"), ("namespace", "shop"), ("container_name", "sh")];
    assert_eq!(named["workload"], pod_wl(&uid3, &c3, &names3, json!({})));

    let (records, stats) = sc.stop();
    let w = &stats["workload"];
    assert_eq!(w["kubernetes_pods"], 3, "{w:#}");
    assert!(w["unresolved"]["no_pod_metadata"].as_u64().unwrap() >= 1, "{w:#}");
    assert!(records.iter().all(|r| !r["workload"].is_null()));
}

/// The API down at start, then answering garbage: every flow is still
/// reported (the pod by its UID, reason NO_POD_METADATA) and counted, the
/// sidecar keeps running; once the API answers (slowly), the pod is named.
#[test]
fn flows_are_reported_while_the_api_is_down_or_garbled() {
    let Some(_one_at_a_time) = cgroup_test() else {
        return;
    };
    let Setup { api, node, metrics, mut cg, sport, _server } = setup();
    let (uid, uid_) = pod_uid(110);
    let cid = container_id(110);
    api.apply(&pod("web-0", &uid, &node, Some(("StatefulSet", "web")), &[("web", &cid)], json!({"app": "web"}))).unwrap();
    api.fault("down", 0.0).unwrap();
    let path = pod_cgroup(&uid_, &cid);
    cg.make(&path);

    let sc = sidecar(&api, &node, &metrics);
    let unnamed = pod_wl(&uid, &cid, &[("reason", "no_pod_metadata")], json!({}));
    let unresolved = "flowlog_sidecar_workload_unresolved_total{reason=\"no_pod_metadata\"}";
    let list_errors = "flowlog_sidecar_kubernetes_watch_errors_total{error=\"list\"}";
    let port = connect_from(&cg, &path, sport);
    sc.wait_for("the record while the API is down", WAIT, |r| !by_ports(r, port, sport).is_empty());
    assert_eq!(sc.records(|r| one(r, port, sport))["workload"], unnamed);
    wait_metric(&metrics, unresolved, WAIT, |n| n >= 1.0);
    wait_metric(&metrics, list_errors, WAIT, |n| n >= 1.0);
    assert_eq!(sample(&scrape(&metrics), "flowlog_sidecar_kubernetes_api_up"), 0.0);
    assert!(api.requests("fault down") >= 1);

    // Garbage instead of JSON: the same, and the watcher keeps trying.
    let errors = sample(&scrape(&metrics), list_errors);
    api.fault("garbage", 0.0).unwrap();
    wait_metric(&metrics, list_errors, RECOVERY, |n| n > errors);
    assert!(api.requests("fault garbage") >= 1);
    let port = connect_from(&cg, &path, sport);
    sc.wait_for("the record while the API answers garbage", WAIT, |r| !by_ports(r, port, sport).is_empty());
    assert_eq!(sc.records(|r| one(r, port, sport))["workload"], unnamed);
    wait_metric(&metrics, unresolved, WAIT, |n| n >= 2.0);

    // The API answers again, if slowly (each answer a second late): the
    // watcher recovers (after its backoff) and the pod is named.
    api.fault("slow", 1.0).unwrap();
    wait_metric(&metrics, "flowlog_sidecar_kubernetes_pods", RECOVERY, |n| n == 1.0);
    let named = connect_until(&sc, &cg, &path, sport, "the pod named once the API is back", |w| w["reason"].is_null());
    let names = [("name", "web-0"), ("namespace", "shop"), ("container_name", "web"), ("owner_kind", "StatefulSet"), ("owner_name", "web")];
    assert_eq!(named["workload"], pod_wl(&uid, &cid, &names, json!({"app": "web"})));
    assert_eq!(api.requests("get statefulsets"), 0, "a StatefulSet is the top owner: no lookup");
    assert!(api.requests("fault slow") >= 2, "the list and the watch were slow");

    let (records, stats) = sc.stop();
    assert!(stats["workload"]["unresolved"]["no_pod_metadata"].as_u64().unwrap() >= 2);
    let mine: Vec<&Value> = records.iter().filter(|r| r["workload"]["pod_uid"] == uid.as_str()).collect();
    assert!(mine.len() >= 3, "every flow of the pod reported: {mine:#?}");
    assert!(mine.iter().all(|r| r["workload"]["kind"] == "pod"));
}

/// A pod with IPs and a phase as the API reports them (`ips` as
/// `status.podIPs` and the first as `status.podIP`), on the node's network
/// when `host_network`.
fn pod_with_ips(name: &str, uid: &str, node: &str, owner: Option<(&str, &str)>, ips: &[&str], phase: &str, host_network: bool) -> Value {
    // The container's id is not announced; its runtime is.
    let mut p = pod(name, uid, node, owner, &[(name, &container_id(0))], json!({"app": name}));
    p["spec"]["hostNetwork"] = json!(host_network);
    p["status"]["phase"] = json!(phase);
    p["status"]["qosClass"] = json!("Burstable");
    p["status"]["podIP"] = json!(ips[0]);
    p["status"]["podIPs"] = json!(ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>());
    p
}

/// A pod as announced (the pod, no container, named as its flows are) with its IPs.
fn announced_pod(uid: &str, name: &str, owner: (&str, &str), ips: &[&str]) -> (Value, Vec<String>) {
    let fields = [
        ("pod_uid", uid),
        ("qos_class", "Burstable"),
        ("runtime", "containerd"),
        ("name", name),
        ("namespace", "shop"),
        ("owner_kind", owner.0),
        ("owner_name", owner.1),
    ];
    let mut w = avro_wl("POD", &fields);
    w["labels"] = json!({"app": name});
    (w, ips.iter().map(|ip| ip.to_string()).collect())
}

/// How long after `since` a heartbeat was made.
fn after(h: &Heartbeat, since: SystemTime) -> Duration {
    let since_ns = since.duration_since(UNIX_EPOCH).unwrap().as_nanos() as i64;
    Duration::from_nanos((h.time_ns - since_ns).max(0) as u64)
}

/// Pods' IPs from the Kubernetes API, by a sidecar without CAP_SYS_ADMIN
/// and CAP_SYS_PTRACE (as the DaemonSet runs it: it cannot enter a
/// namespace): the pods of its node are announced with their podIPs and
/// names, a pod being deleted too; a hostNetwork pod's IP (the node's), an
/// ended pod's, a link-local one and another node's pods' never. A pod
/// added is announced, and a pod deleted released, within about a second
/// of the API saying so, though the sidecar lists on its own only every 10
/// minutes. A plain container's namespace (the API does not cover it) is
/// skipped and counted.
#[test]
fn pod_ips_are_announced_from_the_api_without_cap_sys_admin() {
    let Some(_one_at_a_time) = cgroup_test() else {
        return;
    };
    if !broker::have_broker() {
        return;
    }
    let Setup { api, node, metrics, mut cg, .. } = setup();
    let t = std::process::id();
    let broker = flowlog_runtime::testkit::Broker::start(&broker::spec("podips")).expect("start the broker");
    let host_id = format!("podips-{t}");
    let uid = |seed: u64| pod_uid(seed).0;
    let (web, db, added) = (uid(120), uid(121), uid(122));
    // db is being deleted: it holds its IP until the API drops it. Its
    // status has only podIP, as older API servers report it.
    let mut db_pod = pod_with_ips("db", &db, &node, Some(("StatefulSet", "db")), &["10.215.2.2"], "Running", false);
    db_pod["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    db_pod["status"].as_object_mut().unwrap().remove("podIPs");
    api.apply(&json!([
        controller("ReplicaSet", "apps/v1", "web-6c9f", Some(("Deployment", "web"))),
        pod_with_ips("web", &web, &node, Some(("ReplicaSet", "web-6c9f")), &["10.215.1.2", "fd00:215::2"], "Running", false),
        db_pod,
        // The node's exporter, on the node's network: its IP is the node's.
        pod_with_ips("exporter", &uid(123), &node, Some(("DaemonSet", "exporter")), &["10.215.9.9"], "Running", true),
        pod_with_ips("done", &uid(124), &node, Some(("Job", "done")), &["10.215.4.4"], "Succeeded", false),
        pod_with_ips("odd", &uid(125), &node, None, &["169.254.3.3"], "Running", false),
        pod_with_ips("elsewhere", &uid(126), "other-node", None, &["10.215.5.5"], "Running", false),
    ]))
    .unwrap();
    // A plain container in a network namespace of its own, holding an
    // address: only entering its namespace could tell.
    let ns = pod_network(format!("fltest-podips-{t}"), &format!("flp{}", t % 100_000), "10.215.6.2/24");
    let ctr_cg = format!("system.slice/docker-{}.scope", container_id(127));
    cg.make(&ctr_cg);
    let ctr = Proc::start(Some(&ns), "wait()", &[]);
    cg.enter(&ctr_cg, ctr.pid());

    let spool = std::env::temp_dir().join(format!("flowlog-podips-spool-{t}"));
    let without_namespaces = ["setpriv", "--inh-caps=-sys_admin,-sys_ptrace", "--bounding-set=-sys_admin,-sys_ptrace", "--"];
    let sc = Sidecar::start_under(
        &without_namespaces,
        &[
            "--output", "kafka", "--kafka-brokers", &broker.addr, "--spool-dir", spool.to_str().unwrap(),
            "--host-id", &host_id, "--metrics-listen", &metrics, "--shutdown-timeout-secs", "3",
            "--workload-kubernetes", "true", "--node-name", &node, "--workload-kubernetes-api-url", &api.url(),
            "--workload-ips-interval-secs", "600",
        ],
    );
    let web_w = announced_pod(&web, "web", ("Deployment", "web"), &["10.215.1.2", "fd00:215::2"]);
    let db_w = announced_pod(&db, "db", ("StatefulSet", "db"), &["10.215.2.2"]);
    let added_w = announced_pod(&added, "api", ("StatefulSet", "api"), &["10.215.7.2"]);
    // The first heartbeat that lists exactly `want`.
    let listing = |want: Listed| {
        let want = sorted(want);
        let is = |h: &Heartbeat| sorted(h.workloads.clone()) == want;
        let all = heartbeats(&broker.addr, &host_id, |all| all.iter().any(is));
        all.iter().find(|h| is(h)).cloned().unwrap_or_else(|| panic!("no heartbeat lists {want:#?}: {all:#?}"))
    };
    listing(vec![web_w.clone(), db_w.clone()]);
    let body = scrape(&metrics);
    let gauge = |name: &str| sample(&body, &format!("flowlog_sidecar_workload_{name}"));
    assert_eq!(gauge("pods_from_api"), 3.0, "web, db and the link-local one: {body}");
    assert_eq!(gauge("addresses_unclaimed{reason=\"link_local\"}"), 1.0, "{body}");
    assert_eq!((gauge("namespaces"), gauge("addresses")), (0.0, 3.0), "{body}");
    assert!(gauge("ip_errors_total{error=\"permission\"}") >= 1.0, "the container's namespace is not entered: {body}");

    // A pod added: announced at once (IP_CHANGE), not at the next round.
    let at = SystemTime::now();
    api.apply(&pod_with_ips("api", &added, &node, Some(("StatefulSet", "api")), &["10.215.7.2"], "Running", false)).unwrap();
    let h = listing(vec![web_w.clone(), db_w.clone(), added_w.clone()]);
    eprintln!("announced {:?} after the API added the pod", after(&h, at));
    assert_eq!(h.reason, "IP_CHANGE");
    assert!(after(&h, at) < Duration::from_secs(2), "{:?}", after(&h, at));

    // A pod deleted: released at once.
    let at = SystemTime::now();
    api.delete("Pod", "shop", "web").unwrap();
    let h = listing(vec![db_w.clone(), added_w.clone()]);
    eprintln!("released {:?} after the API deleted the pod", after(&h, at));
    assert_eq!(h.reason, "IP_CHANGE");
    assert!(after(&h, at) < Duration::from_secs(2), "{:?}", after(&h, at));

    sc.stop();
    let _ = std::fs::remove_dir_all(&spool);
    drop(ctr);
    let all = heartbeats(&broker.addr, &host_id, |all| all.iter().any(|h| h.reason == "STOP"));
    let last = all.last().map(|h| (h.reason.as_str(), sorted(h.workloads.clone())));
    assert_eq!(last, Some(("STOP", sorted(vec![db_w.clone(), added_w.clone()]))));
    // Never anything else: only these three pods, only their own IPs.
    let allowed = [web_w, db_w, added_w];
    assert!(all.iter().all(|h| h.workloads.iter().all(|w| allowed.contains(w))), "{all:#?}");
}
