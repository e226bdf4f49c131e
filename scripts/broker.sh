#!/usr/bin/env bash
# Local Kafka-protocol broker (tansu, sqlite storage) on 127.0.0.1 only.
#   scripts/broker.sh start DIR PORT [TOPIC...]   start, wait until ready, create topics
#   scripts/broker.sh stop DIR                    stop the broker started in DIR (by PID)
set -euo pipefail
TOOLS="${FLOWLOG_TOOLS:-$HOME/.cache/flowlog/tools}"
TANSU="${TANSU:-$TOOLS/tansu-0.6.0/bin/tansu}"
cmd="${1:?usage: broker.sh start|stop DIR [PORT TOPIC...]}"
dir="${2:?missing DIR}"
case "$cmd" in
start)
    port="${3:?missing PORT}"; shift 3
    [ -x "$TANSU" ] || { echo "tansu not found at $TANSU: run make setup" >&2; exit 1; }
    mkdir -p "$dir"
    # tansu resolves sqlite:// paths against its working directory.
    # STORAGE=memory selects the faster in-memory engine (benchmarks only).
    engine="sqlite://tansu.db"; [ "${STORAGE:-sqlite}" = memory ] && engine="memory://tansu/"
    (cd "$dir" && exec "$TANSU" broker --listener-url "tcp://127.0.0.1:$port" \
        --advertised-listener-url "tcp://127.0.0.1:$port" --storage-engine "$engine" \
        > broker.log 2>&1) &
    echo $! > "$dir/broker.pid"
    ready=0
    for _ in $(seq 150); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then ready=1; break; fi
        kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null || break
        sleep 0.1
    done
    [ "$ready" = 1 ] || { echo "broker did not start:" >&2; cat "$dir/broker.log" >&2; exit 1; }
    for t in "$@"; do
        "$TANSU" topic create --broker "tcp://127.0.0.1:$port" --partitions "${PARTITIONS:-1}" "$t" >> "$dir/topics.log" 2>&1 \
            || { echo "creating topic $t failed:" >&2; cat "$dir/topics.log" >&2; exit 1; }
    done
    echo "broker pid $(cat "$dir/broker.pid") on 127.0.0.1:$port"
    ;;
stop)
    if [ -f "$dir/broker.pid" ]; then
        kill "$(cat "$dir/broker.pid")" 2>/dev/null || true
        rm -f "$dir/broker.pid"
    fi
    ;;
*) echo "unknown command $cmd" >&2; exit 2 ;;
esac
