//! Kubernetes Services as a source, through the real client (kube-rs)
//! against the local Kubernetes API fixture (the API's real JSON, watches,
//! 410 Gone, faults), with a real local broker and records read back by
//! fastavro: flows to a ClusterIP are the Service's while it exists; the
//! watch survives a compacted history (re-list) and an API that is down or
//! answers garbage, and no flow is ever lost for it.

mod common;

use std::time::Duration;

use common::*;
use flowlog_runtime::testkit::{free_port, kube_api::KubeApi};
use serde_json::{json, Value as Json};

fn service(name: &str, cluster_ip: &str) -> Json {
    json!({
        "kind": "Service", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": "shop", "labels": {"app": name}},
        "spec": {"type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "ports": [{"port": 80, "protocol": "TCP"}]},
    })
}

/// A flow from client-host to `ip`:80 starting at `start`.
fn flow_to(seq: i64, ip: [u8; 4], start: i64) -> (String, Vec<u8>) {
    let f = flowlog_schema::Flow { remote_port: 80, ..flow_record(seq, ip, start, seq) };
    ("client-host".into(), flow_message(&f))
}

fn enricher_args<'a>(api: &'a str, listen: &'a str) -> [&'a str; 8] {
    ["--kubernetes-services", "true", "--kubernetes-api-url", api, "--metrics-listen", listen, "--late-window-secs", "0"]
}

fn remote(recs: &[Json], seq: i64) -> &Json {
    &recs.iter().find(|r| r["sequence"] == seq).unwrap_or_else(|| panic!("#{seq} missing: {recs:#?}"))["remote"]
}

/// api (10.96.0.10) is deleted through the watch; gone (10.96.0.11) is
/// deleted while the API is down and its history compacted: the watch gets
/// 410 Gone, lists again and releases it. Flows are attributed by time.
#[test]
fn cluster_ips_are_the_services_while_they_exist() {
    let Some(b) = start_broker("services", 1) else { return };
    let api = KubeApi::start().expect("python3 and the Kubernetes API fixture");
    api.apply(&json!([service("api", "10.96.0.10"), service("gone", "10.96.0.11"), service("headless", "None")])).unwrap();
    let out = out_dir("services");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let e = start_enricher(&b.addr, &out, &enricher_args(&api.url(), &listen));
    let services = || metric(port, "flowlog_enricher_kubernetes_services");
    wait_until("both Services", Duration::from_secs(30), || services() == 2.0);
    assert_eq!(metric(port, "flowlog_enricher_kubernetes_api_up"), 1.0);
    let t_both = now_ns();

    api.delete("Service", "shop", "api").unwrap();
    wait_until("api deleted", Duration::from_secs(30), || services() == 1.0);
    let t_deleted = now_ns();

    api.fault("down", 0.0).unwrap();
    wait_until("the API seen down", Duration::from_secs(30), || metric(port, "flowlog_enricher_kubernetes_api_up") == 0.0);
    api.delete("Service", "shop", "gone").unwrap();
    api.compact().unwrap();
    let lists = api.requests("list services");
    api.fault("ok", 0.0).unwrap();
    wait_until("a new list", Duration::from_secs(60), || api.requests("list services") > lists && services() == 0.0);
    assert!(metric(port, r#"flowlog_enricher_kubernetes_watch_errors_total{error="expired"}"#) >= 1.0, "no 410 seen");
    assert_eq!(metric(port, "flowlog_enricher_kubernetes_api_up"), 1.0);
    let t_relisted = now_ns();

    produce(&b.addr, "flowlog.flows", &[
        flow_to(0, [10, 96, 0, 10], t_both),
        flow_to(1, [10, 96, 0, 10], t_deleted),
        flow_to(2, [10, 96, 0, 11], t_deleted),
        flow_to(3, [10, 96, 0, 11], t_relisted),
    ]);
    let recs = wait_files(&out, 4, Duration::from_secs(60));
    stop(e);
    assert_eq!(recs.len(), 4, "{recs:#?}");
    let a = remote(&recs, 0);
    assert_eq!((a["source"].as_str(), a["workload"].as_str(), a["labels"]["app"].as_str()), (Some("KUBERNETES"), Some("api"), Some("api")));
    assert!((a["confidence"].as_f64().unwrap() - 0.9).abs() < 1e-6);
    let held = &a["held_by"];
    assert_eq!((held["kind"].as_str(), held["name"].as_str(), held["namespace"].as_str()), (Some("CLUSTER_IP"), Some("api"), Some("shop")));
    assert_eq!((remote(&recs, 1)["attributed"].as_bool(), remote(&recs, 1)["reason"].as_str()), (Some(false), Some("NO_OWNER_AT_TIME")));
    assert_eq!(remote(&recs, 2)["held_by"]["name"], "gone");
    assert_eq!((remote(&recs, 3)["attributed"].as_bool(), remote(&recs, 3)["reason"].as_str()), (Some(false), Some("NO_OWNER_AT_TIME")));
    let _ = std::fs::remove_dir_all(&out);
}

/// The API answers garbage when the enricher starts: it starts anyway,
/// writes flows (unattributed), counts the errors; once the API is back,
/// the Services are known and later flows attributed.
#[test]
fn an_api_answering_garbage_never_stops_the_enricher() {
    let Some(b) = start_broker("services-garbage", 1) else { return };
    let api = KubeApi::start().expect("python3 and the Kubernetes API fixture");
    api.apply(&service("api", "10.96.0.10")).unwrap();
    api.fault("garbage", 0.0).unwrap();
    let out = out_dir("services-garbage");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let e = start_enricher(&b.addr, &out, &enricher_args(&api.url(), &listen));
    produce(&b.addr, "flowlog.flows", &[flow_to(0, [10, 96, 0, 10], now_ns())]);
    let recs = wait_files(&out, 1, Duration::from_secs(60));
    assert_eq!(recs.len(), 1, "the flow was not written while the API was broken");
    assert_eq!(remote(&recs, 0)["reason"], "UNKNOWN_IP");
    assert!(metric(port, r#"flowlog_enricher_kubernetes_watch_errors_total{error="list"}"#) >= 1.0);
    assert_eq!(metric(port, "flowlog_enricher_kubernetes_api_up"), 0.0);

    api.fault("ok", 0.0).unwrap();
    wait_until("the Service listed", Duration::from_secs(60), || metric(port, "flowlog_enricher_kubernetes_services") == 1.0);
    produce(&b.addr, "flowlog.flows", &[flow_to(1, [10, 96, 0, 10], now_ns())]);
    let recs = wait_files(&out, 2, Duration::from_secs(60));
    stop(e);
    assert_eq!(recs.len(), 2);
    assert_eq!(remote(&recs, 1)["source"], "KUBERNETES");
    assert_eq!(remote(&recs, 1)["held_by"]["name"], "api");
    let _ = std::fs::remove_dir_all(&out);
}
