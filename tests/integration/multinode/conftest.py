"""A multi-node Ray cluster with fake GPUs, shaped by node pools (run in its own pytest process)."""

import pytest

from serving import NodePool
from tests.integration.conftest import free_port

CPU = NodePool(name="cpu", cpus_per_node=4, memory_bytes_per_node=8 << 30, max_nodes=1)
L4 = NodePool(
    name="l4", accelerator_type="L4", gpus_per_node=1, cpus_per_node=2, memory_bytes_per_node=16 << 30, max_nodes=4
)
A100 = NodePool(
    name="a100", accelerator_type="A100", gpus_per_node=1, cpus_per_node=2, memory_bytes_per_node=16 << 30, max_nodes=1
)
POOLS = [CPU, L4, A100]


@pytest.fixture(scope="module")
def pool_cluster():
    """Head (no CPUs, no GPUs) + 1 CPU node + 4 single-GPU L4 nodes + 1 single-GPU A100 node."""
    import ray
    from ray import serve

    from serving.testing import local_cluster

    if ray.is_initialized():
        pytest.skip("needs its own Ray cluster: run `pytest tests/integration/multinode` separately (make test does)")
    with local_cluster(POOLS) as cluster:
        port = free_port()
        # One proxy on the head: a proxy per node would crowd the 2-core test machine.
        serve.start(http_options={"host": "127.0.0.1", "port": port}, proxy_location="HeadOnly")
        yield cluster, f"http://127.0.0.1:{port}"
        serve.shutdown()
