# Writes alerts_test.yaml (promtool unit tests of alerts.yaml). The cases and the
# expected summaries are written here by hand; descriptions are copied from
# alerts.yaml. After editing alerts.yaml: python3 deploy/prometheus/gen_alerts_test.py
# (needs PyYAML), then scripts/check-deploy.sh runs them with promtool.
import os, yaml
HERE = os.path.dirname(os.path.abspath(__file__))
rules = {r['alert']: r for g in yaml.safe_load(open(os.path.join(HERE, 'alerts.yaml')))['groups'] for r in g['rules']}
def A(name, labels, summary):
    r = rules[name]
    l = dict(labels); l['severity'] = r['labels']['severity']
    return {'exp_labels': l, 'exp_annotations': {'summary': summary, 'description': r['annotations']['description']}}
def T(name, at, alerts=()):
    return {'eval_time': at, 'alertname': name, 'exp_alerts': list(alerts)}
S = lambda series, values: {'series': series, 'values': values}
tests = []
def case(comment, series, checks):
    tests.append({'name': comment, 'interval': '1m', 'input_series': series, 'alert_rule_test': checks})

# ---------------- sidecar ----------------
case('sidecar down: only the target that stopped answering', [
    S('up{job="flowlog-sidecar",instance="a:9464"}', '1x15'),
    S('up{job="flowlog-sidecar",instance="b:9464"}', '1 1 0x13'),
], [T('FlowlogSidecarDown', '4m'),
    T('FlowlogSidecarDown', '8m', [A('FlowlogSidecarDown', {'job': 'flowlog-sidecar', 'instance': 'b:9464'}, 'flowlog sidecar on b:9464 is not scraped')])])

case('ring buffer drops fire while increasing, clear after; other reasons do not count', [
    S('flowlog_sidecar_flows_dropped_total{instance="a",reason="ringbuf_full"}', '0 0 0 0 0 10 20 20x15'),
    S('flowlog_sidecar_flows_dropped_total{instance="b",reason="ringbuf_full"}', '0x22'),
    S('flowlog_sidecar_flows_dropped_total{instance="b",reason="spool_full"}', '0 0 0 0 0 50 100 100x15'),
], [T('FlowlogSidecarRingBufferDrops', '3m'),
    T('FlowlogSidecarRingBufferDrops', '7m', [A('FlowlogSidecarRingBufferDrops', {'instance': 'a'}, 'flowlog sidecar on a lost 20 flows: ring buffer full')]),
    T('FlowlogSidecarRingBufferDrops', '15m')])

case('records lost after capture, by reason; sock_map_full is not a loss', [
    S('flowlog_sidecar_flows_dropped_total{instance="a",reason="spool_full"}', '0 0 0 0 400 800 800x15'),
    S('flowlog_sidecar_flows_degraded_total{instance="a",reason="sock_map_full"}', '0 0 0 0 400 800 800x15'),
    S('flowlog_sidecar_flows_dropped_total{instance="b",reason="decode_error"}', '0x20'),
], [T('FlowlogSidecarRecordsLost', '3m'),
    T('FlowlogSidecarRecordsLost', '6m', [A('FlowlogSidecarRecordsLost', {'instance': 'a', 'reason': 'spool_full'}, 'flowlog sidecar on a lost 800 flow records (spool_full)')]),
    T('FlowlogSidecarRecordsLost', '15m')])

case('socket map or listener map full', [
    S('flowlog_sidecar_flows_degraded_total{instance="a",reason="sock_map_full"}', '0 0 0 7 7x20'),
    S('flowlog_sidecar_listen_map_full_total{instance="a"}', '0x25'),
    S('flowlog_sidecar_listen_map_full_total{instance="b"}', '0 0 0 0 0 2 2x20'),
    S('flowlog_sidecar_listen_map_full_total{instance="c"}', '0x25'),
], [T('FlowlogSidecarTrackingMapsFull', '2m'),
    T('FlowlogSidecarTrackingMapsFull', '6m', [
        A('FlowlogSidecarTrackingMapsFull', {'instance': 'a'}, 'flowlog sidecar on a: socket or listener map full'),
        A('FlowlogSidecarTrackingMapsFull', {'instance': 'b'}, 'flowlog sidecar on b: socket or listener map full')]),
    T('FlowlogSidecarTrackingMapsFull', '24m')])

case('kernel read errors', [
    S('flowlog_sidecar_kernel_read_errors_total{instance="a"}', '0 0 0 0 0 3 3x30'),
    S('flowlog_sidecar_kernel_read_errors_total{instance="b"}', '0x35'),
], [T('FlowlogSidecarKernelReadErrors', '4m'),
    T('FlowlogSidecarKernelReadErrors', '6m', [A('FlowlogSidecarKernelReadErrors', {'instance': 'a'}, 'flowlog eBPF program on a failed 3 kernel reads')]),
    T('FlowlogSidecarKernelReadErrors', '30m')])

case('broker down for 5 minutes', [
    S('flowlog_sidecar_broker_up{instance="a"}', '1x15'),
    S('flowlog_sidecar_broker_up{instance="b"}', '1 1 0x13'),
    S('flowlog_sidecar_broker_up{instance="c"}', '1 1 0 0 1x11'),
], [T('FlowlogSidecarBrokerDown', '5m'),
    T('FlowlogSidecarBrokerDown', '8m', [A('FlowlogSidecarBrokerDown', {'instance': 'b'}, 'flowlog sidecar on b cannot reach Kafka')])])

case('spool growing for 30 minutes; a stable or empty spool is fine', [
    S('flowlog_sidecar_spool_bytes{instance="a"}', '0x45'),
    S('flowlog_sidecar_spool_bytes{instance="b"}', '0 0 0+1048576x43'),
    S('flowlog_sidecar_spool_bytes{instance="c"}', '5242880x45'),
], [T('FlowlogSidecarSpoolGrowing', '10m'),
    T('FlowlogSidecarSpoolGrowing', '40m', [A('FlowlogSidecarSpoolGrowing', {'instance': 'b'}, 'flowlog spool on b has grown for 30 minutes (38MiB)')])])

case('spool above 80 % of spool.max_bytes for 5 minutes', [
    S('flowlog_sidecar_spool_bytes{instance="a"}', '500x20'),
    S('flowlog_sidecar_spool_max_bytes{instance="a"}', '1000x20'),
    S('flowlog_sidecar_spool_bytes{instance="b"}', '900x20'),
    S('flowlog_sidecar_spool_max_bytes{instance="b"}', '1000x20'),
], [T('FlowlogSidecarSpoolNearlyFull', '3m'),
    T('FlowlogSidecarSpoolNearlyFull', '10m', [A('FlowlogSidecarSpoolNearlyFull', {'instance': 'b'}, 'flowlog spool on b is 90% full')])])

case('delivery latency p99 above 5 s for 15 minutes', [
    S('flowlog_sidecar_delivery_latency_seconds_bucket{instance="a",le="0.1"}', '0+10x30'),
    S('flowlog_sidecar_delivery_latency_seconds_bucket{instance="a",le="5"}', '0+10x30'),
    S('flowlog_sidecar_delivery_latency_seconds_bucket{instance="a",le="10"}', '0+10x30'),
    S('flowlog_sidecar_delivery_latency_seconds_bucket{instance="a",le="+Inf"}', '0+10x30'),
    S('flowlog_sidecar_delivery_latency_seconds_bucket{instance="b",le="0.1"}', '0x30'),
    S('flowlog_sidecar_delivery_latency_seconds_bucket{instance="b",le="5"}', '0x30'),
    S('flowlog_sidecar_delivery_latency_seconds_bucket{instance="b",le="10"}', '0+10x30'),
    S('flowlog_sidecar_delivery_latency_seconds_bucket{instance="b",le="+Inf"}', '0+10x30'),
], [T('FlowlogSidecarDeliveryLatencyHigh', '10m'),
    T('FlowlogSidecarDeliveryLatencyHigh', '25m', [A('FlowlogSidecarDeliveryLatencyHigh', {'instance': 'b'}, 'flowlog produce latency p99 on b is 9.95s')])])

# ---------------- enricher ----------------
case('enricher down', [
    S('up{job="flowlog-enricher",instance="10.0.0.1:9465"}', '1x15'),
    S('up{job="flowlog-enricher",instance="10.0.0.2:9465"}', '0x15'),
], [T('FlowlogEnricherDown', '3m'),
    T('FlowlogEnricherDown', '6m', [A('FlowlogEnricherDown', {'job': 'flowlog-enricher', 'instance': '10.0.0.2:9465'}, 'flowlog enricher 10.0.0.2:9465 is not scraped')])])

case('keeping up: lag is 100 s of input (steady state of batching); idle: no lag, no input', [
    S('flowlog_enricher_consumer_lag_records{instance="e1"}', '500000x40'),
    S('flowlog_enricher_consumer_lag_records{instance="e2"}', '500000x40'),
    S('flowlog_enricher_records_in_total{instance="e1"}', '0+300000x40'),
    S('flowlog_enricher_records_in_total{instance="e2"}', '0+300000x40'),
], [T('FlowlogEnricherFallingBehind', '30m'), T('FlowlogEnricherLagHigh', '30m')])

case('idle: no lag and no input is not behind', [
    S('flowlog_enricher_consumer_lag_records{instance="e1"}', '0x40'),
    S('flowlog_enricher_records_in_total{instance="e1"}', '100x40'),
], [T('FlowlogEnricherFallingBehind', '30m')])

case('falling behind: 20 minutes of input unprocessed', [
    S('flowlog_enricher_consumer_lag_records{instance="e1"}', '12000000x40'),
    S('flowlog_enricher_records_in_total{instance="e1"}', '0+600000x40'),
], [T('FlowlogEnricherFallingBehind', '10m'),
    T('FlowlogEnricherFallingBehind', '25m', [A('FlowlogEnricherFallingBehind', {}, 'flowlog enrichers are 20m 0s behind the flow topic')])])

case('stalled: lag but nothing consumed', [
    S('flowlog_enricher_consumer_lag_records{instance="e1"}', '1000x40'),
    S('flowlog_enricher_records_in_total{instance="e1"}', '5000x40'),
], [T('FlowlogEnricherFallingBehind', '25m', [A('FlowlogEnricherFallingBehind', {}, 'flowlog enrichers are +Inf behind the flow topic')])])

case('lag above 50 M records', [
    S('flowlog_enricher_consumer_lag_records{instance="e1"}', '40000000x40'),
    S('flowlog_enricher_consumer_lag_records{instance="e2"}', '20000000x40'),
], [T('FlowlogEnricherLagHigh', '10m'),
    T('FlowlogEnricherLagHigh', '20m', [A('FlowlogEnricherLagHigh', {}, 'flowlog consumer lag is 60M records')])])

case('local side unattributed above 1 %', [
    S('flowlog_enricher_attributed_total{instance="e1",side="local",source="SIDECAR"}', '0+980x40'),
    S('flowlog_enricher_unattributed_total{instance="e1",side="local",reason="UNKNOWN_IP"}', '0+20x40'),
    S('flowlog_enricher_attributed_total{instance="e1",side="remote",source="SIDECAR"}', '0+1000x40'),
], [T('FlowlogLocalSideUnattributed', '10m'),
    T('FlowlogLocalSideUnattributed', '35m', [A('FlowlogLocalSideUnattributed', {}, '2% of flows have an unattributed local side')])])

case('local side attributed (0.5 % missing); remote mostly unknown: info only after 30 minutes', [
    S('flowlog_enricher_attributed_total{instance="e1",side="local",source="SIDECAR"}', '0+995x70'),
    S('flowlog_enricher_unattributed_total{instance="e1",side="local",reason="UNKNOWN_IP"}', '0+5x70'),
    S('flowlog_enricher_attributed_total{instance="e1",side="remote",source="STATIC"}', '0+200x70'),
    S('flowlog_enricher_unattributed_total{instance="e1",side="remote",reason="UNKNOWN_IP"}', '0+800x70'),
], [T('FlowlogLocalSideUnattributed', '65m'),
    T('FlowlogUnattributedShareHigh', '25m'),
    T('FlowlogUnattributedShareHigh', '65m', [A('FlowlogUnattributedShareHigh', {}, '40.25% of flow ends are unattributed')])])

case('EC2 source stale; a static map out of sync since minute 3; a static map in sync never alerts', [
    S('flowlog_enricher_source_age_seconds{instance="e1",source="ec2"}', '0 60 0 60 0+60x30'),
    S('flowlog_enricher_source_age_seconds{instance="e1",source="static"}', '0x35'),
    S('flowlog_enricher_source_age_seconds{instance="e3",source="static"}', '0x2 0+60x30'),
    S('flowlog_enricher_source_age_seconds{instance="e2",source="ec2"}', '0 60 0 60 0 60 0 60 0 60 0 60 0 60 0 60 0 60 0 60 0 60 0 60 0 60'),
], [T('FlowlogMetadataSourceStale', '10m'),
    T('FlowlogMetadataSourceStale', '20m', [A('FlowlogMetadataSourceStale', {'instance': 'e1', 'source': 'ec2'}, 'flowlog ec2 metadata on e1 is 16m 0s old'),
                                            A('FlowlogMetadataSourceStale', {'instance': 'e3', 'source': 'static'}, 'flowlog static metadata on e3 is 17m 0s old')])])

case('source errors', [
    S('flowlog_enricher_source_errors_total{instance="e1",source="static"}', '0 0 1 1x20'),
    S('flowlog_enricher_source_errors_total{instance="e1",source="ec2"}', '0x23'),
], [T('FlowlogMetadataSourceErrors', '1m'),
    T('FlowlogMetadataSourceErrors', '5m', [A('FlowlogMetadataSourceErrors', {'instance': 'e1', 'source': 'static'}, 'flowlog static source on e1 failed 1 times')]),
    T('FlowlogMetadataSourceErrors', '20m')])

case('identity heartbeats stop at 2m', [
    S('flowlog_enricher_identity_last_seen_timestamp_seconds{instance="e1"}', '0 60 120x20'),
    S('flowlog_enricher_identity_last_seen_timestamp_seconds{instance="e2"}', '0 60 115x20'),
], [T('FlowlogIdentityStale', '10m'),
    T('FlowlogIdentityStale', '14m', [A('FlowlogIdentityStale', {}, 'No sidecar identity heartbeat for 12m 0s')])])

case('identity heartbeats keep coming', [
    S('flowlog_enricher_identity_last_seen_timestamp_seconds{instance="e1"}', '0+60x30'),
], [T('FlowlogIdentityStale', '25m')])

case('dead letters', [
    S('flowlog_enricher_dlq_total{instance="e1",reason="schema"}', '0 0 0+60x20'),
    S('flowlog_enricher_dlq_total{instance="e1",reason="truncated"}', '0x25'),
], [T('FlowlogEnricherDeadLetters', '1m'),
    T('FlowlogEnricherDeadLetters', '15m', [A('FlowlogEnricherDeadLetters', {'reason': 'schema'}, 'flowlog enricher sends 1 messages/s to the dead-letter topic (schema)')])])

case('sequence gaps', [
    S('flowlog_enricher_sequence_gaps_total{instance="e1"}', '0 0 0 3 3x25'),
    S('flowlog_enricher_sequence_gaps_total{instance="e2"}', '0x30'),
], [T('FlowlogSequenceGaps', '2m'),
    T('FlowlogSequenceGaps', '5m', [A('FlowlogSequenceGaps', {}, '3 flow records missing between sidecars and enrichers')]),
    T('FlowlogSequenceGaps', '25m')])

# every alert must be tested firing
fired = {a['exp_labels'] and t['alertname'] for c in tests for t in c['alert_rule_test'] for a in t['exp_alerts']}
missing = set(rules) - fired
assert not missing, missing
out = {'rule_files': ['alerts.yaml'], 'evaluation_interval': '1m', 'tests': tests}
class D(yaml.SafeDumper): pass
D.add_representer(str, lambda d, s: d.represent_scalar('tag:yaml.org,2002:str', s, style="'" if any(c in s for c in '{}"=+') else None))
hdr = ("# promtool unit tests of alerts.yaml: each alert fires on realistic series and\n"
       "# stays quiet on healthy ones. Run: promtool test rules deploy/prometheus/alerts_test.yaml\n"
       "# (scripts/check-deploy.sh does). 'name' says what each case shows.\n")
open(os.path.join(HERE, 'alerts_test.yaml'), 'w').write(hdr + yaml.dump(out, Dumper=D, sort_keys=False, width=200))
