#!/usr/bin/env python3
"""Prints every record of every Avro container file under a folder as JSON lines,
read with fastavro (an Avro implementation this project did not write)."""
import json, pathlib, sys
from fastavro import reader

for p in sorted(pathlib.Path(sys.argv[1]).rglob("*.avro")):
    with open(p, "rb") as f:
        for rec in reader(f):
            rec["_file"] = str(p.relative_to(sys.argv[1]))
            print(json.dumps(rec, default=str))
