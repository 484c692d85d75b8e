"""`gpuserve status` logic on snapshots (no Ray): states and the reason a replica waits."""

from prometheus_client import generate_latest

from serving._private.status_metrics import StatusGauges
from serving.pools import POOL_LABEL, POOL_MAX_NODES_LABEL
from serving.status import DeploymentView, NodeView, ReplicaView, explain, render


def node(i, pool, max_nodes, gpus=1, free=0):
    labels = {POOL_LABEL: pool, POOL_MAX_NODES_LABEL: str(max_nodes)} if pool else {}
    return NodeView(f"node{i}", labels, gpus, free, 4, 3)


def gpu_deployment(replicas, pool="l4"):
    return DeploymentView("app", "llm", pool, 1, 1, len(replicas), replicas)


def running(i):
    return ReplicaView(f"r{i}", "RUNNING", f"node{i}")


PENDING = ReplicaView("r9", "STARTING", None)


def test_five_replicas_four_gpus_pool_at_max():
    nodes = [node(i, "l4", 4) for i in range(4)] + [node(9, "cpu", 1, gpus=0)]
    [rep] = explain(nodes, [gpu_deployment([running(i) for i in range(4)] + [PENDING])])
    assert rep.counts == {"RUNNING": 4, "PENDING": 1} and rep.pending == 1
    reason = rep.replicas[-1]["reason"]
    assert "waiting for 1 GPU(s) in pool 'l4': 4/4 GPUs in use on 4 node(s)" in reason
    assert "the pool is at max_nodes (4), so no node can be added" in reason
    text = render([rep])
    assert "app/llm pool l4: 5 target; PENDING 1, RUNNING 4" in text and "max_nodes (4)" in text


def test_pool_below_max_can_grow():
    nodes = [node(i, "l4", 6) for i in range(4)]
    [rep] = explain(nodes, [gpu_deployment([running(i) for i in range(4)] + [PENDING])])
    assert "the cluster autoscaler can add 2 more node(s) to the pool" in rep.replicas[-1]["reason"]


def test_pool_without_nodes():
    [rep] = explain([node(9, "cpu", 1, gpus=0)], [gpu_deployment([PENDING])])
    assert "it has no nodes yet" in rep.replicas[0]["reason"]


def test_starting_on_a_node_is_not_pending():
    [rep] = explain([node(0, "l4", 1)], [gpu_deployment([ReplicaView("r0", "STARTING", "node0")])])
    assert rep.counts == {"STARTING": 1} and "reason" not in rep.replicas[0]


def test_unpinned_deployment_reason():
    [rep] = explain([node(0, None, 1)], [gpu_deployment([PENDING], pool=None)])
    assert "not pinned to a pool" in rep.replicas[0]["reason"]


def test_metrics_export_pending_per_deployment_and_pool():
    nodes = [node(i, "l4", 4) for i in range(4)]
    gauges = StatusGauges()
    gauges.update(explain(nodes, [gpu_deployment([running(i) for i in range(4)] + [PENDING])]))
    text = generate_latest(gauges.registry).decode()
    assert 'gpuserve_pending_replicas{deployment="llm",pool="l4"} 1.0' in text
    assert 'gpuserve_replicas{deployment="llm",pool="l4",state="RUNNING"} 4.0' in text
    gauges.update(explain(nodes, [gpu_deployment([running(i) for i in range(4)])]))
    text = generate_latest(gauges.registry).decode()
    assert 'gpuserve_pending_replicas{deployment="llm",pool="l4"} 0.0' in text
    assert 'state="PENDING"' not in text
