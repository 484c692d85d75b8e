"""Translate a ModelDeployment spec into Ray Serve deployment options.

Pure: returns plain dicts, imports no Ray, so the mapping is unit-tested.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

from autoscaling.policy import make_policy
from serving.spec import ModelDeployment

if TYPE_CHECKING:
    from serving.pools import NodePool

# A model that fails to load fails the same way every time: a few retries cover
# a flaky node, hundreds only hide the error (Serve's default is 20).
MAX_CONSTRUCTOR_RETRY_COUNT = 3


GPUSERVE_POLICY = "autoscaling.ray_policy:GpuservePolicy"
# Ray Serve's default replica metrics push interval.
DEFAULT_PUSH_INTERVAL_S = 10.0


def _policy_kwargs(spec: ModelDeployment, pool: Optional["NodePool"]) -> dict[str, Any]:
    """Ray's ``policy_kwargs`` for the gpuserve policy adapter (JSON-able)."""
    a = spec.autoscaling
    assert a is not None and a.gpuserve_policy is not None
    params = dict(a.policy_params)
    if a.gpuserve_policy == "predictive":
        # The spec's scale-down delay is the user's knob; the policy's guardrail applies it.
        params.setdefault("downscale_delay_s", a.downscale_delay_s)
        if pool is not None:
            # What the pool says its nodes take to come up is the prior the policy starts from.
            params.setdefault("node_lead_prior_s", pool.provisioning_s)
    kwargs: dict[str, Any] = {
        "policy": a.gpuserve_policy,
        "params": params,
        "slots_per_replica": spec.queue.max_ongoing_requests,
    }
    if a.log_every_decision:
        kwargs["log_every_decision"] = True
    if spec.resources.gpus > 0 and params.get("pre_provision", True):
        kwargs["node_bundle"] = {"GPU": float(spec.resources.gpus), "CPU": float(spec.resources.cpus)}
        if pool is not None:
            kwargs["node_label_selector"] = pool.ray_selector
    return kwargs


# The gateway admits or rejects every request itself; Ray must hand it all of them at once.
GATEWAY_MAX_ONGOING_REQUESTS = 100_000


# Requests Ray's router may hold in front of the gateways at least: a burst that arrives at once is
# all "queued" there for the milliseconds it takes to pick a gateway (measured: 12 simultaneous
# requests against a bound of 4 gave a 503).
GATEWAY_ROUTER_QUEUE_FLOOR = 256


def gateway_router_queue(spec: ModelDeployment) -> int:
    """Bound of Ray's router queue in front of the gateways: what they could hold at most, or the floor."""
    admissible = spec.queue.max_queued_requests + spec.replica_bounds()[1] * spec.queue.max_ongoing_requests
    return max(GATEWAY_ROUTER_QUEUE_FLOOR, admissible)


def gateway_name(spec: ModelDeployment) -> str:
    """The gateway deployment's name in the application."""
    return f"{spec.name}-gateway"


def gateway_options(spec: ModelDeployment, pool: Optional["NodePool"] = None) -> dict[str, Any]:
    """Options of the admission gateways: ``queue.gateway_replicas`` replicas, no CPU reserved.

    They only wait on I/O. With a ``pool`` (a CPU pool with a standing node:
    :meth:`~serving.pools.ServingSpec.gateway_pool`) they select its nodes by label, so losing the head
    does not take the data plane with it and CPU work stays off the GPU pools. Without one they stay
    on the head, where the controller runs: a pool that may have no node would leave them pending
    until the autoscaler brings one (241 s measured), with every request waiting behind them.
    """
    if pool is not None:
        place: dict[str, Any] = {"num_cpus": 0, "label_selector": pool.ray_selector}
    else:
        place = {"num_cpus": 0, "resources": {"node:__internal_head__": 0.001}}
    return {
        "name": gateway_name(spec),
        "num_replicas": spec.queue.gateway_replicas,
        "max_ongoing_requests": GATEWAY_MAX_ONGOING_REQUESTS,
        # Ray's router holds requests in front of the gateways while it picks one (a burst's worth, for
        # milliseconds) and while none can take them (one is being restarted). Bounded, so a failover
        # answers fast 503s with Retry-After instead of buffering without limit in every proxy; never
        # below what the gateways could admit, or a burst they would admit gets 503s.
        "max_queued_requests": gateway_router_queue(spec),
        "backpressure_config": {"status_code": 503, "retry_after_s": spec.queue.retry_after_s},
        "ray_actor_options": place,
        # The proxy already writes an access-log line per request; a second one here costs the
        # rejection path time and says nothing new.
        "logging_config": {"enable_access_log": False},
        "health_check_period_s": spec.health.check_period_s,
        "health_check_timeout_s": spec.health.check_timeout_s,
    }


def deployment_options(spec: ModelDeployment, pool: Optional["NodePool"] = None) -> dict[str, Any]:
    """Keyword arguments for ``serve.deployment(...).options(**kw)``.

    With a ``pool``, replicas select that pool's nodes by label, so GPU replicas
    land only in their pool and CPU replicas never on GPU nodes (or the head,
    which carries no pool label).
    """
    actor: dict[str, Any] = {"num_cpus": spec.resources.cpus, "num_gpus": spec.resources.gpus}
    if spec.resources.memory_bytes is not None:
        actor["memory"] = spec.resources.memory_bytes
    if spec.resources.accelerator_type is not None:
        actor["accelerator_type"] = spec.resources.accelerator_type
    if pool is not None:
        actor["label_selector"] = pool.ray_selector
    # Hugging Face libraries must never reach for the hub from a replica.
    actor["runtime_env"] = {"env_vars": {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}}

    opts: dict[str, Any] = {
        "name": spec.name,
        "ray_actor_options": actor,
        "max_ongoing_requests": spec.queue.max_ongoing_requests,
        # Behind the gateway the model's only caller is the gateway, which never sends more than the
        # running replicas take: the bound is the gateway's, deployment-wide.
        "max_queued_requests": -1 if spec.queue.gateway else spec.queue.max_queued_requests,
        "backpressure_config": {"status_code": 429, "retry_after_s": spec.queue.retry_after_s},
        "graceful_shutdown_timeout_s": spec.queue.drain_timeout_s,
        "health_check_period_s": spec.health.check_period_s,
        "health_check_timeout_s": spec.health.check_timeout_s,
        "max_constructor_retry_count": MAX_CONSTRUCTOR_RETRY_COUNT,
    }
    if spec.autoscaling is not None:
        a = spec.autoscaling
        cfg: dict[str, Any] = {
            "min_replicas": a.min_replicas,
            "max_replicas": a.max_replicas,
            "target_ongoing_requests": a.target_ongoing_requests,
            "upscale_delay_s": a.upscale_delay_s,
            "downscale_delay_s": a.downscale_delay_s,
            "look_back_period_s": a.look_back_period_s,
        }
        if a.initial_replicas is not None:
            cfg["initial_replicas"] = a.initial_replicas
        if a.gpuserve_policy is not None:
            kwargs = _policy_kwargs(spec, pool)
            cfg["policy"] = {"policy_function": GPUSERVE_POLICY, "policy_kwargs": kwargs}
            # Replicas push their metrics every metrics_interval_s (Ray: 10 s unless the driver's
            # environment said otherwise when Ray was imported). The policy counts the arrivals
            # between its decisions from those pushes: stale by up to one push, they read as a lag
            # and then a jump. Push at least twice per decision and twice per look-back window.
            interval_s = make_policy(kwargs["policy"], **kwargs["params"]).interval_s
            push_s = min(DEFAULT_PUSH_INTERVAL_S, interval_s / 2, a.look_back_period_s / 2)
            if push_s < DEFAULT_PUSH_INTERVAL_S:
                cfg["metrics_interval_s"] = push_s
            # The gpuserve policy applies its own scale-down delay and cooldown; Ray's delay logic
            # on top would double them.
            cfg["upscale_delay_s"] = 0.0
            cfg["downscale_delay_s"] = 0.0
        elif a.policy is not None and a.policy != "ray_default":
            cfg["policy"] = {"policy_function": a.policy}
        opts["autoscaling_config"] = cfg
    else:
        opts["num_replicas"] = 1 if spec.replicas is None else spec.replicas
    return opts
