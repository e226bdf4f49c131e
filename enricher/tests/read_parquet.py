#!/usr/bin/env python3
"""Prints every row of every Parquet file under a folder as JSON lines, read
with DuckDB (a query engine this project did not write), Hive partitioning
on: the folder names' `dt`/`hr` come out as columns."""
import json, sys
import duckdb


def plain(v):
    """DuckDB's Python values as JSON: structs as objects, maps as objects."""
    if isinstance(v, dict):
        if set(v) == {"key", "value"} and isinstance(v["key"], list):
            return {k: plain(x) for k, x in zip(v["key"], v["value"])}
        return {k: plain(x) for k, x in v.items()}
    if isinstance(v, list):
        return [plain(x) for x in v]
    return v


rel = duckdb.execute(
    "SELECT * FROM read_parquet(?, hive_partitioning = true, hive_types_autocast = false)",
    [sys.argv[1].rstrip("/") + "/**/*.parquet"],
)
names = [d[0] for d in rel.description]
for row in rel.fetchall():
    print(json.dumps({n: plain(v) for n, v in zip(names, row)}, default=str))
