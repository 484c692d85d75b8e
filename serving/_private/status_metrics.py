"""Replica-state and pending-replica gauges for `gpuserve status --metrics-port`.

A pending replica has no process to report from, so these gauges come from the
status view of the whole cluster, served by prometheus_client (a sidecar next
to the Ray head, or a developer's terminal).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Gauge

from serving.protocol import metric
from serving.status import DeploymentReport


class StatusGauges:
    """Gauges on their own registry, so tests and servers do not share state."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        self.pending = self._gauge("gpuserve_pending_replicas")
        self.replicas = self._gauge("gpuserve_replicas")

    def _gauge(self, name: str) -> Gauge:
        m = metric(name)
        return Gauge(m.name, m.help, list(m.tags), registry=self.registry)

    def update(self, reports: list[DeploymentReport]) -> None:
        # Clear first: a deployment or state that disappeared must not keep its last value.
        self.pending.clear()
        self.replicas.clear()
        for r in reports:
            pool = r.pool or ""
            self.pending.labels(r.name, pool).set(r.pending)
            for state, n in r.counts.items():
                self.replicas.labels(r.name, pool, state).set(n)
