#!/usr/bin/env python3
"""Waits until a sidecar's latest identity record does (or no longer does)
list a pod among the workloads whose IPs it announces, read from the identity
topic with confluent-kafka and fastavro (readers this project did not write).

    demo_identity.py BROKER HOST_ID POD_UID yes|no [--timeout SECS]

Exits 0 once it does, 1 at the timeout. The demo waits on this before it
sends traffic to a pod, so that the pod's IP is known from the first flow.
"""
import argparse
import io
import json
import pathlib
import sys
import time

import fastavro
from confluent_kafka import Consumer, TopicPartition

SCHEMA = fastavro.parse_schema(json.loads((pathlib.Path(__file__).parent.parent / "schemas/identity.avsc").read_text()))
HEADER = 10  # Avro single-object encoding: C3 01 + 8-byte schema fingerprint


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("broker")
    ap.add_argument("host_id")
    ap.add_argument("pod_uid")
    ap.add_argument("want", choices=["yes", "no"])
    ap.add_argument("--topic", default="flowlog.identity")
    ap.add_argument("--timeout", type=float, default=30)
    a = ap.parse_args()
    c = Consumer({"bootstrap.servers": a.broker, "group.id": f"flowlog-demo-identity-{time.time_ns()}",
                  "enable.auto.commit": False})
    parts = c.list_topics(a.topic, timeout=10).topics[a.topic].partitions
    c.assign([TopicPartition(a.topic, p, 0) for p in parts])  # from the beginning
    deadline = time.monotonic() + a.timeout
    latest = None  # the host's latest record: (time_ns, listed?)
    try:
        while time.monotonic() < deadline:
            m = c.poll(0.2)
            if m is not None and not m.error():
                r = fastavro.schemaless_reader(io.BytesIO(m.value()[HEADER:]), SCHEMA)
                if r["host"]["host_id"] == a.host_id and (latest is None or r["time_ns"] >= latest[0]):
                    listed = any(w["workload"]["pod_uid"] == a.pod_uid and w["ips"] for w in r["workloads"])
                    latest = (r["time_ns"], listed)
            # Decided only once caught up (nothing more to read right now):
            # an early record must not answer for a later one.
            if m is None and latest is not None and latest[1] == (a.want == "yes"):
                return 0
    finally:
        c.close()
    print(f"sidecar {a.host_id}: pod {a.pod_uid} {'not ' if a.want == 'yes' else 'still '}announced "
          f"after {a.timeout:.0f} s (latest identity record: {latest})", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
