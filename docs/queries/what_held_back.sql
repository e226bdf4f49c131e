-- What held senders back, per sender -> receiver workload pair: of the time
-- the sending sockets had data in flight (limits.busy_us), the seconds and
-- share stopped by the receiver's window (the receiver reads too slowly, or
-- its receive buffer is small) and by the sender's own send buffer, with the
-- bytes retransmitted. Each record describes its local socket sending to the
-- remote end, so a connection seen from both ends counts once per direction.
-- limits are the connection's values so far (not deltas), so only FINAL
-- records count; records without limits (a sidecar older than the field)
-- are left out.
SELECT side_name("local", local_ip, local_workload) AS sender,
    side_name("remote", remote_ip, NULL) AS receiver,
    count(*) AS connections,
    sum(limits.busy_us) / 1e6 AS busy_s,
    sum(limits.rwnd_limited_us) / 1e6 AS receiver_limited_s,
    sum(limits.sndbuf_limited_us) / 1e6 AS send_buffer_limited_s,
    round(sum(limits.rwnd_limited_us) / nullif(sum(limits.busy_us), 0), 4) AS receiver_limited_share,
    sum(limits.bytes_retrans) AS bytes_retransmitted
FROM flows
WHERE record_type = 'FINAL' AND limits IS NOT NULL
GROUP BY sender, receiver
ORDER BY receiver_limited_s DESC, send_buffer_limited_s DESC, sender, receiver;
