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
    from ray.util.metrics import Counter, Gauge, Histogram

    m = metric(name)
    if not m.via_ray:
        raise ValueError(f"metric {name!r} is exported by `gpuserve status`, not through Ray")
    if m.kind == "histogram":
        return Histogram(m.name, m.help, list(m.boundaries), m.tags)
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
    """Count an out-of-memory error by kind: ``split`` (a batch halved and retried), ``preempted`` (a
    generation batch recomputed), ``too_large`` (one request, 413) or ``persistent`` (the device's; counts
    toward replacing the replica)."""
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


class GenerationMetrics:
    """Token-level metrics of a text-generation replica: the observer its scheduler calls
    (``deployments._scheduler.StepObserver``), on the model thread, once per step."""

    def __init__(self, deployment: str, replica: str, ttft_slo_s: float):
        self.tags = {"deployment": deployment, "replica": replica}
        self._ttft = _ray_metric("gpuserve_time_to_first_token_seconds")
        self._itl = _ray_metric("gpuserve_inter_token_latency_seconds")
        self._tokens = _ray_metric("gpuserve_generated_tokens")
        self._sequences = _ray_metric("gpuserve_sequences")
        self._kv = _ray_metric("gpuserve_kv_cache_bytes")
        self._slo = _ray_metric("gpuserve_ttft_slo_seconds")
        self._ttft_slo_s = ttft_slo_s
        self._last = (0, 0, 0)
        self._record_gauges()
        threading.Thread(target=self._refresh_forever, name="gpuserve-generation-metrics", daemon=True).start()

    def first_tokens(self, ttfts_s: list[float]) -> None:
        for t in ttfts_s:
            self._ttft.observe(t, self.tags)
        if ttfts_s:
            self._tokens.inc(len(ttfts_s), self.tags)

    def step(self, running: int, waiting: int, kv_cache_bytes: int, token_gaps_s: list[float]) -> None:
        for gap in token_gaps_s:
            self._itl.observe(gap, self.tags)
        if token_gaps_s:
            self._tokens.inc(len(token_gaps_s), self.tags)
        self._last = (running, waiting, kv_cache_bytes)
        self._record_gauges()

    def _record_gauges(self) -> None:
        running, waiting, kv = self._last
        self._sequences.set(running, {**self.tags, "state": "running"})
        self._sequences.set(waiting, {**self.tags, "state": "waiting"})
        self._kv.set(kv, self.tags)
        self._slo.set(self._ttft_slo_s, self.tags)

    def _refresh_forever(self) -> None:
        # Ray drops a gauge not set again within tens of seconds; an idle scheduler takes no steps.
        while True:
            time.sleep(REFRESH_PERIOD_S)
            self._record_gauges()


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
