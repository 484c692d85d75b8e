"""The wire contract between gpuserve's servers and its clients: header names and error codes.

One public place for the names both sides must agree on, so a client needs none of the server's
modules (and none of Ray) to speak to a deployment.
"""

from __future__ import annotations

__all__ = [
    "NOT_RETRIED_CODES",
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

# Error codes a client must not retry whatever their HTTP status.
NOT_RETRIED_CODES = frozenset({REPLICA_DIED_CODE, QUARANTINED_CODE})
