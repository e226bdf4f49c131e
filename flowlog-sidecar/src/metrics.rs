//! Every Prometheus metric the sidecar exports, in one place.

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};

pub const EVENTS_READ: &str = "flowlog_sidecar_events_read_total";
pub const FLOWS_PRODUCED: &str = "flowlog_sidecar_flows_produced_total";
pub const FLOWS_DELIVERED: &str = "flowlog_sidecar_flows_delivered_total";
pub const FLOWS_FAILED: &str = "flowlog_sidecar_flows_failed_total";
/// Flows lost. Label `reason`: ringbuf_full, decode_error, spool_full,
/// spool_error, spool_corrupt, and the undeliverable ones
/// (transport::kafka::undeliverable): message_too_large, invalid_record,
/// unknown_topic, not_authorized.
pub const FLOWS_DROPPED: &str = "flowlog_sidecar_flows_dropped_total";
/// Flows still reported, but with less in them. Label `reason`:
/// sock_map_full (no start time / opening process: the socket was not tracked).
pub const FLOWS_DEGRADED: &str = "flowlog_sidecar_flows_degraded_total";
/// Label `reason`: broker_down, backlog, queue_full, produce_error,
/// delivery_failed (written in front of the spool), shutdown.
pub const FLOWS_SPOOLED: &str = "flowlog_sidecar_flows_spooled_total";
pub const FLOWS_REPLAYED: &str = "flowlog_sidecar_flows_replayed_total";
pub const INTERIM_RECORDS: &str = "flowlog_sidecar_interim_records_total";
pub const SPOOL_BYTES: &str = "flowlog_sidecar_spool_bytes";
pub const SPOOL_MAX_BYTES: &str = "flowlog_sidecar_spool_max_bytes";
pub const SPOOL_RECORDS: &str = "flowlog_sidecar_spool_records";
pub const KAFKA_QUEUE: &str = "flowlog_sidecar_kafka_queue_messages";
pub const DELIVERY_LATENCY: &str = "flowlog_sidecar_delivery_latency_seconds";
pub const BROKER_UP: &str = "flowlog_sidecar_broker_up";
pub const IDENTITY_SENT: &str = "flowlog_sidecar_identity_records_total";
pub const LISTEN_MAP_FULL: &str = "flowlog_sidecar_listen_map_full_total";
pub const KERNEL_READ_ERRORS: &str = "flowlog_sidecar_kernel_read_errors_total";
pub const FLOWS_PARKED: &str = "flowlog_sidecar_flows_parked_total";
pub const CLOSES_AT_DESTROY: &str = "flowlog_sidecar_closes_at_destroy_total";
pub const STALE_SOCKETS: &str = "flowlog_sidecar_stale_sockets_total";
pub const BPF_RUN_TIME: &str = "flowlog_sidecar_bpf_run_time_seconds_total";
pub const BPF_RUN_COUNT: &str = "flowlog_sidecar_bpf_runs_total";
pub const BPF_RECURSION_MISSES: &str = "flowlog_sidecar_bpf_recursion_misses_total";
/// Label `kind`: host, pod, container, service.
pub const WORKLOAD_FLOWS: &str = "flowlog_sidecar_workload_flows_total";
/// Label `reason`: no_owner, cgroup_not_found, unparsable_path,
/// unknown_runtime, no_cgroup_v2, lookup_failed, no_pod_metadata (kind
/// pod, not named by the Kubernetes API); other is never counted.
pub const WORKLOAD_UNRESOLVED: &str = "flowlog_sidecar_workload_unresolved_total";
pub const WORKLOAD_HELD: &str = "flowlog_sidecar_workload_held_flows";
pub const CGROUP_WALKS: &str = "flowlog_sidecar_cgroup_walks_total";
pub const CGROUP_WALK_ERRORS: &str = "flowlog_sidecar_cgroup_walk_errors_total";
pub const CGROUPS_KNOWN: &str = "flowlog_sidecar_cgroups_known";
/// Flows outside the capture scope (`[scope]`): dropped, never sent.
pub const FLOWS_OUT_OF_SCOPE: &str = "flowlog_sidecar_flows_out_of_scope_total";
pub const WORKLOAD_IP_ROUNDS: &str = "flowlog_sidecar_workload_ip_rounds_total";
pub const WORKLOAD_NAMESPACES: &str = "flowlog_sidecar_workload_namespaces";
pub const WORKLOAD_ADDRESSES: &str = "flowlog_sidecar_workload_addresses";
pub const WORKLOAD_API_PODS: &str = "flowlog_sidecar_workload_pods_from_api";
/// Label `reason`: shared_interface, link_local, conflict, shared_namespace.
pub const WORKLOAD_ADDRESSES_UNCLAIMED: &str = "flowlog_sidecar_workload_addresses_unclaimed";
/// Label `error`: permission, walk, list.
pub const WORKLOAD_IP_ERRORS: &str = "flowlog_sidecar_workload_ip_errors_total";
/// The Kubernetes pod watch (`workload.kubernetes`), updated by its thread.
pub const KUBE_PODS: &str = "flowlog_sidecar_kubernetes_pods";
pub const KUBE_API_UP: &str = "flowlog_sidecar_kubernetes_api_up";
/// Label `type`: apply, delete (watch events), relist_pod (a pod of a
/// list), relist_done (a whole list: at start and after 410 Gone).
pub const KUBE_WATCH_EVENTS: &str = "flowlog_sidecar_kubernetes_watch_events_total";
/// Label `error`: client (no API client: config), list, watch (starting or
/// reading a watch), watch_status (an error status on the watch), expired
/// (410 Gone: history compacted, listing again).
pub const KUBE_WATCH_ERRORS: &str = "flowlog_sidecar_kubernetes_watch_errors_total";
/// Label `result`: ok, not_found, error (the pod keeps its direct owner).
pub const KUBE_OWNER_LOOKUPS: &str = "flowlog_sidecar_kubernetes_owner_lookups_total";
/// Prefix of the process gauges `flowlog_sidecar_process_cpu_seconds_total`
/// and `flowlog_sidecar_process_resident_memory_bytes` (flowlog_runtime::process).
const PREFIX: &str = "flowlog_sidecar";

/// Registers descriptions (shown as HELP) for every metric.
pub fn describe() {
    describe_counter!(EVENTS_READ, "Flow events read from the kernel ring buffer.");
    describe_counter!(FLOWS_PRODUCED, "Flow records handed to the Kafka producer (live and replayed).");
    describe_counter!(FLOWS_DELIVERED, "Flow records acknowledged by the broker.");
    describe_counter!(FLOWS_FAILED, "Flow record deliveries that failed: kept in the spool and sent again, or, if they can never be delivered, dropped (flows_dropped_total by reason).");
    describe_counter!(FLOWS_DROPPED, "Flow records lost, by reason (ringbuf_full: the ring buffer and the parking queue were both full; decode_error, spool_full, spool_error, spool_corrupt; never deliverable: message_too_large, invalid_record, unknown_topic, not_authorized).");
    describe_counter!(FLOWS_DEGRADED, "Flow records reported with fields missing, by reason (sock_map_full: no start time or opening process).");
    describe_counter!(FLOWS_SPOOLED, "Flow records written to the on-disk spool, by reason (broker_down; backlog: behind older spooled records, to keep order; queue_full; produce_error; delivery_failed: in front of the spool; shutdown).");
    describe_counter!(FLOWS_REPLAYED, "Flow records read back from the spool and produced (again after a crash during replay).");
    describe_counter!(INTERIM_RECORDS, "Interim records for long-lived connections.");
    describe_gauge!(SPOOL_BYTES, Unit::Bytes, "Bytes in the on-disk spool.");
    describe_gauge!(SPOOL_MAX_BYTES, Unit::Bytes, "spool.max_bytes: past it the oldest spooled records are dropped.");
    describe_gauge!(SPOOL_RECORDS, "Records in the on-disk spool not yet acknowledged by the broker (the segment being replayed included).");
    describe_gauge!(KAFKA_QUEUE, "Messages in the producer's queue or in flight (every stats_interval_secs).");
    describe_histogram!(DELIVERY_LATENCY, Unit::Seconds, "From handing a record to the producer to the broker's ack (1 record in 8).");
    describe_gauge!(BROKER_UP, "1 when the last delivery or metadata probe succeeded; 0 after all brokers were down or a delivery failed.");
    describe_counter!(IDENTITY_SENT, "Identity heartbeat records queued, by reason (start, heartbeat, ip_change: the IPs or the host name changed, stop).");
    describe_counter!(LISTEN_MAP_FULL, "listen() calls not recorded because the listener map was full.");
    describe_counter!(KERNEL_READ_ERRORS, "Kernel memory reads that failed in the eBPF program.");
    describe_counter!(FLOWS_PARKED, "Final flow events that found the ring buffer full and waited in the kernel's parking queue (max_parked) until the reader popped them: not lost.");
    describe_counter!(CLOSES_AT_DESTROY, "Closes the eBPF program missed because a softirq closed the socket while the program ran on that CPU (also counted in flowlog_sidecar_bpf_recursion_misses_total), reported when the socket was destroyed instead: not lost.");
    describe_counter!(STALE_SOCKETS, "Sockets whose close the kernel ran neither eBPF program for (not the state change, not the destroy), found when a new socket took their address: their flows were lost, and no recursion miss counted them (README, Known limitations). The new socket does not inherit their state. A lower bound: an address not reused is not found. Rarely, a socket that lost one of its own state changes is counted too (its flow is kept, without its start and owner).");
    describe_gauge!(BPF_RUN_TIME, Unit::Seconds, "Time spent in the eBPF program (kernel.bpf_stats_enabled=1 only).");
    describe_counter!(BPF_RUN_COUNT, "eBPF program runs (kernel.bpf_stats_enabled=1 only).");
    describe_counter!(BPF_RECURSION_MISSES, "State changes the kernel did not run the eBPF program for, because it was already running on that CPU (a softirq's change interrupting a run; frequent with RPS/RFS). Most lose nothing: transitions the program skips anyway, and closes reported when the socket is destroyed (flowlog_sidecar_closes_at_destroy_total); a missed open loses the flow's start and owner, a close not reported at destroy loses its flow. Always counted.");
    describe_counter!(WORKLOAD_FLOWS, "Flow records by the kind of local workload that owned them (host, pod, container, service).");
    describe_counter!(WORKLOAD_UNRESOLVED, "Flow records attributed to the host although they may belong to a workload, by reason (no_owner, cgroup_not_found, unparsable_path, unknown_runtime, no_cgroup_v2, lookup_failed), or of a pod the Kubernetes API has not named (no_pod_metadata).");
    describe_gauge!(WORKLOAD_HELD, "Flow records waiting for their cgroup to be looked up.");
    describe_counter!(CGROUP_WALKS, "Walks of the cgroup v2 tree (one per batch of new cgroups, at most 4 a second).");
    describe_counter!(CGROUP_WALK_ERRORS, "Walks of the cgroup v2 tree that could not read it.");
    describe_gauge!(CGROUPS_KNOWN, "Cgroups found by the last walk.");
    describe_counter!(FLOWS_OUT_OF_SCOPE, "Flow records outside the capture scope ([scope]): dropped, never sent.");
    describe_counter!(WORKLOAD_IP_ROUNDS, "Listings of the local workloads' IP addresses (workload.announce_ips).");
    describe_gauge!(WORKLOAD_NAMESPACES, "Network namespaces of local pods and containers found by the last listing (the host's own not counted).");
    describe_gauge!(WORKLOAD_ADDRESSES, "IP addresses announced for local workloads, by the last listing.");
    describe_gauge!(WORKLOAD_API_PODS, "Pods whose IPs the last listing took from the Kubernetes API (workload.kubernetes), without entering their network namespaces.");
    describe_gauge!(WORKLOAD_ADDRESSES_UNCLAIMED, "Addresses found (in workloads' namespaces or the Kubernetes API's pods) but not announced, by reason (shared_interface, link_local, conflict: held by two workloads at once, shared_namespace: in a namespace two workloads share).");
    describe_counter!(WORKLOAD_IP_ERRORS, "Errors listing workloads' addresses, by kind (permission: CAP_SYS_ADMIN/CAP_SYS_PTRACE missing to enter a namespace the Kubernetes API does not cover, walk, list).");
    describe_gauge!(KUBE_PODS, "Pods of this node named by the Kubernetes API (workload.kubernetes).");
    describe_gauge!(KUBE_API_UP, "1 while the pod watch of the Kubernetes API works; 0 after an error, until it recovers.");
    describe_counter!(KUBE_WATCH_EVENTS, "Pod watch events, by type (apply, delete; relist_pod and relist_done for lists).");
    describe_counter!(KUBE_WATCH_ERRORS, "Pod watch errors, by kind (client, list, watch, watch_status, expired); each is retried with backoff.");
    describe_counter!(KUBE_OWNER_LOOKUPS, "Lookups of a pod's ReplicaSet or Job for its top owner, by result (ok, not_found, error).");
    flowlog_runtime::process::describe(PREFIX, "Sidecar");
}

pub fn dropped(reason: &'static str, n: u64) {
    counter!(FLOWS_DROPPED, "reason" => reason).increment(n);
}

pub fn degraded(reason: &'static str, n: u64) {
    counter!(FLOWS_DEGRADED, "reason" => reason).increment(n);
}

pub fn spooled(reason: &'static str, n: u64) {
    counter!(FLOWS_SPOOLED, "reason" => reason).increment(n);
}

/// Publishes the workload resolver's counts (on the stats tick: the
/// capture path itself touches no metric per flow).
pub fn record_workloads(r: &crate::workload::Resolver) {
    use flowlog_schema::{WorkloadKind, WorkloadReason};
    let s = r.stats();
    counter!(FLOWS_OUT_OF_SCOPE).absolute(s.out_of_scope);
    if !r.enabled() {
        return;
    }
    for (kind, n) in WorkloadKind::SYMBOLS.iter().zip(s.flows) {
        counter!(WORKLOAD_FLOWS, "kind" => kind.to_ascii_lowercase()).absolute(n);
    }
    // OTHER is a schema default, never given: no series for it.
    for (reason, n) in WorkloadReason::SYMBOLS.iter().zip(s.unresolved).skip(1) {
        counter!(WORKLOAD_UNRESOLVED, "reason" => reason.to_ascii_lowercase()).absolute(n);
    }
    counter!(CGROUP_WALKS).absolute(s.walks);
    counter!(CGROUP_WALK_ERRORS).absolute(s.walk_errors);
    gauge!(CGROUPS_KNOWN).set(r.cgroups_known() as f64);
    gauge!(WORKLOAD_HELD).set(r.held() as f64);
}

/// Updates process CPU and RSS from /proc/self.
pub fn record_process() {
    flowlog_runtime::process::record(PREFIX);
}

/// Starts the Prometheus endpoint.
pub fn serve(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    const LATENCY_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
    flowlog_runtime::prometheus::serve(listen, &[(DELIVERY_LATENCY, LATENCY_BUCKETS)])?;
    describe();
    Ok(())
}
