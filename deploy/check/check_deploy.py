#!/usr/bin/env python3
"""Checks everything under deploy/ (called by scripts/check-deploy.sh, which
installs the tools and passes their paths in the environment).

Each check prints one line; any problem makes the exit status non-zero.
`--update` rewrites deploy/kubernetes/flowlog.yaml from the chart first.
"""

import functools
import json
import os
import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import config_reference as configref  # noqa: E402  (scripts/config_reference.py)
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "flowlog"
HELM = os.environ.get("HELM", "helm")
PROMTOOL = os.environ.get("PROMTOOL", "promtool")
K8S_VERSIONS = ["1.25.0", "1.37.0"]  # the chart's kubeVersion floor and the newest schemas
RELEASE, NAMESPACE = "flowlog", "flowlog"
VARIANTS = {  # values files rendered besides the defaults
    "all": DEPLOY / "check" / "values-all.yaml",
    "hpa": DEPLOY / "check" / "values-hpa.yaml",
    "fixed": DEPLOY / "check" / "values-fixed.yaml",
    "pvc": DEPLOY / "check" / "values-pvc.yaml",
}
# The one value the chart requires (enricher.output.bucket, for the default S3
# output), given to every render "with default values" and to the plain
# manifests. AWS reserves the amzn-s3-demo- prefix for examples: no one can
# own this bucket, so a forgotten placeholder fails instead of writing
# somewhere.
DEFAULT_SETS = ["--set", "enricher.output.bucket=amzn-s3-demo-bucket"]
# What each render's enricher output must be: the `output` and
# `output_formats` of its settings file (None: the file is in a Secret), the
# volume at /data (None: none, and no PVC), the PVC's access mode, the Secret
# the S3 credentials come from, and [s3] settings.
OUTPUT_EXPECT = {
    "defaults": {"output": "s3://amzn-s3-demo-bucket/flowlog/enriched", "formats": ["avro"], "volume": None},
    "all": {"output": "s3://amzn-s3-demo-bucket/prod/flows", "formats": ["avro", "parquet"], "volume": None,
            "aws_secret": "flowlog-enricher-s3",
            "s3": {"endpoint_url": "https://minio.storage.svc:9000", "region": "eu-west-1"}},
    "hpa": {"output": None, "volume": "persistentVolumeClaim"},
    "fixed": {"output": "/data", "formats": ["avro"], "volume": "emptyDir"},
    "pvc": {"output": "/data", "formats": ["avro", "parquet"], "volume": "persistentVolumeClaim",
            "access": "ReadWriteOnce"},
}
# Values the chart must refuse (helm template fails naming the mistake).
REFUSED = [
    ([], "enricher.output.bucket is required"),
    (DEFAULT_SETS + ["--set", "enricher.output.formats={csv}"], "csv is not avro or parquet"),
    (["--set", "enricher.output.type=nfs"], "enricher.output.type must be s3, pvc or emptyDir"),
    (["--set", "enricher.output.type=pvc", "--set", "enricher.output.accessMode=ReadWriteOnce"],
     "ReadWriteOnce holds one replica"),
]

failures: list[str] = []
checks = 0


def ok(msg: str) -> None:
    global checks
    checks += 1
    print(f"  ok    {msg}")


def fail(msg: str) -> None:
    global checks
    checks += 1
    failures.append(msg)
    print(f"  FAIL  {msg}")


def skip(msg: str) -> None:
    # Under `make test` (after cargo test built both binaries) nothing may be skipped.
    if os.environ.get("FLOWLOG_DEPLOY_NO_SKIP") == "1":
        fail(f"{msg} (FLOWLOG_DEPLOY_NO_SKIP=1)")
        return
    print(f"  skip  {msg}")


def section(title: str) -> None:
    print(f"\n== {title}")


def run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def rel(p: Path) -> str:
    try:
        return str(Path(p).relative_to(ROOT))
    except ValueError:
        return str(p)


# --------------------------------------------------------------------------
# What the binaries really accept (their --print-config-reference) and export.
# --------------------------------------------------------------------------

TOML_TYPES = {  # reference type -> (python types, what the file must give)
    "integer": ((int,), "an integer"),
    "boolean": ((bool,), "true/false"),
    "string": ((str,), "a string"),
    "path": ((str,), "a string"),
    "one of": ((str,), "a string"),
    "list of strings": ((list,), "a list"),
    "list of integers": ((list,), "a list"),
    "table of strings": ((dict,), "a table"),
}


@functools.lru_cache(maxsize=None)
def config_reference(binary: str, executable: Path | None) -> dict | None:
    """The binary's settings (and metrics): the built binary's own reference,
    else cargo builds it. Cached: each binary runs once per check."""
    try:
        return configref.reference(binary, executable)
    except configref.ReferenceError as e:
        fail(f"{binary} --print-config-reference: {e}")
        return None


def check_toml_keys(data: dict, ref: dict, section: str = "") -> list[str]:
    """Unknown keys (the binaries refuse them) and wrong types, recursively."""
    settings = {s["key"]: s for s in ref["settings"]}
    sections = {s["section"] for s in ref["sections"]}
    errs = []
    for k, v in data.items():
        key = f"{section}.{k}" if section else k
        if key in sections:
            if isinstance(v, dict):
                errs += check_toml_keys(v, ref, key)
            else:
                errs.append(f"{key} is a section ([{key}]) but the file gives {v!r}")
            continue
        s = settings.get(key)
        if s is None:
            errs.append(f"unknown key {key!r} (not a {ref['binary']} setting)")
            continue
        types, want = TOML_TYPES.get(s["type"], ((object,), s["type"]))
        if not isinstance(v, types) or (types == (int,) and isinstance(v, bool)):
            errs.append(f"{key} = {v!r}: {s['type']} wants {want}")
        elif s["type"] == "one of" and v not in [x["value"] for x in s["values"]]:
            errs.append(f"{key} = {v!r}: not one of {[x['value'] for x in s['values']]}")
        elif s["type"] == "table of strings" and any(not isinstance(x, str) for x in v.values()):
            errs.append(f"{key}: values must be strings")
        elif s["type"] == "list of strings" and any(not isinstance(x, str) for x in v):
            errs.append(f"{key}: items must be strings")
        elif s["type"] == "list of integers" and any(not isinstance(x, int) or isinstance(x, bool) for x in v):
            errs.append(f"{key}: items must be integers")
    return errs


def setting(ref: dict, key: str) -> dict:
    """One setting of the reference."""
    for s in ref["settings"]:
        if s["key"] == key:
            return s
    raise KeyError(f"{ref['binary']} has no setting {key}")


def effective(cfg: dict, ref: dict, key: str):
    """A top-level setting's value in a config file, or the binary's default."""
    return cfg.get(key, setting(ref, key)["default"])


@functools.lru_cache(maxsize=None)
def exported_metrics() -> tuple[set[str], dict[str, str]]:
    """Every series name the two binaries export (from their own references:
    every metric they describe), and each name's crate source text (where
    label names and values are looked up)."""
    names: set[str] = set()
    src_of: dict[str, str] = {}
    for binary, crate, exe in (("flowlog-sidecar", "flowlog-sidecar", SIDECAR_BIN), ("flowlog-enricher", "enricher", ENRICHER_BIN)):
        ref = config_reference(binary, exe) or {}
        all_src = "\n".join(p.read_text() for p in (ROOT / crate / "src").rglob("*.rs"))
        for m in ref.get("metrics", []):
            suffixes = ("_bucket", "_sum", "_count", "") if m["kind"] == "histogram" else ("",)
            for suffix in suffixes:
                names.add(m["name"] + suffix)
                src_of[m["name"] + suffix] = all_src
        if not ref.get("metrics"):
            fail(f"{binary} --print-config-reference lists no metrics")
    return names, src_of


METRIC_RE = re.compile(r"\bflowlog_(?:sidecar|enricher)_[a-z0-9_]+\b")
SELECTOR_RE = re.compile(r"\b(flowlog_(?:sidecar|enricher)_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def check_metric_refs(where: str, text: str, exported: set[str], src_of: dict[str, str]) -> None:
    used = set(METRIC_RE.findall(text))
    unknown = sorted(used - exported)
    if unknown:
        fail(f"{where}: metrics no binary exports: {', '.join(unknown)}")
    else:
        ok(f"{where}: {len(used)} flowlog metrics, all exported")
    # Label names and literal label values on flowlog metrics must appear in the source.
    bad = []
    for name, body in SELECTOR_RE.findall(text):
        src = src_of.get(name)
        if src is None:
            continue
        for label, op, value in MATCHER_RE.findall(body):
            if label in ("instance", "job", "namespace", "pod", "node"):  # added by the scrape
                continue
            if f'"{label}" =>' not in src:
                bad.append(f"{name}{{{label}}}: label not set by the code")
                continue
            if op in ("=", "!=") or (op == "=~" and re.fullmatch(r"[\w|]+", value)):
                for v in value.split("|") if op == "=~" else [value]:
                    if v and f'"{v}"' not in src:
                        bad.append(f'{name}{{{label}="{v}"}}: value not in the code')
    if bad:
        fail(f"{where}: " + "; ".join(sorted(set(bad))))
    elif used:
        ok(f"{where}: label names/values on flowlog metrics exist in the code")


# --------------------------------------------------------------------------
# Config files: keys and types against the binaries' reference, and their own --check-config when built.
# --------------------------------------------------------------------------

def newest_binary(name: str, crate: str) -> Path | None:
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    cands = [target / p / name for p in ("release", "debug")]
    cands = [c for c in cands if c.is_file() and os.access(c, os.X_OK)]
    if not cands:
        return None
    b = max(cands, key=lambda c: c.stat().st_mtime)
    srcs = [p for d in (crate, "flowlog-settings", "flowlog-runtime", "flowlog-schema") for p in (ROOT / d / "src").rglob("*.rs")]
    src_mtime = max(p.stat().st_mtime for p in srcs)
    if b.stat().st_mtime < src_mtime:
        return None  # stale: older than its sources
    return b


SIDECAR_BIN = None
ENRICHER_BIN = None
CLEAN_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"}


def strip_static_map(text: str) -> str:
    """The config without its top-level static_map line (the path is the pod's)."""
    return "\n".join(l for l in text.splitlines() if not re.match(r"\s*static_map\s*=", l)) + "\n"


def validate_config_toml(where: str, text: str, ref: dict | None, binary: Path | None, name: str) -> None:
    """Keys and types against the binary's reference, then the binary's own
    --check-config (parse + every validation, no kernel or Kafka I/O)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(f"{where}: not TOML: {e}")
        return
    if ref is not None:
        errs = check_toml_keys(data, ref)
        # Also checked without a built binary.
        # Unset, wakeup_bytes is a quarter of the ring, always below it.
        wakeup = effective(data, ref, "wakeup_bytes") if name == "flowlog-sidecar" else None
        if wakeup is not None and wakeup >= effective(data, ref, "ring_buffer_bytes"):
            errs.append("wakeup_bytes must be below ring_buffer_bytes")
        if errs:
            fail(f"{where}: " + "; ".join(errs))
        else:
            ok(f"{where}: keys and types match {name} --print-config-reference")
    if binary is None:
        skip(f"{where}: {name} not built (or older than its sources): not run")
        return
    # A static map the file names may not exist here: it is checked separately.
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(strip_static_map(text))
        f.flush()
        r = run([str(binary), "--config", f.name, "--check-config"], env=CLEAN_ENV, timeout=30)
    err = r.stderr.strip()
    if r.returncode == 0 and "configuration OK" in r.stdout:
        ok(f"{where}: accepted by {rel(binary)} (parse + validation)")
    else:
        fail(f"{where}: {rel(binary)} refused it: {err.splitlines()[-1] if err else r.returncode}")


def validate_static_map(where: str, text: str) -> None:
    import ipaddress
    src = (ROOT / "enricher" / "src" / "sources" / "cidr.rs").read_text()
    m = re.search(r"const KEYS: \[&str; \d+\] = \[(.*?)\];", src, re.S)
    keys = set(re.findall(r'"(\w+)"', m.group(1))) if m else set()
    errs = []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        fail(f"{where}: not TOML: {e}")
        return
    if set(data) - {"entry"}:
        errs.append(f"unknown top-level keys {sorted(set(data) - {'entry'})}")
    for i, e in enumerate(data.get("entry", []), 1):
        for k in e:
            if keys and k not in keys:
                errs.append(f"entry {i}: unknown key {k!r}")
        try:
            ipaddress.ip_network(e.get("cidr", ""), strict=False)
        except ValueError:
            errs.append(f"entry {i}: bad cidr {e.get('cidr')!r}")
    if errs:
        fail(f"{where}: " + "; ".join(errs))
    else:
        ok(f"{where}: {len(data.get('entry', []))} static-map entries, keys as in cidr.rs")
    if ENRICHER_BIN is None:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".toml") as f:
        f.write(text)
        f.flush()
        r = run([str(ENRICHER_BIN), "--static-map", f.name, "--check-config"], env=CLEAN_ENV, timeout=30)
    if r.returncode != 0 or "configuration OK" not in r.stdout:
        err = r.stderr.strip()
        fail(f"{where}: {rel(ENRICHER_BIN)} refused it: {err.splitlines()[-1] if err else r.returncode}")
    else:
        ok(f"{where}: loaded by {rel(ENRICHER_BIN)}")


# --------------------------------------------------------------------------
# Helm chart and Kubernetes manifests
# --------------------------------------------------------------------------

def helm_template(values: Path | None) -> str | None:
    cmd = [HELM, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
    cmd += ["-f", str(values)] if values else DEFAULT_SETS
    r = run(cmd)
    if r.returncode != 0:
        fail(f"helm template {values.name if values else '(defaults)'}: {r.stderr.strip()}")
        return None
    return r.stdout


CRD_SCHEMAS = json.loads((DEPLOY / "check" / "crd-schemas.json").read_text())


def validate_docs(where: str, docs: list[dict]) -> None:
    import jsonschema
    import kubernetes_validate as kv
    kinds = []
    for d in docs:
        kind, api = d.get("kind"), d.get("apiVersion")
        name = f"{kind}/{d.get('metadata', {}).get('name')}"
        kinds.append(kind)
        key = f"{api}/{kind}"
        if key in CRD_SCHEMAS:
            try:
                jsonschema.validate(d, CRD_SCHEMAS[key])
            except jsonschema.ValidationError as e:
                fail(f"{where}: {name}: {e.message} at {'/'.join(map(str, e.absolute_path))}")
                continue
            ok(f"{where}: {name} valid ({key}, vendored CRD schema)")
            continue
        good = True
        for v in K8S_VERSIONS:
            try:
                kv.validate(d, v, strict=True)
            except kv.SchemaNotFoundError:
                fail(f"{where}: {name}: no schema for {key} (add one to deploy/check/crd-schemas.json)")
                good = False
                break
            except kv.ValidationError as e:
                fail(f"{where}: {name}: invalid for Kubernetes {v}: {e.message} at {'/'.join(map(str, e.path))}")
                good = False
                break
        if good:
            ok(f"{where}: {name} valid against Kubernetes {' and '.join(K8S_VERSIONS)} schemas (strict)")


def load_docs(text: str) -> list[dict]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_kind(docs, kind):
    return [d for d in docs if d.get("kind") == kind]


def kubernetes_access(docs: list[dict], ds: dict, c: dict, sidecar_ref) -> str | list[str]:
    """With the pod watch on (workload.kubernetes.enabled in the environment):
    the node's name from the Downward API, the token mounted, and a ClusterRole
    bound to the DaemonSet's ServiceAccount granting what the watch needs.
    A description when right, the problems when not."""
    env_of = lambda key, default: setting(sidecar_ref, key)["env"] if sidecar_ref else default
    env = {e["name"]: e for e in c.get("env", [])}
    spec = ds["spec"]["template"]["spec"]
    if env.get(env_of("workload.kubernetes.enabled", "FLOWLOG_WORKLOAD_KUBERNETES"), {}).get("value") != "true":
        if spec.get("automountServiceAccountToken") is not False:
            return ["no pod watch, yet the service account token is mounted"]
        return "no Kubernetes API access"
    problems = []
    node = env.get(env_of("workload.kubernetes.node_name", "FLOWLOG_NODE_NAME"), {})
    if node.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "spec.nodeName":
        problems.append("the pod watch needs the node's name from fieldRef spec.nodeName")
    if spec.get("automountServiceAccountToken") is not True:
        problems.append("the pod watch needs the service account token mounted")
    needed = {("", "pods", v) for v in ("get", "list", "watch")} | {("apps", "replicasets", "get"), ("batch", "jobs", "get")}
    problems += rbac_problems(docs, spec.get("serviceAccountName"), needed, "the pod watch")
    return problems or "pod watch with the node's name, its token, and exactly its RBAC"


def rbac_problems(docs: list[dict], sa: str, needed: set, what: str) -> list[str]:
    """What the ClusterRoles bound to ServiceAccount `sa` grant, against exactly `needed`."""
    roles = {r["metadata"]["name"]: r for r in by_kind(docs, "ClusterRole")}
    granted = set()
    for b in by_kind(docs, "ClusterRoleBinding"):
        if any(s.get("kind") == "ServiceAccount" and s.get("name") == sa for s in b.get("subjects", [])):
            for rule in roles.get(b["roleRef"]["name"], {}).get("rules", []):
                granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    problems = []
    if needed - granted:
        problems.append(f"ServiceAccount {sa} lacks {sorted(needed - granted)}")
    if granted - needed:
        problems.append(f"ServiceAccount {sa} is granted more than {what} needs: {sorted(granted - needed)}")
    return problems


def services_watch_access(docs: list[dict], dep: dict, c: dict, enricher_ref) -> str | list[str]:
    """With the enricher's Services watch on (kubernetes.services in the
    environment): the token mounted and exactly list/watch on services bound
    to the Deployment's ServiceAccount; with it off, no token. A description
    when right, the problems when not."""
    env_name = setting(enricher_ref, "kubernetes.services")["env"] if enricher_ref else "FLOWLOG_ENRICHER_KUBERNETES_SERVICES"
    env = {e["name"]: e for e in c.get("env", [])}
    spec = dep["spec"]["template"]["spec"]
    if env.get(env_name, {}).get("value") != "true":
        if spec.get("automountServiceAccountToken") is not False:
            return ["no Services watch, yet the service account token is mounted"]
        return "no Kubernetes API access"
    problems = [] if spec.get("automountServiceAccountToken") is True else ["the Services watch needs the service account token mounted"]
    problems += rbac_problems(docs, spec.get("serviceAccountName"), {("", "services", v) for v in ("list", "watch")}, "the Services watch")
    return problems or "Services watch with its token and exactly its RBAC"


# The pod's address from the Downward API, which the metrics endpoint binds:
# what an in-cluster Prometheus scrapes (with hostNetwork: the node's
# InternalIP), and not every address of the node as 0.0.0.0 would be.
POD_IP_ENV = "FLOWLOG_POD_IP"


def wildcard_bind(listen: str) -> bool:
    """True when a metrics_listen value binds every address of the host."""
    host = listen.rsplit(":", 1)[0] if ":" in listen else listen
    return host.strip("[]") in ("", "0.0.0.0", "::", "*")


def check_metrics_listen(where: str, text: str, ref: dict | None) -> None:
    """A shipped config file never binds /metrics on every address."""
    if ref is None:
        return
    listen = effective(tomllib.loads(text), ref, "metrics_listen")
    if wildcard_bind(listen):
        fail(f"{where}: metrics_listen = {listen!r} binds every address (use 127.0.0.1, or the host's private address)")
    else:
        ok(f"{where}: metrics_listen = {listen!r}, not every address")


def pod_metrics_problems(c: dict, ref: dict | None, default_env: str) -> list[str]:
    """The container binds /metrics on the pod's own address: the metrics
    port's env var is $(FLOWLOG_POD_IP):<containerPort>, FLOWLOG_POD_IP
    from status.podIP, defined before it (Kubernetes expands only earlier
    variables)."""
    listen_env = setting(ref, "metrics_listen")["env"] if ref else default_env
    names = [e["name"] for e in c.get("env", [])]
    env = {e["name"]: e for e in c.get("env", [])}
    port = next((p["containerPort"] for p in c.get("ports", []) if p.get("name") == "metrics"), None)
    problems = []
    if env.get(POD_IP_ENV, {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") != "status.podIP":
        problems.append(f"{POD_IP_ENV} must come from fieldRef status.podIP")
    value = env.get(listen_env, {}).get("value", "")
    if wildcard_bind(value) or POD_IP_ENV not in value or value.rsplit(":", 1)[-1] != str(port):
        problems.append(f"{listen_env} = {value!r}: want $({POD_IP_ENV}):{port} (the pod's address, the metrics port)")
    elif names.index(POD_IP_ENV) > names.index(listen_env):
        problems.append(f"{POD_IP_ENV} must be defined before {listen_env}")
    return problems


def output_access(docs: list[dict], dep: dict, c: dict, cfg: dict | None, expect: dict) -> str | list[str]:
    """The enricher's output as `expect` says: the settings' output and
    formats, the /data volume only for a directory output (no PVC for S3),
    a ReadWriteOnce PVC only for one replica replaced by Recreate, and S3
    credentials from the expected Secret (else none in the environment).
    A description when right, the problems when not."""
    spec = dep["spec"]["template"]["spec"]
    vols = {v["name"]: v for v in spec["volumes"]}
    data_mounted = any(m["mountPath"] == "/data" and m["name"] == "output" for m in c["volumeMounts"])
    problems = []
    if cfg is not None:
        got = (cfg.get("output"), cfg.get("output_formats"))
        if got != (expect["output"], expect["formats"]):
            problems.append(f"output, output_formats = {got}, want {(expect['output'], expect['formats'])}")
        if any(cfg.get("s3", {}).get(k) != v for k, v in expect.get("s3", {}).items()):
            problems.append(f"[s3] = {cfg.get('s3')}, want {expect['s3']}")
        if not str(cfg.get("output")).startswith("s3://") and cfg.get("output") != "/data":
            problems.append(f"output {cfg.get('output')!r} is neither s3:// nor the /data volume")
    elif expect["output"] is not None:
        problems.append("no rendered enricher.toml")
    kind = expect["volume"]
    out = vols.get("output")
    if kind is None:
        if out or data_mounted:
            problems.append("an S3 output, yet an output volume is mounted")
        if by_kind(docs, "PersistentVolumeClaim"):
            problems.append("an S3 output, yet a PVC is rendered")
    elif not (out and kind in out and data_mounted):
        problems.append(f"output volume ({kind}) not mounted at /data")
    claim = (out or {}).get("persistentVolumeClaim", {}).get("claimName")
    pvcs = {p["metadata"]["name"]: p for p in by_kind(docs, "PersistentVolumeClaim")}
    if claim in pvcs:
        modes = pvcs[claim]["spec"]["accessModes"]
        if modes != [expect.get("access", "ReadWriteMany")]:
            problems.append(f"PVC access modes {modes}, want {[expect.get('access', 'ReadWriteMany')]}")
        scaled = any(s["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
                     for s in by_kind(docs, "ScaledObject") + by_kind(docs, "HorizontalPodAutoscaler"))
        if "ReadWriteMany" not in modes and (scaled or dep["spec"].get("replicas") != 1
                                             or dep["spec"].get("strategy", {}).get("type") != "Recreate"):
            problems.append("a PVC that is not ReadWriteMany needs exactly one replica, no autoscaler, strategy Recreate")
    env = {e["name"]: e for e in c.get("env", [])}
    secret = expect.get("aws_secret")
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        ref = env.get(key, {}).get("valueFrom", {}).get("secretKeyRef", {})
        if (ref.get("name"), ref.get("key")) != ((secret, key) if secret else (None, None)):
            problems.append(f"{key} from {ref or 'nowhere'}, want {f'Secret {secret}' if secret else 'none'}")
    if problems:
        return problems
    where = cfg.get("output") if cfg else f"a {kind} at /data (settings in a Secret)"
    return f"output {where}" + (f", credentials from Secret {secret}" if secret else "")


def semantic_checks(where: str, docs: list[dict], sidecar_ref, enricher_ref, expect: dict) -> None:
    """What the chart promises, on the rendered objects."""
    cms = {d["metadata"]["name"]: d for d in by_kind(docs, "ConfigMap")}
    enricher_cfg = None
    for cm in cms.values():
        for key, text in (cm.get("data") or {}).items():
            w = f"{where}: ConfigMap {cm['metadata']['name']}/{key}"
            if key == "sidecar.toml":
                validate_config_toml(w, text, sidecar_ref, SIDECAR_BIN, "flowlog-sidecar")
                check_metrics_listen(w, text, sidecar_ref)
            elif key == "enricher.toml":
                validate_config_toml(w, text, enricher_ref, ENRICHER_BIN, "flowlog-enricher")
                check_metrics_listen(w, text, enricher_ref)
                enricher_cfg = tomllib.loads(text)
            elif key == "cidrs.toml":
                validate_static_map(w, text)
    for ds in by_kind(docs, "DaemonSet"):
        spec = ds["spec"]["template"]["spec"]
        c = spec["containers"][0]
        sc = c.get("securityContext", {})
        caps = sc.get("capabilities", {})
        problems = []
        if not spec.get("hostNetwork"):
            problems.append("hostNetwork must be true")
        # The records' pids come from the kernel (the node's pids whatever
        # the pod's PID namespace): the host's PID namespace only serves
        # finding other containers' network namespaces from their pids,
        # which needs SYS_ADMIN and SYS_PTRACE too.
        if spec.get("hostPID") and not {"SYS_ADMIN", "SYS_PTRACE"} <= set(caps.get("add", [])):
            problems.append("hostPID without SYS_ADMIN + SYS_PTRACE (it only serves entering other containers' namespaces)")
        if sc.get("privileged") is not False or sc.get("allowPrivilegeEscalation") is not False:
            problems.append("must be privileged: false, allowPrivilegeEscalation: false")
        if caps.get("drop") != ["ALL"] or caps.get("add", [])[:2] != ["BPF", "PERFMON"]:
            problems.append(f"capabilities must drop ALL and add BPF, PERFMON (got {caps})")
        # Pods' IPs come from the Kubernetes API: entering namespaces
        # (SYS_ADMIN, SYS_PTRACE) is never granted by the chart's values here.
        for cap in ("SYS_ADMIN", "SYS_PTRACE"):
            if cap in caps.get("add", []):
                problems.append(f"CAP_{cap} added")
        if where in ("chart[defaults]", "kubernetes/flowlog.yaml") and caps.get("add") != ["BPF", "PERFMON"]:
            problems.append(f"by default exactly BPF, PERFMON (got {caps.get('add')})")
        # uid 0 only for the capabilities (no ambient capabilities for other
        # uids in Kubernetes) and the node's root-owned spool directory.
        if sc.get("runAsUser") != 0 or sc.get("readOnlyRootFilesystem") is not True:
            problems.append("runAsUser 0 with a read-only root file system")
        problems += pod_metrics_problems(c, sidecar_ref, "FLOWLOG_METRICS_LISTEN")
        res = c.get("resources", {})
        if not (res.get("requests", {}).get("memory") and res.get("limits", {}).get("memory")):
            problems.append("memory request and limit required")
        env = {e["name"] for e in c.get("env", [])}
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        host_id_env = setting(sidecar_ref, "identity.host_id")["env"] if sidecar_ref else "FLOWLOG_HOST_ID"
        if host_id_env not in env and "/etc/machine-id" not in mounts:
            problems.append(f"no node identity ({host_id_env} or /etc/machine-id)")
        if "/var/lib/flowlog/spool" not in mounts:
            problems.append("spool not mounted at /var/lib/flowlog/spool")
        kube = kubernetes_access(docs, ds, c, sidecar_ref)
        if isinstance(kube, list):
            problems += kube
        if problems:
            fail(f"{where}: DaemonSet {ds['metadata']['name']}: " + "; ".join(problems))
        else:
            ok(f"{where}: DaemonSet unprivileged with CAP_BPF+CAP_PERFMON, host network{', host PID' if spec.get('hostPID') else ', own PID namespace'}, /metrics on the pod IP, node identity, spool, limits; {kube}")
    deps = {d["metadata"]["name"]: d for d in by_kind(docs, "Deployment")}
    for so in by_kind(docs, "ScaledObject") + by_kind(docs, "HorizontalPodAutoscaler"):
        target = so["spec"]["scaleTargetRef"]["name"]
        problems = [] if target in deps else [f"scaleTargetRef {target} is not a rendered Deployment"]
        if target in deps and "replicas" in deps[target]["spec"]:
            problems.append("the scaled Deployment must not set replicas")
        if so["kind"] == "ScaledObject":
            for t in so["spec"]["triggers"]:
                md = t["metadata"]
                if enricher_cfg is not None and enricher_ref is not None:
                    group, topic, brokers = (effective(enricher_cfg, enricher_ref, k) for k in ("group_id", "flow_topic", "brokers"))
                    if md.get("consumerGroup") != group:
                        problems.append(f"consumerGroup {md.get('consumerGroup')} != enricher group_id {group}")
                    if md.get("topic") != topic:
                        problems.append(f"topic {md.get('topic')} != enricher flow_topic {topic}")
                    if md.get("bootstrapServers") != brokers:
                        problems.append("bootstrapServers != enricher brokers")
        else:
            names = [m["external"]["metric"]["name"] for m in so["spec"]["metrics"] if m["type"] == "External"]
            exported, _ = exported_metrics()
            if not names or any(n not in exported for n in names):
                problems.append(f"external metric {names} is not one the enricher exports")
        if problems:
            fail(f"{where}: {so['kind']} {so['metadata']['name']}: " + "; ".join(problems))
        else:
            ok(f"{where}: {so['kind']} scales {target} on the enricher's own consumer group / lag")
    for dep in deps.values():
        c = dep["spec"]["template"]["spec"]["containers"][0]
        sc = c.get("securityContext", {})
        problems = []
        if sc.get("allowPrivilegeEscalation") is not False or sc.get("capabilities", {}).get("drop") != ["ALL"]:
            problems.append("enricher must drop ALL capabilities, no privilege escalation")
        problems += pod_metrics_problems(c, enricher_ref, "FLOWLOG_ENRICHER_METRICS_LISTEN")
        output = output_access(docs, dep, c, enricher_cfg, expect)
        if isinstance(output, list):
            problems += output
        kube = services_watch_access(docs, dep, c, enricher_ref)
        if isinstance(kube, list):
            problems += kube
        if problems:
            fail(f"{where}: Deployment {dep['metadata']['name']}: " + "; ".join(problems))
        else:
            ok(f"{where}: Deployment {dep['metadata']['name']}: no capabilities, /metrics on the pod IP; {output}; {kube}")
    for rule in by_kind(docs, "PrometheusRule"):
        mine = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
        if rule["spec"] != mine:
            fail(f"{where}: PrometheusRule differs from deploy/prometheus/alerts.yaml")
        else:
            ok(f"{where}: PrometheusRule carries deploy/prometheus/alerts.yaml")


def check_values_comments() -> None:
    """Every leaf value in values.yaml has a comment right above it (or its list)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^(\s*)([A-Za-z0-9_.]+):\s*(.*)$", line)
        if not m or line.lstrip().startswith("#"):
            continue
        indent, key, rest = m.groups()
        # A mapping header (nothing after the colon, more-indented lines follow) is a section.
        nxt = next((l for l in lines[i + 1:] if l.strip() and not l.lstrip().startswith("#")), "")
        is_section = rest == "" and len(nxt) - len(nxt.lstrip()) > len(indent) and not nxt.lstrip().startswith("- ")
        if is_section:
            continue
        prev = lines[i - 1].strip() if i else ""
        if not prev.startswith("#"):
            missing.append(f"{key} (line {i + 1})")
    if missing:
        fail("values.yaml: values without a comment: " + ", ".join(missing))
    else:
        ok("values.yaml: every value has a comment")


# --------------------------------------------------------------------------
# Prometheus, Grafana, systemd
# --------------------------------------------------------------------------

def check_prometheus(exported, src_of) -> None:
    pdir = DEPLOY / "prometheus"
    for args, what in ((["check", "rules", str(pdir / "alerts.yaml")], "alerts.yaml: promtool check rules"),
                       (["check", "config", str(pdir / "prometheus.yml")], "prometheus.yml: promtool check config"),
                       (["test", "rules", str(pdir / "alerts_test.yaml")], "alerts_test.yaml: promtool test rules")):
        r = run([PROMTOOL, *args])
        if r.returncode != 0:
            fail(f"{what}: {(r.stdout + r.stderr).strip()}")
        else:
            ok(what)
    # Debian's promtool has no kubernetes_sd: check the rest of the k8s scrape
    # config with the discovery swapped for a static target.
    k8s = yaml.safe_load((pdir / "prometheus-kubernetes.yml").read_text())
    problems = []
    for sc in k8s.get("scrape_configs", []):
        sd = sc.pop("kubernetes_sd_configs", None)
        if not sd or any(set(x) - {"role", "namespaces", "selectors"} or x.get("role") not in ("pod", "endpoints", "service", "node") for x in sd):
            problems.append(f"{sc.get('job_name')}: kubernetes_sd_configs missing or malformed")
        sc["static_configs"] = [{"targets": ["127.0.0.1:1"]}]
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "alerts.yaml").write_text((pdir / "alerts.yaml").read_text())
        (Path(d) / "p.yml").write_text(yaml.safe_dump(k8s))
        r = run([PROMTOOL, "check", "config", str(Path(d) / "p.yml")])
    if r.returncode != 0 or problems:
        fail(f"prometheus-kubernetes.yml: {'; '.join(problems)} {(r.stdout + r.stderr).strip() if r.returncode else ''}")
    else:
        ok("prometheus-kubernetes.yml: promtool check config (kubernetes_sd swapped for static) + sd structure")
    # Every alert has a test where it fires.
    rules = [r["alert"] for g in yaml.safe_load((pdir / "alerts.yaml").read_text())["groups"] for r in g["rules"] if "alert" in r]
    tests = yaml.safe_load((pdir / "alerts_test.yaml").read_text())["tests"]
    fired = {t["alertname"] for c in tests for t in c.get("alert_rule_test", []) if t.get("exp_alerts")}
    quiet = {t["alertname"] for c in tests for t in c.get("alert_rule_test", []) if not t.get("exp_alerts")}
    missing = [a for a in rules if a not in fired or a not in quiet]
    if missing:
        fail(f"alerts_test.yaml: alerts without both a firing and a quiet test: {missing}")
    else:
        ok(f"alerts_test.yaml: all {len(rules)} alerts tested firing and quiet")
    chart_copy = CHART / "files" / "alerts.yaml"
    if chart_copy.read_text() != (pdir / "alerts.yaml").read_text():
        fail("helm/flowlog/files/alerts.yaml differs from prometheus/alerts.yaml (run with --update)")
    else:
        ok("helm/flowlog/files/alerts.yaml == prometheus/alerts.yaml")
    for f in ("alerts.yaml", "prometheus.yml", "prometheus-kubernetes.yml"):
        check_metric_refs(f"prometheus/{f}", (pdir / f).read_text(), exported, src_of)


def check_grafana(exported, src_of) -> None:
    path = DEPLOY / "grafana" / "flowlog.json"
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        fail(f"grafana/flowlog.json: not JSON: {e}")
        return
    problems = []
    tvars = {v["name"]: v for v in dash.get("templating", {}).get("list", [])}
    if tvars.get("datasource", {}).get("type") != "datasource" or tvars["datasource"].get("query") != "prometheus":
        problems.append("no Prometheus datasource variable 'datasource'")
    ids, exprs = set(), []
    for p in dash.get("panels", []):
        if p["id"] in ids:
            problems.append(f"duplicate panel id {p['id']}")
        ids.add(p["id"])
        if p["type"] == "row":
            continue
        if p.get("datasource", {}).get("uid") != "${datasource}":
            problems.append(f"panel {p['title']!r} does not use ${{datasource}}")
        for t in p.get("targets", []):
            if not t.get("expr"):
                problems.append(f"panel {p['title']!r}: empty query")
            exprs.append((p["title"], t["expr"]))
    text = json.dumps(dash)
    for comp in ("flowlog_sidecar_", "flowlog_enricher_"):
        if comp not in text:
            problems.append(f"no {comp}* panel")
    if problems:
        fail("grafana/flowlog.json: " + "; ".join(problems))
    else:
        ok(f"grafana/flowlog.json: valid JSON, {len(ids)} panels, datasource variable, both components")
    # PromQL syntax: every query as a recording rule through promtool.
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:q{i}", "expr": e.replace("$__rate_interval", "5m").replace("$sidecar", ".*").replace("$enricher", ".*")}
        for i, (_, e) in enumerate(exprs)]}]}
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        yaml.safe_dump(rules, f)
        f.flush()
        r = run([PROMTOOL, "check", "rules", f.name])
    if r.returncode != 0:
        fail(f"grafana/flowlog.json: a query does not parse: {(r.stdout + r.stderr).strip()}")
    else:
        ok(f"grafana/flowlog.json: all {len(exprs)} queries parse (promtool)")
    check_metric_refs("grafana/flowlog.json", "\n".join(e for _, e in exprs), exported, src_of)


REQUIRED_HARDENING = {
    "flowlog-sidecar.service": ["CapabilityBoundingSet=CAP_BPF CAP_PERFMON", "AmbientCapabilities=CAP_BPF CAP_PERFMON",
                                "NoNewPrivileges=yes", "ProtectSystem=strict", "ProtectHome=yes", "PrivateTmp=yes",
                                "StateDirectory=flowlog/spool", "RestrictAddressFamilies=", "SystemCallArchitectures=native",
                                "MemoryMax=", "User="],
    "flowlog-enricher.service": ["CapabilityBoundingSet=\n", "NoNewPrivileges=yes", "ProtectSystem=strict",
                                 "ProtectHome=yes", "PrivateTmp=yes", "StateDirectory=flowlog/enriched",
                                 "RestrictAddressFamilies=", "SystemCallArchitectures=native", "MemoryMax=", "User="],
}


def stage_unit(d: Path, unit: str) -> Path:
    """deploy/systemd's `unit` copied into `d`, its ExecStart (in
    /usr/local/bin) pointed at a stub there, for systemd-analyze."""
    text = (DEPLOY / "systemd" / unit).read_text()
    binary = re.search(r"^ExecStart=(\S+)", text, re.M).group(1)
    stub = d / Path(binary).name
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    (d / unit).write_text(text.replace(binary, str(stub)))
    return d / unit


def check_systemd() -> None:
    sdir = DEPLOY / "systemd"
    sa = os.environ.get("SYSTEMD_ANALYZE", "systemd-analyze")
    with tempfile.TemporaryDirectory() as d:
        units = []
        for unit, required in REQUIRED_HARDENING.items():
            text = (sdir / unit).read_text()
            missing = [r.strip() for r in required if r not in text]
            if missing:
                fail(f"systemd/{unit}: missing hardening {missing}")
            else:
                ok(f"systemd/{unit}: hardening directives present")
            units.append(str(stage_unit(Path(d), unit)))
        r = run([sa, "verify", "--man=no", *units])
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or out:
            fail(f"systemd-analyze verify: {out or r.returncode}")
        else:
            ok("systemd-analyze verify: both units, no warnings")
        for u in units:
            r = run([sa, "security", "--offline=yes", "--threshold=25", u])
            score = re.search(r"Overall exposure level for \S+: ([\d.]+)", r.stdout)
            if r.returncode != 0:
                fail(f"systemd-analyze security {Path(u).name}: exposure {score.group(1) if score else '?'} > 2.5")
            else:
                ok(f"systemd-analyze security {Path(u).name}: exposure {score.group(1) if score else '?'} (<= 2.5)")
    check_workload_ips_dropin(sa)


# The optional drop-in for the sidecar's namespace path (workload IPs of
# containers Kubernetes does not run): exactly these, and the root README
# shows the same.
WORKLOAD_IPS_DROPIN = ["AmbientCapabilities=CAP_SYS_ADMIN CAP_SYS_PTRACE",
                       "CapabilityBoundingSet=CAP_SYS_ADMIN CAP_SYS_PTRACE", "RestrictNamespaces=net"]


def check_workload_ips_dropin(sa: str) -> None:
    unit = "flowlog-sidecar.service"
    dropin = DEPLOY / "systemd" / f"{unit}.d" / "workload-ips.conf"
    text = dropin.read_text()
    directives = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith(("#", "["))]
    if directives != WORKLOAD_IPS_DROPIN:
        fail(f"systemd/{unit}.d/workload-ips.conf: directives {directives}, want {WORKLOAD_IPS_DROPIN}")
    else:
        ok(f"systemd/{unit}.d/workload-ips.conf: adds CAP_SYS_ADMIN, CAP_SYS_PTRACE and network namespaces only")
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```ini\n# /etc/systemd/system/flowlog-sidecar\.service\.d/workload-ips\.conf\n(.*?)```", readme, re.S)
    shown = [ln.strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("[")] if block else None
    if shown != WORKLOAD_IPS_DROPIN:
        fail(f"README.md (Security) does not show the drop-in as deploy/systemd has it: {shown}")
    else:
        ok("README.md shows the workload-IPs drop-in as deploy/systemd has it")
    with tempfile.TemporaryDirectory() as d:
        staged = stage_unit(Path(d), unit)
        (Path(d) / f"{unit}.d").mkdir()
        (Path(d) / f"{unit}.d" / dropin.name).write_text(dropin.read_text())
        r = run([sa, "verify", "--man=no", str(staged)])
        out = (r.stdout + r.stderr).strip()
        if r.returncode != 0 or out:
            fail(f"systemd-analyze verify (sidecar with workload-ips.conf): {out or r.returncode}")
            return
        # What the unit amounts to with the drop-in, read offline.
        r = run([sa, "security", "--offline=yes", "--no-pager", str(staged)])
        # Exposed: ✗ (- without UTF-8); restricted: ✓ (+).
        report = (r.stdout + r.stderr).replace("✗", "-").replace("✓", "+")
        want = ["- CapabilityBoundingSet=~CAP_SYS_ADMIN", "- CapabilityBoundingSet=~CAP_SYS_PTRACE",
                "- RestrictNamespaces=~net", "+ RestrictNamespaces=~user", "+ RestrictNamespaces=~mnt"]
        missing = [w for w in want if w not in report]
        if missing:
            fail(f"systemd-analyze security (sidecar with workload-ips.conf): not as meant: {missing}")
        else:
            ok("systemd-analyze verify + security: the drop-in merges (CAP_SYS_ADMIN, CAP_SYS_PTRACE, network namespaces only)")


def main() -> int:
    global SIDECAR_BIN, ENRICHER_BIN
    update = "--update" in sys.argv
    SIDECAR_BIN = newest_binary("flowlog-sidecar", "flowlog-sidecar")
    ENRICHER_BIN = newest_binary("flowlog-enricher", "enricher")
    exported, src_of = exported_metrics()

    section("Example config files (deploy/config)")
    sidecar_ref = config_reference("flowlog-sidecar", SIDECAR_BIN)
    enricher_ref = config_reference("flowlog-enricher", ENRICHER_BIN)
    validate_config_toml("config/sidecar.toml", (DEPLOY / "config" / "sidecar.toml").read_text(), sidecar_ref,
                         SIDECAR_BIN, "flowlog-sidecar")
    validate_config_toml("config/enricher.toml", (DEPLOY / "config" / "enricher.toml").read_text(), enricher_ref,
                         ENRICHER_BIN, "flowlog-enricher")
    validate_static_map("config/cidrs.toml", (DEPLOY / "config" / "cidrs.toml").read_text())
    check_metrics_listen("config/sidecar.toml", (DEPLOY / "config" / "sidecar.toml").read_text(), sidecar_ref)
    check_metrics_listen("config/enricher.toml", (DEPLOY / "config" / "enricher.toml").read_text(), enricher_ref)
    # The README's promise: both binaries bind 127.0.0.1 unless told otherwise.
    for ref in (sidecar_ref, enricher_ref):
        if ref is not None:
            default = setting(ref, "metrics_listen")["default"]
            if not default.startswith("127.0.0.1:"):
                fail(f"{ref['binary']}: metrics_listen defaults to {default!r}, the README says 127.0.0.1")
            else:
                ok(f"{ref['binary']}: metrics_listen defaults to {default!r}, as the README says")

    section("Helm chart (deploy/helm/flowlog)")
    if update:
        (CHART / "files" / "alerts.yaml").write_text((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    check_values_comments()
    for name, values in [("defaults", None), *VARIANTS.items()]:
        cmd = [HELM, "lint", "--strict", str(CHART)] + (["-f", str(values)] if values else DEFAULT_SETS)
        r = run(cmd)
        if r.returncode != 0:
            fail(f"helm lint --strict ({name}): {(r.stdout + r.stderr).strip()}")
        else:
            ok(f"helm lint --strict ({name})")
    rendered = {}
    for name, values in [("defaults", None), *VARIANTS.items()]:
        out = helm_template(values)
        if out is None:
            continue
        rendered[name] = out
        try:
            docs = load_docs(out)
        except yaml.YAMLError as e:
            fail(f"helm template ({name}): output is not YAML: {e}")
            continue
        ok(f"helm template ({name}): {len(docs)} objects: {', '.join(sorted({d['kind'] for d in docs}))}")
        validate_docs(f"chart[{name}]", docs)
        semantic_checks(f"chart[{name}]", docs, sidecar_ref, enricher_ref, OUTPUT_EXPECT[name])
    for sets, message in REFUSED:
        r = run([HELM, "template", RELEASE, str(CHART), "--namespace", NAMESPACE, *sets])
        if r.returncode == 0 or message not in r.stderr:
            fail(f"helm template {' '.join(sets) or '(no bucket)'}: not refused with {message!r}: {r.stderr.strip() or 'rendered'}")
        else:
            ok(f"helm template {' '.join(sets) or '(no bucket)'}: refused ({message})")
    check_metric_refs("helm chart", "\n".join(p.read_text() for p in CHART.rglob("*") if p.is_file()), exported, src_of)

    section("Plain manifests (deploy/kubernetes)")
    plain = DEPLOY / "kubernetes" / "flowlog.yaml"
    header = ("# Generated by scripts/check-deploy.sh --update from deploy/helm/flowlog with default values\n"
              "# and the one value the chart requires:\n"
              f"#   helm template {RELEASE} deploy/helm/flowlog --namespace {NAMESPACE} {' '.join(DEFAULT_SETS)}\n"
              "# Do not edit in the repository: change the chart and regenerate. In your copy, set the\n"
              "# image, the brokers and the bucket (amzn-s3-demo-bucket is a placeholder no one owns)\n"
              "# and give the enricher S3 credentials (an IRSA role-arn annotation on its ServiceAccount,\n"
              "# or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY). Apply: kubectl apply -f deploy/kubernetes/\n")
    if "defaults" in rendered:
        want = header + rendered["defaults"]
        if update:
            plain.write_text(want)
        if not plain.exists() or plain.read_text() != want:
            fail("kubernetes/flowlog.yaml is not the chart rendered with default values (run scripts/check-deploy.sh --update)")
        else:
            ok("kubernetes/flowlog.yaml == helm template of the chart with default values")
    for f in sorted((DEPLOY / "kubernetes").glob("*.yaml")):
        try:
            docs = load_docs(f.read_text())
        except yaml.YAMLError as e:
            fail(f"kubernetes/{f.name}: not YAML: {e}")
            continue
        validate_docs(f"kubernetes/{f.name}", docs)
        if f.name == "flowlog.yaml":
            semantic_checks(f"kubernetes/{f.name}", docs, sidecar_ref, enricher_ref, OUTPUT_EXPECT["defaults"])

    section("Prometheus (deploy/prometheus)")
    check_prometheus(exported, src_of)

    section("Grafana (deploy/grafana)")
    check_grafana(exported, src_of)

    section("systemd (deploy/systemd)")
    check_systemd()

    section("README")
    readme = (DEPLOY / "README.md").read_text()
    check_metric_refs("deploy/README.md", readme, exported, src_of)
    rules = [r["alert"] for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"] for r in g["rules"]]
    undocumented = [a for a in rules if a not in readme]
    if undocumented:
        fail(f"deploy/README.md does not explain alerts {undocumented}")
    else:
        ok(f"deploy/README.md explains all {len(rules)} alerts")

    print(f"\ncheck-deploy: {checks - len(failures)} passed, {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
