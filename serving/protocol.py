"""The contract between gpuserve's processes and whatever reads them: header, error-code, environment and metric names.

One public place for the names both sides must agree on, so a client needs none of the server's
modules (and none of Ray) to speak to a deployment, and a dashboard or alert can be checked
against the metrics gpuserve exports. The environment a Ray process needs for the contract to hold
at Ray's own HTTP proxy (:data:`PROXY_ENV`) is here too.

The load signals a replica reports to Ray Serve's autoscaler are named in
:mod:`autoscaling.signals` (the policy package imports no other gpuserve package) and re-exported
here as :data:`LOAD_SIGNALS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from autoscaling.signals import ARRIVALS, ARRIVALS_TOTAL, MEMORY_HEADROOM, SERVICE, STARTUP

__all__ = [
    "GATEWAY_LOST_CODE",
    "LOAD_SIGNALS",
    "METRICS",
    "Metric",
    "NOT_RETRIED_CODES",
    "PROXY_ENV",
    "PRIORITY_HEADER",
    "QUARANTINED_CODE",
    "REPLICA_DIED_CODE",
    "REPLICA_HEADER",
    "SERVICE_HEADER",
    "TIMEOUT_HEADER",
    "WEIGHT_DIGEST_DIR_ENV",
    "exported_metric_names",
    "metric",
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

# Directory (outside the weight cache) where `gpuserve prefetch --digest-dir` records each cache entry's
# manifest digest; a replica with it set refuses an entry that does not match (serving.weights). The
# rendered pods mount it read-only in the Ray container.
WEIGHT_DIGEST_DIR_ENV = "GPUSERVE_WEIGHT_DIGEST_DIR"

# Error codes a client must not retry whatever their HTTP status.
NOT_RETRIED_CODES = frozenset({REPLICA_DIED_CODE, QUARANTINED_CODE})


# -- Metric names -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    """One Prometheus metric gpuserve exports.

    Attributes:
        name: The name gpuserve registers.
        kind: ``gauge`` or ``counter``.
        help: The help text.
        tags: The label names, in order.
        via_ray: True when recorded through Ray's metrics pipeline (``ray.util.metrics``), which
            prefixes ``ray_`` on export; False for the ``gpuserve status`` exporter
            (prometheus_client, exported as named).
    """

    name: str
    kind: Literal["gauge", "counter", "histogram"]
    help: str
    tags: tuple[str, ...]
    via_ray: bool = True
    # A histogram's bucket upper bounds.
    boundaries: tuple[float, ...] = ()

    @property
    def exported_name(self) -> str:
        """The name a Prometheus query uses: Ray's ``ray_`` prefix, and ``_total`` on counters (a
        histogram's series add ``_bucket``, ``_sum`` and ``_count`` to it)."""
        prefix = "ray_" if self.via_ray else ""
        suffix = "_total" if self.kind == "counter" else ""
        return prefix + self.name + suffix

    @property
    def exported_series(self) -> tuple[str, ...]:
        """Every series name the metric exports."""
        if self.kind == "histogram":
            return tuple(self.exported_name + s for s in ("_bucket", "_sum", "_count"))
        return (self.exported_name,)


_REPLICA = ("deployment", "replica")
_GPU = ("deployment", "replica", "gpu")

# Every metric gpuserve exports. Keys are how the code refers to them (see :func:`metric`).
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        # Replica lifecycle (each model replica).
        Metric("gpuserve_model_load_seconds", "gauge", "Seconds to load the model onto its device.", _REPLICA),
        Metric("gpuserve_warmup_seconds", "gauge", "Seconds spent in warm-up inferences.", _REPLICA),
        Metric(
            "gpuserve_time_to_ready_seconds",
            "gauge",
            "Seconds from the replica's constructor start to ready (loaded and warm).",
            _REPLICA,
        ),
        Metric("gpuserve_warmup_rounds", "gauge", "Warm-up rounds run before latency was stable.", _REPLICA),
        Metric(
            "gpuserve_warmup_peak_memory_bytes",
            "gauge",
            "Largest peak memory seen in warm-up (CUDA allocator on GPU, process RSS on CPU).",
            _REPLICA,
        ),
        Metric(
            "gpuserve_oom",
            "counter",
            "Out-of-memory errors in a replica's model thread, by how they were handled.",
            (*_REPLICA, "kind"),
        ),
        # GPU telemetry (each model replica on a GPU; none without one).
        Metric("gpuserve_gpu_memory_used_bytes", "gauge", "Device memory in use (NVML, all processes).", _GPU),
        Metric("gpuserve_gpu_memory_total_bytes", "gauge", "Device memory (NVML).", _GPU),
        Metric("gpuserve_gpu_utilization_ratio", "gauge", "GPU busy fraction over NVML's last sample period.", _GPU),
        Metric("gpuserve_gpu_temperature_celsius", "gauge", "GPU temperature.", _GPU),
        Metric("gpuserve_gpu_power_watts", "gauge", "GPU power draw.", _GPU),
        Metric("gpuserve_gpu_ecc_uncorrected_errors", "gauge", "Volatile uncorrected ECC errors.", _GPU),
        Metric("gpuserve_torch_allocated_bytes", "gauge", "Bytes allocated by this replica's torch allocator.", _GPU),
        Metric("gpuserve_torch_reserved_bytes", "gauge", "Bytes reserved by this replica's torch allocator.", _GPU),
        Metric(
            "gpuserve_torch_peak_allocated_bytes", "gauge", "Peak bytes allocated by this replica's torch allocator.", _GPU
        ),
        Metric(
            "gpuserve_torch_oom_count", "gauge", "Out-of-memory errors torch's allocator has seen in this replica.", _GPU
        ),
        # Text generation (each model replica running the iteration scheduler).
        Metric(
            "gpuserve_time_to_first_token_seconds",
            "histogram",
            "From a generation request reaching the scheduler to its first token.",
            _REPLICA,
            boundaries=(0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0),
        ),
        Metric(
            "gpuserve_inter_token_latency_seconds",
            "histogram",
            "Between two consecutive tokens of one sequence.",
            _REPLICA,
            boundaries=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
        ),
        Metric("gpuserve_generated_tokens", "counter", "Tokens generated (output tokens).", _REPLICA),
        Metric(
            "gpuserve_sequences",
            "gauge",
            "Sequences in the scheduler, by state (running: decoding; waiting: not yet admitted).",
            ("deployment", "replica", "state"),
        ),
        Metric("gpuserve_kv_cache_bytes", "gauge", "Bytes held by the running batch's KV cache.", _REPLICA),
        Metric(
            "gpuserve_ttft_slo_seconds",
            "gauge",
            "The deployment's time-to-first-token target (generation.ttft_slo_s), for the alert.",
            _REPLICA,
        ),
        # Admission (each gateway). received equals the sum of requests over outcome once nothing is pending.
        Metric("gpuserve_requests_received", "counter", "Requests that reached the gateway.", ("deployment",)),
        Metric(
            "gpuserve_requests",
            "counter",
            "Requests answered by the gateway, by outcome and reason.",
            ("deployment", "outcome", "reason"),
        ),
        Metric(
            "gpuserve_queue_length", "gauge", "Requests waiting in the gateway's queue, by class.", ("deployment", "priority")
        ),
        Metric("gpuserve_in_flight_requests", "gauge", "Requests dispatched to replicas.", ("deployment",)),
        Metric("gpuserve_capacity_requests", "gauge", "Requests the running replicas take at once.", ("deployment",)),
        # Cluster view (`gpuserve status --metrics-port`): a pending replica has no process to report from.
        Metric(
            "gpuserve_pending_replicas",
            "gauge",
            "Replicas Ray could not place yet, per deployment and node pool.",
            ("deployment", "pool"),
            via_ray=False,
        ),
        Metric(
            "gpuserve_replicas",
            "gauge",
            "Replicas per deployment, node pool and state.",
            ("deployment", "pool", "state"),
            via_ray=False,
        ),
    )
}

# The per-replica load signals Ray Serve's autoscaler aggregates (not Prometheus metrics).
LOAD_SIGNALS = (ARRIVALS, ARRIVALS_TOTAL, SERVICE, STARTUP, MEMORY_HEADROOM)


def metric(name: str) -> Metric:
    """The metric registered as ``name``.

    Raises:
        KeyError: ``name`` is not one of :data:`METRICS`; the message lists the valid names.
    """
    try:
        return METRICS[name]
    except KeyError:
        raise KeyError(f"no gpuserve metric {name!r}; valid: {', '.join(sorted(METRICS))}") from None


def exported_metric_names() -> set[str]:
    """Every metric name as Prometheus sees it (what dashboards and alerts may query)."""
    return {name for m in METRICS.values() for name in m.exported_series}
