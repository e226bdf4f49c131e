#!/usr/bin/env bash
# `make demo`: the whole pipeline on this machine, end to end, with no static
# map: every workload is named by the sidecars themselves.
#
#   Kubernetes API fixture ──> sidecars (pods' names, owners)   enricher (Services)
#   local broker (tansu) <── 3 sidecars (eBPF, each one "host") ──> enricher ──> Avro files
#
# Three "hosts" share this one kernel; each is a cgroup subtree with its own
# sidecar scoped to it (setting scope.cgroup), as if each were its own machine:
#
#   node-1  a Kubernetes node: pods frontend and api (Deployments, namespace shop)
#   node-2  a Kubernetes node: pod cache-0 (StatefulSet cache)
#   db-vm   a plain VM: systemd services postgresql.service and backup.service
#
# Pods are processes in kubelet-style cgroups (kubepods.slice/.../cri-containerd-
# <id>.scope), each in its own network namespace with its own address on a
# private bridge; the systemd-style services run in cgroups named as systemd
# names them, in the VM's network namespace. No Kubernetes API server can be
# installed here, so scripts/kube_api_fixture.py serves the API's real JSON
# (pods, ReplicaSets, Deployments, the Service) to the real client (kube-rs)
# in the sidecars and the enricher. The Service api has a ClusterIP made real
# by an nftables DNAT rule, as kube-proxy does. One address (stray) runs no
# sidecar: the only side nobody names. One client calls a closed port (failed
# connects), some links are slow or lossy (netem) so RTTs and retransmits differ.
#
# Then pod cache-0 is deleted and its IP given to a new pod, cache-1: flows
# before go to cache-0, flows after to cache-1 (attribution at the flow's time).
#
# The enricher's files are read back with fastavro into a summary (with the
# attribution self-check: each connection seen from both ends compares one
# end's remote attribution with the other end's own), plus an SVG graph.
#
# FLOWLOG_DEMO_CHECK=1 turns the summary into assertions (make test runs it):
# every side named except stray's, self-check without disagreement, the
# Service named, the reused IP attributed to the right pod on each side of the
# switch, no sequence gaps.
#
# Stops everything it started (processes, broker, namespaces, cgroups,
# bridge), also on Ctrl-C; leftovers of an earlier killed run are removed
# first. Output in out/demo/ (FLOWLOG_DEMO_OUT). FLOWLOG_DEMO_SECONDS sets the
# traffic duration; FLOWLOG_DEMO_BIN the folder of the binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
# Namespaces, cgroups, links and the sidecars need root: run the whole demo as root.
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "the demo needs root (or sudo)" >&2; exit 1; }
    exec sudo -E env "PATH=$PATH" bash scripts/demo.sh "$@"
fi
TOOLS="${FLOWLOG_TOOLS:-$HOME/.cache/flowlog/tools}"
PY="$TOOLS/venv-py-1/bin/python"
OUT="${FLOWLOG_DEMO_OUT:-out/demo}"
SECONDS_OF_TRAFFIC="${FLOWLOG_DEMO_SECONDS:-8}"
CHECK="${FLOWLOG_DEMO_CHECK:-0}"
BIN="${FLOWLOG_DEMO_BIN:-./target/release}"
NS_PREFIX=flowlog-demo-
BRIDGE=flowlog-demo-br
NET=10.213.0
CLUSTER_IP=10.96.0.20 # Service shop/api, port 80 -> the api pod's 8080
HOSTS=(node-1 node-2 db-vm)
declare -A HOST_IP=([node-1]=$NET.1 [node-2]=$NET.2 [db-vm]=$NET.3)
# Pods: name, node, IP, owner kind/name. cache-1 comes later, on cache-0's IP.
PODS=(frontend api cache-0)
declare -A POD_NODE=([frontend]=node-1 [api]=node-1 [cache-0]=node-2 [cache-1]=node-2)
declare -A POD_IP=([frontend]=$NET.11 [api]=$NET.12 [cache-0]=$NET.14 [cache-1]=$NET.14)
STRAY_IP=$NET.99

say() { printf '\n== %s\n' "$*"; }
fail() {
    echo "demo FAILED: $1" >&2
    shift
    for f in "$@"; do [ -f "$f" ] && { echo "--- last lines of $f" >&2; tail -n 25 "$f" >&2; }; done
    exit 1
}
for b in flowlog-sidecar flowlog-enricher flowlog-demo-traffic; do
    [ -x "$BIN/$b" ] || fail "$BIN/$b is missing: run make build"
done
[ -x "$PY" ] || fail "$PY is missing: run make setup"
command -v ip >/dev/null && command -v tc >/dev/null || fail "the ip and tc commands (iproute2) are needed"
command -v nft >/dev/null || fail "nft (Debian nftables) is needed for the Service's ClusterIP: run make setup"
# The cgroup v2 hierarchy (pure v2 at /sys/fs/cgroup, or the hybrid layout's unified).
CG_MOUNT=$(awk '{ for (i = 7; i < NF; i++) if ($i == "-") { if ($(i + 1) == "cgroup2") print $5; break } }' /proc/self/mountinfo | head -n 1)
[ -n "$CG_MOUNT" ] || fail "no cgroup v2 hierarchy is mounted"
CG_REL=/flowlog-demo
CG="$CG_MOUNT$CG_REL"

# Running, and not a zombie (an exited child not yet reaped)?
alive() { [ -r "/proc/$1/stat" ] && ! grep -q '^[0-9]* (.*) Z' "/proc/$1/stat" 2>/dev/null; }
# Waits (up to 30 s) for $1's log ($OUT/$1.log) to say $2, or for it to die.
wait_started() {
    for _ in $(seq 300); do
        grep -q "$2" "$OUT/$1.log" && return 0
        alive "$(cat "$OUT/run/$1.pid")" || break
        sleep 0.1
    done
    grep -q "$2" "$OUT/$1.log" || fail "the $1 did not start" "$OUT/$1.log"
}
wait_gone() { # PID [TENTHS]: waits for it to exit, then SIGKILL
    for _ in $(seq "${2:-100}"); do alive "$1" || break; sleep 0.1; done
    kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true # reaps it if it is our child
}
# Stops a process recorded in a pid file, if it still is the program named.
kill_pidfile() { # FILE NAME
    local pid
    [ -f "$1" ] || return 0
    pid=$(cat "$1")
    if [ -n "$pid" ] && grep -qa -- "$2" "/proc/$pid/cmdline" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        wait_gone "$pid"
    fi
    rm -f "$1"
}
stop_broker() { # (broker.sh stop kills by PID: only when it still is our tansu)
    local pid
    pid=$(cat "$OUT/broker/broker.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && grep -qa tansu "/proc/$pid/cmdline" 2>/dev/null; then
        bash scripts/broker.sh stop "$OUT/broker" 2>/dev/null || true
        wait_gone "$pid" 50
    fi
    rm -f "$OUT/broker/broker.pid"
}

# Kills every process in a cgroup subtree, then removes its cgroups (deepest first).
remove_cgroup() { # DIR
    local d pid
    [ -d "$1" ] || return 0
    for _ in $(seq 50); do
        local left=0
        while read -r d; do
            while read -r pid; do
                [ -n "$pid" ] && { kill -KILL "$pid" 2>/dev/null || true; left=1; }
            done < "$d/cgroup.procs"
        done < <(find "$1" -type d)
        [ "$left" = 0 ] && break
        sleep 0.1
    done
    find "$1" -depth -type d -exec rmdir {} \; 2>/dev/null || true
}
# Removes the namespaces (and the processes in them), veths and bridge.
remove_netns() { # NAME
    local pids
    pids=$(ip netns pids "$1" 2>/dev/null || true)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    ip netns del "$1" 2>/dev/null || true
}
remove_network() {
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX" || true); do
        remove_netns "$ns"
    done
    ip link del "$BRIDGE" 2>/dev/null || true
}

# Stops what a run (this one, or an earlier one that was killed) left behind.
stop_all() {
    kill_pidfile "$OUT/run/enricher.pid" flowlog-enricher
    for h in "${HOSTS[@]}"; do kill_pidfile "$OUT/run/sidecar-$h.pid" flowlog-sidecar; done
    kill_pidfile "$OUT/run/kube-api.pid" kube_api_fixture
    kill_pidfile "$OUT/run/s3.pid" moto_server
    remove_cgroup "$CG"
    remove_network
    stop_broker
}

finished=0
cleanup() {
    local rc=$?
    set +e
    trap '' INT TERM
    [ "$finished" = 1 ] || echo "== stopping everything the demo started" >&2
    stop_all
    # Leave the files to whoever ran `make demo` through sudo.
    [ -n "${SUDO_UID:-}" ] && chown -R "$SUDO_UID:${SUDO_GID:-$SUDO_UID}" "$OUT" 2>/dev/null
    exit $rc
}
trap cleanup EXIT
trap 'echo "interrupted" >&2; exit 130' INT TERM

stop_all # leftovers of an earlier run that was killed
rm -rf "$OUT"; mkdir -p "$OUT/run" "$OUT/traffic"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); ENRICHER_METRICS=$(free_port); S3_PORT=$(free_port)
metric() { # URL NAME: the sum of a Prometheus counter over its labels
    curl -sf "$1" 2>/dev/null | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%d\n", s }'
}
SECONDS=0

say "starting the local broker on 127.0.0.1:$PORT"
# The broker, sidecars and enricher get sessions of their own so that a Ctrl-C
# reaches only this script, which then stops them in order (the sidecars first,
# while the broker still takes their last records).
setsid bash scripts/broker.sh start "$OUT/broker" "$PORT" flowlog.flows flowlog.identity flowlog.dlq \
    || fail "the broker did not start" "$OUT/broker/broker.log"

# --- the object store: moto's S3 server, the bucket the enricher writes to --
say "starting a local S3 endpoint (moto) on 127.0.0.1:$S3_PORT, bucket flowlog-demo"
setsid "$TOOLS/venv-py-1/bin/moto_server" -H 127.0.0.1 -p "$S3_PORT" > "$OUT/s3.log" 2>&1 &
echo $! > "$OUT/run/s3.pid"
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT" AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1
for _ in $(seq 100); do "$PY" scripts/s3_lake.py create-bucket flowlog-demo 2>/dev/null && break; sleep 0.2; done
"$PY" scripts/s3_lake.py create-bucket flowlog-demo 2>/dev/null || fail "the S3 endpoint did not start" "$OUT/s3.log"
LAKE=s3://flowlog-demo/enriched

# --- the Kubernetes API (fixture) -------------------------------------------
# Pod UIDs and container ids: fixed, so runs compare.
declare -A POD_UID POD_CID
i=0
for p in frontend api cache-0 cache-1; do
    i=$((i + 1))
    POD_UID[$p]=$(printf '0f10c0de-%04x-4000-8000-%012x' "$i" "$i")
    POD_CID[$p]=$(printf '%064x' $((0xc0de0000 + i)))
done
say "starting the Kubernetes API fixture (scripts/kube_api_fixture.py: the API's real JSON for kube-rs)"
kube_objects() { # the fixture's objects, as JSON: Deployments, ReplicaSets, Pods, the Service
    "$PY" - "$@" <<'PY'
import json, sys
ns = "shop"
args = sys.argv[1:]
objs = []
def meta(name, labels=None, owner=None, uid=None):
    m = {"name": name, "namespace": ns, "labels": labels or {}}
    if owner: m["ownerReferences"] = [{"apiVersion": owner[0], "kind": owner[1], "name": owner[2], "uid": owner[3], "controller": True}]
    if uid: m["uid"] = uid
    return m
for dep, rs in (("frontend", "frontend-7d4b9c"), ("api", "api-5f6c8d")):
    duid, ruid = f"d0000000-0000-4000-8000-{len(dep):012x}", f"e0000000-0000-4000-8000-{len(dep):012x}"
    objs.append({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(dep, {"app": dep}, uid=duid), "spec": {}})
    objs.append({"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": meta(rs, {"app": dep}, ("apps/v1", "Deployment", dep, duid), ruid), "spec": {}})
for spec in args:  # pod=name,node,ip,uid,container_id
    name, node, ip, uid, cid = spec.split(",")
    app = name.split("-")[0]
    owner = {"frontend": ("apps/v1", "ReplicaSet", "frontend-7d4b9c"), "api": ("apps/v1", "ReplicaSet", "api-5f6c8d"),
             "cache": ("apps/v1", "StatefulSet", "cache")}[app]
    pod = name if app == "cache" else f"{owner[2]}-{uid[-5:]}"
    objs.append({"apiVersion": "v1", "kind": "Pod",
                 "metadata": meta(pod, {"app": app, "version": "1.4"}, owner + ("00000000-0000-4000-8000-000000000001",), uid),
                 "spec": {"nodeName": node, "containers": [{"name": app, "image": f"demo/{app}:1.4"}]},
                 "status": {"phase": "Running", "qosClass": "BestEffort", "podIP": ip, "podIPs": [{"ip": ip}],
                            "containerStatuses": [{"name": app, "containerID": f"containerd://{cid}", "ready": True}]}})
print(json.dumps({"items": objs}))
PY
}
pod_spec() { echo "$1,${POD_NODE[$1]},${POD_IP[$1]},${POD_UID[$1]},${POD_CID[$1]}"; }
kube_objects $(for p in "${PODS[@]}"; do pod_spec "$p"; done) > "$OUT/kube-objects.json"
cat > "$OUT/kube-service.json" <<EOF
{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "api", "namespace": "shop", "labels": {"app": "api"}},
 "spec": {"type": "ClusterIP", "clusterIP": "$CLUSTER_IP", "clusterIPs": ["$CLUSTER_IP"], "selector": {"app": "api"},
          "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
EOF
setsid python3 scripts/kube_api_fixture.py --port-file "$OUT/run/kube-api.port" \
    --objects "$OUT/kube-objects.json" --objects "$OUT/kube-service.json" > "$OUT/kube-api.log" 2>&1 &
echo $! > "$OUT/run/kube-api.pid"
for _ in $(seq 100); do [ -s "$OUT/run/kube-api.port" ] && break; sleep 0.1; done
[ -s "$OUT/run/kube-api.port" ] || fail "the Kubernetes API fixture did not start" "$OUT/kube-api.log"
KUBE_API="http://127.0.0.1:$(cat "$OUT/run/kube-api.port")"
echo "   $KUBE_API: Deployments frontend, api; StatefulSet cache; Service shop/api ClusterIP $CLUSTER_IP:80"

# --- hosts, pods and services -------------------------------------------------
ip link add "$BRIDGE" type bridge
ip link set "$BRIDGE" up
add_netns() { # NAME IP: a namespace with its own address on the bridge
    local ns=$NS_PREFIX$1 veth=fd-${1:0:10}
    ip netns add "$ns"
    ip link add "$veth" type veth peer name eth0 netns "$ns"
    ip link set "$veth" master "$BRIDGE" up
    ip -n "$ns" addr add "$2/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
}
pod_cgroup() { # POD: its container's cgroup, as kubelet (systemd driver) and containerd name it
    local u=${POD_UID[$1]}
    echo "$CG/${POD_NODE[$1]}/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${u//-/_}.slice/cri-containerd-${POD_CID[$1]}.scope"
}
add_pod() { # POD
    add_netns "$1" "${POD_IP[$1]}"
    mkdir -p "$(pod_cgroup "$1")"
    printf '   pod %-9s %-12s on %-7s netns %s, cgroup …/%s\n' "$1" "${POD_IP[$1]}" "${POD_NODE[$1]}" "$NS_PREFIX$1" \
        "$(basename "$(dirname "$(pod_cgroup "$1")")")"
}
say "building three hosts on bridge $BRIDGE ($NET.0/24), cgroups under $CG"
for h in "${HOSTS[@]}"; do
    add_netns "$h" "${HOST_IP[$h]}"
    mkdir -p "$CG/$h"
    printf '   host %-8s %-12s netns %s, cgroup %s\n' "$h" "${HOST_IP[$h]}" "$NS_PREFIX$h" "$CG_REL/$h"
done
for p in "${PODS[@]}"; do add_pod "$p"; done
for s in postgresql backup; do mkdir -p "$CG/db-vm/system.slice/$s.service"; done
echo "   services postgresql.service, backup.service on db-vm (its network namespace: ${HOST_IP[db-vm]})"
add_netns stray "$STRAY_IP"
echo "   stray $STRAY_IP: no sidecar"
# The Service's ClusterIP, as kube-proxy makes it: DNAT of $CLUSTER_IP:80 to the
# api pod, here in the client pod's own namespace (output chain).
ip -n "${NS_PREFIX}frontend" route add 10.96.0.0/12 dev eth0
ip netns exec "${NS_PREFIX}frontend" nft -f - <<EOF
table ip kube-proxy {
    chain output { type nat hook output priority -100; ip daddr $CLUSTER_IP tcp dport 80 dnat to ${POD_IP[api]}:8080; }
}
EOF
# Slow links: the replies of db-vm and cache leave through a delayed (and, for
# db-vm, lossy) link. netem where the kernel has it; else a token-bucket shaper
# whose short queue adds queueing delay and drops (so retransmits).
shape() { # NS
    if ip netns exec "$NS_PREFIX$1" tc qdisc add dev eth0 root netem "${@:2}" 2>/dev/null; then return 0; fi
    return 1
}
if shape db-vm delay 8ms 2ms loss 1.5%; then
    shape cache-0 delay 1ms; shape api delay 2ms
    echo "   netem: db-vm 8±2 ms + 1.5% loss, api 2 ms, cache 1 ms (one way)"
else
    echo "   (netem is not available in this kernel: token-bucket shaping instead)"
    ip netns exec "${NS_PREFIX}db-vm" tc qdisc add dev eth0 root tbf rate 40mbit burst 32kb limit 96kb
    ip netns exec "${NS_PREFIX}cache-0" tc qdisc add dev eth0 root tbf rate 200mbit burst 64kb limit 512kb
fi

# Runs a command in a cgroup and a network namespace (as a container runtime or
# systemd would start it there).
run_in() { # CGROUP_DIR NETNS CMD...
    local cg=$1 ns=$2; shift 2
    bash -c 'echo $$ > "$1/cgroup.procs" && shift && exec ip netns exec "$@"' _ "$cg" "$NS_PREFIX$ns" "$@"
}

# --- sidecars and enricher -----------------------------------------------------
declare -A SIDECAR_METRICS
start_sidecar() { # HOST
    local h=$1 m
    m=$(free_port); SIDECAR_METRICS[$h]=$m
    # Each sidecar is one host: its cgroup subtree, its IP, its Kubernetes node.
    {
        echo "[identity]"
        echo "host_id = \"$h\""
        echo "ips = [\"${HOST_IP[$h]}\"]"
        case $h in
            db-vm) echo "workload = \"postgres-vm\""; echo "labels = { cluster = \"demo\", zone = \"zone-b\", team = \"data\" }" ;;
            node-1) echo "workload = \"k8s-node\""; echo "labels = { cluster = \"demo\", zone = \"zone-a\" }" ;;
            *) echo "workload = \"k8s-node\""; echo "labels = { cluster = \"demo\", zone = \"zone-b\" }" ;;
        esac
        echo "[scope]"
        echo "cgroup = \"$CG_REL/$h\""
        if [ "$h" != db-vm ]; then
            echo "[workload.kubernetes]"
            echo "enabled = true"
            echo "node_name = \"$h\""
            echo "api_url = \"$KUBE_API\""
        fi
    } > "$OUT/sidecar-$h.toml"
    setsid "$BIN/flowlog-sidecar" --config "$OUT/sidecar-$h.toml" --output kafka --kafka-brokers "127.0.0.1:$PORT" \
        --spool-dir "$OUT/spool-$h" --metrics-listen "127.0.0.1:$m" --heartbeat-secs 2 \
        --interim-interval-secs 3 --stats-file "$OUT/sidecar-$h-stats.json" 2> "$OUT/sidecar-$h.log" &
    echo $! > "$OUT/run/sidecar-$h.pid"
}
say "starting three sidecars, one per host (config $OUT/sidecar-HOST.toml)"
for h in "${HOSTS[@]}"; do start_sidecar "$h"; done
for h in "${HOSTS[@]}"; do
    wait_started "sidecar-$h" "capturing TCP flows"
    echo "   $h: scope $CG_REL/$h, metrics http://127.0.0.1:${SIDECAR_METRICS[$h]}/metrics"
done

say "starting the enricher (no static map: the sidecars' identities and the Services; Avro and Parquet to $LAKE; metrics http://127.0.0.1:$ENRICHER_METRICS/metrics)"
setsid "$BIN/flowlog-enricher" --brokers "127.0.0.1:$PORT" --group-id flowlog-demo \
    --output "$LAKE" --output-formats avro,parquet --s3-endpoint-url "$AWS_ENDPOINT_URL" --s3-region us-east-1 \
    --kubernetes-services true --kubernetes-api-url "$KUBE_API" \
    --batch-max-age-secs 2 --late-window-secs 5 \
    --metrics-listen "127.0.0.1:$ENRICHER_METRICS" 2> "$OUT/enricher.log" &
echo $! > "$OUT/run/enricher.pid"
wait_started enricher "enriching"

# Waits until HOST's sidecar's latest identity record lists (yes) or no
# longer lists (no) the pod UID among the workloads whose IPs it holds.
wait_announced() { # HOST UID yes|no
    "$PY" scripts/demo_identity.py "127.0.0.1:$PORT" "$1" "$2" "$3" --timeout 30 \
        || fail "sidecar $1 did not announce pod $2 as ${3/no/gone}" "$OUT/sidecar-$1.log"
}

# --- traffic -------------------------------------------------------------------
in_pod() { local p=$1; shift; run_in "$(pod_cgroup "$p")" "$p" "$BIN/flowlog-demo-traffic" "$@"; }
in_service() { local s=$1; shift; run_in "$CG/db-vm/system.slice/$s.service" db-vm "$BIN/flowlog-demo-traffic" "$@"; }
in_stray() { ip netns exec "${NS_PREFIX}stray" "$BIN/flowlog-demo-traffic" "$@"; }
wait_listening() { # LOG NAME
    for _ in $(seq 50); do grep -qs listening "$1" && return 0; sleep 0.1; done
    fail "the traffic server of $2 did not start" "$1"
}
serve_pod() { # POD PORT
    in_pod "$1" serve --listen "${POD_IP[$1]}:$2" > "$OUT/traffic/serve-$1-$2.log" 2>&1 &
    wait_listening "$OUT/traffic/serve-$1-$2.log" "$1"
}
clients=()
client() { # RUNNER WHO NAME FROM TO PORT ARGS...: one traffic client
    local runner=$1 who=$2 name=$3 from=$4 to=$5 port=$6; shift 6
    $runner $who client --name "$name" --bind "$from" --connect "$to:$port" \
        --seconds "$SECONDS_OF_TRAFFIC" "$@" > "$OUT/traffic/${name//[>:]/_}.json" 2>&1 &
    clients+=($!)
}
wait_clients() {
    for p in "${clients[@]}"; do wait "$p" || true; done
    clients=()
}
say "generating traffic for ${SECONDS_OF_TRAFFIC}s (flowlog-demo-traffic in each pod, service and the stray namespace)"
serve_pod frontend 80; serve_pod api 8080; serve_pod cache-0 6379
in_service postgresql serve --listen "${HOST_IP[db-vm]}:5432" > "$OUT/traffic/serve-postgresql.log" 2>&1 &
wait_listening "$OUT/traffic/serve-postgresql.log" postgresql
# Each sidecar announces its node's pods' IPs (from the API fixture, and from
# the pods' namespaces): wait until it has, as a pod's first clients would
# otherwise find its IP unannounced (NO_OWNER_AT_TIME, never guessed).
for p in "${PODS[@]}"; do wait_announced "${POD_NODE[$p]}" "${POD_UID[$p]}" yes; done
echo "   every pod's IP is announced by its node's sidecar (identity topic)"
F=${POD_IP[frontend]} A=${POD_IP[api]} C=${POD_IP[cache-0]} D=${HOST_IP[db-vm]}
#      runner     who        name                 from       to          port  conn/s    req/conn      request         reply
client in_pod     frontend   "frontend->api-svc"  "$F"       $CLUSTER_IP 80    --rate 20 --requests 3  --request-bytes 200-2k --response-bytes 2k-96k --threads 4
client in_pod     frontend   "frontend->cache"    "$F"       "$C"        6379  --rate 5  --requests 2  --request-bytes 64-256 --response-bytes 200-4k
client in_pod     frontend   "frontend->api:9090" "$F"       "$A"        9090  --rate 2  --threads 1   # nothing listens there: failed connects
client in_pod     api        "api->postgres"      "$A"       "$D"        5432  --rate 3  --requests 10 --request-bytes 100-1k --response-bytes 4k-256k --think-ms 30 --threads 6
client in_pod     api        "api->cache"         "$A"       "$C"        6379  --rate 30 --requests 4  --request-bytes 64-512 --response-bytes 100-8k
client in_service backup     "backup->api"        "$D"       "$A"        8080  --rate 2  --requests 2  --request-bytes 1k-4k  --response-bytes 1k-4k
client in_stray   ""         "stray->frontend"    "$STRAY_IP" "$F"       80    --rate 3  --requests 2  --request-bytes 300-600 --response-bytes 10k-40k
wait_clients

say "pod cache-0 deleted; its IP ${POD_IP[cache-0]} goes to a new pod, cache-1"
REUSE_T=$(date +%s%N) # every flow to cache-0 started before this, every one to cache-1 after
curl -sf -X DELETE "$KUBE_API/admin/objects/pods/shop/cache-0" > /dev/null || fail "the fixture did not delete cache-0" "$OUT/kube-api.log"
remove_cgroup "$CG/node-2/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod${POD_UID[cache-0]//-/_}.slice"
remove_netns "${NS_PREFIX}cache-0"
wait_announced node-2 "${POD_UID[cache-0]}" no
kube_objects "$(pod_spec cache-1)" | curl -sf -X POST --data-binary @- "$KUBE_API/admin/objects" > /dev/null \
    || fail "the fixture did not take cache-1" "$OUT/kube-api.log"
add_pod cache-1
# The address now answers from another MAC: peers forget the old one at once
# (as a CNI's gratuitous ARP makes them), not after their neighbour entries age out.
for ns in $(ip netns list | awk '{print $1}' | grep "^$NS_PREFIX"); do
    ip -n "$ns" neigh flush to "${POD_IP[cache-1]}" 2>/dev/null || true
done
serve_pod cache-1 6379
wait_announced node-2 "${POD_UID[cache-1]}" yes
client in_pod api "api->cache-1" "$A" "${POD_IP[cache-1]}" 6379 --rate 20 --requests 2 --request-bytes 64-512 --response-bytes 100-8k
wait_clients
for f in "$OUT"/traffic/*.json; do
    "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); d["bytes"]=d["bytes_sent"]+d["bytes_received"]
print("   %(name)-24s %(connections)5d connections %(failed_connects)4d failed connects %(requests)6d requests %(bytes)12d bytes" % d)' "$f" \
        || fail "a traffic client failed" "$f"
done
# The servers, pods and namespaces go now: their connections are all closed.
remove_cgroup "$CG"
remove_network

say "stopping the sidecars (each delivers what it holds first)"
for h in "${HOSTS[@]}"; do
    kill_pidfile "$OUT/run/sidecar-$h.pid" flowlog-sidecar
    if grep -q "left in the spool" "$OUT/sidecar-$h.log"; then
        echo "   WARNING: sidecar $h could not deliver everything (records left in $OUT/spool-$h):"
        grep -E "WARN|ERROR" "$OUT/sidecar-$h.log" | tail -n 3
    fi
done
# What is in the flow topic now is what the enricher has to get through.
HIGH=$("$PY" - "127.0.0.1:$PORT" <<'PY'
import sys
from confluent_kafka import Consumer, TopicPartition
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "flowlog-demo-watermarks"})
md = c.list_topics("flowlog.flows", timeout=10)
print(sum(c.get_watermark_offsets(TopicPartition("flowlog.flows", p), timeout=10)[1] for p in md.topics["flowlog.flows"].partitions))
c.close()
PY
) || fail "could not read the flow topic's end offsets" "$OUT/broker/broker.log"
echo "   $HIGH flow records in flowlog.flows"
[ "$HIGH" -gt 0 ] || fail "the sidecars delivered no flow records" "$OUT"/sidecar-*.log

say "waiting for the enricher to consume all $HIGH records"
EM="http://127.0.0.1:$ENRICHER_METRICS/metrics"
seen=0
for _ in $(seq 600); do
    seen=$(( $(metric "$EM" flowlog_enricher_records_in_total) ))
    [ "$seen" -ge "$HIGH" ] && break
    alive "$(cat "$OUT/run/enricher.pid")" || fail "the enricher exited" "$OUT/enricher.log"
    sleep 0.2
done
[ "$seen" -ge "$HIGH" ] || fail "the enricher consumed $seen of $HIGH records in 2 minutes" "$OUT/enricher.log"
echo "   consumed $seen; stopping it (it writes its open batches)"
kill -TERM "$(cat "$OUT/run/enricher.pid")" 2>/dev/null || true
# The self-check's last word (one-sided halves are counted as they expire, and
# at exit): scraped until the enricher is gone.
while alive "$(cat "$OUT/run/enricher.pid")"; do
    curl -sf "$EM" > "$OUT/enricher-metrics.tmp" 2>/dev/null && mv "$OUT/enricher-metrics.tmp" "$OUT/enricher-metrics.txt"
    sleep 0.1
done
kill_pidfile "$OUT/run/enricher.pid" flowlog-enricher
# Its only progress record: the group's committed offsets, at the topic's end.
committed=$("$PY" - "127.0.0.1:$PORT" <<'PY'
import sys
from confluent_kafka import Consumer, TopicPartition
c = Consumer({"bootstrap.servers": sys.argv[1], "group.id": "flowlog-demo"})
md = c.list_topics("flowlog.flows", timeout=10)
tps = [TopicPartition("flowlog.flows", p) for p in md.topics["flowlog.flows"].partitions]
print(sum(max(tp.offset, 0) for tp in c.committed(tps, timeout=10)))
c.close()
PY
) || fail "could not read the enricher's committed offsets" "$OUT/broker/broker.log"
[ "$committed" -eq "$HIGH" ] \
    || fail "the enricher committed $committed of $HIGH offsets" "$OUT/enricher.log"
n=$("$PY" scripts/s3_lake.py sync "$LAKE" "$OUT/enriched") || fail "could not copy the lake from $LAKE" "$OUT/s3.log"
echo "   committed through the topic's end; $n objects in $LAKE (copied to $OUT/enriched/)"
stop_broker
kill_pidfile "$OUT/run/kube-api.pid" kube_api_fixture
awk '/^flowlog_enricher_(dlq|sequence_gaps)_total/ { printf "   %s %s\n", $1, $2 }' "$OUT/enricher-metrics.txt"
for h in "${HOSTS[@]}"; do
    "$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); s.update(s.pop("kernel")); s.update(s.pop("user"))
print("   sidecar %-7s %6d kernel events, %6d read; drops: ring buffer full %d, socket map full %d; errors: read %d, decode %d, output %d" % (sys.argv[2], s["events"], s["events_read"], s["ringbuf_full"], s["sock_map_full"], s["read_errors"], s["decode_errors"], s["output_errors"]))' \
        "$OUT/sidecar-$h-stats.json" "$h" || echo "   (no stats file from sidecar $h)"
done

say "summary, read back from the enriched Avro files with fastavro"
check_args=()
[ "$CHECK" = 1 ] && check_args=(--check --stray "$STRAY_IP" --cluster-ip "$CLUSTER_IP" --service shop/api
    --reused "${POD_IP[cache-0]}=cache-0,cache-1@$REUSE_T")
"$PY" scripts/demo_summary.py "$OUT/enriched" --traffic "$OUT/traffic" --svg "$OUT/workload-graph.svg" \
    --metrics "$OUT/enricher-metrics.txt" "${check_args[@]}" \
    || fail "the summary found no enriched flows, or a check failed" "$OUT/enricher.log"
say "the same summary with DuckDB over the Parquet objects, compared with the Avro one"
"$PY" scripts/demo_summary.py "$OUT/enriched" --format parquet --compare "$OUT/enriched" \
    --traffic "$OUT/traffic" --metrics "$OUT/enricher-metrics.txt" "${check_args[@]}" \
    || fail "the Parquet (DuckDB) and Avro (fastavro) summaries differ, or a check failed" "$OUT/enricher.log"
say "example queries (docs/queries/) with DuckDB over the Parquet objects"
"$PY" scripts/lake_query.py "$OUT/enriched" top_talkers bytes_by_cost_class \
    || fail "the example queries failed" "$OUT/enricher.log"
if command -v rsvg-convert >/dev/null && rsvg-convert "$OUT/workload-graph.svg" -o "$OUT/workload-graph.png" 2>/dev/null; then
    echo "(also as PNG: $OUT/workload-graph.png)"
fi
finished=1
printf '\n== done in %d s; files in %s/ (enriched/: a copy of %s: Avro and Parquet, Hive-partitioned dt=/hr=)\n' "$SECONDS" "$OUT" "$LAKE"
