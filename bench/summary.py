#!/usr/bin/env python3
"""Writes bench/results/SUMMARY.md: every benchmark's targets beside the measured figures."""
import json, pathlib, sys

results = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
rows = []

def row(bench, what, measured, target, ok):
    rows.append(f"| {bench} | {what} | {measured} | {target} | {'yes' if ok else '**no**'} |")

c = results / "capture.json"
if c.exists():
    d = json.loads(c.read_text())
    t = d["targets"]
    n = f"{len(d['rate_rounds'])} " if "rate_rounds" in d else ""
    spread = f", {n}rounds {d['rate_ratio_min_max'][0]:.3f}-{d['rate_ratio_min_max'][1]:.3f}" if "rate_ratio_min_max" in d else ""
    if "rate_ratio_interval" in d:
        lo, hi = d["rate_ratio_interval"]
        spread += f"; {d['rate_ratio_interval_coverage'] * 100:.1f}% interval of the median {lo:.3f}-{hi:.3f}"
    if "rate_ratio_separate_runs" in d:
        m = d["rate_ratio_separate_runs_min_max"]
        spread += f"; windows of one load; separate runs of it {d['rate_ratio_separate_runs']:.3f} ({m[0]:.3f}-{m[1]:.3f})"
    if "rate_ratio_with_bpf_stats" in d:
        spread += f"; program statistics off, as in production; with kernel.bpf_stats_enabled=1 {d['rate_ratio_with_bpf_stats']:.3f}"
    row("capture", "connection rate with / without sidecar (median of rounds)", f"{d['rate_ratio']:.3f} ({d['rate_with_per_s']:.0f} / {d['rate_without_per_s']:.0f} per s{spread})",
        f">= {t['rate_ratio_min']}", d["rate_ratio"] >= t["rate_ratio_min"])
    kmax = d["targets"]["kernel_ns_per_flow_max"]
    floor = f" (empty program on the same load: {d['floor_ns_per_flow']:.0f} ns)" if "floor_ns_per_flow" in d else ""
    rounds = ""
    if d.get("kernel_ns_per_flow_rounds"):
        r = d["kernel_ns_per_flow_rounds"]
        rounds = f"; median of rounds {d['kernel_ns_per_flow_median']:.0f}, rounds {min(r):.0f}-{max(r):.0f}"
    row("capture", "kernel time per flow (all transitions of one socket)", f"{d['kernel_ns_per_flow']:.0f} ns{floor}{rounds}", f"<= {kmax} ns", d["kernel_ns_per_flow"] <= kmax)
    if "printing_user_ns_per_flow_max" in t:
        umax = t["printing_user_ns_per_flow_max"]
        r = d["printing_user_ns_per_flow_rounds"]
        row("capture", "sidecar user CPU per flow, printing mode (the tcplife-style table into a pipe; every flow printed once)",
            f"{d['printing_user_ns_per_flow']:.0f} ns (rounds {min(r):.0f}-{max(r):.0f}; --output null {d['sidecar_user_ns_per_flow']:.0f} ns; lines missing {d['printing_lines_missing']})",
            f"<= {umax} ns", d["printing_user_ns_per_flow"] <= umax and d["printing_lines_missing"] == 0)
        row("capture", "sidecar user CPU per flow, JSON lines (~1 KB per flow) into a pipe", f"{d['json_user_ns_per_flow']:.0f} ns (lines missing {d['json_lines_missing']})", "-", d["json_lines_missing"] == 0)
        p = d.get("peer")
        ours = f"flowlog printing: rate ratio {d['printing_rate_ratio']:.3f}, {d['printing_cpu_ns_per_connection']:.0f} ns CPU per connection, {d['printing_lines_per_connection']:.2f} lines per connection"
        if p:
            row("capture", "side by side on the same load and rounds (program statistics on for both; CPU = process + its programs)",
                f"{ours}; {p['tool']} ({p['script']}): rate ratio {p['rate_ratio']:.3f} ({p['rate_ratio_min_max'][0]:.3f}-{p['rate_ratio_min_max'][1]:.3f}), {p['cpu_ns_per_connection']:.0f} ns CPU per connection, {p['lines_per_connection']:.2f} lines per connection",
                "-", True)
        else:
            row("capture", "side by side with a peer", f"{ours}; peer skipped (bpftrace not installed)", "-", True)
    else:
        umax = t["sidecar_user_ns_per_flow_max"]
        row("capture", "sidecar user CPU per flow", f"{d['sidecar_user_ns_per_flow']:.0f} ns", f"<= {umax} ns", d["sidecar_user_ns_per_flow"] <= umax)
    if "workload_resolution_cpu_ratio_max" in t:
        row("capture", "sidecar CPU per flow (exact on-CPU time of all its threads, /proc/PID/task/*/schedstat), workload resolution on / off (same run)",
            f"{d['sidecar_cpu_ns_per_flow']:.0f} / {d['sidecar_cpu_ns_per_flow_resolution_off']:.0f} ns ({d['workload_resolution_cpu_ratio']:.3f}, median of rounds {d['workload_resolution_cpu_ratio_median']:.3f}; user CPU in 10 ms ticks {d['workload_resolution_user_cpu_ratio']:.3f})",
            f"<= {t['workload_resolution_cpu_ratio_max']}", d["workload_resolution_cpu_ratio"] <= t["workload_resolution_cpu_ratio_max"])
    elif "workload_resolution_user_cpu_ratio" in d:
        row("capture", "sidecar user CPU per flow, workload resolution on / off (same run)",
            f"{d['sidecar_user_ns_per_flow']:.0f} / {d['sidecar_user_ns_per_flow_resolution_off']:.0f} ns ({d['workload_resolution_user_cpu_ratio']:.3f}; exact on-CPU {d['workload_resolution_cpu_ratio']:.3f}, median of rounds {d['workload_resolution_cpu_ratio_median']:.3f})",
            "<= 1.05", d["workload_resolution_user_cpu_ratio"] <= 1.05)
    row("capture", "sidecar CPU per 1000 connections/s", f"{d['sidecar_cpu_percent_per_1000_conn_per_s']:.3f} %", "-", True)
    row("capture", "ring-buffer / map drops", f"{d['drops']}", "0", d["drops"] == 0)
    row("capture", "sidecar peak RSS", f"{d['sidecar_peak_rss_mb']:.1f} MB", "<= 40 MB", d["sidecar_peak_rss_mb"] <= 40)
for name, output in [("long_lived.json", "JSON"), ("long_lived_kafka.json", "Kafka")]:
    l = results / name
    if not l.exists():
        continue
    d = json.loads(l.read_text())
    b = f"long-lived ({output})"
    row(b, f"{d['long_lived_connections']} long-lived connections + churn: ring/map/decode drops", f"{d['drops']}", "0", d["drops"] == 0)
    if "misses_not_recovered" in d:
        row(b, "program recursion misses not reported at destroy (an upper bound of flows lost; the next row counts them)", f"{d['misses_not_recovered']} (of {d['recursion_misses']} misses)", "-", True)
    if "finals_missing" in d:
        row(b, f"closed sockets whose final record never came (of {2 * d['closed_before_stop']}; counted or not)", f"{d['finals_missing']}", "0", d["finals_missing"] == 0)
    if "stale_sockets" in d:
        row(b, "sockets whose close the kernel ran no program for, found at address reuse (a lower bound of the flows lost unseen)", f"{d['stale_sockets']}", "-", True)
    row(b, "sockets whose interim + final records do not sum to the bytes sent/received", f"{d['mismatched_sockets']}", "0", d["mismatched_sockets"] == 0)
    row(b, "churn of short connections beside them", f"{d['churn']['connections_per_sec']:.0f} per s", "20000 (aim)", d["churn"]["connections_per_sec"] >= 20000)
    if output == "Kafka":
        row(b, "sidecar CPU / peak RSS", f"{d['sidecar_cpu_percent']:.0f} % / {d['sidecar_peak_rss_mb']:.1f} MB", "<= 48 MB", d["sidecar_peak_rss_mb"] <= 48)
    else:
        row(b, "sidecar CPU / peak RSS", f"{d['sidecar_cpu_percent']:.0f} % / {d['sidecar_peak_rss_mb']:.1f} MB", "-", True)
    row(b, f"socket map kernel memory (max_sockets {d['max_sockets']})", f"{d['socket_map_kernel_bytes'] / 1048576:.1f} MB", "-", True)
    if "parked" in d:
        row(b, f"final events parked while the ring was full (not lost) / parking queue kernel memory (max_parked {d['max_parked']})", f"{d['parked']} / {d['parking_queue_kernel_bytes'] / 1048576:.1f} MB", "-", True)
t = results / "transport.json"
if t.exists():
    d = json.loads(t.read_text())
    lost = d.get("rounds_lost_total", d["lost"])
    row("transport", "records lost (read from kernel vs in topic)", f"{lost} (median run: {d['lost']} of {d['flows_read']})", "0", lost == 0)
    umax = d["targets"]["sidecar_user_ns_per_flow_max"]
    runs = d.get("rounds_sidecar_user_ns_per_flow", [d["sidecar_user_ns_per_flow"]])
    row("transport", f"sidecar user CPU per flow incl. encoding and producing (median of {len(runs)} runs)", f"{d['sidecar_user_ns_per_flow']:.0f} ns (runs {min(runs):.0f}-{max(runs):.0f})", f"<= {umax} ns", d["sidecar_user_ns_per_flow"] <= umax)
    row("transport", "sidecar peak RSS (default queue bounds)", f"{d['sidecar_peak_rss_mb']:.1f} MB", "<= 48 MB", d["sidecar_peak_rss_mb"] <= 48)
    row("transport", "close -> readable from broker, p99", f"{d['close_to_readable_ms_p99']:.0f} ms (p50 {d['close_to_readable_ms_p50']:.0f})", "<= 250 ms", d["close_to_readable_ms_p99"] <= 250)
    row("transport", "connection rate during the run", f"{d['connections_per_sec']:.0f} per s", "-", True)
    if "sidecar_idle_cpu_ms_per_s" in d:
        idle = d["sidecar_idle_cpu_ms_per_s"]
        row("transport", "sidecar CPU at rest (connected to the broker, no traffic; all threads)", f"{idle:.2f} ms/s ({idle / 10:.2f}% of one core)", "-", True)
sw = results / "transport_sweep.json"
if sw.exists():
    d = json.loads(sw.read_text())
    cells = ", ".join(f"{v['compression']}/{v['linger_ms']} ms/{v.get('records_per_message', 1)} {v['sidecar_user_ns_per_flow_median']:.0f} ns (p99 {v['close_to_readable_ms_p99_median']:.0f} ms)" for v in d["variants"])
    row("transport", f"producer settings (compression/linger/records per message): user CPU per flow, median of {d['rounds']} rounds", cells, "-", all(v["lost_total"] == 0 for v in d["variants"]))

e = results / "enrich.json"
if e.exists():
    d = json.loads(e.read_text())
    t = d["targets"]
    fmin = t["fast_path_flows_per_sec_one_core_min"]
    row("enrich", "decode -> attribute -> Avro file, one core", f"{d['fast_path_flows_per_sec_one_core']:.0f} flows/s", f">= {fmin}", d["fast_path_flows_per_sec_one_core"] >= fmin)
    if "parquet_path_flows_per_sec_one_core" in d:
        b = d["bytes_per_flow"]
        row("enrich", "decode -> attribute -> Avro+zstd file, one core", f"{d['avro_zstd_path_flows_per_sec_one_core']:.0f} flows/s", "-", True)
        pmin = t["parquet_path_flows_per_sec_one_core_min"]
        row("enrich", "decode -> attribute -> Parquet file, one core", f"{d['parquet_path_flows_per_sec_one_core']:.0f} flows/s", f">= {pmin}", d["parquet_path_flows_per_sec_one_core"] >= pmin)
        row("enrich", "bytes per flow: Avro / Avro+zstd / Parquet", f"{b['avro_null']:.1f} / {b['avro_zstd']:.1f} / {b['parquet']:.1f}", "-", True)
    q = d.get("duckdb_top_talkers")
    if q:
        row("enrich", f"DuckDB top talkers over {q['flows']} flows (Parquet, {q['threads']} threads)", f"{q['seconds_median']:.3f} s", "-", True)
    row("enrich", "ratio to apache-avro's generic Value path (same run)", f"{d['ratio_fast_over_generic']:.2f}x", "-", True)
    row("enrich", "memory per 1 M tracked IPs", f"{d['memory_mb_per_million_tracked_ips']:.0f} MB", "-", True)

out = ["# Benchmark summary", "", "Written by `make bench` from `bench/results/*.json` (one run; machines here are noisy, so compare ratios within a run).", "",
       "| benchmark | figure | measured | target | met |", "|---|---|---|---|---|", *rows, ""]
(results / "SUMMARY.md").write_text("\n".join(out))
print("\n".join(out))
