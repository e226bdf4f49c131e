//! Every Prometheus metric the enricher exports.

use crate::attribute::Attribution;

pub const RECORDS_IN: &str = "flowlog_enricher_records_in_total";
pub const RECORDS_OUT: &str = "flowlog_enricher_records_out_total";
pub const ATTRIBUTED: &str = "flowlog_enricher_attributed_total";
pub const UNATTRIBUTED: &str = "flowlog_enricher_unattributed_total";
pub const DLQ: &str = "flowlog_enricher_dlq_total";
pub const FILES_ROLLED: &str = "flowlog_enricher_files_rolled_total";
pub const SEQUENCE_GAPS: &str = "flowlog_enricher_sequence_gaps_total";
pub const STATIC_MAP_ENTRIES: &str = "flowlog_enricher_static_map_entries";
pub const SOURCE_AGE: &str = "flowlog_enricher_source_age_seconds";
pub const SOURCE_ERRORS: &str = "flowlog_enricher_source_errors_total";
pub const TRACKED_IPS: &str = "flowlog_enricher_tracked_ips";
pub const LATE_ATTRIBUTED: &str = "flowlog_enricher_late_attributed_total";
pub const CONSUMER_LAG: &str = "flowlog_enricher_consumer_lag_records";
pub const IDENTITY_LAST_SEEN: &str = "flowlog_enricher_identity_last_seen_timestamp_seconds";

pub fn record_attribution(side: &'static str, a: &Attribution) {
    if a.attributed {
        metrics::counter!(ATTRIBUTED, "side" => side, "source" => a.source).increment(1);
    } else {
        metrics::counter!(UNATTRIBUTED, "side" => side, "reason" => a.reason.unwrap_or("UNKNOWN")).increment(1);
    }
}

/// A bounded label for a reject reason.
pub fn reject_kind(reason: &str) -> &'static str {
    if reason.starts_with("unknown schema") || reason.starts_with("not Avro") {
        "schema"
    } else if reason.contains("truncated") || reason.contains("trailing") || reason.contains("varint") {
        "truncated"
    } else if reason.contains("address") {
        "bad_address"
    } else if reason.contains("start") || reason.contains("time") {
        "bad_time"
    } else {
        "invalid"
    }
}

pub fn serve(listen: std::net::SocketAddr) -> anyhow::Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(listen)
        .install()
        .map_err(|e| anyhow::anyhow!("starting the metrics endpoint on {listen}: {e}"))
}
