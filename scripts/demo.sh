#!/usr/bin/env bash
# Demo: run the sidecar (table output) while a small traffic generator opens
# connections on this machine, then stop everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${FLOWLOG_DEMO_OUT:-out/demo}"
mkdir -p "$OUT"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -E"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

echo "== starting the sidecar (flows also saved to $OUT/flows.jsonl)"
$SUDO ./target/release/flowlog-sidecar --output json --stats-file "$OUT/stats.json" > "$OUT/flows.jsonl" 2> "$OUT/sidecar.log" &
pids+=($!)
for _ in $(seq 100); do grep -q "capturing TCP flows" "$OUT/sidecar.log" && break; sleep 0.1; done
grep -q "capturing TCP flows" "$OUT/sidecar.log" || { cat "$OUT/sidecar.log"; exit 1; }

echo "== generating traffic for 3 s"
./target/release/flowlog-loadgen --clients 2 --servers 2 --seconds 3
# A refused connection, to show failed connects.
(exec 3<>/dev/tcp/127.0.0.1/1) 2>/dev/null || true
sleep 0.5
kill -TERM "${pids[0]}"; wait "${pids[0]}" || true; pids=()

echo "== last flows"
python3 - "$OUT/flows.jsonl" <<'PY'
import json, sys, collections
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"{'PID':>7} {'COMM':<15} {'DIR':<6} {'LOCAL':<22} {'REMOTE':<22} {'TX':>8} {'RX':>8} {'RTT_US':>7} END")
for r in rows[-8:]:
    print(f"{r['pid']:>7} {r['comm']:<15} {r['direction']:<6} {r['local_addr']+':'+str(r['local_port']):<22} "
          f"{r['remote_addr']+':'+str(r['remote_port']):<22} {r['bytes_sent']:>8} {r['bytes_received']:>8} {r['srtt_us']:>7} {r['end_reason']}")
ends = collections.Counter(r['end_reason'] for r in rows)
print(f"\n{len(rows)} flows, {sum(r['bytes_sent'] for r in rows)} bytes sent; by end reason: {dict(ends)}")
PY
echo "== sidecar counters"; cat "$OUT/stats.json"; echo
echo "records: $OUT/flows.jsonl"
