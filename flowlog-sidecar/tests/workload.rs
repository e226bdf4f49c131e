//! Local workload resolution on the real kernel: cgroup v2 hierarchies
//! named exactly as kubelet (both cgroup drivers), Docker, Podman and
//! systemd name them, real processes placed in them (and in their own
//! network namespace) making real connections, and the sidecar's records
//! naming each one's workload.

mod common;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::{Duration, Instant},
};

use common::{workloads::*, *};
use flowlog_runtime::testkit::{free_port, sample};
use serde_json::{json, Value};

/// Every kind of workload, each in a cgroup named as its manager names it,
/// each one's client connecting to a server that is a systemd service: both
/// records of every connection name their workload exactly.
#[test]
fn records_name_the_workload_of_each_cgroup() {
    let Some(_one_at_a_time) = cgroup_test() else {
        return;
    };
    let t = std::process::id();
    let mut cg = Cgroups::new();
    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let sc = Sidecar::start(&[
        "--metrics-listen",
        &metrics_addr,
        "--stats-interval-secs",
        "1",
    ]);

    // The server: a systemd service, listening once the sidecar is attached
    // (so its server-side records name the listener's cgroup).
    let web = format!("fltest{t}-web");
    let server_cg = format!("system.slice/{web}.service");
    let server_id = cg.make(&server_cg);
    let mut server = Proc::start(None, SERVER, &[]);
    cg.enter(&server_cg, server.pid());
    server.go();
    let sport = server.port();

    let ((u1, u1_), (u2, u2_), (u3, u3_), (u4, _), (u5, _), (_, u6_)) = (
        pod_uid(1),
        pod_uid(2),
        pod_uid(3),
        pod_uid(4),
        pod_uid(5),
        pod_uid(6),
    );
    let c: Vec<String> = (0..12).map(container_id).collect();
    let scope = |prefix: &str, id: &str| format!("{prefix}-{id}.scope");
    let cases: Vec<(String, Value)> = vec![
        // kubelet, systemd driver: containerd, CRI-O, Docker (cri-dockerd); three QoS classes.
        (
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u1_}.slice/{}",
                scope("cri-containerd", &c[0])
            ),
            wl(
                "pod",
                &[
                    ("pod_uid", &u1),
                    ("container_id", &c[0]),
                    ("runtime", "containerd"),
                    ("qos_class", "Burstable"),
                    ("unit", &scope("cri-containerd", &c[0])),
                ],
            ),
        ),
        (
            format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{u2_}.slice/{}",
                scope("crio", &c[1])
            ),
            wl(
                "pod",
                &[
                    ("pod_uid", &u2),
                    ("container_id", &c[1]),
                    ("runtime", "crio"),
                    ("qos_class", "BestEffort"),
                    ("unit", &scope("crio", &c[1])),
                ],
            ),
        ),
        (
            format!(
                "kubepods.slice/kubepods-pod{u3_}.slice/{}",
                scope("docker", &c[2])
            ),
            wl(
                "pod",
                &[
                    ("pod_uid", &u3),
                    ("container_id", &c[2]),
                    ("runtime", "docker"),
                    ("qos_class", "Guaranteed"),
                    ("unit", &scope("docker", &c[2])),
                ],
            ),
        ),
        // kubelet, cgroupfs driver: the bare id (containerd, Docker) and CRI-O's.
        (
            format!("kubepods/burstable/pod{u4}/{}", c[3]),
            wl(
                "pod",
                &[
                    ("pod_uid", &u4),
                    ("container_id", &c[3]),
                    ("qos_class", "Burstable"),
                ],
            ),
        ),
        (
            format!("kubepods/besteffort/pod{u5}/crio-{}", c[4]),
            wl(
                "pod",
                &[
                    ("pod_uid", &u5),
                    ("container_id", &c[4]),
                    ("runtime", "crio"),
                    ("qos_class", "BestEffort"),
                ],
            ),
        ),
        // Containers outside Kubernetes.
        (
            format!("system.slice/{}", scope("docker", &c[5])),
            wl(
                "container",
                &[
                    ("container_id", &c[5]),
                    ("runtime", "docker"),
                    ("unit", &scope("docker", &c[5])),
                ],
            ),
        ),
        (
            format!("docker/{}", c[6]),
            wl(
                "container",
                &[("container_id", &c[6]), ("runtime", "docker")],
            ),
        ),
        (
            format!("machine.slice/{}", scope("libpod", &c[7])),
            wl(
                "container",
                &[
                    ("container_id", &c[7]),
                    ("runtime", "podman"),
                    ("unit", &scope("libpod", &c[7])),
                ],
            ),
        ),
        // A template service in a nested slice.
        (
            format!("system.slice/system-fltest{t}.slice/fltest{t}-getty@tty1.service"),
            wl(
                "service",
                &[
                    ("name", &format!("fltest{t}-getty@tty1")),
                    ("unit", &format!("fltest{t}-getty@tty1.service")),
                ],
            ),
        ),
        // A login session: the host itself.
        (
            format!("user.slice/user-4242.slice/session-fltest{t}.scope"),
            wl("host", &[]),
        ),
    ];
    // Paths that look like a pod's but do not parse: the host, with the reason and the path.
    let bad = [
        (
            format!("kubepods/burstable/podnot-a-uid-{t}/{}", c[8]),
            "unparsable_path",
        ),
        (
            format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{u6_}.slice/{}",
                scope("runsc", &c[9])
            ),
            "unknown_runtime",
        ),
    ];
    let cases: Vec<(String, Value)> = cases
        .into_iter()
        .chain(bad.iter().map(|(path, reason)| {
            (
                path.clone(),
                wl(
                    "host",
                    &[("reason", reason), ("cgroup_path", &format!("/{path}"))],
                ),
            )
        }))
        .collect();

    let mut clients = Vec::new();
    for (path, want) in cases {
        let id = cg.make(&path);
        let mut p = Proc::start(None, CLIENT, &[&sport.to_string()]);
        cg.enter(&path, p.pid());
        p.go();
        let cport = p.port();
        p.wait_success();
        clients.push((path, id, cport, want));
    }
    let all_in = |r: &[Value]| {
        clients.iter().all(|(_, _, cp, _)| {
            !by_ports(r, *cp, sport).is_empty() && !by_ports(r, sport, *cp).is_empty()
        })
    };
    sc.wait_for("both records of every client", WAIT, all_in);

    // A cgroup removed while its connection is open: the record is still
    // reported, as the host's, with the reason. (The python process starts
    // first, so the cgroup lives for a few milliseconds only.)
    let gone = format!("system.slice/{}", scope("docker", &c[10]));
    let mut p = Proc::start(None, CLIENT, &[&sport.to_string(), "hold"]);
    let gone_id = cg.make(&gone);
    cg.enter(&gone, p.pid());
    p.go();
    let gone_port = p.port();
    cg.enter("", p.pid());
    cg.remove(&gone);
    p.go();
    p.wait_success();
    sc.wait_for("the record of the removed cgroup", WAIT, |r| {
        !by_ports(r, gone_port, sport).is_empty()
    });

    // The reasons are counted (published on the stats tick).
    let t0 = Instant::now();
    let unresolved =
        |reason: &str| format!("flowlog_sidecar_workload_unresolved_total{{reason=\"{reason}\"}}");
    loop {
        let body = scrape(&metrics_addr);
        if ["unparsable_path", "unknown_runtime", "cgroup_not_found"]
            .iter()
            .all(|r| sample(&body, &unresolved(r)) >= 1.0)
            && sample(&body, "flowlog_sidecar_workload_flows_total{kind=\"pod\"}") >= 5.0
        {
            break;
        }
        assert!(t0.elapsed() < WAIT, "unresolved flows not counted: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (records, stats) = sc.stop();
    drop(server);

    for (path, id, cport, want) in &clients {
        let client = one(&records, *cport, sport);
        assert_eq!(client["workload"], *want, "client in {path}");
        assert_eq!(client["cgroup_id"], *id, "client in {path}");
        assert_eq!(client["comm"], "python3");
        assert_eq!(client["bytes_sent"], 1000);
        let server = one(&records, sport, *cport);
        assert_eq!(
            server["workload"],
            wl(
                "service",
                &[("name", &web), ("unit", &format!("{web}.service"))]
            ),
            "server of {path}"
        );
        assert_eq!(server["cgroup_id"], server_id);
    }
    let gone_rec = one(&records, gone_port, sport);
    assert_eq!(gone_rec["cgroup_id"], gone_id);
    assert_eq!(
        gone_rec["workload"],
        wl("host", &[("reason", "cgroup_not_found")])
    );
    assert_eq!(gone_rec["bytes_received"], 2000);
    let w = &stats["workload"];
    for (reason, at_least) in [
        ("unparsable_path", 1),
        ("unknown_runtime", 1),
        ("cgroup_not_found", 1),
    ] {
        assert!(
            w["unresolved"][reason].as_u64().unwrap() >= at_least,
            "{reason}: {w:#}"
        );
    }
    assert!(
        w["flows"]["pod"].as_u64().unwrap() >= 5 && w["flows"]["container"].as_u64().unwrap() >= 3,
        "{w:#}"
    );
    assert!(w["cgroup_walks"].as_u64().unwrap() >= 1);
}

/// A pod's process in its own network namespace: opens a connection to
/// itself (before the sidecar starts), then a new one, then closes the old
/// one from its client side first; one step per line on stdin.
const POD: &str = r#"
wait()
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(16)
old = socket.create_connection(l.getsockname())
old_srv, _ = l.accept()
print(l.getsockname()[1], old.getsockname()[1], flush=True)
wait()
new = socket.create_connection(l.getsockname())
new_srv, _ = l.accept()
print(new.getsockname()[1], flush=True)
new.sendall(b"n" * 100)
new.shutdown(socket.SHUT_WR)
drain(new_srv)
new_srv.close()
drain(new)
new.close()
wait()
# This side closes first: the kernel never saw this socket open, and a
# close before the peer's names no owner.
old.close()
drain(old_srv)
old_srv.close()
print("closed", flush=True)
wait()
"#;

/// Connections opened before the sidecar started have no owner when this
/// side closes first (cgroup id 0). In a pod's own network namespace they
/// are the pod's (learned from the pod's other flows); in the host's, they
/// are the host's, with the reason.
#[test]
fn ownerless_flows_are_their_network_namespaces_pod() {
    let Some(_one_at_a_time) = cgroup_test() else {
        return;
    };
    let t = std::process::id();
    let ns = Netns::new(format!("fltest-wl-{t}"));
    let ns_ino = inode(&format!("/var/run/netns/{}", ns.0));
    let (uid, _) = pod_uid(50);
    let cid = container_id(50);
    let pod_cg = format!("kubepods/besteffort/pod{uid}/{cid}");
    let mut cg = Cgroups::new();
    let pod_id = cg.make(&pod_cg);
    let mut pod = Proc::start(Some(&ns), POD, &[]);
    cg.enter(&pod_cg, pod.pid());
    pod.go();
    let ports: Vec<u16> = pod.line().split(' ').map(|p| p.parse().unwrap()).collect();
    let (lport, old_port) = (ports[0], ports[1]);
    // The host's own connection, also opened before the sidecar.
    let host_l = TcpListener::bind("127.0.0.1:0").unwrap();
    let host_c = TcpStream::connect(host_l.local_addr().unwrap()).unwrap();
    let (mut host_s, _) = host_l.accept().unwrap();
    let (host_sport, host_cport) = (
        host_l.local_addr().unwrap().port(),
        host_c.local_addr().unwrap().port(),
    );

    let sc = Sidecar::start(&[]);
    pod.go();
    let new_port = pod.port();
    let in_ns = |r: &[Value], l: u16, rp: u16| {
        r.iter()
            .any(|x| x["netns_ino"] == ns_ino && x["local_port"] == l && x["remote_port"] == rp)
    };
    sc.wait_for("the pod's new connection", WAIT, |r| {
        in_ns(r, new_port, lport)
    });
    pod.go();
    assert_eq!(pod.line(), "closed");
    drop(host_c);
    assert_eq!(host_s.read(&mut [0u8; 8]).unwrap(), 0);
    drop(host_s);
    sc.wait_for("the old connections' records", WAIT, |r| {
        in_ns(r, old_port, lport)
            && in_ns(r, lport, old_port)
            && !by_ports(r, host_cport, host_sport).is_empty()
    });
    pod.go();
    let (records, stats) = sc.stop();
    let mine: Vec<Value> = records
        .iter()
        .filter(|r| r["netns_ino"] == ns_ino)
        .cloned()
        .collect();

    let pod_wl = wl(
        "pod",
        &[
            ("pod_uid", &uid),
            ("container_id", &cid),
            ("qos_class", "BestEffort"),
        ],
    );
    let new = one(&mine, new_port, lport);
    assert_eq!(
        (new["workload"].clone(), new["cgroup_id"].clone()),
        (pod_wl.clone(), json!(pod_id))
    );
    let old = one(&mine, old_port, lport);
    assert_eq!(old["cgroup_id"], 0, "{old:#}");
    // The pod, not a container of it: its containers share the namespace.
    assert_eq!(
        old["workload"],
        wl("pod", &[("pod_uid", &uid), ("qos_class", "BestEffort")])
    );
    // The other end closed second, in process context: its owner is known.
    let old_srv = one(&mine, lport, old_port);
    assert_eq!(
        (old_srv["workload"].clone(), old_srv["cgroup_id"].clone()),
        (pod_wl, json!(pod_id))
    );

    let host = one(&records, host_cport, host_sport);
    assert_eq!(host["cgroup_id"], 0, "{host:#}");
    assert_eq!(host["workload"], wl("host", &[("reason", "no_owner")]));
    assert!(stats["workload"]["by_netns"].as_u64().unwrap() >= 1);
    assert!(
        stats["workload"]["unresolved"]["no_owner"]
            .as_u64()
            .unwrap()
            >= 1
    );
}

/// `--workload-resolve false`: records carry no workload, the stats none.
#[test]
fn resolution_off_leaves_the_workload_empty() {
    let Some(_one_at_a_time) = cgroup_test() else {
        return;
    };
    let (uid, uid_) = pod_uid(60);
    let path = format!("kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{}.scope", container_id(60));
    let mut cg = Cgroups::new();
    cg.make(&path);
    let sc = Sidecar::start(&["--workload-resolve", "false"]);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let sport = l.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).unwrap();
        s.write_all(&vec![0u8; 2 * buf.len()]).unwrap();
    });
    let mut p = Proc::start(None, CLIENT, &[&sport.to_string()]);
    cg.enter(&path, p.pid());
    p.go();
    let cport = p.port();
    p.wait_success();
    server.join().unwrap();
    sc.wait_for("both records", WAIT, |r| {
        !by_ports(r, cport, sport).is_empty() && !by_ports(r, sport, cport).is_empty()
    });
    let (records, stats) = sc.stop();
    let client = one(&records, cport, sport);
    assert_eq!(
        client["cgroup_id"],
        inode(cgroup2_mount().join(&path).to_str().unwrap()),
        "the pod {uid}'s cgroup"
    );
    assert_eq!(client["workload"], Value::Null);
    assert_eq!(one(&records, sport, cport)["workload"], Value::Null);
    assert_eq!(stats["workload"], Value::Null);
}
