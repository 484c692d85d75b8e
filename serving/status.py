"""Why is it waiting? Replica states per deployment, and a reason for each pending replica.

``explain`` is pure: it takes snapshots of the nodes and the deployments and
says, for every replica that Ray could not place, which pool it waits for, how
many of that pool's GPUs are in use, and whether the cluster autoscaler can
still add a node. ``collect`` takes those snapshots from a running Ray cluster
(the only function here that touches Ray); ``status`` does both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from serving.pools import POOL_LABEL, POOL_MAX_NODES_LABEL

__all__ = [
    "DeploymentReport",
    "DeploymentView",
    "NodeView",
    "ReplicaView",
    "collect",
    "explain",
    "render",
    "status",
]

PENDING = "PENDING"


@dataclass(frozen=True)
class NodeView:
    node_id: str
    labels: dict[str, str]
    gpus_total: float
    gpus_free: float
    cpus_total: float
    cpus_free: float

    @property
    def pool(self) -> Optional[str]:
        return self.labels.get(POOL_LABEL)

    @property
    def pool_max_nodes(self) -> Optional[int]:
        raw = self.labels.get(POOL_MAX_NODES_LABEL)
        return int(raw) if raw and raw.isdigit() else None


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    state: str
    node_id: Optional[str]


@dataclass(frozen=True)
class DeploymentView:
    app: str
    name: str
    pool: Optional[str]
    gpus_per_replica: float
    cpus_per_replica: float
    target_replicas: int
    replicas: list[ReplicaView]


@dataclass
class DeploymentReport:
    app: str
    name: str
    pool: Optional[str]
    target_replicas: int
    counts: dict[str, int] = field(default_factory=dict)
    replicas: list[dict[str, Any]] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return self.counts.get(PENDING, 0)


def _state(r: ReplicaView) -> str:
    # A replica Ray has not placed on any node is waiting for resources, not starting.
    if r.state == "STARTING" and not r.node_id:
        return PENDING
    return r.state


def _reason(d: DeploymentView, nodes: list[NodeView]) -> str:
    if d.pool is None:
        need = f"{d.gpus_per_replica:g} GPU(s)" if d.gpus_per_replica else f"{d.cpus_per_replica:g} CPU(s)"
        return f"waiting for {need} anywhere in the cluster (the deployment is not pinned to a pool)"
    members = [n for n in nodes if n.pool == d.pool]
    if not members:
        return (
            f"waiting for pool {d.pool!r}: it has no nodes yet; the cluster autoscaler must create one "
            "(or the pool does not exist in this cluster)"
        )
    if d.gpus_per_replica:
        kind, total = "GPU", sum(n.gpus_total for n in members)
        used = total - sum(n.gpus_free for n in members)
        need = d.gpus_per_replica
    else:
        kind, total = "CPU", sum(n.cpus_total for n in members)
        used = total - sum(n.cpus_free for n in members)
        need = d.cpus_per_replica
    head = (
        f"waiting for {need:g} {kind}(s) in pool {d.pool!r}: {used:g}/{total:g} {kind}s in use on "
        f"{len(members)} node(s)"
    )
    max_nodes = members[0].pool_max_nodes
    if max_nodes is None:
        return head + "; the pool's max_nodes is unknown, so whether a node can be added is unknown"
    if len(members) >= max_nodes:
        return (
            head + f"; the pool is at max_nodes ({max_nodes}), so no node can be added: lower the replicas "
            "or raise the pool's max_nodes"
        )
    return head + f"; the cluster autoscaler can add {max_nodes - len(members)} more node(s) to the pool"


def explain(nodes: list[NodeView], deployments: list[DeploymentView]) -> list[DeploymentReport]:
    """Replica states per deployment, with a reason for each pending replica."""
    reports = []
    for d in deployments:
        rep = DeploymentReport(app=d.app, name=d.name, pool=d.pool, target_replicas=d.target_replicas)
        reason = None
        for r in d.replicas:
            st = _state(r)
            rep.counts[st] = rep.counts.get(st, 0) + 1
            row: dict[str, Any] = {"replica": r.replica_id, "state": st, "node_id": r.node_id}
            if st == PENDING:
                reason = reason or _reason(d, nodes)
                row["reason"] = reason
            rep.replicas.append(row)
        reports.append(rep)
    return reports


def render(reports: list[DeploymentReport]) -> str:
    """The human-readable form `gpuserve status` prints."""
    lines = []
    for r in reports:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(r.counts.items())) or "no replicas"
        pool = f" pool {r.pool}" if r.pool else ""
        lines.append(f"{r.app}/{r.name}{pool}: {r.target_replicas} target; {counts}")
        for row in r.replicas:
            where = f" on node {row['node_id'][:12]}" if row["node_id"] else ""
            lines.append(f"  {row['replica']} {row['state']}{where}")
            if "reason" in row:
                lines.append(f"    {row['reason']}")
    return "\n".join(lines)


def collect() -> tuple[list[NodeView], list[DeploymentView]]:
    """Snapshots of the connected Ray cluster's nodes and Serve deployments."""
    import ray
    from ray import serve

    # Per-node free resources have no public API in Ray 2.60; the GCS-backed
    # helper is what `ray status` itself reads.
    from ray._private.state import available_resources_per_node

    free = available_resources_per_node()
    nodes = [
        NodeView(
            node_id=n["NodeID"],
            labels=dict(n.get("Labels") or {}),
            gpus_total=float(n["Resources"].get("GPU", 0)),
            gpus_free=float(free.get(n["NodeID"], {}).get("GPU", 0)),
            cpus_total=float(n["Resources"].get("CPU", 0)),
            cpus_free=float(free.get(n["NodeID"], {}).get("CPU", 0)),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]
    details = serve.context._get_global_client().get_serve_details()
    deployments = []
    for app_name, app in (details.get("applications") or {}).items():
        for name, dep in (app.get("deployments") or {}).items():
            opts = (dep.get("deployment_config") or {}).get("ray_actor_options") or {}
            deployments.append(
                DeploymentView(
                    app=app_name,
                    name=name,
                    pool=(opts.get("label_selector") or {}).get(POOL_LABEL),
                    gpus_per_replica=float(opts.get("num_gpus") or 0),
                    cpus_per_replica=float(opts.get("num_cpus") or 0),
                    target_replicas=int(dep.get("target_num_replicas") or 0),
                    replicas=[
                        ReplicaView(
                            replica_id=r["replica_id"],
                            state=str(getattr(r["state"], "value", r["state"])),
                            node_id=r.get("node_id") or None,
                        )
                        for r in dep.get("replicas") or []
                    ],
                )
            )
    return nodes, deployments


def status() -> list[DeploymentReport]:
    """``explain`` over the connected cluster: the Python form of `gpuserve status`."""
    return explain(*collect())

