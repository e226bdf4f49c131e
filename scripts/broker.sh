#!/usr/bin/env bash
# Local Kafka-protocol broker (tansu, sqlite storage) on 127.0.0.1 only.
#   scripts/broker.sh start DIR PORT [TOPIC...]   start, wait until ready, create topics
#   scripts/broker.sh stop DIR                    stop the broker started in DIR (by PID) and wait until it exited
# start exits 3 when PORT is taken by another process: the caller may retry on another port.
# Environment: PARTITIONS (default 1) per topic; STORAGE=memory for the faster
# in-memory engine (benchmarks only); STOP_GRACE_SECS (default 5) before stop
# falls back to SIGKILL; BROKER_IP (default 127.0.0.1) the address it listens
# on and advertises (the soak puts the sidecar behind a link it can cut).
set -euo pipefail
TOOLS="${FLOWLOG_TOOLS:-$HOME/.cache/flowlog/tools}"
TANSU="${TANSU:-$TOOLS/tansu-0.6.0/bin/tansu}"
cmd="${1:?usage: broker.sh start|stop DIR [PORT TOPIC...]}"
dir="${2:?missing DIR}"

# True while PID runs (a zombie has exited, only its parent has not reaped it).
running() {
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    s=${s##*) }
    [ "${s:0:1}" != Z ]
}

# Inodes of the TCP sockets listening on PORT, any address, IPv4 or IPv6.
listeners() {
    awk -v p="$(printf ':%04X' "$1")" '$4 == "0A" && substr($2, length($2) - 4) == p { print $10 }' \
        /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# True when PID itself listens on PORT: a listener that belongs to someone else
# must not pass for our broker.
listens() {
    local inode fds
    fds=$(ls -l "/proc/$1/fd" 2>/dev/null) || return 1
    for inode in $(listeners "$2"); do
        grep -qF "socket:[$inode]" <<<"$fds" && return 0
    done
    return 1
}

# SIGTERM, then wait for the exit. tansu can ignore SIGTERM for many seconds
# while busy (and then stays on its port at high CPU): SIGKILL after the grace.
stop_broker() {
    local pid=$1 grace="${STOP_GRACE_SECS:-5}"
    # Only our broker: after it died on its own, its PID may be someone else's.
    [ -n "$pid" ] && grep -qa tansu "/proc/$pid/cmdline" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq $((grace * 10))); do running "$pid" || return 0; sleep 0.1; done
    echo "broker $pid still running ${grace} s after SIGTERM: SIGKILL" >&2
    kill -KILL "$pid" 2>/dev/null || true
    for _ in $(seq 50); do running "$pid" || return 0; sleep 0.1; done
    echo "broker $pid did not exit" >&2
    return 1
}

case "$cmd" in
start)
    port="${3:?missing PORT}"; shift 3
    [ -x "$TANSU" ] || { echo "tansu not found at $TANSU: run make setup" >&2; exit 1; }
    [ -z "$(listeners "$port")" ] || { echo "port $port is taken" >&2; exit 3; }
    mkdir -p "$dir"
    # tansu resolves sqlite:// paths against its working directory.
    engine="sqlite://tansu.db"; [ "${STORAGE:-sqlite}" = memory ] && engine="memory://tansu/"
    ip="${BROKER_IP:-127.0.0.1}"
    (cd "$dir" && exec "$TANSU" broker --listener-url "tcp://$ip:$port" \
        --advertised-listener-url "tcp://$ip:$port" --storage-engine "$engine" \
        > broker.log 2>&1) &
    pid=$!
    echo "$pid" > "$dir/broker.pid"
    ready=0
    for _ in $(seq 150); do
        if listens "$pid" "$port"; then ready=1; break; fi
        running "$pid" || break
        sleep 0.1
    done
    if [ "$ready" != 1 ]; then
        # Someone bound the port between the check above and the broker's
        # bind, or a connection in TIME_WAIT still holds it as its local port
        # (a port from the ephemeral range: tansu binds without SO_REUSEADDR).
        if ! running "$pid" && { [ -n "$(listeners "$port")" ] || grep -q AddrInUse "$dir/broker.log"; }; then
            echo "port $port was taken before the broker bound it" >&2; rm -f "$dir/broker.pid"; exit 3
        fi
        echo "broker did not start:" >&2; cat "$dir/broker.log" >&2; stop_broker "$pid" || true; exit 1
    fi
    for t in "$@"; do
        "$TANSU" topic create --broker "tcp://$ip:$port" --partitions "${PARTITIONS:-1}" "$t" >> "$dir/topics.log" 2>&1 \
            || { echo "creating topic $t failed:" >&2; cat "$dir/topics.log" >&2; stop_broker "$pid" || true; exit 1; }
    done
    echo "broker pid $pid on $ip:$port"
    ;;
stop)
    [ -f "$dir/broker.pid" ] || exit 0
    stop_broker "$(cat "$dir/broker.pid")"
    rm -f "$dir/broker.pid"
    ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
