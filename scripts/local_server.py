"""Serves an HTTP handler on 127.0.0.1 for tests and the demo (the
Kubernetes API fixture, the S3 fault proxy): port 0 means one the kernel
picks; the port is printed on the first line of stdout and, with a port
file, written there (to a temporary name, then renamed: a reader never sees
half a number)."""

import os
from http.server import ThreadingHTTPServer


def serve(handler, port=0, port_file=None):
    """Serves handler (one thread per connection) until interrupted."""
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    port = server.server_address[1]
    if port_file:
        tmp = port_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.replace(tmp, port_file)
    print(port, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
