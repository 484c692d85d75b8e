"""Out-of-memory handling on real Ray Serve over HTTP (OOMs injected in a CPU replica through torch's own
exception and the same code path a GPU takes), and a real Prometheus server scraping the cluster."""

import concurrent.futures as cf
import subprocess
import time

import httpx
import pytest

from serving import BatchingSpec, HealthSpec, MemorySpec, ModelDeployment, ModelSource, QueueSpec
from serving.monitoring import ALERTS, asset_path
from tests.conftest import MINILM, require_prometheus_binary
from tests.integration.conftest import free_port

REPLICA = "x-gpuserve-replica"
TASK = "tests.integration.stall_task:OomInjectingTask"


def oom_spec(name, **memory):
    return ModelDeployment(
        name=name,
        task=TASK,
        model=ModelSource(path=MINILM),
        replicas=1,
        queue=QueueSpec(max_ongoing_requests=16),
        batching=BatchingSpec(max_batch_size=8, batch_wait_timeout_s=0.05),
        health=HealthSpec(check_period_s=1, check_timeout_s=10),
        memory=MemorySpec(**memory),
    )


def test_load_induced_ooms_split_the_batch_and_every_request_is_answered(deploy, serve_instance):
    from ray import serve

    try:
        client = deploy(oom_spec("oom-split", max_ooms_in_window=1000).build(), "oom-split", "/oom-split")
        texts = [f"OOM-BATCH request {i}" for i in range(16)]
        with cf.ThreadPoolExecutor(16) as pool:
            replies = list(pool.map(lambda t: client.post("/v1/embeddings", json={"input": t}), texts))
        assert [r.status_code for r in replies] == [200] * 16, [r.text for r in replies if r.status_code != 200]
        assert all(len(r.json()["data"][0]["embedding"]) == 384 for r in replies)
        health = client.get("/health").json()
        # Batches of more than one ran out of memory and were split; single requests went through.
        assert health["memory"]["oom_total"] >= 1
        assert health["memory"]["budget_bytes"] > 0 and health["memory"]["model"]["per_token_bytes"] >= 0
    finally:
        serve.delete("oom-split")


def test_requests_too_large_get_413_without_costing_the_replica_and_persistent_ooms_replace_it_once(
    deploy, serve_instance
):
    from ray import serve

    try:
        client = deploy(oom_spec("oom-persist", max_ooms_in_window=2).build(), "oom-persist", "/oom-persist")
        first = client.get("/health").headers[REPLICA]
        # Requests larger than any that completed here run out of memory alone: 413, and never count.
        for _ in range(5):  # more than max_ooms_in_window
            r = client.post("/v1/embeddings", json={"input": "OOM-ALWAYS " + "word " * 40})
            assert r.status_code == 413, r.text
            err = r.json()["error"]
            assert err["code"] == "request_too_large_for_device" and "ran out of device memory" in err["message"]
        for _ in range(4):  # several health checks later, the same replica serves
            r = client.post("/v1/embeddings", json={"input": "fine, and longer than the request that probes the device"})
            assert r.status_code == 200 and r.headers[REPLICA] == first
            time.sleep(1)
        # OOMs on requests no larger than served ones are the device's: 503 (retry elsewhere), and they count.
        for _ in range(3):  # 3 in the window: over the limit of 2
            r = client.post("/v1/embeddings", json={"input": "OOM-DEVICE"})
            assert r.status_code == 503 and r.json()["error"]["code"] == "device_out_of_memory", r.text
        # check_health now fails; Serve replaces the replica.
        deadline = time.monotonic() + 120
        current = first
        while time.monotonic() < deadline:
            try:
                current = client.get("/health").headers.get(REPLICA, first)
            except httpx.HTTPError:
                pass
            if current != first:
                break
            time.sleep(1)
        assert current != first, "the replica with persistent OOMs was not replaced"
        # The new replica serves, and stays: one replacement, not a crash loop.
        deadline = time.monotonic() + 60
        while serve.status().applications["oom-persist"].deployments["oom-persist"].status != "HEALTHY":
            assert time.monotonic() < deadline, "deployment did not return to HEALTHY"
            time.sleep(1)
        seen = set()
        for _ in range(10):
            r = client.post("/v1/embeddings", json={"input": "fine again"})
            assert r.status_code == 200
            seen.add(r.headers[REPLICA])
            time.sleep(0.5)
        assert seen == {current}
    finally:
        serve.delete("oom-persist")


@pytest.fixture
def prometheus_server(tmp_path, metrics_port):
    """A real Prometheus server scraping the local Ray cluster's metrics every second, with gpuserve's rules."""
    binary = require_prometheus_binary("prometheus")
    port = free_port()
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: ['{asset_path(ALERTS)}']\n"
        "scrape_configs:\n"
        "  - job_name: ray\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(base + "/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not become ready"
            assert proc.poll() is None, "prometheus exited"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_prometheus_scrapes_the_cluster_and_finds_gpuserve_metrics_by_promql(
    prometheus_server, embeddings_client, deploy
):
    from ray import serve

    try:
        client = deploy(oom_spec("oom-metrics", max_ooms_in_window=1000).build(), "oom-metrics", "/oom-metrics")
        with cf.ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda i: client.post("/v1/embeddings", json={"input": f"OOM-BATCH {i}"}), range(8)))
        assert client.post("/v1/embeddings", json={"input": "OOM-ALWAYS " + "word " * 40}).status_code == 413
        embeddings_client.post("/v1/embeddings", json={"input": "hello"})

        def query(q):
            r = httpx.get(prometheus_server + "/api/v1/query", params={"query": q}, timeout=5).json()
            assert r["status"] == "success", r
            return r["data"]["result"]

        wanted = {
            'ray_gpuserve_time_to_ready_seconds{deployment="minilm"}': lambda rs: float(rs[0]["value"][1]) > 0,
            'sum by (kind) (ray_gpuserve_oom_total{deployment="oom-metrics"})': lambda rs: {
                r["metric"]["kind"] for r in rs
            }
            >= {"split", "too_large"},
        }
        deadline = time.monotonic() + 120
        pending = dict(wanted)
        while pending and time.monotonic() < deadline:
            for q, ok in list(pending.items()):
                rs = query(q)
                if rs and ok(rs):
                    del pending[q]
            time.sleep(1)
        assert not pending, f"not found by PromQL within 120 s: {list(pending)}"
        rules = httpx.get(prometheus_server + "/api/v1/rules", timeout=5).json()["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"GpuserveOutOfMemoryErrors", "GpuserveQueueFull"}
        # CPU replicas report no GPU series at all: nothing that would read as an idle GPU.
        assert query('ray_gpuserve_gpu_memory_used_bytes{deployment="oom-metrics"}') == []
    finally:
        serve.delete("oom-metrics")


def test_gpu_telemetry_reaches_prometheus_format_with_deployment_replica_and_gpu_labels(serve_instance, metrics_port):
    """The GPU export path of a replica, with NVML faked at the hardware boundary, inside a Ray actor
    (as in a replica): the series appear with their labels; unsupported readings are absent, not 0."""
    import ray

    @ray.remote(num_cpus=0)
    class FakeGpuReplica:
        def start(self):
            from types import SimpleNamespace

            from serving._private.metrics import start_gpu_metrics
            from serving.gpu import GpuTelemetry
            from tests.unit.test_gpu_memory import FakeNvml, gpu

            cuda = SimpleNamespace(
                is_available=lambda: True,
                device_count=lambda: 1,
                memory_stats=lambda i: {"allocated_bytes.all.current": 5, "reserved_bytes.all.current": 7,
                                        "allocated_bytes.all.peak": 9, "num_ooms": 1},
            )
            telemetry = GpuTelemetry(nvml=FakeNvml([gpu(0, 70)]), cuda=cuda, visible_devices="0")
            start_gpu_metrics("fake-llm", "replica-1", telemetry)
            return True

    actor = FakeGpuReplica.remote()
    assert ray.get(actor.start.remote())
    wanted = {
        "ray_gpuserve_gpu_memory_used_bytes": 70 * 2**30,
        "ray_gpuserve_gpu_memory_total_bytes": 80 * 2**30,
        "ray_gpuserve_gpu_utilization_ratio": 0.37,
        "ray_gpuserve_torch_reserved_bytes": 7,
        "ray_gpuserve_torch_oom_count": 1,
    }
    deadline, rows = time.monotonic() + 90, {}
    while time.monotonic() < deadline and len(rows) < len(wanted):
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        for line in text.splitlines():
            for name in wanted:
                if line.startswith(name + "{") and 'deployment="fake-llm"' in line:
                    rows[name] = line
        time.sleep(1)
    ray.kill(actor)
    assert set(rows) == set(wanted), sorted(set(wanted) - set(rows))
    for name, value in wanted.items():
        assert 'replica="replica-1"' in rows[name] and 'gpu="0"' in rows[name]
        assert float(rows[name].rsplit(" ", 1)[1]) == pytest.approx(value)
    # ECC is unsupported on the fake GPU: no series at all rather than a misleading 0.
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    assert not any(l.startswith("ray_gpuserve_gpu_ecc_uncorrected_errors{") and "fake-llm" in l for l in text.splitlines())
