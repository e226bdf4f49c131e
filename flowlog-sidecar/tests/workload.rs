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

/// A process in `ns` that connects to itself once told, and prints both ports.
const SELF_CONNECT: &str = r#"
wait()
l = socket.socket()
l.bind(("127.0.0.1", 0))
l.listen(1)
c = socket.create_connection(l.getsockname())
s, _ = l.accept()
c.sendall(b"x" * 10)
c.close()
assert drain(s) == 10
s.close()
print(l.getsockname()[1], flush=True)
"#;

/// Two sidecars on one kernel, each scoped to its own "host": one to the
/// cgroup subtree `node1`, the other to `node2` and a network namespace. A
/// client in node1 talks to a server in node2: each sidecar reports its own
/// side only; the namespace's flows go to the second; flows of neither
/// (this test's own) to none. What each drops is counted.
#[test]
fn a_scope_captures_its_own_part_of_the_machine() {
    let Some(_one_at_a_time) = cgroup_test() else {
        return;
    };
    let t = std::process::id();
    let top = format!("fltest{t}-scope");
    // node2 is named node10: a sibling whose name starts like node1's.
    let (node1, node2) = (format!("{top}/node1"), format!("{top}/node10"));
    let mut cg = Cgroups::new();
    // A service inside each node's subtree, as on a real host.
    let (client_cg, server_cg) = (format!("{node1}/system.slice/client.service"), format!("{node2}/system.slice/web.service"));
    cg.make(&client_cg);
    cg.make(&server_cg);
    let ns = Netns::new(format!("fltest-scope-{t}"));
    let ns_path = format!("/run/netns/{}", ns.0);
    let m1 = format!("127.0.0.1:{}", free_port());
    let m2 = format!("127.0.0.1:{}", free_port());
    let one = Sidecar::start(&["--scope-cgroup", &format!("/{node1}"), "--metrics-listen", &m1, "--stats-interval-secs", "1"]);
    let two = Sidecar::start(&["--scope-cgroup", &format!("/{node2}/"), "--scope-netns", &ns_path, "--metrics-listen", &m2]);

    // This test's own connection: no one's.
    let (own_sport, own_cports) = short_connections(1);
    let own_cport = own_cports[0];
    // A connection inside the namespace (from a process in neither subtree).
    let mut in_ns = Proc::start(Some(&ns), SELF_CONNECT, &[]);
    in_ns.go();
    let ns_sport = in_ns.port();
    in_ns.wait_success();
    // node1's client to node2's server.
    let mut server = Proc::start(None, SERVER, &[]);
    cg.enter(&server_cg, server.pid());
    server.go();
    let sport = server.port();
    let mut client = Proc::start(None, CLIENT, &[&sport.to_string()]);
    cg.enter(&client_cg, client.pid());
    client.go();
    let cport = client.port();
    client.wait_success();

    let from_ns = |r: &[Value]| r.iter().filter(|x| x["local_port"] == ns_sport || x["remote_port"] == ns_sport).count();
    one.wait_for("node1's client record", WAIT, |r| !by_ports(r, cport, sport).is_empty());
    two.wait_for("node2's server record and the namespace's two", WAIT, |r| {
        !by_ports(r, sport, cport).is_empty() && from_ns(r) == 2
    });
    // The drops are counted as they happen (published on the stats tick).
    let t0 = Instant::now();
    while sample(&scrape(&m1), "flowlog_sidecar_flows_out_of_scope_total") < 5.0 {
        assert!(t0.elapsed() < WAIT, "node1's sidecar did not count the flows outside its scope");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (r1, s1) = one.stop();
    let (r2, s2) = two.stop();
    drop(server);

    let client_rec = by_ports(&r1, cport, sport);
    assert_eq!(client_rec.len(), 1, "{client_rec:#?}");
    assert_eq!(client_rec[0]["workload"]["unit"], "client.service");
    assert!(by_ports(&r1, sport, cport).is_empty(), "node2's server side is not node1's");
    assert_eq!(from_ns(&r1), 0, "the namespace is not node1's");
    assert_eq!(by_ports(&r2, sport, cport).len(), 1);
    assert!(by_ports(&r2, cport, sport).is_empty(), "node1's client side is not node2's");
    assert_eq!(from_ns(&r2), 2);
    for r in [&r1, &r2] {
        assert!(by_ports(r, own_cport, own_sport).is_empty() && by_ports(r, own_sport, own_cport).is_empty());
    }
    // Every record of each is in its scope.
    let node_of = |rec: &Value| rec["workload"]["unit"].as_str().map(str::to_owned);
    assert!(r1.iter().all(|x| node_of(x).as_deref() == Some("client.service")), "{r1:#?}");
    assert!(r2.iter().all(|x| node_of(x).as_deref() == Some("web.service") || x["netns_ino"] == inode(&ns_path)), "{r2:#?}");
    // node1 dropped at least: the server side, the namespace's two, this test's two.
    assert!(s1["out_of_scope"].as_u64().unwrap() >= 5, "{s1:#}");
    assert!(s2["out_of_scope"].as_u64().unwrap() >= 3, "{s2:#}");
}

/// Adds a bridge `ifname` (no ports), up, holding `addr`, in `ns`.
fn bridge(ns: &Netns, ifname: &str, addr: &str) {
    ip(&["-n", &ns.0, "link", "add", ifname, "type", "bridge"]);
    ip(&["-n", &ns.0, "addr", "add", addr, "dev", ifname]);
    ip(&["-n", &ns.0, "link", "set", ifname, "up"]);
}

/// Waits until the sidecar's metrics at `addr` satisfy `pred`.
fn wait_metrics(addr: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let t0 = Instant::now();
    loop {
        let body = scrape(addr);
        if pred(&body) {
            return body;
        }
        assert!(t0.elapsed() < WAIT, "timed out waiting for {what}: {body}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Two pods (both cgroup drivers' naming) and a Docker container, each in
/// a network namespace of its own, are announced with their IPs; the
/// link-local and shared-interface (`cni0`, `docker0`) addresses in their
/// namespaces are not, nor an address two namespaces hold at once, nor
/// anything of a hostNetwork pod or of a pod outside the capture scope. A
/// deleted pod is no longer announced.
#[test]
fn the_workloads_ips_are_announced() {
    let Some(_one_at_a_time) = cgroup_test() else {
        return;
    };
    if !broker::have_broker() {
        return;
    }
    let t = std::process::id();
    let broker = flowlog_runtime::testkit::Broker::start(&broker::spec("wlips")).expect("start the broker");
    let host_id = format!("wlips-{t}");
    let top = format!("fltest{t}-ips");
    let mut cg = Cgroups::new();
    let ((uid1, _), (uid2, uid2_), (uid4, _), (uid5, _)) = (pod_uid(70), pod_uid(71), pod_uid(73), pod_uid(74));
    let c: Vec<String> = (70..75).map(container_id).collect();
    let host_if = |i: u32| format!("flv{}{i}", t % 100_000);

    // Pod 1 (cgroupfs naming): its IP, a link-local one, and two bridges'
    // addresses that every host has.
    let pod1_cg = format!("{top}/kubepods/besteffort/pod{uid1}/{}", c[0]);
    let ns1 = pod_network(format!("fltest-ips1-{t}"), &host_if(1), "10.213.1.2/24");
    ip(&["-n", &ns1.0, "addr", "add", "169.254.7.1/16", "dev", "eth0"]);
    bridge(&ns1, "cni0", "10.22.0.1/24");
    bridge(&ns1, "docker0", "172.17.0.1/16");
    // Pod 2 (systemd naming), and a Docker container: both also hold 10.213.99.9.
    let pod2_cg = format!(
        "{top}/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid2_}.slice/cri-containerd-{}.scope",
        c[1]
    );
    let ns2 = pod_network(format!("fltest-ips2-{t}"), &host_if(2), "10.213.2.2/24");
    ip(&["-n", &ns2.0, "addr", "add", "10.213.99.9/32", "dev", "eth0"]);
    let ctr_cg = format!("{top}/system.slice/docker-{}.scope", c[2]);
    let ns3 = pod_network(format!("fltest-ips3-{t}"), &host_if(3), "10.213.3.2/24");
    ip(&["-n", &ns3.0, "addr", "add", "10.213.99.9/32", "dev", "eth0"]);
    // A hostNetwork pod (the host's namespace), and a pod outside the scope.
    let pod4_cg = format!("{top}/kubepods/besteffort/pod{uid4}/{}", c[3]);
    let pod5_cg = format!("fltest{t}-other/kubepods/besteffort/pod{uid5}/{}", c[4]);
    let ns5 = pod_network(format!("fltest-ips5-{t}"), &host_if(5), "10.213.5.2/24");
    let mut procs = Vec::new();
    for (path, ns) in [(&pod1_cg, Some(&ns1)), (&pod2_cg, Some(&ns2)), (&ctr_cg, Some(&ns3)), (&pod4_cg, None), (&pod5_cg, Some(&ns5))] {
        cg.make(path);
        let p = Proc::start(ns, "wait()", &[]);
        cg.enter(path, p.pid());
        procs.push(p);
    }

    let metrics_addr = format!("127.0.0.1:{}", free_port());
    let spool = std::env::temp_dir().join(format!("flowlog-wlips-spool-{t}"));
    let sc = Sidecar::start(&[
        "--output", "kafka", "--kafka-brokers", &broker.addr, "--spool-dir", spool.to_str().unwrap(),
        "--host-id", &host_id, "--metrics-listen", &metrics_addr, "--shutdown-timeout-secs", "3",
        "--scope-cgroup", &format!("/{top}"), "--workload-ips-interval-secs", "1",
    ]);
    let gauge = |body: &str, name: &str| sample(body, &format!("flowlog_sidecar_workload_{name}"));
    let unclaimed = |body: &str, reason: &str| gauge(body, &format!("addresses_unclaimed{{reason=\"{reason}\"}}"));
    let body = wait_metrics(&metrics_addr, "the three namespaces' addresses", |b| {
        gauge(b, "namespaces") == 3.0 && gauge(b, "addresses") == 3.0 && unclaimed(b, "conflict") == 1.0
    });
    assert_eq!(unclaimed(&body, "shared_interface"), 2.0, "{body}");
    assert!(unclaimed(&body, "link_local") >= 1.0, "{body}");
    assert_eq!(unclaimed(&body, "shared_namespace"), 0.0, "{body}");

    // Pod 1 is deleted: its process, its cgroup, its namespace.
    drop(procs.remove(0));
    cg.remove_when_empty(&pod1_cg);
    drop(ns1);
    let body = wait_metrics(&metrics_addr, "pod 1 to be gone", |b| gauge(b, "namespaces") == 2.0);
    assert_eq!(gauge(&body, "addresses"), 2.0, "{body}");
    assert_eq!(sample(&body, "flowlog_sidecar_workload_ip_errors_total{error=\"permission\"}"), 0.0);
    sc.stop();
    let _ = std::fs::remove_dir_all(&spool);
    drop(procs);

    // What the identity heartbeats said, in order.
    let heartbeats: Vec<(String, Listed)> = heartbeats(&broker.addr, &host_id, |h| h.iter().any(|h| h.reason == "STOP"))
        .into_iter()
        .map(|h| (h.reason, h.workloads))
        .collect();
    let pod = |uid: &str, qos: &str, runtime: Option<&str>| {
        let mut fields = vec![("pod_uid", uid), ("qos_class", qos)];
        fields.extend(runtime.map(|r| ("runtime", r)));
        avro_wl("POD", &fields)
    };
    let pod1 = (pod(&uid1, "BestEffort", None), vec!["10.213.1.2".to_string()]);
    let pod2 = (pod(&uid2, "Burstable", Some("containerd")), vec!["10.213.2.2".to_string()]);
    let unit = format!("docker-{}.scope", c[2]);
    let ctr = (
        avro_wl("CONTAINER", &[("container_id", &c[2]), ("runtime", "docker"), ("unit", &unit)]),
        vec!["10.213.3.2".to_string()],
    );
    let all3 = sorted(vec![pod1.clone(), pod2.clone(), ctr.clone()]);
    let two = sorted(vec![pod2, ctr]);
    let lists: Vec<&Listed> = heartbeats.iter().map(|(_, l)| l).collect();
    // Announced at once when found (in START if the first listing was
    // done by then, else in an IP_CHANGE), then at once without pod 1
    // (IP_CHANGE), until the STOP; each listing only ever one of these
    // (never pod 5's, never a shared or link-local address, never 10.213.99.9).
    let first = heartbeats.iter().position(|(_, l)| !l.is_empty()).expect("a heartbeat with workloads");
    assert!(["START", "IP_CHANGE"].contains(&heartbeats[first].0.as_str()), "{heartbeats:#?}");
    let all_at = lists.iter().position(|l| sorted((*l).clone()) == all3).expect("a heartbeat with all three");
    let without = all_at + lists[all_at..].iter().position(|l| sorted((*l).clone()) == two).expect("a heartbeat without pod 1");
    assert_eq!(heartbeats[without].0, "IP_CHANGE", "{heartbeats:#?}");
    assert_eq!(heartbeats.last().map(|(r, l)| (r.as_str(), sorted(l.clone()))), Some(("STOP", two.clone())));
    assert!(lists[first..].iter().all(|l| l.iter().all(|w| all3.contains(w))), "{heartbeats:#?}");
    assert!(heartbeats[without..].iter().all(|(_, l)| !l.contains(&pod1)), "pod 1 never comes back");
}
