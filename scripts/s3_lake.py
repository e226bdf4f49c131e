#!/usr/bin/env python3
"""An S3 lake from the command line, with boto3 (endpoint and credentials from
the standard AWS environment: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...):

    s3_lake.py create-bucket NAME          # e.g. on a local moto server
    s3_lake.py sync s3://BUCKET/PREFIX DIR # every object below PREFIX into DIR,
                                           # keeping the dt=/hr=/ layout; prints the count

Used by the demo and the enricher's S3 tests."""
import sys

import boto3

from lake_query import sync_s3


def main(argv):
    if len(argv) == 2 and argv[0] == "create-bucket":
        boto3.client("s3").create_bucket(Bucket=argv[1])
    elif len(argv) == 3 and argv[0] == "sync" and argv[1].startswith("s3://"):
        print(sync_s3(argv[1], argv[2], suffixes=None))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
