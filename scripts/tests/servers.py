"""Real local servers for the script tests: moto's S3 server and the S3
fault proxy in front of it, each a child process on 127.0.0.1, stopped by
the caller (`stop()`)."""

import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import time

SCRIPTS = pathlib.Path(__file__).resolve().parent.parent
# moto_server is installed beside the venv's python (scripts/setup.sh).
MOTO_SERVER = pathlib.Path(sys.executable).parent / "moto_server"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(what, ok, timeout=30, proc=None):
    """Polls ok() until true; fails after timeout, or when proc exits."""
    t0 = time.monotonic()
    while not ok():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})")
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(0.05)


def connectable(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


class Moto:
    """moto's S3 (and EC2, ...) server on a free port."""

    def __init__(self):
        for _ in range(5):  # the port may be taken between picking and binding
            self.port = free_port()
            self.proc = subprocess.Popen([str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                wait_until("moto_server", lambda: connectable(self.port), proc=self.proc)
                break
            except RuntimeError:
                continue
        else:
            raise RuntimeError("moto_server did not start")
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.kill()
        self.proc.wait()


class FaultProxy:
    """scripts/s3_fault_proxy.py in front of `upstream`."""

    def __init__(self, upstream):
        self.dir = tempfile.TemporaryDirectory(prefix="s3-fault-proxy-")
        port_file = pathlib.Path(self.dir.name) / "port"
        self.proc = subprocess.Popen([sys.executable, str(SCRIPTS / "s3_fault_proxy.py"), "--upstream", upstream,
                                      "--port-file", str(port_file)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until("s3_fault_proxy", port_file.exists, proc=self.proc)
        self.port = int(port_file.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def admin(self, method, path, doc=None):
        import json
        import urllib.request
        req = urllib.request.Request(self.url + path, method=method,
                                     data=None if doc is None else json.dumps(doc).encode())
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.dir.cleanup()


def s3_client(endpoint, **config):
    """A boto3 S3 client for a local endpoint: static test credentials,
    path-style addressing; `config` goes to botocore's Config (retries, timeouts)."""
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=os.environ.get("AWS_ACCESS_KEY_ID", "test"),
                        aws_secret_access_key=os.environ.get("AWS_SECRET_ACCESS_KEY", "test"),
                        config=Config(s3={"addressing_style": "path"}, **config))
