"""Node pools: one definition drives Ray placement here and KubeRay worker groups later.

A pool is a set of identical nodes: GPU pools (one accelerator type, whole GPUs,
tainted so nothing else lands there) and CPU pools (ingress, pre/post-processing).
``ServingSpec`` binds deployments to pools and checks, before anything deploys,
that every GPU request is whole, fits one node of its pool, and that CPU work
stays off GPU pools.

Why whole GPUs: GPUs are not time-sliced between replicas here, because one
replica's memory spike would OOM its neighbour and the recovery is slow; a
replica owns its devices or waits for free ones.

Placement in Ray uses node labels (Ray 2.60 label selectors): each pool's nodes
carry ``gpuserve.io/pool=<name>`` and each replica selects its pool's label.
Labels were chosen over per-pool custom resources because a selector constrains
*where* an actor runs without inventing a resource to count, and Ray's
autoscaler and KubeRay propagate labels to the node groups they create.
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator, model_validator

from serving.spec import ModelDeployment, _Spec, check_dns_name

__all__ = ["GPU_TAINT_KEY", "POOL_LABEL", "POOL_MAX_NODES_LABEL", "NodePool", "ServingSpec", "Taint"]

POOL_LABEL = "gpuserve.io/pool"
# Lets `gpuserve status` tell whether the cluster autoscaler may still add a node to the pool.
POOL_MAX_NODES_LABEL = "gpuserve.io/pool-max-nodes"
GPU_TAINT_KEY = "nvidia.com/gpu"


class Taint(_Spec):
    """A Kubernetes node taint; pods need a matching toleration to land on the node."""

    key: str = Field(min_length=1, max_length=253)
    value: Optional[str] = Field(default=None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


class NodePool(_Spec):
    """A pool of identical nodes.

    Attributes are documented by their ``Field`` descriptions.
    """

    name: str = Field(description="Pool name: lowercase letters, digits and '-', at most 63.")
    accelerator_type: Optional[str] = Field(
        default=None, min_length=1, description="Ray accelerator type of the pool's GPUs (e.g. 'A100', 'L4')."
    )
    gpus_per_node: int = Field(default=0, ge=0, le=16, description="Whole GPUs per node; 0 for a CPU pool.")
    cpus_per_node: float = Field(gt=0, le=1024, description="CPU cores per node.")
    memory_bytes_per_node: int = Field(gt=0, description="Memory per node, in bytes.")
    min_nodes: int = Field(default=0, ge=0, le=10_000, description="Nodes kept even when idle.")
    max_nodes: int = Field(ge=1, le=10_000, description="Most nodes the cluster autoscaler may create.")
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="Kubernetes node labels that select this pool's nodes (nodeSelector)."
    )
    taints: list[Taint] = Field(
        default_factory=list,
        description="Taints on the pool's nodes. GPU pools always carry nvidia.com/gpu:NoSchedule (added if absent).",
    )
    provisioning_s: float = Field(
        default=240.0, gt=0, description="Expected seconds from asking for a node to the node joining Ray."
    )

    @field_validator("name")
    @classmethod
    def _name_form(cls, v: str) -> str:
        return check_dns_name("pool name", v, "it names a KubeRay worker group", "a100")

    @model_validator(mode="after")
    def _consistent(self) -> "NodePool":
        if self.max_nodes < self.min_nodes:
            raise ValueError(
                f"pool {self.name!r}: max_nodes ({self.max_nodes}) must be >= min_nodes ({self.min_nodes})"
            )
        if self.accelerator_type is not None and self.gpus_per_node == 0:
            raise ValueError(
                f"pool {self.name!r}: accelerator_type ({self.accelerator_type!r}) is set but gpus_per_node is 0; "
                "set gpus_per_node >= 1 or remove accelerator_type"
            )
        if self.gpus_per_node > 0 and not any(t.key == GPU_TAINT_KEY for t in self.taints):
            # GPU nodes are tainted so that only pods that tolerate it (GPU workers) land there.
            object.__setattr__(self, "taints", [*self.taints, Taint(key=GPU_TAINT_KEY, value="present")])
        return self

    @property
    def is_gpu(self) -> bool:
        return self.gpus_per_node > 0

    @property
    def ray_selector(self) -> dict[str, str]:
        """The label selector that pins a replica to this pool."""
        return {POOL_LABEL: self.name}

    @property
    def ray_labels(self) -> dict[str, str]:
        """The Ray node labels this pool's nodes carry."""
        return {POOL_LABEL: self.name, POOL_MAX_NODES_LABEL: str(self.max_nodes)}


class ServingSpec(_Spec):
    """Pools and the deployments placed on them: what `serve run` runs locally and KubeRay renders."""

    name: str = Field(description="Name of the whole serving setup (becomes the RayService name).")
    pools: list[NodePool] = Field(min_length=1, description="The node pools; at least one CPU pool.")
    deployments: list[ModelDeployment] = Field(min_length=1, description="Model deployments, each on one pool.")

    @field_validator("name")
    @classmethod
    def _name_form(cls, v: str) -> str:
        return check_dns_name("name", v, "it names the RayService", "llm-serving")

    @model_validator(mode="after")
    def _placement(self) -> "ServingSpec":
        pools = {p.name: p for p in self.pools}
        if len(pools) != len(self.pools):
            raise ValueError("pools: pool names must be unique")
        names = [d.name for d in self.deployments]
        if len(set(names)) != len(names):
            raise ValueError("deployments: deployment names must be unique")
        if not any(not p.is_gpu for p in self.pools):
            raise ValueError("pools: add a CPU pool (gpus_per_node 0); ingress and CPU work must not run on GPU nodes")
        for d in self.deployments:
            self._check_one(d, pools)
        return self

    @staticmethod
    def _check_one(d: ModelDeployment, pools: dict[str, NodePool]) -> None:
        r, where = d.resources, f"deployment {d.name!r}"
        if r.node_pool is None:
            raise ValueError(
                f"{where}: resources.node_pool is not set; choose one of {', '.join(sorted(pools))}"
            )
        pool = pools.get(r.node_pool)
        if pool is None:
            raise ValueError(
                f"{where}: resources.node_pool ({r.node_pool!r}) is not a defined pool; "
                f"defined pools: {', '.join(sorted(pools))}"
            )
        if r.gpus > 0 and not pool.is_gpu:
            raise ValueError(
                f"{where}: resources.gpus ({r.gpus}) but pool {pool.name!r} has no GPUs; pick a GPU pool"
            )
        if r.gpus == 0 and pool.is_gpu:
            raise ValueError(
                f"{where}: a CPU-only deployment (resources.gpus 0) is placed on GPU pool {pool.name!r}; "
                "CPU work stays off GPU nodes: pick a CPU pool"
            )
        if r.gpus > pool.gpus_per_node:
            raise ValueError(
                f"{where}: resources.gpus ({r.gpus}) is more than pool {pool.name!r} has per node "
                f"({pool.gpus_per_node}); a replica's GPUs must be on one node: lower gpus or use a larger pool"
            )
        if r.cpus > pool.cpus_per_node:
            raise ValueError(
                f"{where}: resources.cpus ({r.cpus}) is more than pool {pool.name!r} has per node "
                f"({pool.cpus_per_node})"
            )
        if r.accelerator_type is not None and r.accelerator_type != pool.accelerator_type:
            raise ValueError(
                f"{where}: resources.accelerator_type ({r.accelerator_type!r}) differs from pool {pool.name!r}'s "
                f"({pool.accelerator_type!r}); remove it or pick the matching pool"
            )

    @classmethod
    def of(cls, obj: object) -> "ServingSpec":
        """A ServingSpec as is; a lone ModelDeployment gets a CPU pool, and a GPU pool when it asks for GPUs.

        Raises:
            TypeError: for anything else, saying what is accepted.
        """
        if isinstance(obj, ServingSpec):
            return obj
        if not isinstance(obj, ModelDeployment):
            raise TypeError(f"expected a ServingSpec or a ModelDeployment, got {type(obj).__name__}")
        r = obj.resources
        most = obj.autoscaling.max_replicas if obj.autoscaling else (1 if obj.replicas is None else obj.replicas)
        pools = [NodePool(name="cpu", cpus_per_node=max(4.0, r.cpus), memory_bytes_per_node=16 << 30, max_nodes=4)]
        if r.gpus:
            pools.append(
                NodePool(
                    name="gpu",
                    accelerator_type=r.accelerator_type,
                    gpus_per_node=r.gpus,
                    cpus_per_node=max(8.0, r.cpus),
                    memory_bytes_per_node=64 << 30,
                    max_nodes=max(1, most),
                )
            )
        placed = obj.model_copy(update={"resources": r.model_copy(update={"node_pool": pools[-1].name})})
        return cls(name=obj.name, pools=pools, deployments=[placed])

    def pool_of(self, deployment: ModelDeployment) -> NodePool:
        return next(p for p in self.pools if p.name == deployment.resources.node_pool)

    def gateway_pool(self) -> Optional[NodePool]:
        """Where the admission gateways run: the first CPU pool that keeps a node (``min_nodes`` >= 1).

        None (the head) when no CPU pool keeps one: gateways that waited for the autoscaler to bring
        a node would hold every request behind them. Give a CPU pool ``min_nodes: 1`` to keep the
        data plane off the head.
        """
        return next((p for p in self.pools if not p.is_gpu and p.min_nodes >= 1), None)

    def build(self) -> dict[str, object]:
        """One Ray Serve application per deployment, pinned to its pool, keyed by route prefix."""
        from serving._private.app import build_application

        gw = self.gateway_pool()
        return {f"/{d.name}": build_application(d, self.pool_of(d), gw) for d in self.deployments}
