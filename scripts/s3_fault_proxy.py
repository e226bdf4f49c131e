#!/usr/bin/env python3
"""A reverse proxy in front of an S3 endpoint (moto's server in the tests and
the demo) that injects the failures of a remote object store on demand:
throttling and server errors, slow answers past a client's timeout,
connections reset, and the endpoint gone. Python 3 standard library only.

Every other request is forwarded unchanged: method, path and query, headers
in their order (Host as the client sent it, so SigV4 signatures still
match), the body streamed (Content-Length or chunked, relayed byte for
byte), and the answer streamed back (chunked when the upstream chunks it).
Hop-by-hop headers (Connection, Keep-Alive, Proxy-*) are not forwarded: each
request gets its own upstream connection; client connections are kept alive.

Admin endpoints, on paths no path-style S3 request has (bucket names start
with a letter or digit); never affected by faults:

  POST /_fault     body: one rule or a JSON list of rules (see below); adds
                   them after the current ones; answers {"rules": [...]}.
  GET /_fault      {"rules": [...], "down": bool}: the rules still armed.
  DELETE /_fault   clears every rule and down mode.
  GET /_stats      {"requests": {"PUT": n, ...} (forwarded or not, by
                   method), "forwarded": n, "faults": {"error 503": n,
                   "delay": n, "reset": n, "down": n}, "rules": [...],
                   "down": bool}
  DELETE /_stats   zeroes the counters.

A rule applies to the next `count` requests it matches (default 1; null:
every one until cleared). The first armed rule that matches a request is
used (and its count spent). Fields:

  method    "PUT", or a list ["PUT", "POST"]; absent: any method
  path      a substring of the request's path and query (e.g. "/lake/dt=",
            or "uploadId=" for the parts of multipart uploads); absent: any
  action    "error" (the default with "status"): answers `status`
                (default 503) with an S3 XML error body: `code` (default
                SlowDown for 503, InternalError for 500, ServiceUnavailable
                otherwise) and `message`;
            "delay" (the default with "delay_ms"): waits `delay_ms` (default
                5000), then forwards;
            "reset": closes the connection with a TCP RST, no answer;
            "down": sugar for {"action": "reset", "count": null} with no
                method or path: down mode, every connection reset until
                DELETE /_fault (the listening socket stays open: clients see
                a reset, not a refused connect).
  after     true: forward the request first (the upstream executes it:
            the object IS written), then answer the fault instead of the
            upstream's answer (error, reset), or delay the answer (delay):
            the case where a client retries something that succeeded.

Usage:
  python3 scripts/s3_fault_proxy.py --upstream http://127.0.0.1:PORT
      [--port 0] [--port-file FILE] [--verbose]

It listens on 127.0.0.1 (port 0: one the kernel picks), prints the port on
the first line of stdout and, with --port-file, writes it there (written to
a temporary name, then renamed: a reader never sees half a number).
"""

import argparse
import collections
import http.client
import json
import socket
import struct
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler
from local_server import serve
from urllib.parse import urlsplit
from xml.sax.saxutils import escape

ADMIN_PATHS = ("/_fault", "/_stats")
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "proxy-authenticate"}
CHUNK = 64 * 1024
DEFAULT_CODES = {503: ("SlowDown", "Please reduce your request rate."),
                 500: ("InternalError", "We encountered an internal error. Please try again.")}


class ClientGone(Exception):
    """The client closed its connection before sending the whole body."""


class Faults:
    """The armed rules and the counters, shared by all handler threads."""

    def __init__(self):
        self.lock = threading.Lock()
        self.rules = []
        self.down = False
        self.reset_stats()

    def reset_stats(self):
        self.requests = collections.Counter()
        self.faults = collections.Counter()
        self.forwarded = 0

    def add(self, rule):
        if not isinstance(rule, dict):
            raise ValueError(f"a rule is a JSON object, not {rule!r}")
        rule = dict(rule)
        action = rule.setdefault("action", "error" if "status" in rule else "delay" if "delay_ms" in rule else None)
        if action == "down":
            with self.lock:
                self.down = True
            return
        if action not in ("error", "delay", "reset"):
            raise ValueError(f"unknown action {action!r} (error, delay, reset, down)")
        if action == "error":
            rule["status"] = int(rule.get("status", 503))
        if action == "delay":
            rule["delay_ms"] = int(rule.get("delay_ms", 5000))
        if isinstance(rule.get("method"), str):
            rule["method"] = [rule["method"]]
        rule.setdefault("count", 1)
        rule["after"] = bool(rule.get("after", False))
        unknown = set(rule) - {"action", "status", "code", "message", "delay_ms", "method", "path", "count", "after"}
        if unknown:
            raise ValueError(f"unknown rule fields {sorted(unknown)}")
        with self.lock:
            self.rules.append(rule)

    def clear(self):
        with self.lock:
            self.rules.clear()
            self.down = False

    def take(self, method, path):
        """Counts the request; returns the rule that applies to it (spending
        one of its count), or None."""
        with self.lock:
            self.requests[method] += 1
            if self.down:
                self.faults["down"] += 1
                return {"action": "reset", "after": False, "down": True}
            for rule in self.rules:
                if rule.get("method") and method not in rule["method"]:
                    continue
                if rule.get("path") and rule["path"] not in path:
                    continue
                if rule["count"] is not None:
                    rule["count"] -= 1
                    if rule["count"] <= 0:
                        self.rules.remove(rule)
                kind = f"error {rule['status']}" if rule["action"] == "error" else rule["action"]
                self.faults[kind] += 1
                return rule
            return None

    def state(self):
        with self.lock:
            return {"requests": dict(self.requests), "forwarded": self.forwarded, "faults": dict(self.faults),
                    "rules": [dict(r) for r in self.rules], "down": self.down}


def error_xml(rule, path):
    code, message = DEFAULT_CODES.get(rule["status"], ("ServiceUnavailable", "Service is unable to handle request."))
    code, message = rule.get("code", code), rule.get("message", message)
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{escape(code)}</Code>'
            f"<Message>{escape(message)}</Message><Resource>{escape(path)}</Resource>"
            f"<RequestId>s3-fault-proxy</RequestId></Error>").encode()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, chunked answers
    faults: Faults
    upstream: tuple  # (host, port)
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("s3_fault_proxy: " + (fmt % args) + "\n")

    # Every method goes through one place: S3 uses GET, PUT, POST, HEAD, DELETE.
    def do_GET(self):
        self.handle_one()

    do_PUT = do_POST = do_HEAD = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    def handle_one(self):
        if self.path.split("?", 1)[0] in ADMIN_PATHS:
            return self.admin()
        rule = self.faults.take(self.command, self.path)
        try:
            if rule is None:
                return self.forward()
            if not rule["after"]:
                if rule["action"] == "delay":
                    time.sleep(rule["delay_ms"] / 1000)
                    return self.forward()
                self.skip_body()
                return self.inject(rule)
            # after: the upstream executes the request; its answer is replaced or held.
            if rule["action"] == "delay":
                return self.forward(delay_ms=rule["delay_ms"])
            self.forward(answer=False)
            return self.inject(rule)
        except (ClientGone, ConnectionError, socket.timeout, http.client.HTTPException):
            # The client gave up (its timeout), or the upstream broke off
            # mid-answer: nothing more to say on this connection.
            self.close_connection = True

    def inject(self, rule):
        if rule["action"] == "reset":
            self.reset()
            return
        body = b"" if self.command == "HEAD" else error_xml(rule, self.path.split("?", 1)[0])
        self.send_response_only(rule["status"])
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "s3-fault-proxy")
        self.end_headers()
        self.wfile.write(body)

    def reset(self):
        """Closes the client's connection with RST (SO_LINGER 0): the client
        sees 'connection reset by peer', never an answer."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self.connection.close()

    # --- the request body, streamed ---

    def body_chunks(self):
        """The request body as raw bytes, framing included for a chunked
        body (relayed byte for byte)."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                yield line
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:  # trailers, then the blank line
                    while True:
                        t = self.rfile.readline(65537)
                        yield t
                        if t in (b"\r\n", b"\n", b""):
                            return
                yield from self.read_exactly(size + 2)  # the data and its CRLF
        else:
            yield from self.read_exactly(int(self.headers.get("Content-Length") or 0))

    def read_exactly(self, left):
        while left:
            b = self.rfile.read(min(CHUNK, left))
            if not b:
                raise ClientGone("closed mid-body")
            left -= len(b)
            yield b

    def skip_body(self):
        for _ in self.body_chunks():
            pass

    # --- forwarding ---

    def forward(self, answer=True, delay_ms=0):
        host, port = self.upstream
        up = http.client.HTTPConnection(host, port, timeout=300)
        try:
            try:
                up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in HOP_BY_HOP:
                        up.putheader(k, v)
                up.endheaders()
                for b in self.body_chunks():
                    up.send(b)
                resp = up.getresponse()
            except (OSError, http.client.HTTPException) as e:
                # The upstream is gone or broke off: answer as a gateway would
                # (the rest of the request body is unread: close after).
                self.close_connection = True
                if answer:
                    body = f"upstream {host}:{port}: {e}\n".encode()
                    self.send_response_only(502)
                    self.send_header("Content-Length", str(len(body)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(body)
                return
            with self.faults.lock:
                self.faults.forwarded += 1
            if not answer:
                resp.read()
                return
            if delay_ms:
                time.sleep(delay_ms / 1000)
            self.relay(resp)
        finally:
            up.close()

    def relay(self, resp):
        self.send_response_only(resp.status, resp.reason)
        chunked = resp.chunked
        for k, v in resp.msg.items():
            if k.lower() in HOP_BY_HOP or k.lower() == "transfer-encoding":
                continue
            self.send_header(k, v)
        no_body = self.command == "HEAD" or resp.status in (204, 304) or 100 <= resp.status < 200
        until_close = not no_body and not chunked and resp.length is None
        if chunked and not no_body:
            self.send_header("Transfer-Encoding", "chunked")
        if until_close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if no_body:
            return
        while True:
            b = resp.read1(CHUNK) if chunked else resp.read(CHUNK)
            if not b:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(b), b) if chunked else b)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")

    # --- admin ---

    def admin(self):
        path = self.path.split("?", 1)[0]
        try:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path == "/_fault" and self.command == "POST":
                doc = json.loads(body or b"{}")
                for rule in doc if isinstance(doc, list) else [doc]:
                    self.faults.add(rule)
                return self.send_json(200, self.faults.state())
            if path == "/_fault" and self.command == "DELETE":
                self.faults.clear()
                return self.send_json(200, self.faults.state())
            if path in ADMIN_PATHS and self.command == "GET":
                return self.send_json(200, self.faults.state())
            if path == "/_stats" and self.command == "DELETE":
                with self.faults.lock:
                    self.faults.reset_stats()
                return self.send_json(200, self.faults.state())
        except (ValueError, TypeError) as e:
            return self.send_json(400, {"error": str(e)})
        self.send_json(404, {"error": f"no admin endpoint {self.command} {path}"})

    def send_json(self, code, doc):
        body = json.dumps(doc).encode()
        self.send_response_only(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--upstream", required=True, help="the S3 endpoint, e.g. http://127.0.0.1:5000")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    up = urlsplit(args.upstream)
    if up.scheme != "http" or not up.hostname:
        ap.error("--upstream must be http://HOST[:PORT]")
    Handler.upstream = (up.hostname, up.port or 80)
    Handler.faults = Faults()
    Handler.verbose = args.verbose

    serve(Handler, args.port, args.port_file)


if __name__ == "__main__":
    main()
