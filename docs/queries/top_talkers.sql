-- Top talkers by workload pair (client -> server), by bytes both ways: the
-- table demo_summary.py prints. Connections are counted once (see
-- connections() in lake.sql); failed connects are counted but carry no bytes
-- or RTT. RTT: the client socket's smoothed RTT at close (ms), nearest-rank
-- percentiles; retransmits: segments re-sent by either end.
SELECT client, server,
    list_sort(list(DISTINCT server_port)) AS ports,
    count(*) AS connections,
    count(*) FILTER (WHERE failed) AS failed,
    coalesce(sum(c2s) FILTER (WHERE NOT failed), 0) AS bytes_c2s,
    coalesce(sum(s2c) FILTER (WHERE NOT failed), 0) AS bytes_s2c,
    coalesce(sum(retransmits) FILTER (WHERE NOT failed), 0) AS retransmits,
    pct(list(rtt_us) FILTER (WHERE NOT failed AND rtt_us IS NOT NULL), 50) / 1000 AS p50_rtt_ms,
    pct(list(rtt_us) FILTER (WHERE NOT failed AND rtt_us IS NOT NULL), 99) / 1000 AS p99_rtt_ms
FROM connections()
GROUP BY client, server
ORDER BY bytes_c2s + bytes_s2c DESC, connections DESC, client, server;
