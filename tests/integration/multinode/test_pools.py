"""Whole-GPU pinning and separate pools on a real multi-node Ray cluster with fake GPUs."""

import subprocess
import sys
import time
from pathlib import Path

import httpx
import ray
from ray import serve

from serving import ModelDeployment, ModelSource, Resources, ServingSpec, WarmupSpec
from serving.pools import POOL_LABEL
from serving.status import status
from tests.integration.conftest import free_port
from tests.integration.multinode.conftest import POOLS

ROOT = Path(__file__).resolve().parents[3]


def deployment(name, tiny_lm_dir, gpus, pool, replicas):
    return ModelDeployment(
        name=name,
        task="text_generation",
        model=ModelSource(path=str(tiny_lm_dir)),
        resources=Resources(gpus=gpus, cpus=1, node_pool=pool),
        replicas=replicas,
        warmup=WarmupSpec(cover_max_input=False, min_rounds=1, max_rounds=2),
    )


def deploy(spec: ServingSpec) -> None:
    for prefix, app in spec.build().items():
        # serve.run waits for RUNNING, which a deployment with a pending replica never reaches.
        serve._run(app, name=prefix.strip("/"), route_prefix=prefix, _blocking=False)


def wait_for(predicate, timeout_s=180, what="condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise TimeoutError(f"{what} not reached in {timeout_s}s")


def report_for(name):
    return next((r for r in status() if r.name == name), None)


def pool_of_node():
    return {n["NodeID"]: (n.get("Labels") or {}).get(POOL_LABEL) for n in ray.nodes() if n["Alive"]}


def replica_health(base, prefix, replicas):
    """GET /health until every replica has answered (the router spreads requests)."""
    seen = {}
    deadline = time.monotonic() + 60
    while len(seen) < replicas and time.monotonic() < deadline:
        h = httpx.get(f"{base}{prefix}/health", timeout=30).json()
        seen[h["replica"]] = h
    return seen


def test_five_one_gpu_replicas_on_four_gpus_one_waits_and_says_why(pool_cluster, tiny_lm_dir):
    cluster, base = pool_cluster
    spec = ServingSpec(name="llm", pools=POOLS, deployments=[deployment("gen", tiny_lm_dir, 1, "l4", 5)])
    deploy(spec)
    rep = wait_for(
        lambda: (r := report_for("gen")) and r.counts.get("RUNNING") == 4 and r.pending == 1 and r,
        what="4 RUNNING + 1 pending",
    )
    nodes = pool_of_node()
    running = [row for row in rep.replicas if row["state"] == "RUNNING"]
    assert len({row["node_id"] for row in running}) == 4, "each replica on its own node"
    assert all(nodes[row["node_id"]] == "l4" for row in running)
    [pending] = [row for row in rep.replicas if row["state"] == "PENDING"]
    assert "waiting for 1 GPU(s) in pool 'l4': 4/4 GPUs in use on 4 node(s)" in pending["reason"]
    assert "the pool is at max_nodes (4), so no node can be added" in pending["reason"]

    # Each replica got its own device from Ray: (node, CUDA_VISIBLE_DEVICES) pairs are distinct.
    health = replica_health(base, "/gen", 4)
    devices = {(h["node_id"], h["cuda_visible_devices"]) for h in health.values()}
    assert len(devices) == 4 and all(d is not None for _, d in devices)

    # The CLI says the same, from another process.
    out = subprocess.run(
        [str(Path(sys.executable).with_name("gpuserve")), "status", "--address", cluster.address],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "gen/gen pool l4: 5 target; PENDING 1, RUNNING 4" in out.stdout
    assert "4/4 GPUs in use on 4 node(s); the pool is at max_nodes (4)" in out.stdout

    # And as a metric, scraped over HTTP from `gpuserve status --metrics-port`.
    port = free_port()
    exporter = subprocess.Popen(
        [str(Path(sys.executable).with_name("gpuserve")), "status", "--address", cluster.address,
         "--metrics-port", str(port), "--interval-s", "1"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def scraped():
            try:
                return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
            except httpx.HTTPError:
                return None

        text = wait_for(lambda: (t := scraped()) and "gpuserve_pending_replicas{" in t and t, 60, "metrics")
        assert 'gpuserve_pending_replicas{deployment="gen",pool="l4"} 1.0' in text
        assert 'gpuserve_replicas{deployment="gen",pool="l4",state="RUNNING"} 4.0' in text
    finally:
        exporter.terminate()
        exporter.wait(timeout=30)


def test_two_gpu_pools_and_a_cpu_ingress_each_in_its_own_pool_gateways_on_the_standing_cpu_pool(pool_cluster, tiny_lm_dir):
    cluster, base = pool_cluster
    # The CPU pool keeps a node (min_nodes 1): the admission gateways run there, off the head.
    pools = [p.model_copy(update={"min_nodes": 1}) if p.name == "cpu" else p for p in POOLS]
    spec = ServingSpec(
        name="mixed",
        pools=pools,
        deployments=[
            deployment("big", tiny_lm_dir, 1, "a100", 1),
            deployment("ingress", tiny_lm_dir, 0, "cpu", 2),
        ],
    )
    assert spec.gateway_pool().name == "cpu"
    deploy(spec)
    wait_for(
        lambda: all((r := report_for(n)) and r.counts.get("RUNNING") == c for n, c in (("big", 1), ("ingress", 2), ("big-gateway", 2))),
        what="big, its gateways and ingress RUNNING",
    )
    nodes = pool_of_node()
    head = cluster.head_node.node_id
    expected = {"big": "a100", "ingress": "cpu", "gen": "l4", "big-gateway": "cpu", "ingress-gateway": "cpu"}
    for r in status():
        for row in r.replicas:
            if row["node_id"] is None:
                continue
            if r.name == "gen-gateway":
                # The previous test's spec: its CPU pool keeps no node, so its gateways stay on the head.
                assert row["node_id"] == head, f"{r.name} off the head node"
                continue
            assert row["node_id"] != head, f"{r.name} replica on the head node"
            assert nodes[row["node_id"]] == expected[r.name], f"{r.name} replica outside pool {expected[r.name]}"
    r = httpx.post(f"{base}/ingress/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text
    r = httpx.post(f"{base}/big/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200, r.text


def test_an_application_from_the_rendered_serve_config_serves_on_its_pool(pool_cluster):
    """What KubeRay would deploy: serveConfigV2's builder application, pinned by label to the CPU pool."""
    import yaml

    from kuberay import RenderOptions, render
    from serving.builder import build, load_spec

    _, base = pool_cluster
    target = "examples.two_pools:serving"
    docs = render(load_spec(target), RenderOptions(import_path=target))
    app_cfg = next(a for a in yaml.safe_load(docs[0]["spec"]["serveConfigV2"])["applications"] if a["name"] == "embed-cpu")
    serve.run(build(app_cfg["args"]), name="from-config", route_prefix=app_cfg["route_prefix"])
    try:
        r = httpx.post(f"{base}{app_cfg['route_prefix']}/v1/embeddings", json={"input": "rendered for KubeRay"}, timeout=60)
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
        health = httpx.get(f"{base}{app_cfg['route_prefix']}/health", timeout=30).json()
        assert pool_of_node()[health["node_id"]] == "cpu"
    finally:
        serve.delete("from-config")


def test_a_drained_gpu_node_hands_its_replica_to_another_node_without_failing_a_request(pool_cluster, tiny_lm_dir):
    """The worker pods' preStop hook (`gpuserve drain`), run as Kubernetes would before SIGTERM: the GCS
    drains the node, Serve starts a replacement on another GPU node and stops the old replica gracefully;
    requests sent throughout all succeed. Runs last: it leaves one L4 node draining."""
    import json
    import threading

    cluster, base = pool_cluster
    serve.delete("gen")  # the first test's five replicas hold every L4 GPU
    spec = ServingSpec(name="moving", pools=POOLS, deployments=[deployment("moving", tiny_lm_dir, 1, "l4", 1)])
    deploy(spec)
    rep = wait_for(lambda: (r := report_for("moving")) and r.counts.get("RUNNING") == 1 and r, what="moving RUNNING")
    [old_node] = [row["node_id"] for row in rep.replicas if row["state"] == "RUNNING"]

    codes, stop = [], threading.Event()

    def traffic():
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                r = client.post(f"{base}/moving/v1/completions", json={"prompt": "Hello", "max_tokens": 4})
                codes.append(r.status_code)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        wait_for(lambda: len(codes) >= 3, 60, "traffic before the drain")
        out = subprocess.run(
            [str(Path(sys.executable).with_name("gpuserve")), "drain", "--timeout-s", "90",
             "--node-id", old_node, "--address", cluster.address],
            capture_output=True, text=True, timeout=180, cwd=ROOT,
        )
        assert out.returncode == 0, (out.stdout, out.stderr)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["accepted"] and result["drained"] and result["replicas_left"] == 0, result
        n_at_drain = len(codes)
        wait_for(lambda: len(codes) >= n_at_drain + 3, 60, "traffic after the drain")
    finally:
        stop.set()
        sender.join(timeout=120)
    rep = report_for("moving")
    running = [row["node_id"] for row in rep.replicas if row["state"] == "RUNNING"]
    assert len(running) == 1 and running[0] != old_node and pool_of_node()[running[0]] == "l4", rep.replicas
    assert codes and set(codes) == {200}, f"requests failed during the drain: {sorted(set(codes))}"
