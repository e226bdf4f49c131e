#!/usr/bin/env bash
# `make demo`: the whole pipeline on this machine, end to end.
#
#   local broker (tansu) <- sidecar (eBPF, this machine's real TCP flows)
#                        -> enricher (sidecar identity + a static map) -> Avro files
#
# A few "workloads" (processes in their own network namespaces, with their own
# addresses on a private bridge) talk to each other with the built-in traffic
# generator (flowlog-demo-traffic) for a few seconds; one address is in no map
# (unattributed), one client calls a closed port (failed connects), and some
# links are slowed down (netem, or a token-bucket shaper where netem is
# missing) so RTTs differ and retransmits appear. The enricher's files are then
# read back with fastavro (an Avro reader this project did not write) into a
# summary, plus an SVG of the workload graph.
#
# Stops everything it started (processes, broker, namespaces, bridge), also on
# Ctrl-C; leftovers of an earlier killed run are removed first. Output in
# out/demo/ (FLOWLOG_DEMO_OUT). FLOWLOG_DEMO_SECONDS sets the traffic duration.
set -euo pipefail
cd "$(dirname "$0")/.."
# Namespaces, links and the sidecar need root: run the whole demo as root.
if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null || { echo "the demo needs root (or sudo)" >&2; exit 1; }
    exec sudo -E env "PATH=$PATH" bash scripts/demo.sh "$@"
fi
TOOLS="${FLOWLOG_TOOLS:-$HOME/.cache/flowlog/tools}"
PY="$TOOLS/venv-py-1/bin/python"
OUT="${FLOWLOG_DEMO_OUT:-out/demo}"
SECONDS_OF_TRAFFIC="${FLOWLOG_DEMO_SECONDS:-8}"
BIN=./target/release
NS_PREFIX=flowlog-demo-
BRIDGE=flowlog-demo-br
NET=10.213.0
WORKLOADS=(frontend api db cache stray) # stray: an address nobody maps
declare -A IP=([frontend]=$NET.11 [api]=$NET.12 [db]=$NET.13 [cache]=$NET.14 [stray]=$NET.99)

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

# Removes the namespaces (and the processes in them), veths and bridge.
remove_network() {
    local ns pids
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep "^$NS_PREFIX" || true); do
        pids=$(ip netns pids "$ns" 2>/dev/null || true)
        [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
        ip netns del "$ns" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
}

# Stops what a run (this one, or an earlier one that was killed) left behind.
stop_all() {
    kill_pidfile "$OUT/run/enricher.pid" flowlog-enricher
    kill_pidfile "$OUT/run/sidecar.pid" flowlog-sidecar
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
PORT=$(free_port); SIDECAR_METRICS=$(free_port); ENRICHER_METRICS=$(free_port)
metric() { # URL NAME: the sum of a Prometheus counter over its labels
    curl -sf "$1" 2>/dev/null | awk -v n="$2" '$1 == n || index($1, n "{") == 1 { s += $2 } END { printf "%d\n", s }'
}
SECONDS=0

say "starting the local broker on 127.0.0.1:$PORT"
# The broker, sidecar and enricher get sessions of their own so that a Ctrl-C
# reaches only this script, which then stops them in order (the sidecar first,
# while the broker still takes its last records).
setsid bash scripts/broker.sh start "$OUT/broker" "$PORT" flowlog.flows flowlog.identity flowlog.dlq \
    || fail "the broker did not start" "$OUT/broker/broker.log"

say "building the workloads: namespaces ${NS_PREFIX}{$(IFS=,; echo "${WORKLOADS[*]}")} on bridge $BRIDGE ($NET.0/24)"
ip link add "$BRIDGE" type bridge
ip link set "$BRIDGE" up
for w in "${WORKLOADS[@]}"; do
    ns=$NS_PREFIX$w
    ip netns add "$ns"
    ip link add "fd-$w" type veth peer name eth0 netns "$ns"
    ip link set "fd-$w" master "$BRIDGE" up
    ip -n "$ns" addr add "${IP[$w]}/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
    printf '   %-9s %-12s netns %s\n' "$w" "${IP[$w]}" "$ns"
done
# Slow links: the replies of db and cache leave through a delayed (and, for
# db, lossy) link. netem where the kernel has it; else a token-bucket shaper
# whose short queue adds queueing delay and drops (so retransmits) on db.
if ip netns exec "${NS_PREFIX}db" tc qdisc add dev eth0 root netem delay 8ms 2ms loss 1.5% 2>/dev/null; then
    ip netns exec "${NS_PREFIX}cache" tc qdisc add dev eth0 root netem delay 1ms
    ip netns exec "${NS_PREFIX}api" tc qdisc add dev eth0 root netem delay 2ms
    echo "   netem: db 8±2 ms + 1.5% loss, api 2 ms, cache 1 ms (one way)"
else
    echo "   (netem is not available in this kernel: token-bucket shaping instead —"
    echo "    db 40 Mbit/s with a short queue (delay + drops), cache 200 Mbit/s)"
    ip netns exec "${NS_PREFIX}db" tc qdisc add dev eth0 root tbf rate 40mbit burst 32kb limit 96kb
    ip netns exec "${NS_PREFIX}cache" tc qdisc add dev eth0 root tbf rate 200mbit burst 64kb limit 512kb
fi

say "writing the static map $OUT/static-map.toml (${IP[stray]} left out on purpose)"
{
    echo "# Written by scripts/demo.sh: the demo workloads' addresses."
    # workload, app, team, tier (the service is named after the workload)
    for w in "frontend web storefront edge" "api shop-api storefront backend" \
             "db postgres data data" "cache redis data data"; do
        set -- $w
        printf '[[entry]]\ncidr = "%s/32"\nworkload = "%s"\napp = "%s"\nservice = "%s"\nteam = "%s"\nenv = "demo"\nlabels = { tier = "%s" }\n' \
            "${IP[$1]}" "$1" "$2" "$1" "$3" "$4"
        [ "$1" = cache ] || echo
    done
} > "$OUT/static-map.toml"

say "starting the sidecar (metrics http://127.0.0.1:$SIDECAR_METRICS/metrics)"
setsid $BIN/flowlog-sidecar --output kafka --kafka-brokers "127.0.0.1:$PORT" \
    --spool-dir "$OUT/spool" --metrics-listen "127.0.0.1:$SIDECAR_METRICS" --workload demo-host \
    --interim-interval-secs 3 --stats-file "$OUT/sidecar-stats.json" 2> "$OUT/sidecar.log" &
echo $! > "$OUT/run/sidecar.pid"
wait_started sidecar "capturing TCP flows"

say "starting the enricher (static map + the sidecar's identity; metrics http://127.0.0.1:$ENRICHER_METRICS/metrics)"
setsid $BIN/flowlog-enricher --brokers "127.0.0.1:$PORT" --group-id flowlog-demo --output-dir "$OUT/enriched" \
    --static-map "$OUT/static-map.toml" --batch-max-age-secs 2 --late-window-secs 0 \
    --metrics-listen "127.0.0.1:$ENRICHER_METRICS" 2> "$OUT/enricher.log" &
echo $! > "$OUT/run/enricher.pid"
wait_started enricher "enriching"

say "generating traffic for ${SECONDS_OF_TRAFFIC}s (flowlog-demo-traffic in each namespace)"
in_ns() { local w=$1; shift; ip netns exec "$NS_PREFIX$w" "$BIN/flowlog-demo-traffic" "$@"; }
serve() { # WORKLOAD PORT
    in_ns "$1" serve --listen "${IP[$1]}:$2" > "$OUT/traffic/serve-$1-$2.log" 2>&1 &
}
servers="frontend:80 api:8080 db:5432 cache:6379"
for s in $servers; do serve "${s%:*}" "${s#*:}"; done
for s in $servers; do
    f="$OUT/traffic/serve-${s%:*}-${s#*:}.log"
    for _ in $(seq 50); do grep -qs listening "$f" && break; sleep 0.1; done
    grep -qs listening "$f" || fail "the traffic server of ${s%:*} did not start" "$f"
done
client() { # FROM TO PORT ARGS...
    local from=$1 to=$2 port=$3; shift 3
    in_ns "$from" client --name "$from->$to:$port" --bind "${IP[$from]}" --connect "${IP[$to]}:$port" \
        --seconds "$SECONDS_OF_TRAFFIC" "$@" > "$OUT/traffic/$from-$to-$port.json" 2>&1 &
    clients+=($!)
}
clients=()
#      from     to       port  conn/s       req/conn       request        reply
client frontend api      8080  --rate 20 --requests 3  --request-bytes 200-2k --response-bytes 2k-96k --threads 4
client frontend cache    6379  --rate 5  --requests 2  --request-bytes 64-256 --response-bytes 200-4k
client frontend api      9090  --rate 2  --threads 1   # nothing listens there: failed connects
client api      db       5432  --rate 3  --requests 10 --request-bytes 100-1k --response-bytes 4k-256k --think-ms 30 --threads 6
client api      cache    6379  --rate 30 --requests 4  --request-bytes 64-512 --response-bytes 100-8k
client stray    frontend 80    --rate 3  --requests 2  --request-bytes 300-600 --response-bytes 10k-40k
for p in "${clients[@]}"; do wait "$p" || true; done
for f in "$OUT"/traffic/*-*-*.json; do
    "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); d["bytes"]=d["bytes_sent"]+d["bytes_received"]
print("   %(name)-24s %(connections)5d connections %(failed_connects)4d failed connects %(requests)6d requests %(bytes)12d bytes" % d)' "$f" \
        || fail "a traffic client failed" "$f"
done
# The servers and namespaces go now: their connections are all closed.
remove_network

say "stopping the sidecar (it delivers what it holds first)"
kill_pidfile "$OUT/run/sidecar.pid" flowlog-sidecar
if grep -q "left in the spool" "$OUT/sidecar.log"; then
    echo "   WARNING: the sidecar could not deliver everything (records left in $OUT/spool):"
    grep -E "WARN|ERROR" "$OUT/sidecar.log" | tail -n 3
fi
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
[ "$HIGH" -gt 0 ] || fail "the sidecar delivered no flow records" "$OUT/sidecar.log"

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
curl -sf "$EM" > "$OUT/enricher-metrics.txt" || true
echo "   consumed $seen; stopping it (it writes its open batches)"
kill_pidfile "$OUT/run/enricher.pid" flowlog-enricher
done_through=$(cat "$OUT"/enriched/_state/flowlog.flows-* 2>/dev/null | sort -n | tail -n 1)
[ "${done_through:--1}" -ge $((HIGH - 1)) ] \
    || fail "the enricher's files end at offset ${done_through:-none}, the topic at $((HIGH - 1))" "$OUT/enricher.log"
stop_broker
awk '/^flowlog_enricher_(dlq|sequence_gaps)_total/ { printf "   %s %s\n", $1, $2 }' "$OUT/enricher-metrics.txt"
"$PY" -c 'import json,sys; s=json.load(open(sys.argv[1])); s.update(s.pop("kernel")); s.update(s.pop("user"))
print("   sidecar: %(events)d kernel events, %(events_read)d read; drops: ring buffer full %(ringbuf_full)d, socket map full %(sock_map_full)d, listen map full %(listen_map_full)d; errors: read %(read_errors)d, decode %(decode_errors)d, output %(output_errors)d" % s)' \
    "$OUT/sidecar-stats.json" || echo "   (no sidecar stats file)"

say "summary, read back from the enriched Avro files with fastavro"
"$PY" scripts/demo_summary.py "$OUT/enriched" --traffic "$OUT/traffic" --svg "$OUT/workload-graph.svg" \
    || fail "the summary found no enriched flows (or failed)" "$OUT/enricher.log"
if command -v rsvg-convert >/dev/null && rsvg-convert "$OUT/workload-graph.svg" -o "$OUT/workload-graph.png" 2>/dev/null; then
    echo "(also as PNG: $OUT/workload-graph.png)"
fi
finished=1
printf '\n== done in %d s; files in %s/ (enriched/: Avro object container files, Hive-partitioned dt=/hr=)\n' "$SECONDS" "$OUT"
