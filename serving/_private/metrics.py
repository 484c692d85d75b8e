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



_oom_counter = None


def record_oom(deployment: str, replica: str, kind: str) -> None:
    """Count an out-of-memory error by kind: ``split`` (batch halved and retried) or ``too_large`` (413)."""
    global _oom_counter
    if _oom_counter is None:
        from ray.util.metrics import Counter

        _oom_counter = Counter(
            "gpuserve_oom",
            "Out-of-memory errors in a replica's model thread, by how they were handled.",
            ("deployment", "replica", "kind"),
        )
    _oom_counter.inc(1, {"deployment": deployment, "replica": replica, "kind": kind})


_GPU_TAGS = ("deployment", "replica", "gpu")


def start_gpu_metrics(deployment: str, replica: str, telemetry) -> None:
    """Export the replica's GPU telemetry every REFRESH_PERIOD_S (nothing at all without a GPU)."""
    if not telemetry.available:
        return
    from ray.util.metrics import Gauge

    g = {
        "used": Gauge("gpuserve_gpu_memory_used_bytes", "Device memory in use (NVML, all processes).", _GPU_TAGS),
        "total": Gauge("gpuserve_gpu_memory_total_bytes", "Device memory (NVML).", _GPU_TAGS),
        "util": Gauge("gpuserve_gpu_utilization_ratio", "GPU busy fraction over NVML's last sample period.", _GPU_TAGS),
        "temp": Gauge("gpuserve_gpu_temperature_celsius", "GPU temperature.", _GPU_TAGS),
        "power": Gauge("gpuserve_gpu_power_watts", "GPU power draw.", _GPU_TAGS),
        "ecc": Gauge("gpuserve_gpu_ecc_uncorrected_errors", "Volatile uncorrected ECC errors.", _GPU_TAGS),
        "alloc": Gauge("gpuserve_torch_allocated_bytes", "Bytes allocated by this replica's torch allocator.", _GPU_TAGS),
        "reserved": Gauge("gpuserve_torch_reserved_bytes", "Bytes reserved by this replica's torch allocator.", _GPU_TAGS),
        "peak": Gauge("gpuserve_torch_peak_allocated_bytes", "Peak bytes allocated by this replica's torch allocator.", _GPU_TAGS),
        "ooms": Gauge("gpuserve_torch_oom_count", "Out-of-memory errors torch's allocator has seen in this replica.", _GPU_TAGS),
    }

    def _record() -> None:
        for s in telemetry.gpus():
            tags = {"deployment": deployment, "replica": replica, "gpu": str(s.index)}
            g["used"].set(s.memory_used_bytes, tags)
            g["total"].set(s.memory_total_bytes, tags)
            for key, value in (("util", s.utilization_ratio), ("temp", s.temperature_c), ("power", s.power_w), ("ecc", s.ecc_uncorrected_errors)):
                if value is not None:  # a reading the GPU does not support is left out, not sent as 0
                    g[key].set(value, tags)
        for a in telemetry.allocator():
            tags = {"deployment": deployment, "replica": replica, "gpu": str(a.index)}
            g["alloc"].set(a.allocated_bytes, tags)
            g["reserved"].set(a.reserved_bytes, tags)
            g["peak"].set(a.peak_allocated_bytes, tags)
            g["ooms"].set(a.oom_count, tags)

    def _refresh_forever() -> None:
        while True:
            try:
                _record()
            except Exception as e:  # noqa: BLE001 - telemetry must never take the replica down
                import logging

                logging.getLogger("ray.serve").warning("gpuserve: GPU telemetry failed: %s", e)
            time.sleep(REFRESH_PERIOD_S)

    threading.Thread(target=_refresh_forever, name="gpuserve-gpu-metrics", daemon=True).start()


class AdmissionMetrics:
    """The gateway's request counters and queue gauges.

    ``gpuserve_requests_received_total`` equals the sum of ``gpuserve_requests_total``
    over its ``outcome`` (served, rejected, expired, failed) once nothing is pending;
    ``reason`` says why (e.g. ``queue_full``, ``shed``, ``deadline``, ``http_400``).
    """

    def __init__(self, deployment: str):
        from ray.util.metrics import Counter, Gauge

        self._tags = {"deployment": deployment}
        self.received = Counter("gpuserve_requests_received", "Requests that reached the gateway.", ("deployment",))
        self.outcomes = Counter(
            "gpuserve_requests",
            "Requests answered by the gateway, by outcome and reason.",
            ("deployment", "outcome", "reason"),
        )
        self.queued = Gauge(
            "gpuserve_queue_length", "Requests waiting in the gateway's queue, by class.", ("deployment", "priority")
        )
        self.in_flight = Gauge("gpuserve_in_flight_requests", "Requests dispatched to replicas.", ("deployment",))
        self.capacity = Gauge(
            "gpuserve_capacity_requests", "Requests the running replicas take at once.", ("deployment",)
        )

        # Counted here and handed to Ray's metrics at each poll (0.5 s, far inside any scrape interval):
        # one Ray metric record per request cost about 8 % of a gateway's CPU at saturation (profiled).
        self._received = 0
        self._answered: dict[tuple[str, str], int] = {}

    def arrived(self) -> None:
        self._received += 1

    def answered(self, outcome: str, reason: str) -> None:
        key = (outcome, reason)
        self._answered[key] = self._answered.get(key, 0) + 1

    def flush(self) -> None:
        """Hand the counts since the last flush to Ray's metrics."""
        if self._received:
            n, self._received = self._received, 0
            self.received.inc(n, self._tags)
        answered, self._answered = self._answered, {}
        for (outcome, reason), n in answered.items():
            self.outcomes.inc(n, {**self._tags, "outcome": outcome, "reason": reason})

    def gauges(self, queued_by_class: dict[str, int], in_flight: int, capacity: int) -> None:
        self.flush()
        # Set every poll: Ray drops a gauge value that is not set again within tens of seconds.
        for name, n in queued_by_class.items():
            self.queued.set(n, {**self._tags, "priority": name})
        self.in_flight.set(in_flight, self._tags)
        self.capacity.set(capacity, self._tags)
