//! Workloads' own IPs (Identity.workloads) against a real local broker,
//! records read back by fastavro: remote and local sides that are pod IPs
//! are attributed to the pod (held_by) by time, an IP reused by another pod
//! never goes to the old one; and the attribution self-check of the two
//! halves of a connection, read from the enricher's metrics.

mod common;

use std::{sync::Arc, time::Duration};

use common::*;
use flowlog_runtime::testkit::free_port;
use flowlog_schema::{fixtures, Direction, Flow, HostIdentity, Identity, IdentityReason, Workload, WorkloadIps};
use serde_json::Value as Json;

fn pod(uid: &str, name: &str) -> Arc<Workload> {
    Arc::new(Workload { pod_uid: Some(uid.into()), name: Some(name.into()), namespace: Some("shop".into()), container_id: None, ..fixtures::pod_workload() })
}

/// A heartbeat of `host` at `t` listing `pods` (each with its IPs).
fn heartbeat(host: &HostIdentity, t: i64, pods: &[(&Arc<Workload>, &str)]) -> (String, Vec<u8>) {
    let workloads = pods.iter().map(|(w, ip)| WorkloadIps { workload: (*w).clone(), ips: vec![ip.to_string()] }).collect();
    let id = Identity { workloads, ..fixtures::identity(host, t, IdentityReason::Heartbeat) };
    (host.host_id.clone(), id.to_message())
}

/// A FINAL record of `host`: `local` -> `remote` (CLIENT) or the other way
/// (SERVER), starting at `start`.
fn record(host: &HostIdentity, seq: i64, local: ([u8; 4], u16), remote: ([u8; 4], u16), server: bool, start: i64) -> (String, Vec<u8>) {
    let f = Flow {
        sequence: seq,
        direction: if server { Direction::Server } else { Direction::Client },
        local_addr: local.0.into(),
        local_port: local.1,
        remote_addr: remote.0.into(),
        remote_port: remote.1,
        start_time_ns: Some(start),
        end_time_ns: start + S,
        ..fixtures::flow()
    };
    (host.host_id.clone(), fixtures::flow_message(host, &f))
}

fn by_seq<'a>(recs: &'a [Json], host: &str, seq: i64) -> &'a Json {
    recs.iter().find(|r| r["host_id"] == host && r["sequence"] == seq).unwrap_or_else(|| panic!("{host} #{seq} missing: {recs:#?}"))
}

/// Pod B (on node-a) holds 10.1.0.5 until T0+200 s, pod C (on node-c) from
/// T0+300 s; node-c's heartbeat is read before node-a's that drops B.
#[test]
fn pod_ips_are_attributed_to_the_pod_that_held_them_then() {
    let Some(b) = start_broker("pods", 1) else { return };
    let out = out_dir("pods");
    let (node_a, node_c, client) = (host("node-a", "node", &["10.0.0.11"]), host("node-c", "node", &["10.0.0.12"]), host("client-host", "frontend", &["10.0.0.1"]));
    let (pod_b, pod_c) = (pod("uid-b", "pod-b"), pod("uid-c", "pod-c"));
    let ip = "10.1.0.5";
    produce(&b.addr, "flowlog.identity", &[
        heartbeat(&node_a, T0 + 100 * S, &[(&pod_b, ip)]),
        heartbeat(&node_c, T0 + 300 * S, &[(&pod_c, ip)]),
        heartbeat(&node_a, T0 + 200 * S, &[]),
    ]);
    let pod_ip = ([10, 1, 0, 5], 8080);
    produce(&b.addr, "flowlog.flows", &[
        record(&client, 0, ([10, 0, 0, 1], 40000), pod_ip, false, T0 + 150 * S),
        record(&client, 1, ([10, 0, 0, 1], 40001), pod_ip, false, T0 + 250 * S),
        record(&client, 2, ([10, 0, 0, 1], 40002), pod_ip, false, T0 + 350 * S),
        // node-a's own record of the first connection: its local side is the pod.
        record(&node_a, 0, pod_ip, ([10, 0, 0, 1], 40000), true, T0 + 150 * S),
    ]);
    let e = start_enricher(&b.addr, &out, &[]);
    let recs = wait_files(&out, 4, Duration::from_secs(60));
    stop(e);
    assert_eq!(recs.len(), 4, "{recs:#?}");
    let remote = |seq| &by_seq(&recs, "client-host", seq)["remote"];
    let b_side = remote(0);
    assert_eq!((b_side["source"].as_str(), b_side["workload"].as_str(), b_side["host_id"].as_str()), (Some("SIDECAR"), Some("pod-b"), Some("node-a")));
    assert_eq!(b_side["team"], "node-team", "the node's attributes apply to its pods");
    let held = &b_side["held_by"];
    assert_eq!((held["kind"].as_str(), held["name"].as_str(), held["namespace"].as_str(), held["pod_uid"].as_str()), (Some("POD"), Some("pod-b"), Some("shop"), Some("uid-b")));
    assert_eq!((remote(1)["attributed"].as_bool(), remote(1)["reason"].as_str()), (Some(false), Some("NO_OWNER_AT_TIME")), "nobody held it between");
    assert_eq!(remote(1)["held_by"], Json::Null);
    assert_eq!((remote(2)["workload"].as_str(), remote(2)["held_by"]["pod_uid"].as_str()), (Some("pod-c"), Some("uid-c")));
    let local = &by_seq(&recs, "node-a", 0)["local"];
    assert_eq!((local["workload"].as_str(), local["held_by"]["pod_uid"].as_str()), (Some("pod-b"), Some("uid-b")));
    // A connection with the host's own IP is the host's, held by no workload.
    assert_eq!(by_seq(&recs, "client-host", 0)["local"]["held_by"], Json::Null);
    let _ = std::fs::remove_dir_all(&out);
}

/// Both ends run a sidecar: the client pod on client-host, the server pod
/// on server-host. A connection whose halves agree counts `agree` twice; one
/// where the client's side of the server is wrong (liar-host announced the
/// server host's 10.1.0.8 as its pod's) counts one `disagree`; a lone half
/// is `one_sided` once its window has passed.
#[test]
fn the_self_check_compares_both_halves_of_a_connection() {
    let Some(b) = start_broker("selfcheck", 1) else { return };
    let out = out_dir("selfcheck");
    let (client, server, liar) = (host("client-host", "node", &["10.0.0.1"]), host("server-host", "node", &["10.0.0.2", "10.1.0.8"]), host("liar-host", "node", &["10.0.0.3"]));
    let (client_pod, server_pod, liar_pod) = (pod("uid-client", "client"), pod("uid-server", "server"), pod("uid-liar", "liar"));
    produce(&b.addr, "flowlog.identity", &[
        heartbeat(&client, T0 + 10 * S, &[(&client_pod, "10.1.0.5")]),
        heartbeat(&server, T0 + 10 * S, &[(&server_pod, "10.1.0.6")]),
        heartbeat(&liar, T0 + 20 * S, &[(&liar_pod, "10.1.0.8")]),
        // server-host still lists 10.1.0.8 as its own: a conflict, counted.
        heartbeat(&server, T0 + 30 * S, &[(&server_pod, "10.1.0.6")]),
    ]);
    let (c, s, s_host) = (([10, 1, 0, 5], 40000), ([10, 1, 0, 6], 443), ([10, 1, 0, 8], 443));
    let t = T0 + 100 * S;
    let c2 = (c.0, 40001);
    produce(&b.addr, "flowlog.flows", &[
        record(&client, 0, c, s, false, t),
        record(&server, 0, s, c, true, t),
        record(&client, 1, c2, s_host, false, t),
        record(&server, 1, s_host, c2, true, t),
        // The server's half never comes.
        record(&client, 2, (c.0, 40002), s, false, t),
    ]);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let e = start_enricher(&b.addr, &out, &["--metrics-listen", &listen, "--late-window-secs", "0"]);
    let sample = |result: &str| format!(r#"flowlog_enricher_selfcheck_total{{result="{result}",source="SIDECAR"}}"#);
    assert_eq!(wait_metric(port, &sample("agree"), 3.0), 3.0);
    assert_eq!(wait_metric(port, &sample("disagree"), 1.0), 1.0);
    // One-sided once its window (3 x (batch age 1 s + late window 0)) has passed.
    assert_eq!(wait_metric(port, &sample("one_sided"), 1.0), 1.0);
    assert_eq!(wait_metric(port, "flowlog_enricher_selfcheck_pending", 0.0), 0.0);
    assert_eq!(metric(port, &sample("agree_host")), 0.0);
    assert_eq!(wait_metric(port, r#"flowlog_enricher_ip_conflicts_total{source="sidecar"}"#, 1.0), 1.0);
    let recs = wait_files(&out, 5, Duration::from_secs(30));
    stop(e);
    assert_eq!(recs.len(), 5);
    // What the check compared, as written: the client took 10.1.0.8 for the liar's pod.
    let (client_1, server_1) = (by_seq(&recs, "client-host", 1), by_seq(&recs, "server-host", 1));
    assert_eq!(client_1["flow_id"], server_1["flow_id"]);
    assert_eq!(client_1["remote"]["held_by"]["pod_uid"], "uid-liar");
    assert_eq!((server_1["local"]["host_id"].as_str(), server_1["local"]["held_by"].clone()), (Some("server-host"), Json::Null));
    let (client_0, server_0) = (by_seq(&recs, "client-host", 0), by_seq(&recs, "server-host", 0));
    assert_eq!(client_0["remote"]["held_by"]["pod_uid"], server_0["local"]["held_by"]["pod_uid"]);
    assert_eq!(server_0["remote"]["held_by"]["pod_uid"], "uid-client");
    let _ = std::fs::remove_dir_all(&out);
}
