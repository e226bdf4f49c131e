"""scripts/s3_fault_proxy.py in front of moto's S3 server, driven by boto3
(the AWS SDK for Python), with client retries off so each injected fault is
seen as the client sees it.

    make test-scripts   (or: $VENV/bin/python -m unittest discover -s scripts/tests -v)
"""

import http.client
import json
import os
import sys
import unittest
import urllib.request

import botocore.exceptions

sys.path.insert(0, os.path.dirname(__file__))
from servers import FaultProxy, Moto, s3_client  # noqa: E402

NO_RETRIES = {"retries": {"total_max_attempts": 1, "mode": "standard"}}
BUCKET = "lake"


class FaultProxyTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.moto = Moto()
        cls.addClassCleanup(cls.moto.stop)
        cls.proxy = FaultProxy(cls.moto.url)
        cls.addClassCleanup(cls.proxy.stop)
        # moto checks SigV4 signatures once its auth is on: an IAM user with
        # an admin policy makes the keys, then every request is verified, so
        # the forwarded requests prove the proxy keeps them intact.
        direct = urllib.request.Request(cls.moto.url + "/moto-api/reset-auth", data=b"4", method="POST",
                                        headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(direct, timeout=10).read()
        import boto3
        iam = boto3.client("iam", endpoint_url=cls.moto.url, region_name="us-east-1",
                           aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="enricher")
        policy = iam.create_policy(PolicyName="all", PolicyDocument=json.dumps({
            "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
        iam.attach_user_policy(UserName="enricher", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="enricher")["AccessKey"]
        cls.keys = {"aws_access_key_id": key["AccessKeyId"], "aws_secret_access_key": key["SecretAccessKey"]}
        cls.s3 = cls.client()
        cls.s3.create_bucket(Bucket=BUCKET)

    @classmethod
    def client(cls, keys=None, **config):
        import boto3
        from botocore.config import Config
        return boto3.client("s3", endpoint_url=cls.proxy.url, region_name="us-east-1", **(keys or cls.keys),
                            config=Config(s3={"addressing_style": "path"}, **{**NO_RETRIES, **config}))

    def tearDown(self):
        self.proxy.admin("DELETE", "/_fault")

    def fault(self, **rule):
        return self.proxy.admin("POST", "/_fault", rule)

    def stats(self):
        return self.proxy.admin("GET", "/_stats")

    def assert_s3_error(self, call, code, status):
        with self.assertRaises(botocore.exceptions.ClientError) as e:
            call()
        self.assertEqual(e.exception.response["Error"]["Code"], code)
        self.assertEqual(e.exception.response["ResponseMetadata"]["HTTPStatusCode"], status)

    def test_requests_pass_through_signed(self):
        body = os.urandom(3 * 1024 * 1024 + 17)
        self.s3.put_object(Bucket=BUCKET, Key="dt=2026-11-30/hr=05/a.parquet", Body=body)
        got = self.s3.get_object(Bucket=BUCKET, Key="dt=2026-11-30/hr=05/a.parquet")["Body"].read()
        self.assertEqual(got, body)
        head = self.s3.head_object(Bucket=BUCKET, Key="dt=2026-11-30/hr=05/a.parquet")
        self.assertEqual(head["ContentLength"], len(body))
        ranged = self.s3.get_object(Bucket=BUCKET, Key="dt=2026-11-30/hr=05/a.parquet", Range="bytes=10-19")
        self.assertEqual(ranged["Body"].read(), body[10:20])
        keys = [o["Key"] for o in self.s3.list_objects_v2(Bucket=BUCKET, Prefix="dt=2026-11-30/")["Contents"]]
        self.assertIn("dt=2026-11-30/hr=05/a.parquet", keys)
        # A multipart upload (POST create, PUT parts, POST complete).
        from boto3.s3.transfer import TransferConfig
        big = os.urandom(11 * 1024 * 1024)
        self.s3.upload_fileobj(__import__("io").BytesIO(big), BUCKET, "dt=2026-11-30/hr=05/big.avro",
                               Config=TransferConfig(multipart_threshold=5 * 1024 * 1024, multipart_chunksize=5 * 1024 * 1024))
        self.assertEqual(self.s3.get_object(Bucket=BUCKET, Key="dt=2026-11-30/hr=05/big.avro")["Body"].read(), big)
        # A wrong secret is refused by moto: signatures are checked.
        bad = self.client(keys={**self.keys, "aws_secret_access_key": "wrong"})
        self.assert_s3_error(lambda: bad.get_object(Bucket=BUCKET, Key="dt=2026-11-30/hr=05/a.parquet"),
                             "SignatureDoesNotMatch", 403)

    def test_chunked_request_body_relayed(self):
        # A chunked upload, raw (the SDKs send Content-Length): whatever moto
        # answers it, the proxy relays the framing byte for byte, so moto
        # answers the same through the proxy as directly.
        def put(port):
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.putrequest("PUT", f"/{BUCKET}/chunked", skip_accept_encoding=True)
            c.putheader("Transfer-Encoding", "chunked")
            c.endheaders()
            for part in (b"hello ", b"chunked ", b"world"):
                c.send(b"%x\r\n%s\r\n" % (len(part), part))
            c.send(b"0\r\n\r\n")
            r = c.getresponse()
            answer = (r.status, r.read())
            c.close()
            return answer

        before = self.stats()["forwarded"]
        self.assertEqual(put(self.proxy.port), put(self.moto.port))
        self.assertEqual(self.stats()["forwarded"], before + 1)

    def test_injected_errors_seen_by_the_sdk(self):
        self.s3.put_object(Bucket=BUCKET, Key="e/existing", Body=b"x")
        self.fault(method="PUT", path="/e/", status=503, count=2)
        for i in range(2):
            self.assert_s3_error(lambda: self.s3.put_object(Bucket=BUCKET, Key=f"e/{i}", Body=b"x"), "SlowDown", 503)
        # A GET does not match the rule, and the rule is spent after two.
        self.assertEqual(self.s3.get_object(Bucket=BUCKET, Key="e/existing")["Body"].read(), b"x")
        self.s3.put_object(Bucket=BUCKET, Key="e/2", Body=b"x")
        # Not forwarded: the object the 503'd PUT named does not exist.
        self.assert_s3_error(lambda: self.s3.head_object(Bucket=BUCKET, Key="e/0"), "404", 404)
        self.fault(status=500)
        self.assert_s3_error(lambda: self.s3.get_object(Bucket=BUCKET, Key="e/existing"), "InternalError", 500)
        s = self.stats()
        self.assertGreaterEqual(s["faults"]["error 503"], 2)
        self.assertGreaterEqual(s["faults"]["error 500"], 1)
        self.assertEqual(s["rules"], [])

    def test_error_after_the_upstream_executed(self):
        self.fault(method="PUT", status=500, after=True)
        self.assert_s3_error(lambda: self.s3.put_object(Bucket=BUCKET, Key="after/1", Body=b"written"),
                             "InternalError", 500)
        # The client saw a failure, but the object was written.
        self.assertEqual(self.s3.get_object(Bucket=BUCKET, Key="after/1")["Body"].read(), b"written")

    def test_delay_past_the_client_timeout(self):
        self.s3.put_object(Bucket=BUCKET, Key="slow", Body=b"x")
        impatient = self.client(read_timeout=0.5, connect_timeout=2)
        self.fault(method="GET", delay_ms=1500)
        with self.assertRaises(botocore.exceptions.ReadTimeoutError):
            impatient.get_object(Bucket=BUCKET, Key="slow")
        self.assertEqual(impatient.get_object(Bucket=BUCKET, Key="slow")["Body"].read(), b"x")
        self.assertGreaterEqual(self.stats()["faults"]["delay"], 1)

    def test_connection_reset(self):
        self.fault(action="reset", method="PUT")
        with self.assertRaises((botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)):
            self.s3.put_object(Bucket=BUCKET, Key="reset", Body=b"x")
        self.s3.put_object(Bucket=BUCKET, Key="reset", Body=b"x")

    def test_down_until_cleared(self):
        self.s3.put_object(Bucket=BUCKET, Key="down", Body=b"x")
        self.fault(action="down")
        for _ in range(3):
            with self.assertRaises((botocore.exceptions.ConnectionClosedError, botocore.exceptions.EndpointConnectionError)):
                self.s3.get_object(Bucket=BUCKET, Key="down")
        s = self.stats()
        self.assertTrue(s["down"])
        self.assertGreaterEqual(s["faults"]["down"], 3)
        self.proxy.admin("DELETE", "/_fault")
        self.assertFalse(self.stats()["down"])
        self.assertEqual(self.s3.get_object(Bucket=BUCKET, Key="down")["Body"].read(), b"x")

    def test_admin_rejects_bad_rules(self):
        with self.assertRaises(urllib.error.HTTPError) as e:
            self.fault(action="explode")
        self.assertEqual(e.exception.code, 400)
        with self.assertRaises(urllib.error.HTTPError) as e:
            self.fault(status=503, pathh="/x")
        self.assertEqual(e.exception.code, 400)


if __name__ == "__main__":
    unittest.main()
