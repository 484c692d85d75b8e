"""The names of the load signals a replica reports and the Ray adapter reads: one contract, one place.

Each model replica returns them from Ray Serve's ``record_autoscaling_stats`` (``serving``); Ray
aggregates them per deployment and hands them to :class:`autoscaling.ray_policy.GpuservePolicy`.
"""

from __future__ import annotations

__all__ = ["ARRIVALS", "ARRIVALS_TOTAL", "MEMORY_HEADROOM", "SERVICE", "STARTUP"]

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
