"""Node pools and placement rules, checked before anything is deployed."""

import pytest
from pydantic import ValidationError

from serving import ModelDeployment, ModelSource, NodePool, Resources, ServingSpec, Taint
from serving._private.options import deployment_options
from serving.pools import GPU_TAINT_KEY, POOL_LABEL, POOL_MAX_NODES_LABEL

CPU = NodePool(name="cpu", cpus_per_node=8, memory_bytes_per_node=32 << 30, max_nodes=3)
L4 = NodePool(name="l4", accelerator_type="L4", gpus_per_node=1, cpus_per_node=8, memory_bytes_per_node=32 << 30, max_nodes=4)
A100 = NodePool(
    name="a100", accelerator_type="A100", gpus_per_node=8, cpus_per_node=96, memory_bytes_per_node=1 << 40, max_nodes=2
)


def dep(name="llm", gpus=1, pool="l4", **res):
    return ModelDeployment(
        name=name, task="text_generation", model=ModelSource(path="/m"), resources=Resources(gpus=gpus, node_pool=pool, **res)
    )


def err(fn):
    with pytest.raises(ValidationError) as ei:
        fn()
    return str(ei.value)


def test_gpu_pools_get_the_gpu_taint_cpu_pools_do_not():
    assert any(t.key == GPU_TAINT_KEY and t.effect == "NoSchedule" for t in L4.taints)
    assert CPU.taints == []
    custom = NodePool(
        name="t4", gpus_per_node=1, cpus_per_node=4, memory_bytes_per_node=1 << 34, max_nodes=1,
        taints=[Taint(key=GPU_TAINT_KEY, value="t4", effect="NoExecute")],
    )
    assert [t.value for t in custom.taints] == ["t4"]


def test_pool_labels_and_selector():
    assert L4.ray_labels == {POOL_LABEL: "l4", POOL_MAX_NODES_LABEL: "4"}
    assert L4.ray_selector == {POOL_LABEL: "l4"}


@pytest.mark.parametrize(
    "kw,fragment",
    [
        (dict(name="GPU"), "pool name ('GPU')"),
        (dict(name="x", min_nodes=3, max_nodes=2), "max_nodes (2) must be >= min_nodes (3)"),
        (dict(name="x", accelerator_type="L4", max_nodes=1), "accelerator_type ('L4') is set but gpus_per_node is 0"),
    ],
)
def test_bad_pools(kw, fragment):
    base = dict(cpus_per_node=4, memory_bytes_per_node=1 << 30)
    assert fragment in err(lambda: NodePool(**{**base, **kw}))


def test_valid_serving_spec():
    spec = ServingSpec(name="prod", pools=[CPU, L4, A100], deployments=[dep(), dep("big", 8, "a100"), dep("ingress", 0, "cpu")])
    assert spec.pool_of(spec.deployments[1]).name == "a100"


def test_fractional_gpu_request_rejected_before_deploy():
    assert "resources.gpus (0.5) must be a whole number" in err(lambda: dep(gpus=0.5))


def test_oversized_gpu_request_rejected_before_deploy():
    msg = err(lambda: ServingSpec(name="p", pools=[CPU, L4], deployments=[dep(gpus=2)]))
    assert "resources.gpus (2) is more than pool 'l4' has per node (1)" in msg


def test_unknown_pool_lists_the_defined_ones():
    msg = err(lambda: ServingSpec(name="p", pools=[CPU, L4], deployments=[dep(pool="h100")]))
    assert "resources.node_pool ('h100') is not a defined pool; defined pools: cpu, l4" in msg


def test_cpu_work_stays_off_gpu_pools():
    msg = err(lambda: ServingSpec(name="p", pools=[CPU, L4], deployments=[dep("ingress", 0, "l4")]))
    assert "CPU work stays off GPU nodes" in msg


def test_gpu_work_needs_a_gpu_pool():
    assert "pool 'cpu' has no GPUs" in err(lambda: ServingSpec(name="p", pools=[CPU, L4], deployments=[dep(pool="cpu")]))


def test_a_cpu_pool_is_required():
    assert "add a CPU pool" in err(lambda: ServingSpec(name="p", pools=[L4], deployments=[dep()]))


def test_pool_must_be_named_when_pools_exist():
    assert "resources.node_pool is not set" in err(lambda: ServingSpec(name="p", pools=[CPU, L4], deployments=[dep(pool=None)]))


def test_accelerator_type_must_match_the_pool():
    msg = err(lambda: ServingSpec(name="p", pools=[CPU, L4], deployments=[dep(accelerator_type="A100")]))
    assert "accelerator_type ('A100') differs from pool 'l4'" in msg


def test_duplicate_names():
    assert "pool names must be unique" in err(lambda: ServingSpec(name="p", pools=[CPU, CPU], deployments=[dep("i", 0, "cpu")]))
    assert "deployment names must be unique" in err(
        lambda: ServingSpec(name="p", pools=[CPU, L4], deployments=[dep(), dep()])
    )


def test_pinned_options_select_the_pool_label():
    opts = deployment_options(dep(), L4)
    assert opts["ray_actor_options"]["label_selector"] == {POOL_LABEL: "l4"}
    assert opts["ray_actor_options"]["num_gpus"] == 1
    assert "label_selector" not in deployment_options(dep())["ray_actor_options"]
