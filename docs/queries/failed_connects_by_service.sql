-- Failed connects by destination service: connections whose end_reason is
-- FAILED_CONNECT (connect() never reached ESTABLISHED: refused, timed out,
-- unreachable, aborted; see EndReason in flowlog-schema), grouped by the
-- server's workload name (a Service's ClusterIP as svc:NAMESPACE/NAME) and
-- the socket error at close (error: ECONNREFUSED, ETIMEDOUT, EHOSTUNREACH,
-- ...). Only the client end sees a failed connect.
SELECT server AS service,
    any_value(server_side.service) AS service_label,
    coalesce(error, '-') AS error,
    count(*) AS failed_connects,
    list_sort(list(DISTINCT client)) AS clients,
    list_sort(list(DISTINCT server_port)) AS ports
FROM connections()
WHERE failed
GROUP BY server, coalesce(error, '-')
ORDER BY failed_connects DESC, service, error;
