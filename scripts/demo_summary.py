#!/usr/bin/env python3
"""Summary of `make demo`, read back from the enricher's Avro object container
files with fastavro (an Avro reader this project did not write), or from its
Parquet files with DuckDB (--format parquet; a folder or an s3:// prefix).

    demo_summary.py ENRICHED_DIR [--format avro|parquet] [--compare DIR]
                    [--traffic DIR] [--svg FILE] [--metrics FILE]
                    [--check --stray IP --cluster-ip IP --service NS/NAME
                     --reused IP=OLD_POD,NEW_POD@T_NS]

The summary is computed from rows, whichever reader gave them. --compare DIR
reads the same records in the other format from DIR and checks that both
give the same summary, number for number (records, connections, every
workload pair's counters and RTT percentiles, attribution counts, sequence
ranges), and that DuckDB's own top-talkers query (docs/queries) over the
Parquet files agrees with the pairs computed from the Avro rows; exits 1
when they differ.

A connection between two hosts (or namespaces) that a sidecar watches is seen
from both ends: a client-side and a server-side record with the same flow_id.
Connections are counted once: the client-side record gives the pair's
direction, bytes and RTT; retransmits add up both ends (each end counts the
segments it re-sent). Counters are deltas across a connection's INTERIM and
FINAL records, so they are summed per connection first. Exits 1 when the files
hold no flows.

Workloads are named as the records name them: a pod its sidecar announced by
its controller (Deployment frontend; a StatefulSet's pods by their own names),
a Service's ClusterIP as svc:NAMESPACE/NAME, a host by its workload name, and
the local end of a systemd service as HOST/UNIT.

--metrics reads the enricher's last Prometheus scrape for the attribution
self-check. --check turns the summary into assertions (make test runs the demo
so): every side named except the stray address's, no self-check disagreement,
flows to the ClusterIP named after the Service, the reused IP attributed to the
old pod before T_NS and to the new one after, no sequence gaps, and the
traffic generator's connection counts matched by the flow log. Exits 1 when a
check fails.
"""
import argparse
import collections
import html
import json
import math
import pathlib
import sys

from fastavro import reader

SCHEMA = pathlib.Path(__file__).resolve().parent.parent / "schemas" / "enriched_flow.avsc"
FIELDS = [f["name"] for f in json.loads(SCHEMA.read_text())["fields"]]


def human(n):
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, math.ceil(q / 100 * len(v)) - 1))]


def ms(us):
    return "-" if us is None else (f"{us / 1000:.2f}" if us < 10_000 else f"{us / 1000:.1f}")


def held_name(hb):
    """The name of the workload that held an IP (Attribution.held_by)."""
    if hb["kind"] == "CLUSTER_IP":
        return f"svc:{hb['namespace']}/{hb['name']}"
    if hb["kind"] == "POD" and hb.get("owner_kind") != "StatefulSet":
        return hb.get("owner_name") or hb["name"] or hb["pod_uid"]
    return hb["name"] or hb["container_id"] or hb["pod_uid"]


def name(side, ip, local_workload=None):
    if not side["attributed"]:
        return f"? {ip}"
    if side.get("held_by"):
        return held_name(side["held_by"])
    host = side["workload"] or side["app"] or side["host_id"] or ip
    # The local end of a systemd service on a host: the host and the unit.
    if local_workload and local_workload["kind"] == "SERVICE" and local_workload["name"]:
        return f"{host}/{local_workload['name']}"
    return host


def selfcheck(path):
    """flowlog_enricher_selfcheck_total by result (summed over sources)."""
    out = collections.Counter()
    for line in pathlib.Path(path).read_text().splitlines():
        if line.startswith("flowlog_enricher_selfcheck_total{"):
            labels, value = line.rsplit(" ", 1)
            result = labels.split('result="', 1)[1].split('"', 1)[0]
            out[result] += int(float(value))
    return out


def load(root, fmt="avro"):
    """(files, records): the records as dicts of the Avro schema's fields,
    whichever format they were read from."""
    if fmt == "parquet":
        import lake_query  # DuckDB, only needed here
        with lake_query.Lake(root) as lake:
            return lake.files(), lake.rows(FIELDS)
    recs = []
    files = sorted(pathlib.Path(root).rglob("*.avro"))  # not _claims/ (no extension)
    for p in files:
        with open(p, "rb") as f:
            recs.extend(reader(f))
    return files, recs


def connections(recs):
    """One entry per (sidecar, connection): counters summed over its records."""
    conns = {}
    for r in sorted(recs, key=lambda r: (r["host_id"], r["sequence_epoch"], r["sequence"])):
        k = (r["host_id"], r["connection_id"])
        c = conns.get(k)
        if c is None:
            c = conns[k] = dict(r, records=0, bytes_sent=0, bytes_received=0, retransmits=0)
        c["records"] += 1
        for f in ("bytes_sent", "bytes_received", "retransmits"):
            c[f] += r[f]
        # The last record has the final RTT and end reason.
        for f in ("srtt_us", "rtt_min_us", "end_reason", "error", "end_time_ns", "record_type"):
            c[f] = r[f]
    return list(conns.values())


def pair_stats(conns):
    """(by_flow, pairs): the connection ends joined on flow_id, and per
    (client, server) workload pair its connections counted once."""
    # Join the two ends of a connection on flow_id. Two connections can
    # share one (the same 5-tuple within its 10 s bucket: a refused connect
    # frees its port, and the next connect to that server may take it again):
    # a host's n-th end of a direction, by start time, joins the other
    # host's (or the other direction's) n-th.
    by_flow = collections.defaultdict(list)
    nth = collections.Counter()
    for c in sorted(conns, key=lambda c: (c["start_time_ns"] or 0, c["host_id"], c["connection_id"])):
        k = (c["flow_id"], c["direction"], c["host_id"])
        by_flow[(c["flow_id"], nth[k])].append(c)
        nth[k] += 1
    pairs = collections.defaultdict(lambda: dict(conns=0, failed=0, c2s=0, s2c=0, retx=0, rtt=[], both=0, ports=set()))
    for flow_id, ends in by_flow.items():
        order = {"CLIENT": 0, "SERVER": 1, "UNKNOWN": 2}
        ends.sort(key=lambda c: order.get(c["direction"], 3))
        c = ends[0]
        if c["direction"] == "SERVER":  # only the server end was watched
            src, dst = name(c["remote"], c["remote_ip"]), name(c["local"], c["local_ip"], c["local_workload"])
            c2s, s2c, port = c["bytes_received"], c["bytes_sent"], c["local_port"]
        else:  # CLIENT, or UNKNOWN (opened before the sidecar started): local -> remote
            src, dst = name(c["local"], c["local_ip"], c["local_workload"]), name(c["remote"], c["remote_ip"])
            c2s, s2c, port = c["bytes_sent"], c["bytes_received"], c["remote_port"]
        p = pairs[(src, dst)]
        p["conns"] += 1
        p["both"] += len(ends) > 1
        p["ports"].add(port)
        if c["end_reason"] == "FAILED_CONNECT":
            p["failed"] += 1
            continue
        p["c2s"] += c2s
        p["s2c"] += s2c
        p["retx"] += sum(e["retransmits"] for e in ends)
        rtt = c["srtt_us"] or next((e["srtt_us"] for e in ends if e["srtt_us"]), 0)
        if rtt:
            p["rtt"].append(rtt)
    return by_flow, pairs


def facts(recs):
    """Every number the summary prints, exact (no rounding), as plain data:
    two readers of the same records must give equal facts."""
    conns = connections(recs)
    by_flow, pairs = pair_stats(conns)
    seqs = collections.defaultdict(list)
    for r in recs:
        seqs[f"{r['host_id']} epoch {r['sequence_epoch']}"].append(r["sequence"])
    return {
        "records": len(recs),
        "final": sum(r["record_type"] == "FINAL" for r in recs),
        "sidecars": sorted({r["host_id"] for r in recs}),
        "connection ends": len(conns),
        "connections": len(by_flow),
        "seen from both ends": sum(len(e) > 1 for e in by_flow.values()),
        "pairs": {f"{src} -> {dst}": dict(p, ports=sorted(p["ports"]), rtt=sorted(p["rtt"]),
                                          p50=pct(p["rtt"], 50), p99=pct(p["rtt"], 99))
                  for (src, dst), p in pairs.items()},
        "attribution": {side: {
            "unattributed": sum(not r[side]["attributed"] for r in recs),
            "unattributed bytes": sum(r["bytes_sent"] + r["bytes_received"] for r in recs if not r[side]["attributed"]),
            "by source": dict(collections.Counter(r[side]["source"] for r in recs)),
            "reasons": dict(collections.Counter(r[side]["reason"] for r in recs if not r[side]["attributed"])),
        } for side in ("local", "remote")},
        "sequences": {k: [min(v), max(v), len(set(v))] for k, v in seqs.items()},
    }


def diff(a, b, path=""):
    """Where two facts differ, as 'path: a != b' lines."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            if k not in a or k not in b:
                out.append(f"{path}{k}: only in {'the first' if k in a else 'the second'}")
            else:
                out.extend(diff(a[k], b[k], f"{path}{k}."))
        return out
    return [] if a == b else [f"{path.rstrip('.')}: {a!r} != {b!r}"]


def compare(root, fmt, recs, other_root, other_fmt):
    """The differences between the summary of recs (read from root as fmt)
    and that of the same records read from other_root as other_fmt; plus,
    with DuckDB's top-talkers query over the Parquet side, where it differs
    from the pairs computed from the Avro rows."""
    other_recs = load(other_root, other_fmt)[1]
    mine, theirs = facts(recs), facts(other_recs)
    out = diff(mine, theirs, f"{fmt} vs {other_fmt}: ")
    avro = mine if fmt == "avro" else theirs
    import lake_query
    with lake_query.Lake(root if fmt == "parquet" else other_root) as lake:
        cols, rows = lake.run("top_talkers")
    sql = {}
    for row in rows:
        r = dict(zip(cols, row))
        ms = lambda v: None if v is None else round(v * 1000)  # the query's ms back to us
        sql[f"{r['client']} -> {r['server']}"] = dict(
            conns=r["connections"], failed=r["failed"], c2s=r["bytes_c2s"], s2c=r["bytes_s2c"], retx=r["retransmits"],
            ports=list(r["ports"]), p50=ms(r["p50_rtt_ms"]), p99=ms(r["p99_rtt_ms"]))
    python = {k: {f: p[f] for f in ("conns", "failed", "c2s", "s2c", "retx", "ports", "p50", "p99")}
              for k, p in avro["pairs"].items()}
    out.extend(diff(python, sql, "top_talkers.sql vs the Avro summary: "))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("enriched", help="the enricher's output: a folder (Avro or Parquet), or s3://BUCKET/PREFIX (Parquet)")
    ap.add_argument("--format", choices=("avro", "parquet"), default="avro",
                    help="avro: read with fastavro; parquet: read with DuckDB")
    ap.add_argument("--compare", metavar="DIR",
                    help="the same records in the other format: check that both summaries agree exactly")
    ap.add_argument("--traffic", help="folder of the traffic generator's JSON summaries")
    ap.add_argument("--svg", help="write the workload graph here")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--metrics", help="the enricher's last Prometheus scrape (for the self-check)")
    ap.add_argument("--check", action="store_true", help="assert what the demo promises (see above)")
    ap.add_argument("--stray", help="the one address no sidecar announces")
    ap.add_argument("--cluster-ip")
    ap.add_argument("--service", help="NAMESPACE/NAME of the Service at --cluster-ip")
    ap.add_argument("--reused", help="IP=OLD_POD,NEW_POD@T_NS: the IP went from OLD_POD to NEW_POD at T_NS")
    a = ap.parse_args()
    failures = []

    def check(ok, what):
        if a.check and not ok:
            failures.append(what)

    files, recs = load(a.enriched, a.format)
    if not recs:
        print(f"no enriched flows in {a.enriched} ({len(files)} files)", file=sys.stderr)
        return 1
    conns = connections(recs)

    by_flow, pairs = pair_stats(conns)

    finals = sum(r["record_type"] == "FINAL" for r in recs)
    hosts = {r["host_id"] for r in recs}
    reader_name = "DuckDB over Parquet" if a.format == "parquet" else "fastavro over Avro"
    print(f"[{reader_name}] {len(recs)} enriched records in {len(files)} files ({finals} FINAL, {len(recs) - finals} INTERIM) "
          f"from {len(hosts)} sidecar(s) = {len(conns)} connection ends = {len(by_flow)} connections "
          f"({sum(len(e) > 1 for e in by_flow.values())} seen from both ends, counted once)")

    print(f"\nTop talkers by workload pair (client -> server; '? IP' = unattributed), by bytes:")
    hdr = f"{'client -> server':<34} {'port':>11} {'conns':>6} {'failed':>6} {'bytes c->s':>11} {'bytes s->c':>11} {'retx':>5} {'p50 RTT':>8} {'p99 RTT':>8}"
    print(hdr)
    print("-" * len(hdr))
    ranked = sorted(pairs.items(), key=lambda kv: (-(kv[1]["c2s"] + kv[1]["s2c"]), -kv[1]["conns"]))
    for (src, dst), p in ranked[: a.top]:
        ports = ",".join(str(x) for x in sorted(p["ports"])[:2]) + ("…" if len(p["ports"]) > 2 else "")
        print(f"{src + ' -> ' + dst:<34} {ports:>11} {p['conns']:>6} {p['failed']:>6} {human(p['c2s']):>11} {human(p['s2c']):>11} "
              f"{p['retx']:>5} {ms(pct(p['rtt'], 50)):>8} {ms(pct(p['rtt'], 99)):>8}")
    if len(ranked) > a.top:
        rest = ranked[a.top:]
        print(f"... and {len(rest)} more pairs ({sum(p['conns'] for _, p in rest)} connections, "
              f"{human(sum(p['c2s'] + p['s2c'] for _, p in rest))})")
    print("(RTT: the client socket's smoothed RTT at close, ms; retx: segments re-sent by either end)")

    total = dict(conns=sum(p["conns"] for p in pairs.values()), failed=sum(p["failed"] for p in pairs.values()),
                 bytes=sum(p["c2s"] + p["s2c"] for p in pairs.values()), retx=sum(p["retx"] for p in pairs.values()))
    un_c = sum(p["conns"] for k, p in pairs.items() if any(n.startswith("?") for n in k))
    un_b = sum(p["c2s"] + p["s2c"] for k, p in pairs.items() if any(n.startswith("?") for n in k))
    print(f"\nTotal: {total['conns']} connections, {total['failed']} failed connects, {human(total['bytes'])}, "
          f"{total['retx']} retransmitted segments")
    print(f"Unattributed share: {un_c}/{total['conns']} connections ({100 * un_c / max(1, total['conns']):.1f}%), "
          f"{100 * un_b / max(1, total['bytes']):.1f}% of bytes have a side no source knows")

    print("\nAttribution (per record side):")
    for side in ("local", "remote"):
        n = len(recs)
        un = [r for r in recs if not r[side]["attributed"]]
        by_bytes = sum(r["bytes_sent"] + r["bytes_received"] for r in recs) or 1
        un_bytes = sum(r["bytes_sent"] + r["bytes_received"] for r in un)
        src = collections.Counter(r[side]["source"] for r in recs)
        reasons = collections.Counter(r[side]["reason"] for r in un)
        ips = collections.Counter(r[side + "_ip"] for r in un)
        print(f"  {side:<6}: unattributed {len(un)}/{n} records ({100 * len(un) / n:.1f}%), {100 * un_bytes / by_bytes:.1f}% of bytes; "
              "by source: " + ", ".join(f"{k} {v}" for k, v in src.most_common())
              + (f"; unattributed: " + ", ".join(f"{k} {v}" for k, v in reasons.most_common())
                 + f" (e.g. {', '.join(ip for ip, _ in ips.most_common(3))})" if un else ""))

    # Every record of a sidecar is numbered 0, 1, 2, ... per epoch: holes are lost records.
    seqs = collections.defaultdict(set)
    for r in recs:
        seqs[(r["host_id"], r["sequence_epoch"])].add(r["sequence"])
    for (h, e), s in sorted(seqs.items()):
        gaps = max(s) - min(s) + 1 - len(s)
        check(gaps == 0, f"sidecar {h} epoch {e}: {gaps} records missing")
        print(f"\nSequence check: sidecar {h[:12]}… epoch {e}: records {min(s)}..{max(s)}, {gaps} missing"
              + ("" if min(s) == 0 else f" (starts at {min(s)})"))

    if a.traffic:
        gen = []
        for f in sorted(pathlib.Path(a.traffic).glob("*.json")):
            try:
                gen.append(json.loads(f.read_text().strip().splitlines()[-1]))
            except (ValueError, IndexError):
                pass
        if gen:
            print("\nTraffic generator vs. flow log (connections attempted by the generator / seen in the files):")
            # Generators aimed at the same address (a pod's IP given to the
            # next pod) are compared together.
            groups = collections.defaultdict(list)
            for g in gen:
                groups[(g.get("source"), g["target"])].append(g)
            for (source, target), gs in groups.items():
                ip, port = target.rsplit(":", 1)
                label = " + ".join(g["name"] for g in gs)
                want = sum(g["connections"] + g["failed_connects"] for g in gs)
                if source == a.stray:
                    print(f"  {label:<28} generator {want:>5}  (no sidecar at {a.stray}: seen only by the servers)")
                    continue
                seen = sum(1 for ends in by_flow.values() for c in ends[:1]
                           if c["direction"] == "CLIENT" and c["remote_ip"] == ip and c["remote_port"] == int(port)
                           and (source is None or c["local_ip"] == source))
                check(seen == want, f"{label}: the generator made {want} connections, the flow log has {seen}")
                print(f"  {label:<28} generator {want:>5}  flow log {seen:>5}  {'ok' if seen == want else 'MISMATCH'}")

    if a.compare:
        other = "avro" if a.format == "parquet" else "parquet"
        differences = compare(a.enriched, a.format, recs, a.compare, other)
        check(not differences, "the Avro and Parquet summaries differ")
        if differences:
            print(f"\nAvro and Parquet summaries DIFFER ({len(differences)}):")
            # Per comparison (the two readers' facts; DuckDB's query vs the Avro pairs), the first few.
            by_what = collections.defaultdict(list)
            for d in differences:
                what, detail = d.split(": ", 1)
                by_what[what].append(detail)
            for what, details in by_what.items():
                print(f"  {what}: {len(details)} differences")
                for d in details[:10]:
                    print("    " + d)
        else:
            f = facts(recs)
            print(f"\nAvro (fastavro) and Parquet (DuckDB) summaries agree exactly: {f['records']} records, "
                  f"{f['connections']} connections, {len(f['pairs'])} workload pairs, every counter and percentile; "
                  "DuckDB's top-talkers query agrees with the pairs.")
        if differences and not a.check:
            return 1

    if a.metrics:
        sc = selfcheck(a.metrics)
        check(sc["disagree"] == 0 and sc["agree"] > 0, f"self-check: {dict(sc)}")
        # Each end of a pair is checked (its remote side against the other's
        # own): a connection seen from both ends counts twice.
        for k in ("agree", "agree_host", "disagree"):
            sc[k] = (sc[k] + 1) // 2
        both = sc["agree"] + sc["agree_host"] + sc["disagree"]
        print(f"\nAttribution self-check (one end's remote attribution vs. the other end's own, joined by flow_id): "
              f"{both} connections seen from both ends: {sc['agree']} agree on the workload, {sc['agree_host']} agree on the host "
              f"(the server is a host's service), {sc['disagree']} disagree"
              f" = {100 * (sc['agree'] + sc['agree_host']) / max(1, both):.1f}% agreement; "
              f"{sc['one_sided']} one-sided (the other end runs no sidecar, or sees another 5-tuple: a Service's ClusterIP)"
              + (f", {sc['unattributed']} with the remote side unattributed" if sc["unattributed"] else ""))

    if a.check:
        for r in recs:
            for side in ("local", "remote"):
                ip = r[side + "_ip"]
                check(r[side]["attributed"] or ip == a.stray,
                      f"{r['host_id']} #{r['sequence']}: {side} {ip} unattributed ({r[side]['reason']})")
        svc = [r for r in recs if r["remote_ip"] == a.cluster_ip]
        check(svc, f"no flow to the ClusterIP {a.cluster_ip}")
        for r in svc:
            hb = r["remote"]["held_by"] or {}
            check(r["remote"]["source"] == "KUBERNETES" and f"{hb.get('namespace')}/{hb.get('name')}" == a.service,
                  f"flow to {a.cluster_ip} attributed to {r['remote']['source']} {hb} instead of Service {a.service}")
        if a.reused:
            ip, rest = a.reused.split("=")
            pods, t = rest.split("@")
            old, new = pods.split(",")
            seen = collections.Counter()
            for r in recs:
                for side in ("local", "remote"):
                    if r[side + "_ip"] != ip:
                        continue
                    want = old if (r["start_time_ns"] or r["end_time_ns"]) < int(t) else new
                    got = (r[side]["held_by"] or {}).get("name")
                    seen[got] += 1
                    check(got == want, f"{r['host_id']} #{r['sequence']}: {side} {ip} at {r['start_time_ns']} "
                                       f"attributed to {got}, not {want}")
            print(f"\nIP reuse: {ip} attributed to " + ", ".join(f"{k} {v}" for k, v in sorted(seen.items(), key=lambda kv: str(kv[0]))) + " record sides")
            check(seen[old] > 0 and seen[new] > 0, f"IP reuse: both pods should have flows: {dict(seen)}")
        if failures:
            print(f"\nCHECK FAILED ({len(failures)}):", file=sys.stderr)
            for f in failures[:20]:
                print("  " + f, file=sys.stderr)
            return 1
        print("\nChecks passed: every side named but the stray address's, the Service named, the reused IP "
              "attributed at each flow's time, no self-check disagreement, no sequence gaps, generator counts matched.")

    if a.svg:
        write_svg(a.svg, pairs)
        print(f"\nPicture: workload-to-workload graph (edge width ~ bytes) -> {a.svg}")
    return 0


def layout(pairs, W, H, top):
    """Layered layout, clients left, servers right: a node's column is the
    longest chain of callers before it (cycles cut); within a column, nodes
    follow their callers' height."""
    nodes = sorted({n for k in pairs for n in k}, key=lambda n: (n.startswith("?"), n))
    edges = [(a, b) for (a, b) in pairs if a != b]
    depth = {n: 0 for n in nodes}
    for _ in range(len(nodes)):
        for a, b in edges:
            depth[b] = max(depth[b], min(depth[a] + 1, len(nodes) - 1))
    cols = collections.defaultdict(list)
    for n in nodes:
        cols[depth[n]].append(n)
    ncol = max(cols) + 1
    pos = {}
    for c in range(ncol):
        col = cols.get(c, [])
        callers = lambda n: [pos[a][1] for a, b in edges if b == n and a in pos]
        # Nodes with callers by their callers' mean height; loners (no edges) last.
        col.sort(key=lambda n: (not callers(n) and not any(n in e for e in edges) and c == 0,
                                sum(callers(n)) / len(callers(n)) if callers(n) else 0, n.startswith("?"), n))
        for i, n in enumerate(col):
            x = 110 + (W - 220) * (c / (ncol - 1) if ncol > 1 else 0.5)
            y = top + (H - top - 40) * (i + 0.5) / len(col)
            pos[n] = (x, y)
    return pos


def write_svg(path, pairs):
    """The workload graph: clients left, servers right, one arrow per pair."""
    W, H, node_r = 980, 640, 46
    pos = layout(pairs, W, H, 110)
    maxb = max((p["c2s"] + p["s2c"] for p in pairs.values()), default=1) or 1
    arrow = ('<marker id="{id}" viewBox="0 0 10 10" refX="1" refY="5" markerWidth="14" markerHeight="14" '
             'markerUnits="userSpaceOnUse" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="{c}"/></marker>')
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif">',
           "<defs>" + "".join(arrow.format(id=i, c=c) for i, c in (("ok", "#2c7fb8"), ("un", "#999"), ("fail", "#c0392b"))) + "</defs>",
           f'<rect width="{W}" height="{H}" fill="white"/>',
           '<text x="20" y="34" font-size="20" font-weight="bold">flowlog demo: who talks to whom (read back from the enriched flow log)</text>',
           '<text x="20" y="56" font-size="12" fill="#555">arrow: client → server, width ~ bytes both ways; label: connections, bytes, '
           'RTT p50/p99, retransmits, failed connects.</text>',
           '<text x="20" y="72" font-size="12" fill="#555">Grey: a side no source attributes; red dashed: only failed connects.</text>']
    edges, labels = [], []
    col_w = (W - 220) / max(1, len({round(x) for x, _ in pos.values()}) - 1)
    for (src, dst), p in sorted(pairs.items(), key=lambda kv: kv[1]["c2s"] + kv[1]["s2c"]):
        (x1, y1), (x2, y2) = pos[src], pos[dst]
        b = p["c2s"] + p["s2c"]
        only_failed = p["failed"] == p["conns"]
        w = 2 if only_failed else 1.5 + 14 * math.sqrt(b / maxb)
        if src == dst:  # traffic inside one workload: a loop above it
            d = (f"M{x1 - 20:.0f},{y1 - node_r + 4:.0f} C{x1 - 70:.0f},{y1 - node_r - 75:.0f} "
                 f"{x1 + 70:.0f},{y1 - node_r - 75:.0f} {x1 + 24:.0f},{y1 - node_r - 8:.0f}")
            lx, ly, nx, ny = x1, y1 - node_r - 62 - w / 2, 0.0, -1.0
        else:
            dx, dy = x2 - x1, y2 - y1
            L = math.hypot(dx, dy) or 1
            ux, uy = dx / L, dy / L
            span = abs(dx) / col_w if col_w else 1
            # Edges skipping a column bend around it; backward edges bend below.
            bend = 25 + (110 * (span - 1) if span > 1.5 else 0) + (60 if dx <= 0 else 0)
            nx, ny = (uy, -ux) if dx > 0 else (-uy, ux)
            if ny > 0:
                nx, ny = -nx, -ny
            if span > 1.5 or dx <= 0:
                nx, ny = -nx, -ny  # long and backward edges below
            sx, sy = x1 + ux * node_r, y1 + uy * node_r
            ex, ey = x2 - ux * (node_r + 14), y2 - uy * (node_r + 14)  # room for the arrowhead
            mx, my = (sx + ex) / 2 + nx * 2 * bend, (sy + ey) / 2 + ny * 2 * bend
            d = f"M{sx:.0f},{sy:.0f} Q{mx:.0f},{my:.0f} {ex:.0f},{ey:.0f}"
            off = w / 2 + 14
            lx, ly = (sx + ex) / 2 + nx * (bend + off), (sy + ey) / 2 + ny * (bend + off)  # beside the curve's middle
        if only_failed:
            edges.append(f'<path d="{d}" fill="none" stroke="#c0392b" stroke-width="2" stroke-dasharray="6,4" marker-end="url(#fail)"/>')
            lines = [f"{p['failed']} failed connects"]
        else:
            un = src.startswith("?") or dst.startswith("?")
            color, mk = ("#999", "un") if un else ("#2c7fb8", "ok")
            edges.append(f'<path d="{d}" fill="none" stroke="{color}" stroke-opacity="0.8" stroke-width="{w:.1f}" marker-end="url(#{mk})"/>')
            extra = [f"{p['retx']} retx"] * bool(p["retx"]) + [f"{p['failed']} failed connects"] * bool(p["failed"])
            lines = [f"{p['conns']} conns, {human(b)}", f"RTT {ms(pct(p['rtt'], 50))} / {ms(pct(p['rtt'], 99))} ms"
                     + (", " + ", ".join(extra) if extra else "")]
        anchor = "start" if nx > 0.35 else "end" if nx < -0.35 else "middle"
        n_up = len(lines) - 1 if ny < -0.35 else (-1 if ny > 0.35 else (len(lines) - 1) / 2 - 0.3)
        for i, t in enumerate(lines):
            fill = "#c0392b" if only_failed else "#222"
            labels.append(f'<text x="{lx:.0f}" y="{ly + 14 * (i - n_up):.0f}" font-size="11.5" text-anchor="{anchor}" fill="{fill}" '
                          f'stroke="white" stroke-width="3" paint-order="stroke">{html.escape(t)}</text>')
    out.extend(edges)
    for n, (x, y) in pos.items():
        un = n.startswith("?")
        fill, stroke = ("#eee", "#999") if un else ("#dff0d8", "#3c763d")
        out.append(f'<circle cx="{x:.0f}" cy="{y:.0f}" r="{node_r}" fill="{fill}" stroke="{stroke}" stroke-width="2"/>')
        label = ["unattributed", n[2:]] if un else [n]
        for i, part in enumerate(label):
            out.append(f'<text x="{x:.0f}" y="{y + 5 + (i - (len(label) - 1) / 2) * 15:.0f}" font-size="{12 if un else 14}" '
                       f'text-anchor="middle" font-weight="{"normal" if un else "bold"}">{html.escape(part)}</text>')
    out.extend(labels)
    out.append("</svg>")
    pathlib.Path(path).write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    sys.exit(main())
