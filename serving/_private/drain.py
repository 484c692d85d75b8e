"""Draining a Ray node before its pod stops (``gpuserve drain``, the worker pods' preStop hook).

Kubernetes sends SIGTERM when it removes a pod (a node drain, a scale-down, an upgrade); Ray stops at
once, and the requests running on the node's replicas are lost. The preStop hook runs first: it asks the
GCS to drain the node with a deadline (Ray's own mechanism, as autoscaler v2 uses it for preemption), and
Serve's controller reacts as it does to any draining node: it starts a replacement replica elsewhere,
then stops the replica on the draining node gracefully (its ``graceful_shutdown_timeout_s`` is
``queue.drain_timeout_s``), before the deadline. The hook returns once no Serve replica is left on the
node, or when the deadline passes; the pod's grace period is longer than that (``kuberay.render``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

# Serve's replica actors are named "ServeReplica:<app>:<deployment>".
REPLICA_CLASS_PREFIX = "ServeReplica:"


@dataclass(frozen=True)
class DrainResult:
    """What a drain did.

    Attributes:
        node_id: The drained node.
        accepted: Whether the GCS accepted the drain request.
        rejection: The GCS's reason when it did not.
        replicas_left: Serve replicas still on the node when the wait ended (0: drained).
        waited_s: Seconds spent waiting for them to leave.
    """

    node_id: str
    accepted: bool
    rejection: str
    replicas_left: int
    waited_s: float

    @property
    def drained(self) -> bool:
        return self.replicas_left == 0

    def to_dict(self) -> dict:
        return {**asdict(self), "drained": self.drained}


def wait_until_gone(
    replicas_on_node: Callable[[], int],
    timeout_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    poll_s: float = 1.0,
) -> tuple[int, float]:
    """Poll until no replica is left or ``timeout_s`` passes; (replicas left, seconds waited)."""
    start = clock()
    while True:
        left = replicas_on_node()
        waited = clock() - start
        if left == 0 or waited >= timeout_s:
            return left, waited
        sleep(min(poll_s, max(0.0, timeout_s - waited)))


def drain_node(address: str, timeout_s: float, node_id: Optional[str] = None, reason: str = "pod terminating") -> DrainResult:
    """Drain ``node_id`` (default: this machine's Ray node) and wait up to ``timeout_s`` for its Serve
    replicas to move. Connects to the cluster as a driver and disconnects before returning."""
    import ray
    from ray.core.generated import autoscaler_pb2
    from ray.util.state import list_actors

    ray.init(address=address, log_to_driver=False, logging_level="ERROR", namespace="gpuserve-drain")
    try:
        ctx = ray.get_runtime_context()
        node = node_id or ctx.get_node_id()
        gcs = ray._raylet.GcsClient(address=ctx.gcs_address)
        deadline_ms = time.time_ns() // 1_000_000 + int(timeout_s * 1000)
        # Preemption, not idle termination: the GCS accepts it whatever runs there, and Serve moves the
        # replicas away before the deadline.
        accepted, rejection = gcs.drain_node(
            node, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"), reason, deadline_ms
        )

        def replicas_on_node() -> int:
            actors = list_actors(filters=[("node_id", "=", node), ("state", "=", "ALIVE")], limit=10_000, raise_on_missing_output=False)
            return sum(1 for a in actors if str(a.class_name).startswith(REPLICA_CLASS_PREFIX))

        left, waited = wait_until_gone(replicas_on_node, timeout_s if accepted else 0.0)
        return DrainResult(node, bool(accepted), str(rejection or ""), left, round(waited, 3))
    finally:
        ray.shutdown()
