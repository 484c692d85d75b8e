"""The names of the load signals a replica reports and the Ray adapter reads: one contract, one place.

Each model replica returns them from Ray Serve's ``record_autoscaling_stats`` (``serving``); Ray
aggregates them per deployment and hands them to :class:`autoscaling.ray_policy.GpuservePolicy`.
"""

from __future__ import annotations

__all__ = ["ARRIVALS", "ARRIVALS_TOTAL", "GATEWAY_QUEUED", "MEMORY_HEADROOM", "SERVICE", "STARTUP"]

# Requests received per second over the replica's sliding window (the fallback before the first delta).
ARRIVALS = "gpuserve_arrivals_per_s"
# Requests received since the replica started (the adapter counts the arrivals between two decisions).
ARRIVALS_TOTAL = "gpuserve_arrivals_total"
# Slot-seconds per request (the mean service time).
SERVICE = "gpuserve_service_s"
# Constructor start to ready, seconds: the replica lead time the policy learns online.
STARTUP = "gpuserve_startup_s"
# GPU memory left below the high-water mark, a fraction of the device (low: scale up).
MEMORY_HEADROOM = "gpuserve_memory_headroom_ratio"
# Requests waiting in the deployment's admission gateways, as this replica last heard from each (a gateway
# sends its queue length with every request it dispatches). Ray counts only the requests at replicas and
# in its routers' queues; behind the gateways the queue is theirs, and without this the policy never saw
# it. The adapter takes the largest report over the replicas.
GATEWAY_QUEUED = "gpuserve_gateway_queued_requests"
