"""Reactive baseline policies to compare against: Ray Serve's own, Knative-KPA-like, HPA-like.

All see the same :class:`~autoscaling.policy.PolicyContext` and aim at the same slot utilisation, so
a comparison measures the scaling logic, not the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from autoscaling.policy import Decision, PolicyContext, ceil_replicas, register


@dataclass
class RayDefaultPolicy:
    """Ray Serve's default policy, run by Ray's own code.

    Calls ``ray.serve.autoscaling_policy.replica_queue_length_autoscaling_policy`` for the desired
    count, then Ray's scaling-factor and delay logic with the simulated clock (Ray's delay logic takes
    the time as an argument). Defaults are Ray's: upscale delay 30 s, downscale delay 600 s, and
    a 30 s look-back. ``target_ongoing_requests`` is set to ``utilization * slots`` so the target
    matches the others.

    Ray's policy never sees the requests in flight now. Replicas and handles record the count and
    push what they recorded to the controller every ``metrics_interval_s`` (Ray's default 10 s), and
    the controller hands the policy the mean over the deployment's ``look_back_period_s`` of what has
    arrived. So does this one: the mean of the per-decision counts in the look-back window that ends
    at the last push. Given the instantaneous count, the simulated Ray default scaled to its maximum
    on a 5-second burst that the real one never reacted to (``bench/autoscaling_e2e.py``).
    """

    utilization: float = 0.8
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0
    look_back_period_s: float = 30.0
    metrics_interval_s: float = 10.0
    interval_s: float = 1.0
    _ray: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        for name in ("look_back_period_s", "metrics_interval_s"):
            if not getattr(self, name) > 0:
                raise ValueError(
                    f"{name} ({getattr(self, name)}) must be > 0: Ray averages the load it was pushed over a window"
                )

    def _bind(self, slots: int, lo: int, hi: int) -> Any:
        """Import Ray's functions and build its config once (decide runs every simulated second)."""
        if self._ray is None:
            from ray.serve._private.common import DeploymentID
            from ray.serve.autoscaling_policy import (
                _apply_delay_logic,
                _apply_scaling_factors,
                replica_queue_length_autoscaling_policy,
            )
            from ray.serve.config import AutoscalingConfig, AutoscalingContext

            config = AutoscalingConfig(
                min_replicas=lo,
                max_replicas=hi,
                target_ongoing_requests=self.utilization * slots,
                upscale_delay_s=self.upscale_delay_s,
                downscale_delay_s=self.downscale_delay_s,
            )
            self._ray = (
                DeploymentID(name="sim", app_name="sim"),
                AutoscalingContext,
                replica_queue_length_autoscaling_policy,
                _apply_scaling_factors,
                _apply_delay_logic,
                config,
            )
        return self._ray

    def decide(self, ctx: PolicyContext, state: dict[str, Any]) -> tuple[Decision, dict[str, Any]]:
        dep, Context, policy, scale, delay, config = self._bind(ctx.slots_per_replica, ctx.min_replicas, ctx.max_replicas)
        target = state.get("target", ctx.replicas)
        # What the controller has: the counts recorded up to the last push; it averages those in the
        # look-back window that ends there (nothing pushed yet: nothing in flight, as Ray reads it).
        pushed_s = math.floor(ctx.now_s / self.metrics_interval_s) * self.metrics_interval_s
        keep_s = pushed_s - self.look_back_period_s
        window = [(t, v) for t, v in state.get("window", []) if t > keep_s]
        window.append((ctx.now_s, ctx.ongoing_requests))
        seen = [v for t, v in window if t <= pushed_s]
        ongoing = sum(seen) / len(seen) if seen else 0.0
        rctx = Context(
            deployment_id=dep,
            deployment_name="sim",
            app_name="sim",
            # Ray counts replicas it has started, pending ones included, as current.
            current_num_replicas=ctx.replicas,
            target_num_replicas=target,
            running_replicas=[],
            total_num_requests=ongoing,
            total_queued_requests=ctx.queued_requests,
            aggregated_metrics={},
            raw_metrics={},
            capacity_adjusted_min_replicas=ctx.min_replicas,
            capacity_adjusted_max_replicas=ctx.max_replicas,
            policy_state=dict(state.get("ray", {})),
            last_scale_up_time=None,
            last_scale_down_time=None,
            current_time=ctx.now_s,
            config=config,
        )
        desired, _ = policy(rctx)
        desired = scale(desired, ctx.replicas, config)
        ray_state = dict(state.get("ray", {}))
        decided, ray_state = delay(max(0, desired), target, config, ray_state, _now=ctx.now_s)
        decided = min(max(int(decided), ctx.min_replicas), ctx.max_replicas)
        state = {"ray": ray_state, "target": decided, "window": [[t, v] for t, v in window]}
        return Decision(replicas=decided, reason=f"ray default: desired {desired} (mean in flight {ongoing:.2f})"), state


@dataclass
class KpaLikePolicy:
    """Knative KPA-like: 60 s stable and 6 s panic windows over in-flight requests.

    Desired = in-flight average over the stable window / per-replica target. Panic starts when the
    panic window wants at least twice the ready replicas; while panicking (60 s after the last
    trigger) it never scales down. Scale-down at most halves the count per decision.
    """

    utilization: float = 0.8
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    max_scale_down_rate: float = 2.0
    interval_s: float = 2.0

    def decide(self, ctx: PolicyContext, state: dict[str, Any]) -> tuple[Decision, dict[str, Any]]:
        samples = [s for s in state.get("samples", []) if s[0] > ctx.now_s - self.stable_window_s]
        samples.append((ctx.now_s, ctx.ongoing_requests))
        per_replica = ctx.slots_per_replica * self.utilization
        stable = sum(v for _, v in samples) / len(samples)
        recent = [v for t, v in samples if t > ctx.now_s - self.panic_window_s] or [ctx.ongoing_requests]
        panic = sum(recent) / len(recent)
        want_stable, want_panic = ceil_replicas(stable / per_replica), ceil_replicas(panic / per_replica)
        panic_until = state.get("panic_until", -math.inf)
        if want_panic >= self.panic_threshold * max(1, ctx.ready_replicas):
            panic_until = ctx.now_s + self.stable_window_s
        if ctx.now_s < panic_until:
            target = max(ctx.replicas, want_panic, want_stable)
        else:
            target = max(want_stable, math.floor(ctx.replicas / self.max_scale_down_rate))
        target = min(max(target, ctx.min_replicas), ctx.max_replicas)
        return Decision(replicas=target, reason="kpa"), {"samples": samples, "panic_until": panic_until}


@dataclass
class HpaLikePolicy:
    """Kubernetes HPA-like: every 15 s, ratio to target with 10 % tolerance; 300 s down stabilisation.

    Scale-up is limited per sync to max(double, +4) as HPA's default behaviour; scale-down takes the
    highest recommendation of the last 300 s.
    """

    utilization: float = 0.8
    tolerance: float = 0.1
    stabilization_down_s: float = 300.0
    interval_s: float = 15.0

    def decide(self, ctx: PolicyContext, state: dict[str, Any]) -> tuple[Decision, dict[str, Any]]:
        current = max(ctx.ready_replicas, 1)
        ratio = ctx.ongoing_requests / (current * ctx.slots_per_replica * self.utilization)
        desired = ctx.replicas if abs(ratio - 1) <= self.tolerance else ceil_replicas(current * ratio)
        desired = min(desired, max(2 * ctx.replicas, ctx.replicas + 4))
        recs = [r for r in state.get("recs", []) if r[0] > ctx.now_s - self.stabilization_down_s]
        recs.append((ctx.now_s, desired))
        target = desired if desired >= ctx.replicas else min(ctx.replicas, max(r for _, r in recs))
        target = min(max(target, ctx.min_replicas), ctx.max_replicas)
        return Decision(replicas=target, reason="hpa"), {"recs": recs}


register("ray_default")(lambda **p: RayDefaultPolicy(**p))
register("kpa")(lambda **p: KpaLikePolicy(**p))
register("hpa")(lambda **p: HpaLikePolicy(**p))
