#!/usr/bin/env bash
# Demo: a local broker, the sidecar producing this machine's real TCP flows to
# it (Avro), a small traffic generator, then the records read back from the
# topic with an independent Avro reader (fastavro). Stops everything it
# started, also on Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS="${FLOWLOG_TOOLS:-$HOME/.cache/flowlog/tools}"
PY="$TOOLS/venv-py-1/bin/python"
OUT="${FLOWLOG_DEMO_OUT:-out/demo}"
rm -rf "$OUT"; mkdir -p "$OUT"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -E"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port); METRICS=$(free_port)
sidecar_pid=""
cleanup() {
    [ -n "$sidecar_pid" ] && kill -TERM "$sidecar_pid" 2>/dev/null && wait "$sidecar_pid" 2>/dev/null || true
    bash scripts/broker.sh stop "$OUT/broker"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

echo "== starting the local broker on 127.0.0.1:$PORT"
bash scripts/broker.sh start "$OUT/broker" "$PORT" flowlog.flows flowlog.identity

echo "== starting the sidecar (metrics on http://127.0.0.1:$METRICS/metrics)"
$SUDO ./target/release/flowlog-sidecar --output kafka --kafka-brokers "127.0.0.1:$PORT" \
    --spool-dir "$OUT/spool" --metrics-listen "127.0.0.1:$METRICS" --workload demo-host \
    --interim-interval-secs 2 --stats-file "$OUT/stats.json" 2> "$OUT/sidecar.log" &
sidecar_pid=$!
for _ in $(seq 100); do grep -q "capturing TCP flows" "$OUT/sidecar.log" && break; sleep 0.1; done
grep -q "capturing TCP flows" "$OUT/sidecar.log" || { cat "$OUT/sidecar.log"; exit 1; }

echo "== generating traffic: 1 s of short connections, a refused connect, a 5 s connection"
python3 - <<'PY' &
import socket, threading, time
l = socket.socket(); l.bind(("127.0.0.1", 0)); l.listen()
def srv():
    c, _ = l.accept()
    while c.recv(65536): pass
threading.Thread(target=srv, daemon=True).start()
c = socket.create_connection(l.getsockname())
for _ in range(5):
    c.sendall(b"x" * 100_000); time.sleep(1)
c.close()
PY
slow=$!
./target/release/flowlog-loadgen --clients 1 --servers 1 --seconds 1
(exec 3<>/dev/tcp/127.0.0.1/1) 2>/dev/null || true
wait "$slow"
sleep 0.5
curl -s "http://127.0.0.1:$METRICS/metrics" | grep -E "^flowlog_sidecar_(flows_(produced|delivered)|events_read|broker_up|spool_records)" || true
kill -TERM "$sidecar_pid"; wait "$sidecar_pid" || true; sidecar_pid=""

echo "== records read back from the broker"
"$PY" - "127.0.0.1:$PORT" schemas/flow.avsc schemas/identity.avsc <<'PY'
import io, json, socket, sys, collections
from confluent_kafka import Consumer, TopicPartition
from fastavro import parse_schema, schemaless_reader
from fastavro.schema import to_parsing_canonical_form, fingerprint

brokers, flow_avsc, ident_avsc = sys.argv[1:4]
def load(path):
    s = parse_schema(json.load(open(path)))
    fp = bytes.fromhex(fingerprint(to_parsing_canonical_form(s), "CRC-64-AVRO"))
    return s, fp
def read_all(topic, schema, fp):
    c = Consumer({"bootstrap.servers": brokers, "group.id": "demo", "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 0)])
    out, idle = [], 0.0
    # Stop after 5 s without a message (30 s before the first one).
    while idle < (5 if out else 30):
        m = c.poll(0.5)
        if m is None or m.error():
            idle += 0.5; continue
        idle = 0.0
        v = m.value()
        assert v[:2] == b"\xc3\x01" and v[2:10] == fp, "not single-object encoded with this schema"
        out.append(schemaless_reader(io.BytesIO(v[10:]), schema))
    c.close()
    return out

flows = read_all("flowlog.flows", *load(flow_avsc))
ids = read_all("flowlog.identity", *load(ident_avsc))
ip = lambda b: socket.inet_ntop(socket.AF_INET6 if len(b) == 16 else socket.AF_INET, b)
print(f"{'PID':>7} {'COMM':<15} {'DIR':<6} {'LOCAL':<22} {'REMOTE':<22} {'TX':>9} {'RX':>9} {'RTT_US':>7} {'TYPE':<8}END")
for r in flows[-10:]:
    print(f"{r['pid']:>7} {r['comm']:<15} {r['direction']:<6} {ip(r['local_addr'])+':'+str(r['local_port']):<22} "
          f"{ip(r['remote_addr'])+':'+str(r['remote_port']):<22} {r['bytes_sent']:>9} {r['bytes_received']:>9} {r['srtt_us']:>7} {r['record_type']:<8}{r['end_reason']}")
finals = [r for r in flows if r["record_type"] == "FINAL"]
print(f"\n{len(flows)} records ({len(finals)} final, {len(flows)-len(finals)} interim); "
      f"{sum(r['bytes_sent'] for r in flows)} payload bytes sent in total")
print("by end reason:", dict(collections.Counter(r["end_reason"] for r in finals)))
talkers = collections.Counter()
for r in flows:
    talkers[(r["comm"], r["direction"], r["remote_port"] if r["direction"] == "CLIENT" else r["local_port"])] += r["bytes_sent"]
print("top talkers (comm, direction, service port) by bytes sent:")
for (comm, d, port), b in talkers.most_common(5):
    print(f"  {comm:<15} {d:<7} port {port:<6} {b:>12} bytes")
epochs = collections.defaultdict(set)
for r in flows:
    epochs[(r["host"]["host_id"], r["sequence_epoch"])].add(r["sequence"])
for (h, e), seqs in epochs.items():
    gaps = (max(seqs) + 1) - len(seqs)
    print(f"host {h[:12]}… epoch {e}: sequences 0..{max(seqs)}, gaps {gaps}")
print("identity heartbeats:", [(i["reason"], i["host"]["workload"], i["host"]["ips"][:3]) for i in ids])
PY
echo "== sidecar counters ($OUT/stats.json)"; cat "$OUT/stats.json"; echo
