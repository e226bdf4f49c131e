-- The flow lake in DuckDB: the `flows` view over the enricher's Parquet
-- output (one row per enriched record, schemas/enriched_flow.avsc; the Hive
-- partition columns dt and hr added from the paths), and the macros the
-- example queries share. Run it first:
--
--   SET VARIABLE lake = 'out/lake';      -- the Parquet sink's root folder
--   .read docs/queries/lake.sql
--   .read docs/queries/top_talkers.sql
--
-- scripts/lake_query.py does the same (and copies an s3:// prefix first).

CREATE OR REPLACE VIEW flows AS
SELECT * FROM read_parquet(getvariable('lake') || '/**/*.parquet', hive_partitioning = true);

-- The name of the workload that held an IP (Attribution.held_by): a Service's
-- ClusterIP as svc:NAMESPACE/NAME, a pod by its controller (a StatefulSet's
-- pods by their own names), a container by its name.
CREATE OR REPLACE MACRO held_name(hb) AS CASE
    WHEN hb.kind = 'CLUSTER_IP' THEN 'svc:' || hb.namespace || '/' || hb.name
    WHEN hb.kind = 'POD' AND coalesce(hb.owner_kind, '') <> 'StatefulSet'
        THEN coalesce(nullif(hb.owner_name, ''), nullif(hb.name, ''), hb.pod_uid)
    ELSE coalesce(nullif(hb.name, ''), nullif(hb.container_id, ''), hb.pod_uid)
END;

-- A side's workload name, as scripts/demo_summary.py names it: '? IP' when no
-- source knows the IP; the held_by workload; else the host's workload (app,
-- host id, IP), with the systemd unit for the local end of a host's service
-- (lw: the record's local_workload; NULL for the remote side).
CREATE OR REPLACE MACRO side_name(s, ip, lw) AS CASE
    WHEN NOT s.attributed THEN '? ' || ip
    WHEN s.held_by IS NOT NULL THEN held_name(s.held_by)
    ELSE coalesce(nullif(s.workload, ''), nullif(s.app, ''), nullif(s.host_id, ''), ip)
        || CASE WHEN lw.kind = 'SERVICE' AND nullif(lw.name, '') IS NOT NULL THEN '/' || lw.name ELSE '' END
END;

-- Addresses that are not on the internet: RFC 1918, loopback, link-local,
-- carrier-grade NAT (100.64/10); IPv6 unique-local (fc00::/7), link-local
-- (fe80::/10), loopback, and IPv4-mapped private addresses.
CREATE OR REPLACE MACRO is_private_ip(ip) AS
    regexp_matches(ip, '^(10\.|127\.|169\.254\.|192\.168\.|172\.(1[6-9]|2[0-9]|3[01])\.|100\.(6[4-9]|[7-9][0-9]|1[01][0-9]|12[0-7])\.)')
    OR regexp_matches(lower(ip), '^(f[cd]|fe[89ab]|::1$|::ffff:(10\.|127\.|192\.168\.|172\.(1[6-9]|2[0-9]|3[01])\.))');

-- The nearest-rank percentile (q in 0..100) of a list: the smallest value
-- with at least q% of the values at or below it (what demo_summary.py prints).
CREATE OR REPLACE MACRO pct(values, q) AS
    CASE WHEN len(values) = 0 THEN NULL
         ELSE list_sort(values)[greatest(1, ceil(q / 100 * len(values)))::INTEGER] END;

-- One row per TCP connection, counted once although it may be seen from both
-- ends (a client-side and a server-side record with the same flow_id).
-- Counters are deltas across a connection's INTERIM and FINAL records, so
-- each end's records are summed first (per host_id, connection_id; RTT, end
-- reason and error from its last record). Of the two ends, the client's gives
-- the direction, bytes and RTT (the server's RTT when the client's is 0);
-- retransmits add up both ends (each end counts what it re-sent). An end
-- whose direction is UNKNOWN (opened before the sidecar started) is taken as
-- local -> remote.
--   client, server: workload names (side_name); client_side, server_side:
--   their Attribution; c2s/s2c: payload bytes client->server, server->client.
CREATE OR REPLACE MACRO connections() AS TABLE
WITH ends AS (
    SELECT host_id, connection_id,
        min([sequence_epoch, sequence]) AS first_k,
        arg_min_null(flow_id, [sequence_epoch, sequence]) AS flow_id,
        arg_min_null(direction, [sequence_epoch, sequence]) AS direction,
        arg_min_null(local_ip, [sequence_epoch, sequence]) AS local_ip,
        arg_min_null(local_port, [sequence_epoch, sequence]) AS local_port,
        arg_min_null(remote_ip, [sequence_epoch, sequence]) AS remote_ip,
        arg_min_null(remote_port, [sequence_epoch, sequence]) AS remote_port,
        arg_min_null("local", [sequence_epoch, sequence]) AS local_side,
        arg_min_null("remote", [sequence_epoch, sequence]) AS remote_side,
        arg_min_null(local_workload, [sequence_epoch, sequence]) AS local_workload,
        arg_min_null(start_time_ns, [sequence_epoch, sequence]) AS start_time_ns,
        arg_max_null(end_time_ns, [sequence_epoch, sequence]) AS end_time_ns,
        sum(bytes_sent) AS bytes_sent, sum(bytes_received) AS bytes_received,
        sum(retransmits) AS retransmits,
        arg_max_null(srtt_us, [sequence_epoch, sequence]) AS srtt_us,
        arg_max_null(end_reason, [sequence_epoch, sequence]) AS end_reason,
        arg_max_null(error, [sequence_epoch, sequence]) AS error,
        count(*) AS records
    FROM flows
    GROUP BY host_id, connection_id
), numbered AS (
    -- Two connections can share a flow_id (the same 5-tuple within its 10 s
    -- bucket: a refused connect frees its port, and the next connect to that
    -- server may take it again): a host's n-th end of a direction, by start
    -- time, joins the other host's (or the other direction's) n-th.
    SELECT *, row_number() OVER (PARTITION BY flow_id, direction, host_id
        ORDER BY coalesce(start_time_ns, 0), connection_id) AS nth
    FROM ends
), ordered AS (
    SELECT *,
        row_number() OVER w AS rank,
        count(*) OVER (PARTITION BY flow_id, nth) AS ends,
        sum(retransmits) OVER (PARTITION BY flow_id, nth) AS retx_both,
        first_value(nullif(srtt_us, 0) IGNORE NULLS) OVER (w ROWS BETWEEN UNBOUNDED PRECEDING AND UNBOUNDED FOLLOWING) AS rtt
    FROM numbered
    WINDOW w AS (PARTITION BY flow_id, nth ORDER BY
        CASE direction WHEN 'CLIENT' THEN 0 WHEN 'SERVER' THEN 1 WHEN 'UNKNOWN' THEN 2 ELSE 3 END, host_id, first_k)
)
SELECT flow_id, direction, ends,
    CASE WHEN direction = 'SERVER' THEN side_name(remote_side, remote_ip, NULL)
         ELSE side_name(local_side, local_ip, local_workload) END AS client,
    CASE WHEN direction = 'SERVER' THEN side_name(local_side, local_ip, local_workload)
         ELSE side_name(remote_side, remote_ip, NULL) END AS server,
    CASE WHEN direction = 'SERVER' THEN remote_ip ELSE local_ip END AS client_ip,
    CASE WHEN direction = 'SERVER' THEN local_ip ELSE remote_ip END AS server_ip,
    CASE WHEN direction = 'SERVER' THEN local_port ELSE remote_port END AS server_port,
    CASE WHEN direction = 'SERVER' THEN remote_side ELSE local_side END AS client_side,
    CASE WHEN direction = 'SERVER' THEN local_side ELSE remote_side END AS server_side,
    end_reason = 'FAILED_CONNECT' AS failed, end_reason, error,
    CASE WHEN direction = 'SERVER' THEN bytes_received ELSE bytes_sent END AS c2s,
    CASE WHEN direction = 'SERVER' THEN bytes_sent ELSE bytes_received END AS s2c,
    retx_both AS retransmits, rtt AS rtt_us, start_time_ns, end_time_ns
FROM ordered
WHERE rank = 1;
