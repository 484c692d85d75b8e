"""The predictive policy in real Ray Serve: up on a ramp, down after the cooldown (short timescales)."""

import threading
import time

import httpx

from serving import AutoscalingSpec, BatchingSpec, ModelDeployment, ModelSource, QueueSpec, WarmupSpec
from tests.conftest import MINILM
from tests.integration.conftest import controller_log_lines

APP = "predictive"


def running_replicas(app: str, deployment: str) -> int:
    from ray import serve

    st = serve.status().applications.get(app)
    if st is None or deployment not in st.deployments:
        return 0
    return st.deployments[deployment].replica_states.get("RUNNING", 0)


def test_predictive_policy_scales_up_on_a_ramp_and_down_after_the_cooldown(deploy, serve_instance):
    from ray import serve

    spec = ModelDeployment(
        name="ramp",
        task="tests.integration.stall_task:SlowEmbeddingsTask",  # 0.2 s per request on the model thread
        model=ModelSource(path=MINILM),
        queue=QueueSpec(max_ongoing_requests=2, max_queued_requests=200),
        batching=BatchingSpec(enabled=False),
        warmup=WarmupSpec(min_rounds=1, max_rounds=1),
        autoscaling=AutoscalingSpec(
            min_replicas=1,
            max_replicas=3,
            downscale_delay_s=10,
            look_back_period_s=2,
            policy="predictive",
            # Short timescales for the test; the logic is the production one.
            policy_params={
                "interval_s": 1.0,
                "replica_lead_prior_s": 5.0,
                "node_lead_prior_s": 0.0,
                "cooldown_after_up_s": 5.0,
                "headroom_beta": 0.5,
                "forecast_warmup_updates": 3,
                # Bursts are remembered for at most an hour in production; seconds here.
                "max_peak_window_s": 20.0,
            },
        ),
    )
    try:
        deploy(spec.build(), APP, "/predictive")
        counts: list[tuple[float, int]] = []
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                counts.append((time.monotonic(), running_replicas(APP, "ramp")))
                time.sleep(0.5)

        statuses: list[int] = []
        lock = threading.Lock()

        def fire(client: httpx.Client):
            r = client.post("/v1/embeddings", json={"input": "SLOW:0.2"})
            with lock:
                statuses.append(r.status_code)

        def offer(rate_per_s: float, seconds: float, client: httpx.Client, workers: list[threading.Thread]):
            # Open loop: requests go out on schedule whether or not earlier ones finished.
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t = threading.Thread(target=fire, args=(client,), daemon=True)
                t.start()
                workers.append(t)
                time.sleep(1.0 / rate_per_s)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        workers: list[threading.Thread] = []
        with httpx.Client(base_url=serve_instance + "/predictive", timeout=120) as client:
            offer(2.0, 10, client, workers)  # one replica carries 5 req/s
            t_ramp = time.monotonic()
            for rate in (4.0, 6.0, 8.0, 10.0, 12.0):  # a ramp past one replica's capacity
                offer(rate, 5, client, workers)
            offer(12.0, 25, client, workers)
            t_low = time.monotonic()
            peak = max(n for t, n in counts if t >= t_ramp)
            # Low load: the replicas must come back down after the window and cooldown.
            deadline = t_low + 120
            while time.monotonic() < deadline:
                offer(1.0, 5, client, workers)
                if running_replicas(APP, "ramp") == 1:
                    break
            t_down = time.monotonic()
            for w in workers:
                w.join(timeout=120)
        stop.set()
        watcher.join()
        assert peak >= 2, f"no scale-up on the ramp; replica counts {counts[-20:]}"
        assert running_replicas(APP, "ramp") == 1, f"no scale-down after the load fell; {counts[-10:]}"
        # Down only after the scale-down window (10 s) had passed since the load fell.
        assert t_down - t_low >= 10
        # Every request got an answer: served, or told to come back (429), never lost or a 5xx.
        assert statuses and set(statuses) <= {200, 429}, sorted(set(statuses))
        assert statuses.count(200) >= 0.9 * len(statuses)
        # No churn: the count rose and fell, it did not oscillate up and down repeatedly.
        changes = [b for a, b in zip(counts, counts[1:]) if a[1] != b[1]]
        assert len(changes) <= 8, counts
        # The decisions were gpuserve's: the adapter logs each change with its reason.
        lines = controller_log_lines("gpuserve autoscaling")
        assert any("(up: " in line and " over the floor cost " in line for line in lines), lines
        assert any("(down: " in line and "floor" in line for line in lines), lines
    finally:
        serve.delete(APP)


def test_a_serve_config_file_names_the_policy_and_ray_builds_it():
    """What a user writes in a Serve config file (YAML) is accepted by Ray's schema and builds the adapter."""
    import yaml
    from ray.serve._private.autoscaling_state import _apply_autoscaling_config, _resolve_policy_callable
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import ServeDeploySchema

    text = """
applications:
  - name: llm
    import_path: examples.text_generation:app
    deployments:
      - name: llm
        max_ongoing_requests: 16
        autoscaling_config:
          min_replicas: 1
          max_replicas: 20
          upscale_delay_s: 0
          downscale_delay_s: 0
          policy:
            policy_function: autoscaling.ray_policy:GpuservePolicy
            policy_kwargs:
              policy: predictive
              params: {headroom_beta: 1.5, node_lead_prior_s: 240}
              slots_per_replica: 16
              node_bundle: {GPU: 1, CPU: 4}
"""
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    auto = schema.applications[0].deployments[0].autoscaling_config
    config = AutoscalingConfig(**auto)
    policy = _resolve_policy_callable(config.policy)
    assert policy.policy.headroom_beta == 1.5 and policy.node_bundle == {"GPU": 1, "CPU": 4}
    # Wrapped as Ray wraps it, it decides on a context Ray would pass.
    from types import SimpleNamespace

    ctx = SimpleNamespace(
        deployment_id="llm",
        current_time=100.0,
        policy_state={},
        aggregated_metrics={},
        current_num_replicas=1,
        target_num_replicas=1,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=20,
        # As Ray reports them: 16 running on the one replica (its max_ongoing_requests) and 24 queued
        # at handles; the total counts both.
        total_num_requests=40.0,
        total_queued_requests=24.0,
        config=config,
    )
    n, _ = _apply_autoscaling_config(policy)(ctx)
    # 16 running fill the one replica: 16 + sqrt(16) slots = 1.25 replicas, plus draining the 24 queued
    # (1 s each) within the 70 s replica lead, 0.02: 2 replicas, up from 1.
    assert n == 2


def test_ray_default_baseline_runs_rays_own_delay_logic_on_the_simulated_clock():
    from autoscaling.baselines import RayDefaultPolicy
    from autoscaling.policy import PolicyContext

    pol = RayDefaultPolicy(upscale_delay_s=30, downscale_delay_s=600)
    st: dict = {}

    def at(t, ongoing, n):
        ctx = PolicyContext(
            now_s=t, ready_replicas=n, starting_replicas=0, min_replicas=1, max_replicas=50,
            slots_per_replica=16, arrivals_per_s=0.0, work_s_per_request=1.0, ongoing_requests=ongoing,
        )
        return pol.decide(ctx, st)

    d, st = at(0.0, 128.0, 2)  # wants 10 (128 / 12.8): Ray waits upscale_delay_s first
    assert d.replicas == 2
    d, st = at(29.0, 128.0, 2)
    assert d.replicas == 2
    d, st = at(31.0, 128.0, 2)
    assert d.replicas == 10
    d, st = at(40.0, 12.8, 10)  # wants 1: only after 600 s of wanting it
    assert d.replicas == 10
    d, st = at(641.0, 12.8, 10)
    assert d.replicas == 1
