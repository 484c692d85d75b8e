"""Replica lifecycle metrics, exported to Prometheus through Ray's metrics pipeline.

The only module that touches ``ray.util.metrics``; the rest of gpuserve records
through ``record_lifecycle``.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

# Ray stops exporting a gauge value that is not set again within a few tens of
# seconds (measured: gone after ~20-30 s), so lifecycle values are re-recorded.
REFRESH_PERIOD_S = 5.0

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
    """Set the per-replica lifecycle gauges, and keep them set for the replica's life."""
    tags = {"deployment": deployment, "replica": replica}
    values = {
        "load": load_s,
        "warmup": warmup_s,
        "ready": time_to_ready_s,
        "rounds": warmup_rounds,
        "peak": peak_bytes,
    }

    def _record() -> None:
        g = _get()
        for key, value in values.items():
            g[key].set(value, tags)

    def _refresh_forever() -> None:
        # A daemon thread: it ends with the replica process.
        while True:
            time.sleep(REFRESH_PERIOD_S)
            _record()

    _record()
    threading.Thread(target=_refresh_forever, name="gpuserve-metrics", daemon=True).start()

