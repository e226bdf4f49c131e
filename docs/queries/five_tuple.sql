-- Every record of the connections between ip_a:port_a and ip_b:port_b (TCP;
-- either may be the client), from both ends, in time order: who saw it, its
-- interim and final counters, how it ended, and both sides' attribution.
--   SET VARIABLE ip_a = '10.0.1.5'; SET VARIABLE port_a = '43122';
--   SET VARIABLE ip_b = '10.0.2.9'; SET VARIABLE port_b = '8080';
-- The partition columns (dt, hr) prune the scan when a time range is added,
-- e.g. AND dt = DATE '2026-11-30'.
SELECT dt, hr, flow_id, host_id, direction, record_type,
    local_ip, local_port, remote_ip, remote_port,
    start_time_ns, end_time_ns, bytes_sent, bytes_received, retransmits,
    srtt_us, end_reason, error,
    side_name("local", local_ip, local_workload) AS local_name,
    side_name("remote", remote_ip, NULL) AS remote_name,
    sequence_epoch, sequence
FROM flows
WHERE (local_ip = getvariable('ip_a') AND local_port = getvariable('port_a')::INTEGER
       AND remote_ip = getvariable('ip_b') AND remote_port = getvariable('port_b')::INTEGER)
   OR (local_ip = getvariable('ip_b') AND local_port = getvariable('port_b')::INTEGER
       AND remote_ip = getvariable('ip_a') AND remote_port = getvariable('port_a')::INTEGER)
ORDER BY end_time_ns, host_id, sequence_epoch, sequence;
