"""Replica lifecycle on real Ray Serve: warm before routed, stall → replaced, lifecycle metrics."""

import concurrent.futures as cf
import glob
import json
import os
import threading
import time

import httpx
import pytest

from serving import AutoscalingSpec, BatchingSpec, HealthSpec, ModelDeployment, ModelSource, QueueSpec, WarmupSpec
from tests.conftest import MINILM
from tests.integration.stall_task import STALL_TEXT

REPLICA = "x-gpuserve-replica"
# Serve's access-log line for a request the admission gateway passed to a model replica.
SERVED_LINE = "CALL reply OK"


def replica_log(deployment_app: str, deployment: str, replica: str) -> list[str]:
    import ray

    logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    [path] = glob.glob(os.path.join(logs, "serve", f"replica_{deployment_app}_{deployment}_{replica}.log"))
    with open(path) as f:
        return f.read().splitlines()


def embed_spec(name, replicas=None, **kw):
    return ModelDeployment(
        name=name,
        task=kw.pop("task", "embeddings"),
        model=ModelSource(path=MINILM),
        replicas=replicas,
        queue=kw.pop("queue", QueueSpec(max_ongoing_requests=8)),
        batching=BatchingSpec(max_batch_size=4),
        **kw,
    )


@pytest.fixture
def cleanup():
    """Names of apps a test created; deleted afterwards even if the test failed."""
    from ray import serve

    names: list[str] = []
    yield names
    for name in names:
        serve.delete(name)


def test_new_replica_gets_no_request_before_warm_up_finished(deploy, serve_instance, cleanup):
    cleanup.append("scaled")
    # Serve's autoscaler adds the second replica when steady load exceeds one replica's target.
    scaling = AutoscalingSpec(
        min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=0, downscale_delay_s=600
    )
    client = deploy(embed_spec("scaled", autoscaling=scaling).build(), "scaled", "/scaled")
    first = client.get("/health").headers[REPLICA]
    served: list[tuple[float, str]] = []
    stop = threading.Event()

    def steady_load():
        with httpx.Client(base_url=serve_instance + "/scaled", timeout=60) as c:
            while not stop.is_set():
                r = c.post("/v1/embeddings", json={"input": "steady traffic"})
                assert r.status_code == 200, r.text
                served.append((time.time(), r.headers[REPLICA]))

    with cf.ThreadPoolExecutor(3) as pool:
        loaders = [pool.submit(steady_load) for _ in range(3)]
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if sum(1 for _, rep in served if rep != first) >= 10:
                break
            time.sleep(0.5)
        stop.set()
        for f in loaders:
            f.result()
    reps = {rep for _, rep in served}
    assert first in reps and len(reps) == 2, f"scaling 1 -> 2 must keep the first replica, saw {reps}"
    assert max(t for t, rep in served if rep == first) > min(t for t, rep in served if rep != first)
    new = (reps - {first}).pop()
    # Serve may buffer access-log lines briefly.
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        lines = replica_log("scaled", "scaled", new)
        if any(SERVED_LINE in line for line in lines):
            break
        time.sleep(0.5)
    ready_idx = next(i for i, line in enumerate(lines) if "gpuserve: replica ready" in line)
    request_idx = [i for i, line in enumerate(lines) if SERVED_LINE in line]
    assert request_idx, f"the new replica served requests; its log: {lines[:8]}"
    assert min(request_idx) > ready_idx, "a request was handled before warm-up finished"
    ready = json.loads(lines[ready_idx].split("gpuserve: replica ready ", 1)[1])
    assert ready["replica"] == new and ready["warmup"]["rounds"] >= 2
    # And from the client's side: the new replica's first answer came after its ready time.
    first_new = min(t for t, rep in served if rep == new)
    assert first_new >= ready["ready_at_s"]


def test_stalled_request_path_fails_health_and_serve_replaces_the_replica(deploy, serve_instance, cleanup):
    from ray import serve

    cleanup.append("stalling")
    spec = embed_spec(
        "stalling",
        1,
        task="tests.integration.stall_task:StallingEmbeddingsTask",
        health=HealthSpec(check_period_s=1, check_timeout_s=5, stall_after_s=2),
        warmup=WarmupSpec(cover_max_input=False, max_rounds=2),
        # The stalled request never finishes: do not wait a minute for it.
        queue=QueueSpec(max_ongoing_requests=8, drain_timeout_s=5),
    )
    client = deploy(spec.build(), "stalling", "/stalling")
    before = client.get("/health")
    assert before.status_code == 200 and before.json()["stall_after_s"] == 2
    old = before.headers[REPLICA]

    stalled = cf.ThreadPoolExecutor(1).submit(
        lambda: httpx.post(serve_instance + "/stalling/v1/embeddings", json={"input": STALL_TEXT}, timeout=120)
    )
    # Readiness reflects the stall too, before Serve acts on it.
    deadline, saw_503 = time.monotonic() + 30, False
    while time.monotonic() < deadline and not saw_503:
        try:
            r = client.get("/health", timeout=5)
            saw_503 = r.status_code == 503 and "stalled" in r.json()["error"]["message"]
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    # Serve replaces the replica: a fresh one answers, with a new id.
    deadline, new = time.monotonic() + 180, None
    while time.monotonic() < deadline:
        try:
            r = client.post("/v1/embeddings", json={"input": "after the stall"}, timeout=10)
            if r.status_code == 200 and r.headers[REPLICA] != old:
                new = r.headers[REPLICA]
                break
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert new is not None, "Serve did not replace the stalled replica"
    lines = replica_log("stalling", "stalling", old)
    assert any("unhealthy: request path stalled" in line for line in lines)
    # The stalled request got an answer (an error), not a hang.
    assert stalled.result(timeout=120).status_code >= 500
    # Serve's deployment status catches up once the replacement passes its health checks.
    deadline = time.monotonic() + 60
    while serve.status().applications["stalling"].deployments["stalling"].status != "HEALTHY":
        assert time.monotonic() < deadline, "deployment did not return to HEALTHY"
        time.sleep(1)
    if not saw_503:
        pytest.fail("/health never reported the stall before the replica was replaced")


def test_lifecycle_metrics_reach_prometheus_format(embeddings_client, metrics_port):
    replica = embeddings_client.get("/health").headers[REPLICA]
    names = ("ray_gpuserve_model_load_seconds", "ray_gpuserve_warmup_seconds", "ray_gpuserve_time_to_ready_seconds")
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        # Every metric has a row for this replica (other deployments' replicas export the same names).
        if all(any(line.startswith(n + "{") and f'replica="{replica}"' in line for line in text.splitlines()) for n in names):
            break
        time.sleep(1)
    for n in names:
        rows = [line for line in text.splitlines() if line.startswith(n + "{") and f'replica="{replica}"' in line]
        assert rows, f"{n} for replica {replica} not exported"
        assert 'deployment="minilm"' in rows[0] and float(rows[0].rsplit(" ", 1)[1]) > 0


def test_warm_up_failure_fails_the_deployment_clearly_without_a_retry_storm(serve_instance, cleanup):
    import ray
    from ray import serve

    cleanup.append("badwarm")
    spec = embed_spec("badwarm", 1, task="tests.integration.stall_task:FailingWarmupTask")
    with pytest.raises(RuntimeError, match="Deploying application badwarm failed"):
        serve.run(spec.build(), name="badwarm", route_prefix="/badwarm", blocking=False)
    message = serve.status().applications["badwarm"].deployments["badwarm"].message
    assert "warm-up failed on shape inputsx4" in message
    assert "MemoryError: simulated: batch does not fit" in message
    logs = ray._private.worker.global_worker.node.get_logs_dir_path()
    attempts = glob.glob(os.path.join(logs, "serve", "replica_badwarm_badwarm_*.log"))
    assert 1 <= len(attempts) <= 4, f"{len(attempts)} constructor attempts: a retry storm"


def test_a_long_generation_keeps_its_replica_and_a_hung_decode_step_loses_it(deploy, serve_instance, cleanup, tiny_lm_dir):
    """Liveness by token progress: a non-streamed generation six times longer than ``stall_after_s``
    (GPUSERVE_LONG_GENERATION_S, default 12 s; docs/benchmarks.md records a 60 s run) completes on the
    replica that started it, and a decode step that hangs gets the replica replaced."""
    from tests.integration.stall_task import HANG_STEP_TEXT

    cleanup.append("slowgen")
    spec = ModelDeployment(
        name="slowgen",
        task="tests.integration.stall_task:SlowStepsTextGenerationTask",
        model=ModelSource(path=str(tiny_lm_dir)),
        replicas=1,
        health=HealthSpec(check_period_s=1, check_timeout_s=5, stall_after_s=2),
        warmup=WarmupSpec(cover_max_input=False, max_rounds=2),
        # The hung replica's running request never finishes: do not wait a minute for it.
        queue=QueueSpec(drain_timeout_s=5),
    )
    client = deploy(spec.build(), "slowgen", "/slowgen")
    old = client.get("/health").headers[REPLICA]
    seconds = float(os.environ.get("GPUSERVE_LONG_GENERATION_S", "12"))
    tokens = 200
    t0 = time.monotonic()
    r = client.post(
        "/v1/completions",
        json={"prompt": f"STEP-S:{seconds / tokens} Once", "max_tokens": tokens, "temperature": 0},
        timeout=seconds + 120,
    )
    took = time.monotonic() - t0
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == tokens and took >= 0.9 * seconds
    assert r.headers[REPLICA] == old
    assert not [line for line in replica_log("slowgen", "slowgen", old) if "unhealthy" in line]

    stuck = cf.ThreadPoolExecutor(1).submit(
        lambda: httpx.post(
            serve_instance + "/slowgen/v1/completions",
            json={"prompt": f"STEP-S:0 {HANG_STEP_TEXT}", "max_tokens": 5},
            timeout=180,
        )
    )
    deadline, new = time.monotonic() + 180, None
    while time.monotonic() < deadline and new is None:
        try:
            h = client.get("/health", timeout=5)
            if h.status_code == 200 and h.headers[REPLICA] != old:
                new = h.headers[REPLICA]
        except httpx.HTTPError:
            pass
        time.sleep(1)
    assert new is not None, "Serve did not replace the replica whose decode step hung"
    assert any("unhealthy: request path stalled" in line for line in replica_log("slowgen", "slowgen", old))
    assert stuck.result(timeout=180).status_code >= 500
    # The replacement serves.
    ok = client.post("/v1/completions", json={"prompt": "Once", "max_tokens": 3, "temperature": 0}, timeout=60)
    assert ok.status_code == 200 and ok.headers[REPLICA] == new
