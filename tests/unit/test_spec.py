"""Spec validation: bad specs fail at definition time, naming field, value and fix."""

import subprocess
import sys

import pytest
from pydantic import ValidationError

from serving import AutoscalingSpec, BatchingSpec, ModelDeployment, ModelSource, QueueSpec, Resources, WarmupSpec
from serving._private.options import deployment_options, gateway_options

SRC = ModelSource(path="/models/x")


def make(**kw):
    base = dict(name="m", task="embeddings", model=SRC)
    base.update(kw)
    return ModelDeployment(**base)


def error_text(fn):
    with pytest.raises(ValidationError) as ei:
        fn()
    return str(ei.value)


def test_defaults_are_valid_and_bounded():
    spec = make()
    assert spec.resources.gpus == 0
    assert spec.queue.max_queued_requests > 0, "queues are bounded by default"
    assert spec.served_name == "m"
    assert make(model=ModelSource(path="/x", served_name="alias")).served_name == "alias"


def test_fractional_gpu_is_refused_with_the_rule():
    msg = error_text(lambda: Resources(gpus=0.5))
    assert "resources.gpus (0.5) must be a whole number" in msg
    assert "gpus=1" in msg


@pytest.mark.parametrize("gpus", [-1, 17])
def test_gpu_count_out_of_range(gpus):
    assert "gpus" in error_text(lambda: Resources(gpus=gpus))


def test_whole_float_gpu_is_accepted():
    assert Resources(gpus=2.0).gpus == 2


def test_accelerator_type_needs_a_gpu():
    msg = error_text(lambda: Resources(accelerator_type="A100"))
    assert "accelerator_type ('A100')" in msg and "gpus >= 1" in msg


def test_max_below_min_replicas():
    msg = error_text(lambda: AutoscalingSpec(min_replicas=5, max_replicas=2))
    assert "autoscaling.max_replicas (2) must be >= autoscaling.min_replicas (5)" in msg


def test_initial_replicas_outside_bounds():
    msg = error_text(lambda: AutoscalingSpec(min_replicas=1, max_replicas=3, initial_replicas=4))
    assert "initial_replicas (4)" in msg and "[1, 3]" in msg


def test_policy_must_be_an_import_path():
    msg = error_text(lambda: AutoscalingSpec(policy="not a path"))
    assert "autoscaling.policy ('not a path')" in msg and "module:function" in msg


def test_replicas_and_autoscaling_are_exclusive():
    msg = error_text(lambda: make(replicas=2, autoscaling=AutoscalingSpec()))
    assert "replicas (2) and autoscaling are both set" in msg


@pytest.mark.parametrize("name", ["Upper", "1abc", "a_b", "ends-", "x" * 64, ""])
def test_bad_names(name):
    assert "name" in error_text(lambda: make(name=name))


def test_unknown_task_lists_the_valid_ones():
    msg = error_text(lambda: make(task="summarise"))
    assert "task ('summarise')" in msg and "embeddings" in msg and "text_generation" in msg


def test_task_import_path_is_accepted():
    assert make(task="mypkg.tasks:MyTask").task == "mypkg.tasks:MyTask"


def test_unknown_fields_are_errors():
    assert "extra" in error_text(lambda: make(replica=2)).lower()
    assert "extra" in error_text(lambda: QueueSpec(max_queue=3)).lower()


def test_cuda_device_needs_gpus():
    msg = error_text(lambda: make(model=ModelSource(path="/x", device="cuda")))
    assert "model.device ('cuda') needs resources.gpus >= 1" in msg


def test_gpus_with_cpu_device_is_contradictory():
    msg = error_text(lambda: make(model=ModelSource(path="/x", device="cpu"), resources=Resources(gpus=1)))
    assert "resources.gpus (1)" in msg and "'cpu'" in msg


def test_half_precision_needs_gpus():
    assert "model.dtype ('float16')" in error_text(lambda: make(model=ModelSource(path="/x", dtype="float16")))


def test_batch_larger_than_ongoing_limit():
    msg = error_text(
        lambda: make(queue=QueueSpec(max_ongoing_requests=4), batching=BatchingSpec(max_batch_size=8))
    )
    assert "batching.max_batch_size (8) exceeds queue.max_ongoing_requests (4)" in msg


@pytest.mark.parametrize(
    "path,fragment",
    [("https://hf.co/x", "never downloads"), ("package://not-a-name", "importable package"), ("", "at least 1")],
)
def test_model_path_forms(path, fragment):
    assert fragment in error_text(lambda: ModelSource(path=path))


def test_warmup_needs_something_to_run():
    assert "nothing to run" in error_text(lambda: WarmupSpec(inputs=[], cover_max_input=False))
    assert WarmupSpec(inputs=[]).cover_max_input
    assert "warmup.max_rounds (1) must be >= warmup.min_rounds (2)" in error_text(lambda: WarmupSpec(max_rounds=1))
    assert WarmupSpec(enabled=False, inputs=[], cover_max_input=False).inputs == []


def test_spec_round_trips_through_json():
    spec = make(autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=4), resources=Resources(gpus=1, cpus=2))
    assert ModelDeployment.model_validate(spec.model_dump(mode="json")) == spec


def test_options_fixed_replicas_gpu_and_backpressure():
    spec = make(
        replicas=3,
        resources=Resources(gpus=1, cpus=2, accelerator_type="L4", memory_bytes=8 << 30),
        queue=QueueSpec(max_ongoing_requests=8, max_queued_requests=20, retry_after_s=2),
        batching=BatchingSpec(max_batch_size=4),
    )
    o = deployment_options(spec)
    assert o["name"] == "m" and o["num_replicas"] == 3 and "autoscaling_config" not in o
    actor = o["ray_actor_options"]
    assert actor["num_gpus"] == 1 and actor["num_cpus"] == 2
    assert actor["accelerator_type"] == "L4" and actor["memory"] == 8 << 30
    assert actor["runtime_env"]["env_vars"]["HF_HUB_OFFLINE"] == "1"
    assert o["max_ongoing_requests"] == 8
    # The gateway holds the deployment-wide queue; its only caller never over-sends to the model.
    assert o["max_queued_requests"] == -1 and o["graceful_shutdown_timeout_s"] == 60.0
    g = gateway_options(spec)
    assert g["num_replicas"] == 2 and g["ray_actor_options"]["num_cpus"] == 0  # queue.gateway_replicas
    assert "node:__internal_head__" in g["ray_actor_options"]["resources"]
    assert g["max_ongoing_requests"] > 20 and g["name"] == "m-gateway"
    # Without the gateway, Ray Serve's per-caller queue bound applies.
    o = deployment_options(spec.model_copy(update={"queue": QueueSpec(max_queued_requests=20, retry_after_s=2, gateway=False)}))
    assert o["max_queued_requests"] == 20
    assert o["backpressure_config"] == {"status_code": 429, "retry_after_s": 2}


def test_queue_priorities_and_timeouts_are_checked():
    assert QueueSpec().priorities == ["interactive", "batch"]
    assert "must be one of queue.priorities (interactive, batch)" in error_text(
        lambda: QueueSpec(default_priority="bulk")
    )
    assert "must not repeat a class" in error_text(lambda: QueueSpec(priorities=["a", "a"]))
    assert "class name ('Hi Pri')" in error_text(lambda: QueueSpec(priorities=["Hi Pri"]))
    assert "default_timeout_s" in error_text(lambda: QueueSpec(default_timeout_s=0))


def test_options_autoscaling():
    spec = make(
        autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=4, initial_replicas=2, policy="pkg.mod:policy")
    )
    o = deployment_options(spec)
    assert "num_replicas" not in o
    a = o["autoscaling_config"]
    assert (a["min_replicas"], a["max_replicas"], a["initial_replicas"]) == (1, 4, 2)
    assert a["policy"] == {"policy_function": "pkg.mod:policy"}


def test_options_are_accepted_by_ray_serve():
    # The mapping must be something Ray Serve itself validates, not just a dict we like.
    pytest.importorskip("ray.serve")
    from ray.serve._private.config import DeploymentConfig

    spec = make(autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=4))
    o = deployment_options(spec)
    cfg = DeploymentConfig.from_default(
        **{k: v for k, v in o.items() if k not in ("name", "ray_actor_options")}
    )
    assert cfg.max_queued_requests == -1 and cfg.graceful_shutdown_timeout_s == spec.queue.drain_timeout_s
    assert cfg.backpressure_config.status_code == 429
    assert cfg.autoscaling_config.max_replicas == 4
    g = gateway_options(spec)
    cfg = DeploymentConfig.from_default(**{k: v for k, v in g.items() if k not in ("name", "ray_actor_options")})
    # Ray's queue in front of the gateway (used only while it restarts) is bounded: a failover answers
    # 503 with Retry-After instead of buffering without limit.
    assert cfg.num_replicas == 2 and cfg.max_queued_requests >= spec.queue.max_queued_requests + 4 * 8
    assert cfg.backpressure_config.status_code == 503
    assert cfg.backpressure_config.retry_after_s == spec.queue.retry_after_s


def test_importing_the_api_loads_neither_ray_nor_torch():
    code = (
        "import sys, serving, serving.spec, serving.errors, autoscaling, kuberay, deployments;"
        "bad = [m for m in ('ray', 'torch', 'transformers') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_spec_reference_doc_is_current():
    from pathlib import Path

    from serving._private.specdoc import render

    doc = Path(__file__).resolve().parents[2] / "docs" / "spec.md"
    assert doc.read_text() == render(), "regenerate: python -m serving._private.specdoc > docs/spec.md"


def test_replica_init_spec_leaves_out_scaling():
    from serving._private.app import replica_init_spec

    one, two = make(replicas=1), make(replicas=2)
    auto = make(autoscaling=AutoscalingSpec(min_replicas=1, max_replicas=8))
    # Same constructor argument whatever the replica count: Serve scales instead of replacing replicas.
    assert replica_init_spec(one) == replica_init_spec(two) == replica_init_spec(auto)
    assert ModelDeployment.model_validate(replica_init_spec(two)).name == "m"

