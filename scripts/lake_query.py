#!/usr/bin/env python3
"""Runs the flow lake's example queries (docs/queries/*.sql) with DuckDB over
the enricher's Parquet output: a local folder or an s3:// prefix.

    lake_query.py ROOT [QUERY ...] [--param NAME=VALUE ...] [--json]
    lake_query.py --list

ROOT is the folder the Parquet sink writes (dt=YYYY-MM-DD/hr=HH/*.parquet
below it), or s3://BUCKET/PREFIX. QUERY names a file of docs/queries without
.sql (top_talkers, bytes_by_cost_class, ...); none: all of them, except those
that need parameters not given. --param sets a DuckDB variable a query reads
with getvariable('NAME') (five_tuple: ip_a, port_a, ip_b, port_b). Prints a
table per query, or with --json one JSON object {query: [row, ...]}.

S3: DuckDB reads s3:// through its httpfs extension, which DuckDB downloads
from its own extension site on first use; that site is not reachable from
the machines this project is built on, so an s3:// ROOT is first copied
(the *.parquet objects under the prefix, with boto3) to a temporary folder,
keeping the keys' Hive layout. boto3 takes the endpoint from AWS_ENDPOINT_URL
(moto in the tests and the demo) and credentials from the standard chain.

The same setup works in the DuckDB CLI:
    SET VARIABLE lake = 'out/lake';
    .read docs/queries/lake.sql
    .read docs/queries/top_talkers.sql
"""
import argparse
import json
import pathlib
import re
import sys
import tempfile

import duckdb

QUERIES = pathlib.Path(__file__).resolve().parent.parent / "docs" / "queries"
SETUP = "lake"  # docs/queries/lake.sql: the `flows` view and the macros


def query_names():
    return sorted(p.stem for p in QUERIES.glob("*.sql") if p.stem != SETUP)


def query_params(name):
    """The variables a query reads (getvariable('x')), minus the lake's."""
    text = (QUERIES / f"{name}.sql").read_text()
    return sorted(set(re.findall(r"getvariable\('(\w+)'\)", text)) - {"lake"})


def sync_s3(url, dest, suffixes=(".parquet",)):
    """Copies the objects under s3://BUCKET/PREFIX whose keys end with one of
    `suffixes` (all: None) to dest, each at its key's path below the prefix;
    returns how many."""
    import boto3
    bucket, _, prefix = url[len("s3://"):].partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    s3 = boto3.client("s3")
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if suffixes and not obj["Key"].endswith(tuple(suffixes)):
                continue
            path = pathlib.Path(dest) / obj["Key"][len(prefix):]
            path.parent.mkdir(parents=True, exist_ok=True)
            s3.download_file(bucket, obj["Key"], str(path))
            n += 1
    return n


class Lake:
    """A DuckDB connection with the lake at ROOT as the `flows` view and the
    macros of docs/queries/lake.sql. Use as a context manager (an s3:// ROOT's
    local copy is removed at the end)."""

    def __init__(self, root):
        self.tmp = self.con = None
        root = shown = str(root)
        if root.startswith("s3://"):
            self.tmp = tempfile.TemporaryDirectory(prefix="flowlog-lake-")
            self.objects = sync_s3(root, self.tmp.name)
            root = self.tmp.name
        self.root = root
        if not self.files():
            self.close()
            raise LookupError(f"no Parquet files under {shown}")
        self.con = duckdb.connect()
        self.con.execute("SET VARIABLE lake = ?", [root.rstrip("/")])
        self.con.execute((QUERIES / f"{SETUP}.sql").read_text())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        if self.con:
            self.con.close()
        if self.tmp:
            self.tmp.cleanup()

    def files(self):
        return sorted(pathlib.Path(self.root).rglob("*.parquet"))

    def run(self, name, params=None):
        """(column names, rows) of docs/queries/NAME.sql."""
        for k, v in (params or {}).items():
            self.con.execute(f"SET VARIABLE {k} = ?", [v])
        cur = self.con.execute((QUERIES / f"{name}.sql").read_text())
        return [d[0] for d in cur.description], cur.fetchall()

    def rows(self, columns):
        """Every record, as dicts of the given top-level columns (nested
        records as dicts, maps as dicts): what fastavro gives for the Avro
        files of the same records."""
        quoted = ", ".join('"' + c + '"' for c in columns)
        cur = self.con.execute(f"SELECT {quoted} FROM flows")
        return [dict(zip(columns, r)) for r in cur.fetchall()]


def print_table(name, cols, rows):
    def cell(v):
        return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    text = [[cell(v) for v in r] for r in rows]
    widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(cols)]
    print(f"== {name} ({len(rows)} rows)")
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("  ".join("-" * w for w in widths))
    for r in text:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("root", nargs="?", help="the lake: a folder, or s3://BUCKET/PREFIX")
    ap.add_argument("queries", nargs="*", help="query names (default: all that have their parameters)")
    ap.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--list", action="store_true", help="list the queries and their parameters")
    a = ap.parse_args()
    if a.list:
        for n in query_names():
            print(n + "".join(f" --param {p}=..." for p in query_params(n)))
        return 0
    if not a.root:
        ap.error("ROOT is required")
    params = dict(p.split("=", 1) for p in a.param)
    names = a.queries or [n for n in query_names() if set(query_params(n)) <= set(params)]
    unknown = set(names) - set(query_names())
    if unknown:
        ap.error(f"no such query: {', '.join(sorted(unknown))} (have: {', '.join(query_names())})")
    out = {}
    try:
        lake = Lake(a.root)
    except LookupError as e:
        print(e, file=sys.stderr)
        return 1
    with lake:
        for n in names:
            missing = set(query_params(n)) - set(params)
            if missing:
                ap.error(f"{n} needs --param {' --param '.join(f'{m}=...' for m in sorted(missing))}")
            cols, rows = lake.run(n, params)
            if a.json:
                out[n] = [dict(zip(cols, r)) for r in rows]
            else:
                print_table(n, cols, rows)
    if a.json:
        print(json.dumps(out, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
