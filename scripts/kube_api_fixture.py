#!/usr/bin/env python3
"""A local stand-in for the Kubernetes API server, for tests and the demo.

No real API server can be installed on the machines this project is built
on, so the tests serve the API's real JSON from here and talk to it with the
real client (kube-rs). Python 3 standard library only.

What it serves, as the real API does (paths, JSON shapes, status codes):

  GET /version, /api, /apis                     discovery (minimal)
  GET /api/v1/{plural}                          list (all namespaces)
  GET /api/v1/namespaces/{ns}/{plural}          list in one namespace
  GET /api/v1/namespaces/{ns}/{plural}/{name}   get (404 Status if absent)
  GET /apis/{group}/{version}/...               the same for apps/v1, batch/v1, ...
  Cluster-scoped kinds (nodes, namespaces): /api/v1/{plural}/{name}.

  Lists: {"kind": "PodList", "apiVersion": "v1", "metadata":
  {"resourceVersion": "N"}, "items": [...]} (items without kind/apiVersion,
  as the real API sends them), paginated with limit/continue.
  Query parameters: fieldSelector (path=value, path==value, path!=value,
  comma-separated; e.g. spec.nodeName=node-1), labelSelector (k=v, k!=v,
  k in (a,b), k notin (a,b), k, !k), limit, continue, resourceVersion,
  resourceVersionMatch, watch, allowWatchBookmarks, timeoutSeconds.

  Watches (?watch=1 or true): a chunked stream of JSON lines
  {"type": "ADDED|MODIFIED|DELETED|BOOKMARK|ERROR", "object": {...}}: the
  events after resourceVersion=N (without it, or with 0: ADDED for every
  current object first), then live ones, BOOKMARKs every --bookmark-secs
  when asked for, until timeoutSeconds. A resourceVersion older than the
  retained history gets one ERROR event with a 410 Expired Status (as the
  real API answers a watch), then the end of the stream; so does an
  expired continue token or resourceVersionMatch=Exact on a list (a 410).
  An object that stops (starts) matching a watch's selectors is DELETED
  (ADDED) for that watch.

One global resourceVersion counts up with every change, as etcd's revision.

Admin endpoints, for tests to change the state (never affected by faults):

  POST or PUT /admin/objects    body: one object, a JSON list of them, or
                                {"items": [...]}: creates or replaces each
                                (ADDED or MODIFIED); metadata.uid,
                                namespace ("default"), creationTimestamp
                                filled in when absent; answers the stored
                                objects as {"items": [...]}.
  DELETE /admin/objects/{plural or Kind}/{namespace}/{name}
  DELETE /admin/objects/{plural or Kind}/{name}      (cluster-scoped)
                                deletes (DELETED); 404 if absent.
  POST /admin/compact           forgets the history: every watch from an
                                earlier resourceVersion gets 410 Gone, and
                                the open watches are ended (their clients
                                come back with their last resourceVersion).
  POST /admin/fault             body {"mode": M, "delay_secs": S}: M is
                                "ok", "down" (connections closed without an
                                answer, open watches cut), "unavailable" (503
                                with a Status), "slow" (every API answer
                                delayed S seconds, default 2) or "garbage"
                                (200 with a body that is not JSON; open
                                watches get a garbage line and end).
  GET /admin/state              {"resourceVersion", "oldestResourceVersion",
                                "fault", "openWatches": {plural: n},
                                "requests": {"list pods": n, "watch pods": n,
                                "get replicasets": n, ..., "fault down": n
                                (requests a fault answered), ...}}

Usage:
  python3 scripts/kube_api_fixture.py [--port 0] [--port-file FILE]
      [--objects FILE.json ...] [--bookmark-secs 1] [--verbose]

It listens on 127.0.0.1 (port 0: one the kernel picks), prints the port on
the first line of stdout and, with --port-file, writes it there (written
to a temporary name, then renamed: a reader never sees half a number).
"""

import argparse
import json
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler
from local_server import serve
from urllib.parse import parse_qs, unquote, urlsplit

# plural -> (group/version, Kind, namespaced). Add a line to serve another kind.
RESOURCES = {
    "pods": ("v1", "Pod", True),
    "services": ("v1", "Service", True),
    "endpoints": ("v1", "Endpoints", True),
    "namespaces": ("v1", "Namespace", False),
    "nodes": ("v1", "Node", False),
    "replicasets": ("apps/v1", "ReplicaSet", True),
    "deployments": ("apps/v1", "Deployment", True),
    "statefulsets": ("apps/v1", "StatefulSet", True),
    "daemonsets": ("apps/v1", "DaemonSet", True),
    "jobs": ("batch/v1", "Job", True),
    "cronjobs": ("batch/v1", "CronJob", True),
    "endpointslices": ("discovery.k8s.io/v1", "EndpointSlice", True),
}
PLURAL_OF_KIND = {kind.lower(): plural for plural, (_, kind, _) in RESOURCES.items()}

# Events kept for watches to resume from; older ones are compacted away.
MAX_HISTORY = 10_000


def status(code, reason, message):
    """A metav1.Status, as the API answers errors."""
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def lookup(obj, path):
    """The value at a dotted field path ("spec.nodeName"), as text; "" if absent."""
    for key in path.split("."):
        obj = obj.get(key) if isinstance(obj, dict) else None
    return "" if obj is None else str(obj)


def parse_field_selector(text):
    """[(path, op, value)] with op "=" or "!="."""
    terms = []
    for term in filter(None, (t.strip() for t in (text or "").split(","))):
        if "!=" in term:
            path, value = term.split("!=", 1)
            terms.append((path, "!=", value))
        else:
            path, value = term.split("==", 1) if "==" in term else term.split("=", 1)
            terms.append((path, "=", value))
    return terms


def split_outside_parens(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [p.strip() for p in parts if p.strip()]


def parse_label_selector(text):
    """[(key, op, values)]: op one of = != in notin exists !exists."""
    terms = []
    for term in split_outside_parens(text or ""):
        words = term.replace("(", " ( ").split()
        if len(words) >= 2 and words[1] in ("in", "notin"):
            values = {v.strip() for v in term.split("(", 1)[1].rstrip(")").split(",")}
            terms.append((words[0], words[1], values))
        elif "!=" in term:
            k, v = term.split("!=", 1)
            terms.append((k.strip(), "!=", {v.strip()}))
        elif "=" in term:
            k, v = term.split("==", 1) if "==" in term else term.split("=", 1)
            terms.append((k.strip(), "=", {v.strip()}))
        elif term.startswith("!"):
            terms.append((term[1:].strip(), "!exists", set()))
        else:
            terms.append((term, "exists", set()))
    return terms


def matches(obj, fields, labels):
    for path, op, value in fields:
        if (lookup(obj, path) == value) != (op == "="):
            return False
    have = (obj.get("metadata") or {}).get("labels") or {}
    for key, op, values in labels:
        present, value = key in have, have.get(key)
        ok = {"=": present and value in values, "!=": not present or value not in values,
              "in": present and value in values, "notin": not present or value not in values,
              "exists": present, "!exists": not present}[op]
        if not ok:
            return False
    return True


class Store:
    """Objects, the global resourceVersion, the event history, faults.

    One lock guards everything; watches wait on its condition for news.
    """

    def __init__(self, bookmark_secs):
        self.cond = threading.Condition()
        self.objects = {}  # (plural, namespace, name) -> object
        self.rv = 0
        self.history = []  # (rv, plural, type, object, previous object)
        self.oldest = 0  # watches from a resourceVersion below this get 410
        self.epoch = 0  # bumped to end every open watch
        self.fault = {"mode": "ok", "delay_secs": 2.0}
        self.watches = {}
        self.requests = {}
        self.bookmark_secs = bookmark_secs

    def count(self, what):
        with self.cond:
            self.requests[what] = self.requests.get(what, 0) + 1

    def _event(self, plural, kind, obj, prev):
        self.history.append((self.rv, plural, kind, obj, prev))
        if len(self.history) > MAX_HISTORY:
            dropped = self.history.pop(0)
            self.oldest = dropped[0]
        self.cond.notify_all()

    def apply(self, obj):
        """Creates or replaces one object; returns it as stored."""
        kind = obj.get("kind", "")
        plural = PLURAL_OF_KIND.get(kind.lower())
        if plural is None:
            raise ValueError(f"kind {kind!r} is not served (see RESOURCES)")
        gv, _, namespaced = RESOURCES[plural]
        meta = obj.setdefault("metadata", {})
        if not meta.get("name"):
            raise ValueError("metadata.name is required")
        obj["apiVersion"] = gv
        if namespaced:
            meta.setdefault("namespace", "default")
        else:
            meta.pop("namespace", None)
        key = (plural, meta.get("namespace", ""), meta["name"])
        with self.cond:
            prev = self.objects.get(key)
            meta.setdefault("uid", (prev or {}).get("metadata", {}).get("uid") or str(uuid.uuid4()))
            meta.setdefault("creationTimestamp", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            self.rv += 1
            meta["resourceVersion"] = str(self.rv)
            self.objects[key] = obj
            self._event(plural, "MODIFIED" if prev else "ADDED", obj, prev)
        return obj

    def delete(self, plural, namespace, name):
        with self.cond:
            prev = self.objects.pop((plural, namespace, name), None)
            if prev is None:
                return None
            self.rv += 1
            gone = json.loads(json.dumps(prev))
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._event(plural, "DELETED", gone, prev)
            return gone

    def compact(self):
        """Forgets the history and ends the open watches."""
        with self.cond:
            self.rv += 1
            self.oldest = self.rv
            self.history.clear()
            self.epoch += 1
            self.cond.notify_all()

    def set_fault(self, mode, delay_secs):
        if mode not in ("ok", "down", "unavailable", "slow", "garbage"):
            raise ValueError(f"unknown fault mode {mode!r}")
        with self.cond:
            self.fault = {"mode": mode, "delay_secs": float(delay_secs)}
            if mode in ("down", "garbage"):
                self.epoch += 1  # open watches are cut
            self.cond.notify_all()

    def state(self):
        with self.cond:
            return {"resourceVersion": str(self.rv), "oldestResourceVersion": str(self.oldest),
                    "fault": dict(self.fault), "openWatches": dict(self.watches),
                    "requests": dict(self.requests), "objects": len(self.objects)}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and chunked watches, as kube-rs expects
    store = None  # set in main()
    verbose = False

    def log_message(self, fmt, *args):
        if self.verbose:
            sys.stderr.write("kube-api-fixture: " + (fmt % args) + "\n")

    # --- plumbing ---

    def send_json(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def send_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return json.loads(self.rfile.read(n) or b"null") if n else None

    def api_fault(self):
        """Applies the fault mode to an API request; True when it answered."""
        fault = self.store.state()["fault"]
        mode = fault["mode"]
        if mode != "ok":
            self.store.count(f"fault {mode}")
        if mode == "slow":
            time.sleep(fault["delay_secs"])
        elif mode == "down":
            self.close_connection = True
            return True
        elif mode == "unavailable":
            self.send_json(503, status(503, "ServiceUnavailable", "the fixture is set unavailable"))
            return True
        elif mode == "garbage":
            data = b"<html>this is not JSON"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return True
        return False

    # --- routing ---

    def do_GET(self):
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        if parts[:1] == ["admin"]:
            return self.admin("GET", parts[1:])
        if self.api_fault():
            return
        if parts == ["version"]:
            return self.send_json(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.0-flowlog-fixture",
                                        "platform": "linux/amd64"})
        if parts == ["api"]:
            return self.send_json(200, {"kind": "APIVersions", "versions": ["v1"]})
        if parts == ["apis"]:
            groups = sorted({gv.split("/")[0] for gv, _, _ in RESOURCES.values() if "/" in gv})
            return self.send_json(200, {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": gv, "version": gv.split("/")[1]}
                                         for gv in sorted({r[0] for r in RESOURCES.values() if r[0].startswith(g + "/")})]}
                for g in groups]})
        route = self.route(parts)
        if route is None:
            return self.send_json(404, status(404, "NotFound", f"the server could not find the requested resource ({url.path})"))
        plural, namespace, name = route
        if name is not None:
            return self.get(plural, namespace, name)
        if query.get("watch") in ("1", "true"):
            return self.watch(plural, namespace, query)
        return self.list(plural, namespace, query)

    def do_POST(self):
        self.admin_write("POST")

    def do_PUT(self):
        self.admin_write("PUT")

    def do_DELETE(self):
        self.admin_write("DELETE")

    def admin_write(self, verb):
        parts = [unquote(p) for p in urlsplit(self.path).path.strip("/").split("/") if p]
        if parts[:1] != ["admin"]:
            return self.send_json(405, status(405, "MethodNotAllowed", "this fixture changes state only through /admin"))
        self.admin(verb, parts[1:])

    def route(self, parts):
        """(plural, namespace or None, name or None) of an API path; None if not served."""
        if parts[:2] == ["api", "v1"]:
            gv, rest = "v1", parts[2:]
        elif parts[:1] == ["apis"] and len(parts) >= 3:
            gv, rest = f"{parts[1]}/{parts[2]}", parts[3:]
        else:
            return None
        namespace = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            namespace, rest = rest[1], rest[2:]
        if not rest or len(rest) > 2 or rest[0] not in RESOURCES:
            return None
        rgv, _, namespaced = RESOURCES[rest[0]]
        if rgv != gv or (namespace is not None and not namespaced):
            return None
        name = rest[1] if len(rest) == 2 else None
        if name is not None and namespaced and namespace is None:
            return None
        return rest[0], namespace, name

    # --- the read API ---

    def get(self, plural, namespace, name):
        self.store.count(f"get {plural}")
        with self.store.cond:
            obj = self.store.objects.get((plural, namespace or "", name))
        if obj is None:
            body = status(404, "NotFound", f'{plural} "{name}" not found')
            body["details"] = {"name": name, "kind": plural}
            return self.send_json(404, body)
        self.send_json(200, obj)

    def selected(self, plural, namespace, query):
        fields = parse_field_selector(query.get("fieldSelector"))
        labels = parse_label_selector(query.get("labelSelector"))

        def keep(obj):
            ns = (obj.get("metadata") or {}).get("namespace", "")
            return (namespace is None or ns == namespace) and matches(obj, fields, labels)
        return keep

    def list(self, plural, namespace, query):
        self.store.count(f"list {plural}")
        keep = self.selected(plural, namespace, query)
        gv, kind, _ = RESOURCES[plural]
        token = query.get("continue")
        with self.store.cond:
            exact = query.get("resourceVersionMatch") == "Exact" and query.get("resourceVersion")
            asked = int(token.split(":")[0]) if token else int(exact) if exact else None
            if asked is not None and asked < self.store.oldest:
                return self.send_json(410, status(410, "Expired", "too old resource version: "
                                                  f"{asked} ({self.store.oldest})"))
            rv = asked if token else self.store.rv
            items = sorted((o for (p, _, _), o in self.store.objects.items() if p == plural and keep(o)),
                           key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]))
        start = int(token.split(":")[1]) if token else 0
        limit = int(query.get("limit") or 0) or len(items) + 1
        page = items[start:start + limit]
        meta = {"resourceVersion": str(rv)}
        if start + limit < len(items):
            meta["continue"] = f"{rv}:{start + limit}"
        # List items carry no kind/apiVersion, as the real API sends them.
        strip = [{k: v for k, v in o.items() if k not in ("kind", "apiVersion")} for o in page]
        self.send_json(200, {"kind": f"{kind}List", "apiVersion": gv, "metadata": meta, "items": strip})

    def watch(self, plural, namespace, query):
        store = self.store
        store.count(f"watch {plural}")
        keep = self.selected(plural, namespace, query)
        gv, kind, _ = RESOURCES[plural]
        timeout = float(query.get("timeoutSeconds") or 1800)
        bookmarks = query.get("allowWatchBookmarks") in ("1", "true")
        since = query.get("resourceVersion") or "0"
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

        def send(kind_, obj):
            self.send_chunk(json.dumps({"type": kind_, "object": obj}).encode() + b"\n")

        with store.cond:
            store.watches[plural] = store.watches.get(plural, 0) + 1
            epoch = store.epoch
            if since == "0":  # from the current state: every object first
                initial = [o for (p, _, _), o in store.objects.items() if p == plural and keep(o)]
                cursor = store.rv
            elif int(since) < store.oldest:
                initial, cursor = None, None
            else:
                initial, cursor = [], int(since)
        try:
            if initial is None:
                send("ERROR", status(410, "Expired", f"too old resource version: {since} ({store.oldest})"))
                self.send_chunk(b"")
                return
            for obj in initial:
                send("ADDED", obj)
            deadline = time.monotonic() + timeout
            next_bookmark = time.monotonic() + store.bookmark_secs
            while True:
                with store.cond:
                    store.cond.wait(max(0.0, min(deadline, next_bookmark) - time.monotonic()))
                    if store.epoch != epoch:
                        if store.fault["mode"] == "garbage":
                            self.send_chunk(b"this is not a watch event\n")
                        if store.fault["mode"] == "down":
                            self.close_connection = True
                            return
                        break
                    if cursor < store.oldest:  # fell behind the retained history
                        news = None
                    else:
                        news = [e for e in store.history if e[0] > cursor and e[1] == plural]
                    rv_now = store.rv
                if news is None:
                    send("ERROR", status(410, "Expired", f"too old resource version: {cursor}"))
                    break
                for ev_rv, _, ev_type, obj, prev in news:
                    now_in, was_in = keep(obj), prev is not None and keep(prev)
                    if ev_type == "DELETED":
                        if was_in:
                            send("DELETED", obj)
                    elif now_in:
                        send("MODIFIED" if was_in else "ADDED", obj)
                    elif was_in:  # no longer selected: gone, for this watch
                        send("DELETED", obj)
                    cursor = ev_rv
                if time.monotonic() >= deadline:
                    break
                if time.monotonic() >= next_bookmark:
                    cursor = max(cursor, rv_now)
                    if bookmarks:
                        send("BOOKMARK", {"kind": kind, "apiVersion": gv, "metadata": {"resourceVersion": str(cursor)}})
                    next_bookmark = time.monotonic() + store.bookmark_secs
            self.send_chunk(b"")  # the end of the stream
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            with store.cond:
                store.watches[plural] -= 1

    # --- admin ---

    def admin(self, verb, parts):
        store = self.store
        try:
            if verb in ("POST", "PUT") and parts == ["objects"]:
                body = self.body()
                items = body if isinstance(body, list) else body.get("items", [body]) if isinstance(body, dict) else []
                return self.send_json(200, {"items": [store.apply(o) for o in items]})
            if verb == "DELETE" and parts[:1] == ["objects"] and len(parts) in (3, 4):
                plural = PLURAL_OF_KIND.get(parts[1].lower(), parts[1])
                namespace, name = (parts[2], parts[3]) if len(parts) == 4 else ("", parts[2])
                gone = store.delete(plural, namespace, name)
                if gone is None:
                    return self.send_json(404, status(404, "NotFound", f"{plural} {namespace}/{name} not found"))
                return self.send_json(200, gone)
            if verb == "POST" and parts == ["compact"]:
                store.compact()
                return self.send_json(200, store.state())
            if verb == "POST" and parts == ["fault"]:
                body = self.body() or {}
                store.set_fault(body.get("mode", "ok"), body.get("delay_secs", 2))
                return self.send_json(200, store.state())
            if verb == "GET" and parts == ["state"]:
                return self.send_json(200, store.state())
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return self.send_json(400, status(400, "BadRequest", str(e)))
        self.send_json(404, status(404, "NotFound", f"no admin endpoint {verb} /admin/{'/'.join(parts)}"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--port-file")
    ap.add_argument("--objects", action="append", default=[], help="JSON file: an object, a list, or {items: [...]}")
    ap.add_argument("--bookmark-secs", type=float, default=1.0)
    ap.add_argument("--verbose", action="store_true")
    args = ap.parse_args()

    Handler.store = Store(args.bookmark_secs)
    Handler.verbose = args.verbose
    for path in args.objects:
        with open(path) as f:
            body = json.load(f)
        for obj in body if isinstance(body, list) else body.get("items", [body]):
            Handler.store.apply(obj)

    serve(Handler, args.port, args.port_file)


if __name__ == "__main__":
    main()
