-- RTT by destination: the client socket's smoothed RTT at close (srtt_us;
-- the server's when the client's is 0) over the connections to each server
-- workload (counted once, failed connects left out), nearest-rank
-- percentiles in ms.
SELECT server AS destination,
    any_value(server_side.service) AS service_label,
    count(*) AS connections,
    pct(list(rtt_us), 50) / 1000 AS p50_rtt_ms,
    pct(list(rtt_us), 99) / 1000 AS p99_rtt_ms,
    max(rtt_us) / 1000 AS max_rtt_ms
FROM connections()
WHERE NOT failed AND rtt_us IS NOT NULL
GROUP BY server
ORDER BY p99_rtt_ms DESC, destination;
