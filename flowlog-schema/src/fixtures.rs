//! Sample records for tests and benchmarks, built in one place: change a
//! field of the returned value, then encode it with the record's own codec.

use std::{collections::BTreeMap, sync::Arc};

use crate::{
    enriched::{Attribution, Attrs, EnrichedFlow},
    enums::{Direction, EndReason, Family, IdentityReason, OwnerSource, RecordType, Source, Unattributed, WorkloadKind, WorkloadReason},
    host::Host,
    flow::{Flow, Limits, StatePath},
    host::HostIdentity,
    identity::Identity,
    workload::Workload,
};

/// Host `h1` ("box"), workload `web`, label team=net, IP 10.0.0.1.
pub fn host() -> HostIdentity {
    HostIdentity {
        host_id: "h1".into(),
        hostname: "box".into(),
        instance_id: None,
        workload: Some("web".into()),
        labels: BTreeMap::from([("team".to_string(), "net".to_string())]),
        ips: vec!["10.0.0.1".into()],
    }
}

/// A host with just an id, a workload and IPs.
pub fn host_with(host_id: &str, workload: &str, ips: &[&str]) -> HostIdentity {
    HostIdentity {
        host_id: host_id.into(),
        hostname: host_id.into(),
        workload: Some(workload.into()),
        ips: ips.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A finished IPv4 client connection 10.0.0.1:40000 -> 10.0.0.2:443 from
/// `curl`: 12 345 bytes sent, 1 000 003 received, started at 1 000 ns and
/// ended at 2 000 ns.
pub fn flow() -> Flow {
    let mut state_path = StatePath::default();
    state_path.push(flowlog_common::tcp_state::CLOSE);
    Flow {
        sequence_epoch: 5,
        sequence: 9,
        connection_id: -3,
        record_type: RecordType::Final,
        family: Family::Ipv4,
        direction: Direction::Client,
        local_addr: [10, 0, 0, 1].into(),
        local_port: 40000,
        remote_addr: [10, 0, 0, 2].into(),
        remote_port: 443,
        start_time_ns: Some(1_000),
        end_time_ns: 2_000,
        bytes_sent: 12_345,
        bytes_received: 1_000_003,
        segs_in: 1,
        segs_out: 2,
        retransmits: 0,
        srtt_us: 100,
        rtt_min_us: 50,
        end_reason: EndReason::Normal,
        error: None,
        state_path,
        pid: 7,
        tid: 8,
        comm: "curl".into(),
        owner_source: OwnerSource::Open,
        cgroup_id: 1,
        netns_ino: 2,
        workload: None,
        limits: Some(limits()),
    }
}

/// A connection held back by its receiver for 4 ms of its 8 ms busy, on a
/// kernel that counts RTOs.
pub fn limits() -> Limits {
    Limits {
        busy_us: 8_000,
        rwnd_limited_us: 4_000,
        sndbuf_limited_us: 0,
        delivery_rate_bytes_per_s: 1_250_000,
        bytes_retrans: 1_448,
        reordering: 3,
        reord_seen: 0,
        rto_count: Some(1),
        rto_recoveries: Some(1),
        rto_time_ms: Some(204),
    }
}

/// A Kubernetes pod's container (systemd cgroup driver, containerd), as the
/// sidecar resolves it from the cgroup path.
pub fn pod_workload() -> Workload {
    Workload {
        pod_uid: Some("7f3e1c2a-9b4d-4e5f-8a6b-0c1d2e3f4a5b".into()),
        container_id: Some("4c01db0b339c".repeat(5) + "abcd"),
        runtime: Some("containerd".into()),
        qos_class: Some("Burstable".into()),
        unit: Some(format!("cri-containerd-{}abcd.scope", "4c01db0b339c".repeat(5))),
        ..Workload::of(WorkloadKind::Pod)
    }
}

/// The same pod's container as the Kubernetes API names it (the sidecar's
/// `workload.kubernetes`): pod shop/web-7d9f8b6c5-x2x9z of Deployment web.
pub fn named_pod_workload() -> Workload {
    Workload {
        name: Some("web-7d9f8b6c5-x2x9z".into()),
        namespace: Some("shop".into()),
        container_name: Some("web".into()),
        owner_kind: Some("Deployment".into()),
        owner_name: Some("web".into()),
        labels: BTreeMap::from([("app".to_string(), "web".to_string())]),
        ..pod_workload()
    }
}

/// A whole Flow message.
pub fn flow_message(host: &HostIdentity, flow: &Flow) -> Vec<u8> {
    let mut out = Vec::new();
    flow.to_message(&host.encode(), &mut out);
    out
}

/// An identity heartbeat of `host` at `time_ns`.
pub fn identity(host: &HostIdentity, time_ns: i64, reason: IdentityReason) -> Identity {
    Identity {
        host: host.clone(),
        time_ns,
        reason,
        sequence_epoch: 1,
        next_sequence: 0,
        version: "test".into(),
        workloads: Vec::new(),
    }
}

/// A whole Identity message.
pub fn identity_message(host: &HostIdentity, time_ns: i64, reason: IdentityReason) -> Vec<u8> {
    identity(host, time_ns, reason).to_message()
}

/// `n` enriched records that between them fill every field of
/// enriched_flow.avsc with values and with nulls: three local hosts
/// (workloads `web`, `api` and none), remote sides attributed by the static map (with
/// labels), by a sidecar's pod (held_by), or not at all (IPv6 among them);
/// workload pairs deliberately out of order.
pub fn enriched_flows(n: usize) -> Vec<EnrichedFlow> {
    let hosts: Vec<Arc<Host>> = ["web", "api", "batch"]
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let mut h = host_with(&format!("h{i}"), w, &[&format!("10.0.0.{}", i + 1)]);
            h.labels = BTreeMap::from([("team".to_string(), format!("team-{i}")), ("zone".to_string(), format!("az-{}", i % 2))]);
            if i == 2 {
                h.workload = None;
            }
            Arc::new(Host::new(h))
        })
        .collect();
    let db = Arc::new(Attrs {
        workload: Some("db".into()),
        instance_id: Some("i-0db".into()),
        app: Some("pg".into()),
        service: Some("orders".into()),
        cluster: Some("main".into()),
        env: Some("prod".into()),
        account: Some("123456789012".into()),
        region: Some("eu-west-1".into()),
        zone: Some("az-1".into()),
        eni_id: Some("eni-1".into()),
        vpc_id: Some("vpc-1".into()),
        subnet_id: Some("subnet-1".into()),
        labels: BTreeMap::from([("tier".to_string(), "gold".to_string()), ("zz".to_string(), "é".to_string())]),
        ..Default::default()
    });
    let pod = Arc::new(Workload {
        reason: Some(WorkloadReason::UnknownRuntime),
        cgroup_path: Some("/kubepods/pod1/x".into()),
        ..named_pod_workload()
    });
    let pod_owner = Arc::new(Attrs::of_workload(&hosts[0].identity, pod.clone()));
    (0..n)
        .map(|i| {
            let host = hosts[(i * 7) % hosts.len()].clone();
            let i64_ = i as i64;
            let mut f = Flow {
                sequence: i64_,
                connection_id: -i64_,
                start_time_ns: (i % 5 != 0).then_some(1_000 + i64_),
                end_time_ns: 2_000 + i64_,
                bytes_sent: 100 * i64_,
                bytes_received: 7 * i64_ + 1,
                retransmits: i64_ % 3,
                error: (i % 4 == 1).then(|| "ECONNRESET".to_string()),
                workload: (i % 3 == 0).then(|| pod.clone()),
                local_addr: host.ips[0],
                ..flow()
            };
            let remote = match i % 4 {
                0 => Attribution::of(&db, Source::Static),
                1 => Attribution::none(Unattributed::UnknownIp),
                2 => {
                    f.family = Family::Ipv6;
                    f.local_addr = "2001:db8::1".parse().expect("an IPv6 address");
                    f.remote_addr = "2001:db8::2:0:0:1".parse().expect("an IPv6 address");
                    Attribution::none(Unattributed::NoOwnerAtTime)
                }
                _ => Attribution::of(&pod_owner, Source::Sidecar),
            };
            EnrichedFlow { flow_id: 0x00ab_cdef_0123_4567 ^ i as u64, local: Attribution::of(&host.owner, Source::Sidecar), host, flow: f, remote }
        })
        .collect()
}
