"""A small flow lake for the script tests: enriched records made against
schemas/enriched_flow.avsc, written as Avro object container files (fastavro)
in the enricher's Hive layout (dt=YYYY-MM-DD/hr=HH/), and the same records
as Parquet written by DuckDB (avro_to_parquet) until the enricher's own
Parquet sink writes them.

What the records hold, so the queries have something to find: workloads in
two zones talking within and across zones, seen from both ends or one; a
Service's ClusterIP; a StatefulSet pod; a host's systemd service; a public
address and an unknown private one; failed connects (refused, timed out);
interim and final records; three hours in two days.
"""

import json
import pathlib
import struct
import tempfile

import duckdb
from fastavro import parse_schema, writer

SCHEMA_FILE = pathlib.Path(__file__).resolve().parents[2] / "schemas" / "enriched_flow.avsc"
HOUR_NS = 3600 * 10**9
T0 = 1_795_993_200 * 10**9  # 2026-11-29 23:00 UTC: the records span three hours over two days


def schema():
    return json.loads(SCHEMA_FILE.read_text())


def f32(x):
    """x as the float32 Avro stores (what both readers give back)."""
    return struct.unpack("f", struct.pack("f", x))[0]


def field(name):
    return next(f for f in schema()["fields"] if f["name"] == name)


ATTR_FIELDS = [f["name"] for f in field("local")["type"]["fields"]]
WORKLOAD_INFO_FIELDS = [f["name"] for f in field("local_workload")["type"][1]["fields"]]
FIELDS = [f["name"] for f in schema()["fields"]]


def workload_info(**kw):
    w = {k: None for k in WORKLOAD_INFO_FIELDS}
    w["labels"] = {}
    w.update(kw)
    return w


def attribution(workload=None, zone=None, source="SIDECAR", held_by=None, **kw):
    a = {k: None for k in ATTR_FIELDS}
    a.update(attributed=workload is not None or held_by is not None, source=source if (workload or held_by) else "NONE",
             workload=workload, zone=zone, host_id=kw.pop("host_id", None), labels=kw.pop("labels", {}),
             confidence=f32(1.0 if source == "SIDECAR" else 0.9) if (workload or held_by) else 0.0,
             held_by=held_by)
    if not a["attributed"]:
        a["reason"] = "UNKNOWN_IP"
    a.update(kw)
    return a


# Who has which IP: name -> (ip, host_id of its sidecar or None, attribution).
HOSTS = {
    "frontend": ("10.0.1.10", "host-a", attribution(held_by=workload_info(
        kind="POD", name="frontend-7d9f-x2", namespace="shop", pod_uid="uid-fe", owner_kind="Deployment",
        owner_name="frontend"), zone="eu-west-1a", host_id="host-a", service="web", app="shop")),
    "checkout": ("10.0.2.20", "host-b", attribution(workload="checkout", zone="eu-west-1b", host_id="host-b",
                                                    service="checkout", app="shop")),
    "db-0": ("10.0.1.30", "host-c", attribution(held_by=workload_info(
        kind="POD", name="db-0", namespace="shop", pod_uid="uid-db", owner_kind="StatefulSet", owner_name="db"),
        zone="eu-west-1a", host_id="host-c", service="postgres")),
    "svc": ("10.96.0.10", None, attribution(source="KUBERNETES", held_by=workload_info(
        kind="CLUSTER_IP", name="search", namespace="shop"))),
    "internet": ("93.184.216.34", None, attribution()),
    "stray": ("10.0.9.99", None, attribution()),
}


def record(host, seq, conn, *, direction, local, remote, lport, rport, start, end, sent, recv, retx=0,
           srtt=0, end_reason="NORMAL", error=None, record_type="FINAL", flow_id, local_workload=None, limits=None):
    lip, _, lattr = HOSTS[local]
    rip, _, rattr = HOSTS[remote]
    return {
        "flow_id": flow_id, "host_id": host, "host_workload": local, "sequence_epoch": 1, "sequence": seq,
        "connection_id": conn, "record_type": record_type, "family": "IPV4", "direction": direction,
        "local_ip": lip, "local_port": lport, "remote_ip": rip, "remote_port": rport,
        "start_time_ns": start, "end_time_ns": end, "bytes_sent": sent, "bytes_received": recv,
        "segs_in": recv // 1000 + 1, "segs_out": sent // 1000 + 1, "retransmits": retx, "srtt_us": srtt,
        "rtt_min_us": srtt // 2, "end_reason": end_reason, "error": error, "pid": 100 + conn, "comm": "app",
        "cgroup_id": 7, "netns_ino": 4026531840,
        "local_workload": local_workload, "local": lattr, "remote": rattr, "limits": limits,
    }


def limits(busy_ms, rwnd_ms=0, sndbuf_ms=0, retrans=0):
    """Limits as a sidecar on Linux 6.7+ reports them (busy includes the limited times)."""
    return {"busy_us": busy_ms * 1000, "rwnd_limited_us": rwnd_ms * 1000, "sndbuf_limited_us": sndbuf_ms * 1000,
            "delivery_rate_bytes_per_s": 1_000_000, "bytes_retrans": retrans, "reordering": 3, "reord_seen": 0,
            "rto_count": 0, "rto_recoveries": 0, "rto_time_ms": 0}


def make_records():
    """The records, each sidecar's numbered 0, 1, 2, ... with no gaps."""
    seqs = {}
    out = []

    def emit(host, **kw):
        seq = seqs.get(host, 0)
        seqs[host] = seq + 1
        out.append(record(host, seq, **kw))

    conn = 0
    for i in range(24):
        hour = i % 3  # three hours: 23:00 on day one, 00:00 and 01:00 on day two
        t = T0 + hour * HOUR_NS + i * 10**9
        conn += 1
        fid = f"fe-co-{i}"
        port = 40000 + i
        sent, recv, rtt = 1000 * (i + 1), 50_000 + 7 * i, 900 + 37 * i
        # frontend (zone a) -> checkout (zone b): both ends watched; one interim record first.
        emit("host-a", conn=conn, direction="CLIENT", local="frontend", remote="checkout", lport=port, rport=8080,
             start=t, end=t + 10**8, sent=sent // 2, recv=recv // 2, srtt=rtt, end_reason="OPEN",
             record_type="INTERIM", flow_id=fid)
        emit("host-a", conn=conn, direction="CLIENT", local="frontend", remote="checkout", lport=port, rport=8080,
             start=t, end=t + 2 * 10**8, sent=sent - sent // 2, recv=recv - recv // 2, srtt=rtt + 5,
             retx=i % 2, flow_id=fid, limits=limits(10 * (i + 1), rwnd_ms=i, retrans=1448 * (i % 2)))
        emit("host-b", conn=conn, direction="SERVER", local="checkout", remote="frontend", lport=8080, rport=port,
             start=t + 1000, end=t + 2 * 10**8, sent=recv, recv=sent, srtt=rtt + 11, retx=1, flow_id=fid,
             limits=limits(20, sndbuf_ms=5 if i % 4 == 0 else 0, retrans=1448))
        # checkout (zone b) -> db-0 (zone a, a StatefulSet pod): client end only.
        emit("host-b", conn=conn + 6000, direction="CLIENT", local="checkout", remote="db-0", lport=port + 100, rport=5432,
             start=t, end=t + 3 * 10**8, sent=300 * i, recv=9000 + i, srtt=200 + 3 * i, flow_id=f"co-db-{i}")
        # frontend -> db-0 within zone a, both ends, server RTT only.
        if i % 4 == 0:
            emit("host-a", conn=conn + 1000, direction="CLIENT", local="frontend", remote="db-0", lport=port + 200,
                 rport=5432, start=t, end=t + 10**8, sent=4000, recv=8000, srtt=0, flow_id=f"fe-db-{i}")
            emit("host-c", conn=conn + 1000, direction="SERVER", local="db-0", remote="frontend", lport=5432,
                 rport=port + 200, start=t, end=t + 10**8, sent=8000, recv=4000, srtt=150 + i, flow_id=f"fe-db-{i}")
        # frontend -> the search Service's ClusterIP.
        emit("host-a", conn=conn + 2000, direction="CLIENT", local="frontend", remote="svc", lport=port + 300,
             rport=80, start=t, end=t + 10**8, sent=700, recv=1500, srtt=400 + i, flow_id=f"fe-svc-{i}")
        # checkout -> the internet, from a host's systemd service (local_workload SERVICE).
        if i % 3 == 0:
            emit("host-b", conn=conn + 3000, direction="CLIENT", local="checkout", remote="internet",
                 lport=port + 400, rport=443, start=t, end=t + 5 * 10**8, sent=2000, recv=120_000,
                 srtt=20_000 + 1000 * i, flow_id=f"co-net-{i}",
                 local_workload=workload_info(kind="SERVICE", name="payments-sync", unit="payments-sync.service"))
        # Failed connects: frontend -> checkout:9090 refused; checkout -> the stray address timed out.
        # The second takes the first's port again (a refused connect frees it
        # at once), so the two share a flow_id: still two connections.
        if i % 2 == 0:
            again = i == 2
            emit("host-a", conn=conn + 4000, direction="CLIENT", local="frontend", remote="checkout",
                 lport=40500 if again else port + 500, rport=9090, start=t, end=t + 10**6, sent=0, recv=0, srtt=0,
                 end_reason="FAILED_CONNECT", error="ECONNREFUSED", flow_id="fe-co-fail-0" if again else f"fe-co-fail-{i}")
        if i % 6 == 0:
            emit("host-b", conn=conn + 5000, direction="CLIENT", local="checkout", remote="stray",
                 lport=port + 600, rport=6379, start=t, end=t + 3 * 10**9, sent=0, recv=0, srtt=0,
                 end_reason="FAILED_CONNECT", error="ETIMEDOUT", flow_id=f"co-stray-{i}")
    return out


def partition(rec):
    """The Hive partition (dt, hr) of a record: its end time's UTC hour."""
    import datetime
    t = datetime.datetime.fromtimestamp(rec["end_time_ns"] / 1e9, datetime.timezone.utc)
    return t.strftime("%Y-%m-%d"), t.strftime("%H")


def write_avro(recs, root, per_file=20):
    """Avro object container files under root/dt=/hr=/, per_file records each."""
    parsed = parse_schema(schema())
    groups = {}
    for r in recs:
        groups.setdefault(partition(r), []).append(r)
    files = []
    for (dt, hr), rs in sorted(groups.items()):
        d = pathlib.Path(root) / f"dt={dt}" / f"hr={hr}"
        d.mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(range(0, len(rs), per_file)):
            p = d / f"flowlog.flows-0-{n:06d}.avro"
            with open(p, "wb") as f:
                writer(f, parsed, rs[i:i + per_file], codec="null")
            files.append(p)
    return files


def duckdb_type(t, named):
    """The DuckDB column type of an Avro type (records as STRUCTs, maps as
    MAPs, ["null", X] as a nullable X)."""
    if isinstance(t, list):
        (inner,) = [x for x in t if x != "null"]
        return duckdb_type(inner, named)
    if isinstance(t, str):
        prim = {"string": "VARCHAR", "long": "BIGINT", "int": "INTEGER", "float": "FLOAT", "double": "DOUBLE",
                "boolean": "BOOLEAN", "bytes": "BLOB"}
        return prim[t] if t in prim else named[t]
    if t["type"] == "record":
        s = "STRUCT(" + ", ".join(f'"{f["name"]}" {duckdb_type(f["type"], named)}' for f in t["fields"]) + ")"
        named[t["name"]] = s
        return s
    if t["type"] == "map":
        return f"MAP(VARCHAR, {duckdb_type(t['values'], named)})"
    if t["type"] == "array":
        return f"{duckdb_type(t['items'], named)}[]"
    if t["type"] == "enum":
        return "VARCHAR"
    return duckdb_type(t["type"], named)


def avro_to_parquet(avro_root, parquet_root):
    """Each Avro file under avro_root rewritten by DuckDB as Parquet at the
    same relative path (.parquet): the same records in the same partitions."""
    from fastavro import reader
    named = {}
    columns = {f["name"]: duckdb_type(f["type"], named) for f in schema()["fields"]}
    con = duckdb.connect()
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in sorted(pathlib.Path(avro_root).rglob("*.avro")):
            js = pathlib.Path(tmp) / "rows.json"
            with open(p, "rb") as f, open(js, "w") as o:
                for r in reader(f):
                    o.write(json.dumps(r) + "\n")
            dest = pathlib.Path(parquet_root) / p.relative_to(avro_root).with_suffix(".parquet")
            dest.parent.mkdir(parents=True, exist_ok=True)
            con.execute(f"COPY (SELECT * FROM read_json(?, format = 'newline_delimited', columns = {duckdb_struct_literal(columns)})) "
                        f"TO '{dest}' (FORMAT parquet, COMPRESSION zstd)", [str(js)])
            out.append(dest)
    return out


def duckdb_struct_literal(columns):
    return "{" + ", ".join(f"'{k}': '{v}'" for k, v in columns.items()) + "}"
