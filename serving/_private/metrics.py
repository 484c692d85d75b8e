"""Replica lifecycle metrics, exported to Prometheus through Ray's metrics pipeline.

The only module that touches ``ray.util.metrics``; the rest of gpuserve records
through ``record_lifecycle``.
"""

from __future__ import annotations

from typing import Optional

_TAGS = ("deployment", "replica")
_gauges: Optional[dict] = None


def _get() -> dict:
    global _gauges
    if _gauges is None:
        from ray.util.metrics import Gauge

        _gauges = {
            "load": Gauge("gpuserve_model_load_seconds", "Seconds to load the model onto its device.", _TAGS),
            "warmup": Gauge("gpuserve_warmup_seconds", "Seconds spent in warm-up inferences.", _TAGS),
            "ready": Gauge(
                "gpuserve_time_to_ready_seconds",
                "Seconds from the replica's constructor start to ready (loaded and warm).",
                _TAGS,
            ),
            "rounds": Gauge("gpuserve_warmup_rounds", "Warm-up rounds run before latency was stable.", _TAGS),
            "peak": Gauge(
                "gpuserve_warmup_peak_memory_bytes",
                "Largest peak memory seen in warm-up (CUDA allocator on GPU, process RSS on CPU).",
                _TAGS,
            ),
        }
    return _gauges


def record_lifecycle(
    deployment: str,
    replica: str,
    load_s: float,
    warmup_s: float,
    time_to_ready_s: float,
    warmup_rounds: int,
    peak_bytes: int,
) -> None:
    """Set the per-replica lifecycle gauges."""
    tags = {"deployment": deployment, "replica": replica}
    g = _get()
    g["load"].set(load_s, tags)
    g["warmup"].set(warmup_s, tags)
    g["ready"].set(time_to_ready_s, tags)
    g["rounds"].set(warmup_rounds, tags)
    g["peak"].set(peak_bytes, tags)
