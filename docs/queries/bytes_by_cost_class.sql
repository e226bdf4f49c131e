-- Bytes by cost class: what a cloud bill charges transfer by. Per connection
-- (counted once; failed connects carry no bytes), both directions:
--   same-zone   both sides attributed, both availability zones known
--               (Attribution.zone) and equal;
--   cross-zone  both sides attributed, both zones known, and different;
--   internet    a side no source knows (attributed = false) whose IP is
--               public (not private, loopback, link-local or CGNAT: see
--               is_private_ip in lake.sql): traffic leaving the estate;
--   unknown     the rest: a side attributed but without a zone (a host with
--               no zone label, a Service's ClusterIP), or an unknown private IP.
WITH classed AS (
    SELECT *, CASE
        WHEN (NOT client_side.attributed AND NOT is_private_ip(client_ip))
          OR (NOT server_side.attributed AND NOT is_private_ip(server_ip)) THEN 'internet'
        WHEN client_side.attributed AND server_side.attributed
          AND client_side.zone IS NOT NULL AND server_side.zone IS NOT NULL THEN
            CASE WHEN client_side.zone = server_side.zone THEN 'same-zone' ELSE 'cross-zone' END
        ELSE 'unknown'
    END AS cost_class
    FROM connections()
    WHERE NOT failed
)
SELECT cost_class,
    count(*) AS connections,
    sum(c2s + s2c) AS bytes,
    round(100 * sum(c2s + s2c) / sum(sum(c2s + s2c)) OVER (), 1) AS pct_bytes
FROM classed
GROUP BY cost_class
ORDER BY bytes DESC, cost_class;
