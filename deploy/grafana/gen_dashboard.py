# Writes flowlog.json, the Grafana dashboard for both components.
# Edit the panels here, then: python3 deploy/grafana/gen_dashboard.py
# (scripts/check-deploy.sh checks the JSON and that every flowlog_* metric exists).
import json, os

HERE = os.path.dirname(os.path.abspath(__file__))
DS = {"type": "prometheus", "uid": "${datasource}"}
panels, y, pid = [], 0, 0
RI = "$__rate_interval"
SC = 'instance=~"$sidecar"'
EN = 'instance=~"$enricher"'


def row(title):
    global y, pid
    pid += 1
    panels.append({"id": pid, "type": "row", "title": title, "collapsed": False,
                   "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
    y += 1


_x = 0


def panel(title, targets, unit="short", desc="", w=8, h=8, kind="timeseries", stack=False, newline=False):
    global y, pid, _x
    if newline or _x + w > 24:
        _x = 0
        y += h
    pid += 1
    p = {"id": pid, "type": kind, "title": title, "description": desc, "datasource": DS,
         "gridPos": {"h": h, "w": w, "x": _x, "y": y},
         "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
         "targets": [{"refId": chr(65 + i), "datasource": DS, "expr": e, "legendFormat": l}
                     for i, (e, l) in enumerate(targets)]}
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"stacking": {"mode": "normal" if stack else "none"}, "fillOpacity": 10}
        p["options"] = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["mean", "max"]},
                        "tooltip": {"mode": "multi"}}
    panels.append(p)
    _x += w


def endrow():
    global y, _x
    y += 8
    _x = 0


row("Sidecar (one per host)")
panel("Flows captured / s", [(f"sum(rate(flowlog_sidecar_events_read_total{{{SC}}}[{RI}]))", "all hosts"),
                             (f"topk(5, sum by (instance) (rate(flowlog_sidecar_events_read_total{{{SC}}}[{RI}])))", "{{instance}}")],
      "ops", "Flow events read from the kernel ring buffer.")
panel("Flows lost / s (by reason)", [(f"sum by (reason) (rate(flowlog_sidecar_flows_dropped_total{{{SC}}}[{RI}]))", "{{reason}}"),
                                     (f"sum(rate(flowlog_sidecar_stale_sockets_total{{{SC}}}[{RI}]))", "unseen by the kernel (stale sockets)")],
      "ops", "ringbuf_full: reader too slow; spool_full: broker down longer than the spool holds; spool_error/spool_corrupt: disk; decode_error; "
      "unseen: sockets whose close the kernel ran no program for, found when their address was reused (a lower bound).", stack=True)
panel("Degraded flows / s", [(f"sum by (reason) (rate(flowlog_sidecar_flows_degraded_total{{{SC}}}[{RI}]))", "{{reason}}"),
                             (f"sum(rate(flowlog_sidecar_listen_map_full_total{{{SC}}}[{RI}]))", "listen() not recorded"),
                             (f"sum(rate(flowlog_sidecar_kernel_read_errors_total{{{SC}}}[{RI}]))", "kernel read errors"),
                             (f"sum(rate(flowlog_sidecar_bpf_recursion_misses_total{{{SC}}}[{RI}])) - sum(rate(flowlog_sidecar_closes_at_destroy_total{{{SC}}}[{RI}]))",
                              "state changes skipped (not closes reported at destroy)")],
      "ops", "Reported, with fields missing (map full) or zeroed (kernel read errors). Skipped state changes (recursion misses less the closes reported at destroy) "
      "are mostly transitions that carry nothing; a skipped open loses the flow's start and owner.")
endrow()
panel("Produced / delivered / failed / s", [(f"sum(rate(flowlog_sidecar_flows_produced_total{{{SC}}}[{RI}]))", "produced"),
                                           (f"sum(rate(flowlog_sidecar_flows_delivered_total{{{SC}}}[{RI}]))", "delivered"),
                                           (f"sum(rate(flowlog_sidecar_flows_failed_total{{{SC}}}[{RI}]))", "failed"),
                                           (f"sum(rate(flowlog_sidecar_flows_replayed_total{{{SC}}}[{RI}]))", "replayed from spool")], "ops")
panel("Spooled / s (by reason)", [(f"sum by (reason) (rate(flowlog_sidecar_flows_spooled_total{{{SC}}}[{RI}]))", "{{reason}}")], "ops",
      "Records written to the on-disk spool: broker_down, backlog, queue_full, produce_error, shutdown.", stack=True)
panel("Spool size", [(f"sum by (instance) (flowlog_sidecar_spool_bytes{{{SC}}}) > 0", "{{instance}}")], "bytes",
      "Hosts with a non-empty spool. Oldest records are dropped at spool.max_bytes.")
endrow()
panel("Delivery latency (produce -> ack)", [
    (f"histogram_quantile(0.5, sum by (le) (rate(flowlog_sidecar_delivery_latency_seconds_bucket{{{SC}}}[{RI}])))", "p50"),
    (f"histogram_quantile(0.99, sum by (le) (rate(flowlog_sidecar_delivery_latency_seconds_bucket{{{SC}}}[{RI}])))", "p99"),
    (f"sum(rate(flowlog_sidecar_delivery_latency_seconds_sum{{{SC}}}[{RI}])) / sum(rate(flowlog_sidecar_delivery_latency_seconds_count{{{SC}}}[{RI}]))", "mean")],
      "s", "Sampled 1 record in 8.")
panel("Brokers unreachable / producer queue", [(f"count(flowlog_sidecar_broker_up{{{SC}}} == 0) or vector(0)", "hosts with broker down"),
                                              (f"max(flowlog_sidecar_kafka_queue_messages{{{SC}}})", "max producer queue (records)")], "short")
panel("Identity heartbeats / interim records", [(f"sum by (reason) (rate(flowlog_sidecar_identity_records_total{{{SC}}}[{RI}]))", "heartbeat {{reason}}"),
                                                (f"sum(rate(flowlog_sidecar_interim_records_total{{{SC}}}[{RI}]))", "interim records")], "ops")
endrow()
panel("eBPF time per program run", [(f"sum by (instance) (rate(flowlog_sidecar_bpf_run_time_seconds_total{{{SC}}}[{RI}])) / sum by (instance) (rate(flowlog_sidecar_bpf_runs_total{{{SC}}}[{RI}]))", "{{instance}}")],
      "s", "Needs sysctl kernel.bpf_stats_enabled=1.")
panel("Sidecar CPU (cores)", [(f"sum by (instance) (rate(flowlog_sidecar_process_cpu_seconds_total{{{SC}}}[{RI}]))", "{{instance}} user+sys"),
                              (f"sum by (instance) (rate(flowlog_sidecar_bpf_run_time_seconds_total{{{SC}}}[{RI}]))", "{{instance}} in eBPF (kernel)")],
      "short", "Bench: 0.12 % of a core per 1000 connections/s.")
panel("Sidecar resident memory", [(f"max by (instance) (flowlog_sidecar_process_resident_memory_bytes{{{SC}}})", "{{instance}}")],
      "bytes", "Bench peak: 28 MB. Limit in the chart / unit: 128 MiB.")
endrow()

row("Enricher (consumer group)")
panel("Records in / out / s", [(f"sum(rate(flowlog_enricher_records_in_total{{{EN}}}[{RI}]))", "in"),
                               (f"sum by (sink) (rate(flowlog_enricher_records_out_total{{{EN}}}[{RI}]))", "out ({{sink}})")], "ops")
panel("Attributed share", [
    (f"sum by (side) (rate(flowlog_enricher_attributed_total{{{EN}}}[{RI}])) / (sum by (side) (rate(flowlog_enricher_attributed_total{{{EN}}}[{RI}])) + sum by (side) (rate(flowlog_enricher_unattributed_total{{{EN}}}[{RI}])))", "{{side}}")],
      "percentunit", "Local side: should be ~100 % (the recording host). Remote: depends on how much traffic leaves known address space.")
panel("Attribution by source / unattributed by reason", [(f"sum by (source) (rate(flowlog_enricher_attributed_total{{{EN}}}[{RI}]))", "{{source}}"),
                                                        (f"sum by (reason) (rate(flowlog_enricher_unattributed_total{{{EN}}}[{RI}]))", "unattributed {{reason}}")],
      "ops", "Counted when the batch is written (after the late window).", stack=True)
endrow()
panel("Consumer lag", [(f"sum(flowlog_enricher_consumer_lag_records{{{EN}}})", "records (group)"),
                       (f"sum by (instance) (flowlog_enricher_consumer_lag_records{{{EN}}})", "{{instance}}")], "short",
      "Records in the flow topic beyond what is durably written. Steady state ~ rate x batch_max_age_secs.")
panel("Lag in seconds of input", [(f"sum(flowlog_enricher_consumer_lag_records{{{EN}}}) / sum(rate(flowlog_enricher_records_in_total{{{EN}}}[{RI}]))", "behind")], "s",
      "FlowlogEnricherFallingBehind fires above 600 s.")
panel("Dead letters / s (by reason)", [(f"sum by (reason) (rate(flowlog_enricher_dlq_total{{{EN}}}[{RI}]))", "{{reason}}")], "ops", stack=True)
endrow()
panel("Metadata source age", [(f"max by (source) (flowlog_enricher_source_age_seconds{{{EN}}})", "{{source}}"),
                              (f"time() - max(flowlog_enricher_identity_last_seen_timestamp_seconds{{{EN}}})", "identity topic (last heartbeat)")], "s",
      "ec2: since the last good DescribeNetworkInterfaces sweep; static: since the map was (re)loaded (large is normal).")
panel("Source errors / late attributions", [(f"sum by (source) (increase(flowlog_enricher_source_errors_total{{{EN}}}[{RI}]))", "{{source}} errors"),
                                            (f"sum(rate(flowlog_enricher_late_attributed_total{{{EN}}}[{RI}]))", "late attributed / s")], "short")
panel("Tracked IPs / static map entries", [(f"max by (instance) (flowlog_enricher_tracked_ips{{{EN}}})", "tracked IPs {{instance}}"),
                                           (f"max(flowlog_enricher_static_map_entries{{{EN}}})", "static map entries")], "short",
      "Memory: ~148 MB per million tracked IPs (bench).")
endrow()
panel("Objects written / s, roll failures / s", [(f"sum by (format) (rate(flowlog_enricher_objects_written_total{{{EN}}}[{RI}]))", "{{format}} objects"),
                                               (f"sum by (stage) (rate(flowlog_enricher_roll_failures_total{{{EN}}}[{RI}]))", "{{stage}} failures")], "ops",
      "Roll failures are retried with backoff (the partition paused meanwhile): the store or the broker is away.")
panel("Sequence gaps (records missing)", [(f"sum(increase(flowlog_enricher_sequence_gaps_total{{{EN}}}[{RI}]))", "gaps")], "short",
      "Per-host sequence numbers skipped between sidecar and enricher.")
panel("Enricher CPU (cores) / memory (GB)", [
    (f"sum by (instance) (rate(flowlog_enricher_process_cpu_seconds_total{{{EN}}}[{RI}]))", "{{instance}} CPU cores"),
    (f"max by (instance) (flowlog_enricher_process_resident_memory_bytes{{{EN}}}) / 1e9", "{{instance}} memory GB")], "short",
      "The enricher's own process metrics (user+system CPU, resident memory).")
endrow()
panel("Attribution self-check / s (by result)", [(f"sum by (result) (rate(flowlog_enricher_selfcheck_total{{{EN}}}[{RI}]))", "{{result}}")], "ops",
      "Connections seen from both ends: one end's remote attribution against the other end's own (a pair counts twice). "
      "disagree should stay near 0; one_sided is normal for peers without a sidecar and Service (ClusterIP) traffic. Per instance.", stack=True)
panel("Kubernetes Services watch", [(f"max(flowlog_enricher_kubernetes_services{{{EN}}})", "Services with a ClusterIP"),
                                    (f"count(flowlog_enricher_kubernetes_api_up{{{EN}}} == 0) or vector(0)", "instances with the API down"),
                                    (f"sum by (error) (increase(flowlog_enricher_kubernetes_watch_errors_total{{{EN}}}[{RI}]))", "errors {{error}}")], "short",
      "[kubernetes] services: Services known, instances whose watch is failing, watch errors (expired = 410 Gone, listed again).")
panel("IP conflicts / s (by source)", [(f"sum by (source) (rate(flowlog_enricher_ip_conflicts_total{{{EN}}}[{RI}]))", "{{source}}")], "ops",
      "Announcements of an IP another announcer claimed since (an address held by two at once; the later claim keeps it).")
endrow()

dash = {
    "title": "flowlog", "uid": "flowlog", "tags": ["flowlog", "ebpf", "kafka"], "timezone": "browser",
    "schemaVersion": 39, "version": 1, "editable": True, "refresh": "30s",
    "time": {"from": "now-6h", "to": "now"},
    "description": "flowlog sidecar (eBPF capture, Kafka transport, spool) and enricher (consumer group, attribution, files).",
    "templating": {"list": [
        {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
         "current": {}, "hide": 0, "refresh": 1, "options": []},
        {"name": "sidecar", "label": "Sidecar", "type": "query", "datasource": DS,
         "query": {"query": "label_values(flowlog_sidecar_events_read_total, instance)", "refId": "sidecar"},
         "definition": "label_values(flowlog_sidecar_events_read_total, instance)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2, "options": []},
        {"name": "enricher", "label": "Enricher", "type": "query", "datasource": DS,
         "query": {"query": "label_values(flowlog_enricher_records_in_total, instance)", "refId": "enricher"},
         "definition": "label_values(flowlog_enricher_records_in_total, instance)",
         "includeAll": True, "multi": True, "allValue": ".*", "current": {"text": "All", "value": "$__all"}, "refresh": 2, "options": []},
    ]},
    "annotations": {"list": []},
    "panels": panels,
}
with open(os.path.join(HERE, "flowlog.json"), "w") as f:
    json.dump(dash, f, indent=2)
    f.write("\n")
