"""The flow lake's readers and queries on a small synthetic lake (lake_data):
fastavro over the Avro files and DuckDB over the Parquet files give the
records produced; demo_summary.py's summaries from both agree (and differ
when a file is missing); each example query (docs/queries) gives what the
records hold; lake_query.py reads an s3:// prefix on moto's S3 server.

    make test-scripts   (or: $VENV/bin/python -m unittest discover -s scripts/tests -v)
"""

import collections
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import unittest

from fastavro import reader

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import demo_summary  # noqa: E402
import lake_data  # noqa: E402
import lake_query  # noqa: E402
from servers import Moto, s3_client  # noqa: E402


def run(*args, env=None):
    return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


class LakeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory(prefix="flowlog-lake-test-")
        cls.addClassCleanup(cls.tmp.cleanup)
        root = pathlib.Path(cls.tmp.name)
        cls.avro, cls.parquet = root / "avro", root / "parquet"
        cls.records = lake_data.make_records()
        lake_data.write_avro(cls.records, cls.avro)
        lake_data.avro_to_parquet(cls.avro, cls.parquet)
        cls.lake = lake_query.Lake(cls.parquet)
        cls.addClassCleanup(cls.lake.close)

    def query(self, name, **params):
        cols, rows = self.lake.run(name, params)
        return [dict(zip(cols, r)) for r in rows]

    def test_both_readers_give_the_records_produced(self):
        key = lambda r: (r["host_id"], r["sequence_epoch"], r["sequence"])
        avro = []
        for p in sorted(self.avro.rglob("*.avro")):
            with open(p, "rb") as f:
                avro.extend(reader(f))
        parquet = self.lake.rows(lake_data.FIELDS)
        self.assertEqual(len(avro), len(self.records))
        self.assertEqual(sorted(avro, key=key), sorted(self.records, key=key))
        self.assertEqual(sorted(parquet, key=key), sorted(self.records, key=key))
        # Hive partitions: each file's dt/hr is its records' end hour.
        parts = {(str(dt), hr) for dt, hr in self.lake.con.execute("SELECT DISTINCT dt, hr FROM flows").fetchall()}
        self.assertEqual(parts, {lake_data.partition(r) for r in self.records})
        self.assertEqual(len(parts), 3)

    def test_summaries_agree_and_a_missing_file_is_seen(self):
        self.assertEqual(demo_summary.compare(self.avro, "avro", self.records, self.parquet, "parquet"), [])
        out = run(HERE.parent / "demo_summary.py", self.parquet, "--format", "parquet", "--compare", self.avro)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("[DuckDB over Parquet] 156 enriched records", out.stdout)
        self.assertIn("summaries agree exactly", out.stdout)
        # Negative control: one Parquet file fewer, and the comparison says so.
        with tempfile.TemporaryDirectory() as short:
            shutil.copytree(self.parquet, short, dirs_exist_ok=True)
            next(pathlib.Path(short).rglob("*.parquet")).unlink()
            out = run(HERE.parent / "demo_summary.py", self.avro, "--compare", short)
            self.assertEqual(out.returncode, 1, out.stdout + out.stderr)
            self.assertIn("summaries DIFFER", out.stdout)
            self.assertIn("connections: 102 != ", out.stdout)
            self.assertIn("top_talkers.sql vs the Avro summary", out.stdout)

    def summary(self):
        return demo_summary.facts(self.records)

    def test_top_talkers(self):
        rows = {(r["client"], r["server"]): r for r in self.query("top_talkers")}
        self.assertEqual(set(rows), {("frontend", "checkout"), ("checkout/payments-sync", "? 93.184.216.34"),
                                     ("checkout", "db-0"), ("frontend", "db-0"), ("frontend", "svc:shop/search"),
                                     ("checkout", "? 10.0.9.99")})
        fc = rows[("frontend", "checkout")]
        self.assertEqual((fc["connections"], fc["failed"], fc["ports"]), (36, 12, [8080, 9090]))
        self.assertEqual(fc["bytes_c2s"], sum(1000 * (i + 1) for i in range(24)))
        self.assertEqual(fc["retransmits"], sum(i % 2 + 1 for i in range(24)))
        # The first row has the most bytes.
        first = self.query("top_talkers")[0]
        self.assertEqual((first["client"], first["server"]), ("frontend", "checkout"))

    def test_bytes_by_cost_class(self):
        rows = {r["cost_class"]: r for r in self.query("bytes_by_cost_class")}
        # frontend (zone a) -> checkout (b) and checkout -> db-0 (a): cross;
        # frontend -> db-0: same; the public address: internet; the
        # ClusterIP (no zone): unknown. Failed connects carry no bytes.
        self.assertEqual({k: r["connections"] for k, r in rows.items()},
                         {"cross-zone": 48, "same-zone": 6, "internet": 8, "unknown": 24})
        self.assertEqual(rows["same-zone"]["bytes"], 6 * 12000)
        self.assertEqual(rows["internet"]["bytes"], 8 * 122_000)
        total = sum(p["c2s"] + p["s2c"] for p in self.summary()["pairs"].values())
        self.assertEqual(sum(r["bytes"] for r in rows.values()), total)

    def test_failed_connects_by_service(self):
        rows = [(r["service"], r["error"], r["failed_connects"], r["clients"]) for r in self.query("failed_connects_by_service")]
        self.assertEqual(rows, [("checkout", "ECONNREFUSED", 12, ["frontend"]), ("? 10.0.9.99", "ETIMEDOUT", 4, ["checkout"])])
        failed = sum(p["failed"] for p in self.summary()["pairs"].values())
        self.assertEqual(sum(r[2] for r in rows), failed)

    def test_p99_rtt_by_destination(self):
        want = collections.defaultdict(list)
        for key, p in self.summary()["pairs"].items():
            want[key.split(" -> ", 1)[1]].extend(p["rtt"])
        got = {r["destination"]: r for r in self.query("p99_rtt_by_destination")}
        self.assertEqual(set(got), {k for k, v in want.items() if v})
        for dst, r in got.items():
            self.assertEqual(r["connections"], len(want[dst]), dst)
            self.assertEqual(round(r["p99_rtt_ms"] * 1000), demo_summary.pct(want[dst], 99), dst)
            self.assertEqual(round(r["p50_rtt_ms"] * 1000), demo_summary.pct(want[dst], 50), dst)
        # checkout's RTTs are the client's (the server end's are ignored).
        self.assertEqual(round(got["checkout"]["max_rtt_ms"] * 1000), 900 + 37 * 23 + 5)

    def test_what_held_back(self):
        rows = {(r["sender"], r["receiver"]): r for r in self.query("what_held_back")}
        # Only the frontend <-> checkout ends carry limits (the others are
        # from an older sidecar); the interim records are left out.
        self.assertEqual(set(rows), {("frontend", "checkout"), ("checkout", "frontend")})
        fc, cf = rows[("frontend", "checkout")], rows[("checkout", "frontend")]
        self.assertEqual((fc["connections"], cf["connections"]), (24, 24))
        self.assertAlmostEqual(fc["busy_s"], sum(10 * (i + 1) for i in range(24)) / 1e3)
        self.assertAlmostEqual(fc["receiver_limited_s"], sum(range(24)) / 1e3)
        self.assertEqual(fc["send_buffer_limited_s"], 0)
        self.assertAlmostEqual(fc["receiver_limited_share"], round(sum(range(24)) / sum(10 * (i + 1) for i in range(24)), 4))
        self.assertEqual(fc["bytes_retransmitted"], 1448 * 12)
        self.assertAlmostEqual(cf["send_buffer_limited_s"], 6 * 5 / 1e3)
        self.assertEqual((cf["receiver_limited_s"], cf["receiver_limited_share"]), (0, 0))
        # The receiver-limited pair comes first.
        self.assertEqual((self.query("what_held_back")[0]["sender"]), "frontend")

    def test_five_tuple(self):
        # frontend:40003 <-> checkout:8080, given either way round.
        for a, b in ((("10.0.1.10", 40003), ("10.0.2.20", 8080)), (("10.0.2.20", 8080), ("10.0.1.10", 40003))):
            rows = self.query("five_tuple", ip_a=a[0], port_a=str(a[1]), ip_b=b[0], port_b=str(b[1]))
            self.assertEqual([(r["host_id"], r["record_type"], r["direction"]) for r in rows],
                             [("host-a", "INTERIM", "CLIENT"), ("host-a", "FINAL", "CLIENT"), ("host-b", "FINAL", "SERVER")])
            self.assertEqual({r["flow_id"] for r in rows}, {"fe-co-3"})
            self.assertEqual({r["local_name"] for r in rows}, {"frontend", "checkout"})

    def test_lake_query_cli_over_s3(self):
        moto = Moto()
        self.addCleanup(moto.stop)
        env = {"AWS_ENDPOINT_URL": moto.url, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = s3_client(moto.url)
        s3.create_bucket(Bucket="flows")
        for p in self.parquet.rglob("*.parquet"):
            s3.upload_file(str(p), "flows", "lake/" + str(p.relative_to(self.parquet)))
        s3.put_object(Bucket="flows", Key="lake/_notes.txt", Body=b"not parquet")
        local = run(HERE.parent / "lake_query.py", self.parquet, "--json")
        remote = run(HERE.parent / "lake_query.py", "s3://flows/lake", "--json", env=env)
        self.assertEqual(local.returncode, 0, local.stderr)
        self.assertEqual(remote.returncode, 0, remote.stderr)
        got = json.loads(remote.stdout)
        self.assertEqual(got, json.loads(local.stdout))
        # All but five_tuple, which needs its parameters.
        self.assertEqual(set(got), set(lake_query.query_names()) - {"five_tuple"})
        table = run(HERE.parent / "lake_query.py", "s3://flows/lake", "five_tuple", "--param", "ip_a=10.0.1.10",
                    "--param", "port_a=40003", "--param", "ip_b=10.0.2.20", "--param", "port_b=8080", env=env)
        self.assertEqual(table.returncode, 0, table.stderr)
        self.assertIn("== five_tuple (3 rows)", table.stdout)
        # The summary from s3:// too.
        out = run(HERE.parent / "demo_summary.py", "s3://flows/lake", "--format", "parquet", "--compare", self.avro, env=env)
        self.assertEqual(out.returncode, 0, out.stdout + out.stderr)
        self.assertIn("summaries agree exactly", out.stdout)
        missing = run(HERE.parent / "lake_query.py", "s3://flows/nothing-here", env=env)
        self.assertEqual(missing.returncode, 1)
        self.assertIn("no Parquet files", missing.stderr)


if __name__ == "__main__":
    unittest.main()
