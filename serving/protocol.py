"""The wire contract between gpuserve's servers and its clients: header names and error codes.

One public place for the names both sides must agree on, so a client needs none of the server's
modules (and none of Ray) to speak to a deployment. The environment a Ray process needs for the
contract to hold at Ray's own HTTP proxy (:data:`PROXY_ENV`) is here too.
"""

from __future__ import annotations

__all__ = [
    "GATEWAY_LOST_CODE",
    "NOT_RETRIED_CODES",
    "PROXY_ENV",
    "PRIORITY_HEADER",
    "QUARANTINED_CODE",
    "REPLICA_DIED_CODE",
    "REPLICA_HEADER",
    "SERVICE_HEADER",
    "TIMEOUT_HEADER",
]

# Request headers the admission gateway reads.
PRIORITY_HEADER = "x-gpuserve-priority"
TIMEOUT_HEADER = "x-gpuserve-timeout-s"
# Response header naming the replica that answered (for tracing a request to its logs).
REPLICA_HEADER = "x-gpuserve-replica"
# Response header: milliseconds the replica spent on the request (parsed to answered; not streams).
# Latency less this is the time the request waited before a replica worked on it.
SERVICE_HEADER = "x-gpuserve-service-ms"

# A replica died while it ran the request. Answered 503 with Retry-After (the platform may be at
# fault: a node lost, a process OOM-killed), but gpuserve's own client does not retry it on its own:
# the request may be what killed the replica, and a retry loop would take down one replica per try.
REPLICA_DIED_CODE = "replica_died"
# The same request body was running when replicas died more than once: the gateway refuses it (422).
QUARANTINED_CODE = "input_quarantined"

# The gateway holding the request died before it answered (a process killed, a node lost): 503 with
# Retry-After, sent by Ray's HTTP proxy through gpuserve's middleware (Ray's own answer is a bare 500).
GATEWAY_LOST_CODE = "gateway_lost"

# Ray Serve's HTTP proxy loads ASGI middleware from the import path in this variable (Ray's own
# mechanism, read when a proxy process starts). Every process that starts Ray for gpuserve (``gpuserve
# run``, the rendered pods, the test clusters) sets it, so a platform fault between the proxy and a
# gateway is answered 503 with Retry-After, never 500.
PROXY_ENV = {"RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "serving._private.proxy_guard:middlewares"}

# Error codes a client must not retry whatever their HTTP status.
NOT_RETRIED_CODES = frozenset({REPLICA_DIED_CODE, QUARANTINED_CODE})
