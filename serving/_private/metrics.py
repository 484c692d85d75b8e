"""gpuserve's metrics, exported to Prometheus through Ray's metrics pipeline.

The only module that touches ``ray.util.metrics``; the rest of gpuserve records through the
functions and classes here. Names, kinds, help and tags come from :data:`serving.protocol.METRICS`.
"""

from __future__ import annotations

import threading
import time
from typing import Optional

from serving.protocol import metric


def _ray_metric(name: str):
    """A Ray metric built from its entry in the protocol's catalogue."""
    from ray.util.metrics import Counter, Gauge

    m = metric(name)
    if not m.via_ray:
        raise ValueError(f"metric {name!r} is exported by `gpuserve status`, not through Ray")
    return (Gauge if m.kind == "gauge" else Counter)(m.name, m.help, m.tags)

# Ray stops exporting a gauge value that is not set again within a few tens of
# seconds (measured: gone after ~20-30 s), so lifecycle values are re-recorded.
REFRESH_PERIOD_S = 5.0

_gauges: Optional[dict] = None


def _get() -> dict:
    global _gauges
    if _gauges is None:
        _gauges = {
            "load": _ray_metric("gpuserve_model_load_seconds"),
            "warmup": _ray_metric("gpuserve_warmup_seconds"),
            "ready": _ray_metric("gpuserve_time_to_ready_seconds"),
            "rounds": _ray_metric("gpuserve_warmup_rounds"),
            "peak": _ray_metric("gpuserve_warmup_peak_memory_bytes"),
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
        _oom_counter = _ray_metric("gpuserve_oom")
    _oom_counter.inc(1, {"deployment": deployment, "replica": replica, "kind": kind})


def start_gpu_metrics(deployment: str, replica: str, telemetry) -> None:
    """Export the replica's GPU telemetry every REFRESH_PERIOD_S (nothing at all without a GPU)."""
    if not telemetry.available:
        return
    g = {
        key: _ray_metric(name)
        for key, name in (
            ("used", "gpuserve_gpu_memory_used_bytes"),
            ("total", "gpuserve_gpu_memory_total_bytes"),
            ("util", "gpuserve_gpu_utilization_ratio"),
            ("temp", "gpuserve_gpu_temperature_celsius"),
            ("power", "gpuserve_gpu_power_watts"),
            ("ecc", "gpuserve_gpu_ecc_uncorrected_errors"),
            ("alloc", "gpuserve_torch_allocated_bytes"),
            ("reserved", "gpuserve_torch_reserved_bytes"),
            ("peak", "gpuserve_torch_peak_allocated_bytes"),
            ("ooms", "gpuserve_torch_oom_count"),
        )
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
        self._tags = {"deployment": deployment}
        self.received = _ray_metric("gpuserve_requests_received")
        self.outcomes = _ray_metric("gpuserve_requests")
        self.queued = _ray_metric("gpuserve_queue_length")
        self.in_flight = _ray_metric("gpuserve_in_flight_requests")
        self.capacity = _ray_metric("gpuserve_capacity_requests")

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
