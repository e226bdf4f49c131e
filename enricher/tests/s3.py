#!/usr/bin/env python3
"""The S3 side of the enricher's lake tests, with boto3 against a local S3
server (moto): `s3.py URL create BUCKET` creates a bucket; `s3.py URL sync
BUCKET PREFIX DIR` copies every object under PREFIX into DIR (then read by
the same readers as a local output) and prints their keys."""
import pathlib, sys
import boto3

url, cmd, bucket = sys.argv[1], sys.argv[2], sys.argv[3]
s3 = boto3.client("s3", endpoint_url=url, aws_access_key_id="test",
                  aws_secret_access_key="test", region_name="us-east-1")
if cmd == "create":
    s3.create_bucket(Bucket=bucket)
elif cmd == "sync":
    prefix, dest = sys.argv[4], pathlib.Path(sys.argv[5])
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for o in page.get("Contents", []):
            rel = o["Key"][len(prefix):].lstrip("/")
            p = dest / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read())
            print(rel)
else:
    sys.exit(f"unknown command {cmd}")
