//! Every Prometheus metric the enricher exports.

use std::collections::BTreeMap;

use flowlog_schema::EnrichedFlow;

pub const RECORDS_IN: &str = "flowlog_enricher_records_in_total";
pub const RECORDS_OUT: &str = "flowlog_enricher_records_out_total";
pub const ATTRIBUTED: &str = "flowlog_enricher_attributed_total";
pub const UNATTRIBUTED: &str = "flowlog_enricher_unattributed_total";
pub const DLQ: &str = "flowlog_enricher_dlq_total";
/// Dead letters sent as a reference, without their payload (too large).
pub const DLQ_OMITTED: &str = "flowlog_enricher_dlq_omitted_total";
/// Objects written to the lake, by format; their bytes.
pub const OBJECTS_WRITTEN: &str = "flowlog_enricher_objects_written_total";
pub const BYTES_WRITTEN: &str = "flowlog_enricher_written_bytes_total";
/// Batches whose end an earlier attempt had claimed (a redo or a zombie).
pub const BOUNDARIES_ADOPTED: &str = "flowlog_enricher_batch_boundaries_adopted_total";
/// Batches whose write or commit failed and is tried again, by stage.
pub const ROLL_FAILURES: &str = "flowlog_enricher_roll_failures_total";
/// Batches due but waiting for late metadata.
pub const HELD_BATCHES: &str = "flowlog_enricher_held_batches";
/// Held batches written before their late-metadata wait was over (memory bound).
pub const HOLD_CUT: &str = "flowlog_enricher_hold_cut_total";
/// Batches dropped unwritten because their partition was lost (fenced).
pub const FENCED: &str = "flowlog_enricher_fenced_batches_total";
pub const SEQUENCE_GAPS: &str = "flowlog_enricher_sequence_gaps_total";
pub const SEQUENCE_LATE: &str = "flowlog_enricher_sequence_late_total";
pub const DUPLICATES: &str = "flowlog_enricher_duplicates_total";
pub const SEQUENCE_EVICTED: &str = "flowlog_enricher_sequence_ranges_evicted_total";
pub const STATIC_MAP_ENTRIES: &str = "flowlog_enricher_static_map_entries";
pub const SOURCE_AGE: &str = "flowlog_enricher_source_age_seconds";
pub const SOURCE_ERRORS: &str = "flowlog_enricher_source_errors_total";
pub const TRACKED_IPS: &str = "flowlog_enricher_tracked_ips";
pub const LATE_ATTRIBUTED: &str = "flowlog_enricher_late_attributed_total";
pub const CONSUMER_LAG: &str = "flowlog_enricher_consumer_lag_records";
/// Decoded sidecar host blocks found in the cache (`result` = hit/miss):
/// the hit ratio is hit / (hit + miss).
pub const HOST_CACHE: &str = "flowlog_enricher_host_cache_lookups_total";
/// Prefix of the process gauges `flowlog_enricher_process_cpu_seconds_total`
/// and `flowlog_enricher_process_resident_memory_bytes` (flowlog_runtime::process:
/// same names and meaning as the sidecar's, one dashboard query shape for both).
const PREFIX: &str = "flowlog_enricher";
pub const IDENTITY_LAST_SEEN: &str = "flowlog_enricher_identity_last_seen_timestamp_seconds";
/// Listings of an IP another announcer had claimed since (`source` =
/// sidecar/kubernetes/ec2): shared addresses; see sources::identity.
pub const IP_CONFLICTS: &str = "flowlog_enricher_ip_conflicts_total";
/// The attribution self-check (`result`, `source`): see selfcheck.rs.
pub const SELFCHECK: &str = "flowlog_enricher_selfcheck_total";
pub const SELFCHECK_PENDING: &str = "flowlog_enricher_selfcheck_pending";
/// The Kubernetes Services watch (`[kubernetes] services`).
pub const EC2_INTERFACES: &str = "flowlog_enricher_ec2_interfaces";
pub const KUBE_SERVICES: &str = "flowlog_enricher_kubernetes_services";
pub const KUBE_API_UP: &str = "flowlog_enricher_kubernetes_api_up";
pub const KUBE_WATCH_ERRORS: &str = "flowlog_enricher_kubernetes_watch_errors_total";

/// Counts the conflicts an ownership source's events met.
pub fn count_conflicts(source: &'static str, n: usize) {
    if n > 0 {
        metrics::counter!(IP_CONFLICTS, "source" => source).increment(n as u64);
    }
}

/// Counts the final attribution of a written batch (after held-back records
/// had their second chance), one counter update per label set, not per record.
pub fn record_attributions(records: &[EnrichedFlow]) {
    let mut counts: BTreeMap<(bool, &'static str, &'static str), u64> = BTreeMap::new();
    for r in records {
        for (side, a) in [("local", &r.local), ("remote", &r.remote)] {
            let label = match a.reason {
                None => a.source.symbol(),
                Some(reason) => reason.symbol(),
            };
            *counts.entry((a.attributed(), side, label)).or_default() += 1;
        }
    }
    for ((attributed, side, label), n) in counts {
        if attributed {
            metrics::counter!(ATTRIBUTED, "side" => side, "source" => label).increment(n);
        } else {
            metrics::counter!(UNATTRIBUTED, "side" => side, "reason" => label).increment(n);
        }
    }
}

/// This process's CPU time (user+system, all threads) and resident memory.
pub fn record_process() {
    flowlog_runtime::process::record(PREFIX);
}

pub fn serve(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    flowlog_runtime::prometheus::serve(listen, &[])?;
    describe();
    Ok(())
}

/// HELP text for every metric (shown by the endpoint and in dashboards).
pub fn describe() {
    use metrics::{describe_counter, describe_gauge, Unit};
    describe_counter!(
        RECORDS_IN,
        "Flow records read from the flow topic, each record of a FlowBatch message counted (including records sent to the DLQ; a batch refused whole counts as one)."
    );
    describe_counter!(
        RECORDS_OUT,
        "Enriched records durably written, by sink (lake, topic)."
    );
    describe_counter!(
        ATTRIBUTED,
        "Flow sides attributed in written records, by side (local/remote) and source (SIDECAR/KUBERNETES/EC2/STATIC); counted once per record when it is written (after the late window)."
    );
    describe_counter!(UNATTRIBUTED, "Flow sides written with no owner at the flow's start, by side and reason (UNKNOWN_IP/NO_OWNER_AT_TIME); counted when written, so a side attributed late is not counted here.");
    describe_counter!(DLQ, "Messages delivered to the dead-letter topic (acknowledged by the broker), by reason (schema/truncated/bad_address/bad_time/invalid).");
    describe_counter!(DLQ_OMITTED, "Dead letters larger than the maximum message size, sent as a reference: no payload, their origin (topic/partition/offset), reason and size in headers.");
    describe_counter!(
        OBJECTS_WRITTEN,
        "Objects written to the output (one per batch, hour and format), by format (avro/parquet)."
    );
    describe_counter!(BYTES_WRITTEN, Unit::Bytes, "Bytes of the objects written, by format (avro/parquet).");
    describe_counter!(
        BOUNDARIES_ADOPTED,
        "Batches that ended where an earlier attempt at the same offsets had claimed (a redo after a crash, or an instance that lost its partition)."
    );
    describe_counter!(
        ROLL_FAILURES,
        "Batches whose claim, write or commit failed, by stage (claim/write/commit); the batch is tried again with backoff, its partition paused meanwhile."
    );
    describe_gauge!(
        HELD_BATCHES,
        "Batches due (full or old enough) but held back for late metadata (young flows with an unattributed side), at most late_window_secs longer."
    );
    describe_counter!(
        HOLD_CUT,
        "Batches written before their wait for late metadata was over, because max_held_records records were in memory (their unattributed sides stay so)."
    );
    describe_counter!(
        FENCED,
        "Batches dropped unwritten because their partition was lost (session expired): the partition's new owner writes them."
    );
    describe_counter!(
        SEQUENCE_GAPS,
        "Per-host sequence numbers skipped when a newer record arrived (holes opened); minus sequence_late_total: holes still open."
    );
    describe_counter!(
        SEQUENCE_LATE,
        "Records that arrived after newer ones of their host and filled a hole counted in sequence_gaps_total."
    );
    describe_counter!(
        DUPLICATES,
        "Flow records dropped as already accepted by this instance (same host, sequence_epoch and sequence: sent again by a sidecar)."
    );
    describe_counter!(
        SEQUENCE_EVICTED,
        format!(
            "Ranges of accepted sequence numbers forgotten to bound memory (per host at most {} ranges over its {} newest epochs; at most {} hosts, the least recently seen go first): a repeat of a forgotten record is written again.",
            crate::pipeline::sequences::MAX_RANGES,
            crate::pipeline::sequences::MAX_EPOCHS,
            crate::pipeline::sequences::MAX_HOSTS
        )
    );
    describe_gauge!(
        STATIC_MAP_ENTRIES,
        "Entries in the static CIDR map in force."
    );
    describe_gauge!(
        SOURCE_AGE,
        Unit::Seconds,
        "Seconds since the metadata source was last known current, by source (ec2: last good sweep; static: the map in force last matched its file)."
    );
    describe_counter!(SOURCE_ERRORS, "Failed metadata refreshes, by source (static: the map was rejected, the old one is kept; ec2: a sweep failed; sidecar: the identity topic could not be read yet, retried with backoff).");
    describe_gauge!(
        TRACKED_IPS,
        "IPs with an ownership history from the sidecars' identity heartbeats."
    );
    describe_counter!(
        LATE_ATTRIBUTED,
        "Held-back records fully attributed thanks to metadata that arrived late."
    );
    describe_gauge!(
        CONSUMER_LAG,
        "Records in the flow topic beyond the last offset durably in the output, summed over the partitions this member owns (every 10 s)."
    );
    describe_counter!(
        HOST_CACHE,
        "Lookups of decoded sidecar host blocks, by result (hit/miss); normally over 99 % hits (a miss is a new host or an IP change)."
    );
    flowlog_runtime::process::describe(PREFIX, "Enricher");
    describe_gauge!(
        IDENTITY_LAST_SEEN,
        Unit::Seconds,
        "Time of the newest identity heartbeat applied."
    );
    describe_counter!(
        IP_CONFLICTS,
        "Announcements of an IP that another announcer claimed since (an address held by two at once: the later claim keeps it), by source (sidecar/kubernetes/ec2)."
    );
    describe_counter!(
        SELFCHECK,
        "Self-check of written records whose connection's other end also has a record: one side's remote attribution against the other record's local one, by result (agree/agree_host/disagree/unattributed; one_sided: no other half within the window; evicted: dropped at capacity) and source (the remote side's)."
    );
    describe_gauge!(
        SELFCHECK_PENDING,
        "Records waiting for their connection's other half (self-check)."
    );
    describe_gauge!(
        EC2_INTERFACES,
        "EC2 network interfaces in the last good sweep of the EC2 source."
    );
    describe_gauge!(
        KUBE_SERVICES,
        "Kubernetes Services with a ClusterIP known to the Services watch."
    );
    describe_gauge!(
        KUBE_API_UP,
        "1 while the Services watch of the Kubernetes API works; 0 after an error, until it recovers."
    );
    describe_counter!(
        KUBE_WATCH_ERRORS,
        "Services watch errors, by kind (client, list, watch, watch_status, expired); each is retried with backoff."
    );
}
