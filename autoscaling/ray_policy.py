"""Ray Serve adapter: run a gpuserve policy as a Ray Serve custom autoscaling policy.

Ray instantiates :class:`GpuservePolicy` once per deployment with ``policy_kwargs`` (the
``AutoscalingPolicy(policy_function="autoscaling.ray_policy:GpuservePolicy", policy_kwargs=...)``
that ``serving`` writes for ``autoscaling.policy: predictive``) and calls it every control-loop
iteration. This module is the edge: it reads the clock, turns Ray's ``AutoscalingContext`` into a
:class:`~autoscaling.policy.PolicyContext`, calls the pure policy at its own interval, keeps the
policy's state inside Ray's policy state, and sends node requests.

Signals, from each replica's ``record_autoscaling_stats`` (see ``serving``):
``gpuserve_arrivals_total`` (requests received since the replica started: the adapter counts the
arrivals between two decisions from it, per replica, so the policy sees the rate of its own interval
as in the simulator), ``gpuserve_arrivals_per_s`` (requests received per second over a 30 s window:
the fallback before the first delta), ``gpuserve_service_s`` (slot-seconds per
request), ``gpuserve_gateway_queued_requests`` (the requests waiting in the admission gateways, which
Ray's own counts leave out), ``gpuserve_startup_s`` (constructor start to ready: the replica lead time learned online) and, on
GPUs, ``gpuserve_memory_headroom_ratio`` (memory left below the high-water mark: low is a scale-up signal).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Optional

from autoscaling import _node_requests
from autoscaling.policy import PolicyContext, make_policy
from autoscaling.signals import ARRIVALS, ARRIVALS_TOTAL, GATEWAY_QUEUED, MEMORY_HEADROOM, SERVICE, STARTUP

logger = logging.getLogger("ray.serve")


class GpuservePolicy:
    """A gpuserve policy behind Ray Serve's custom-policy interface.

    Args:
        policy: Registry name (``predictive``, ``hpa``, ``kpa``) or ``module:factory``.
        params: The policy's parameters.
        slots_per_replica: The deployment's ``max_ongoing_requests``.
        node_bundle: Resources of one replica's node share, e.g. ``{"GPU": 1, "CPU": 4}``, for
            ``request_resources``; None disables node pre-provisioning.
        node_label_selector: Ray label selector of the pool's nodes for the node requests.
        default_service_s: Service time assumed until replicas report one.
        log_every_decision: Log every decision with the inputs the policy saw, not only changes of
            the target (for diagnosing a policy; one line per decision interval).
    """

    def __init__(
        self,
        policy: str = "predictive",
        params: Optional[dict[str, Any]] = None,
        slots_per_replica: int = 16,
        node_bundle: Optional[dict[str, float]] = None,
        node_label_selector: Optional[dict[str, str]] = None,
        default_service_s: float = 1.0,
        log_every_decision: bool = False,
    ):
        self.policy = make_policy(policy, **(params or {}))
        self.slots = slots_per_replica
        self.node_bundle = node_bundle
        self.node_label_selector = node_label_selector
        self.default_service_s = default_service_s
        self.log_every_decision = log_every_decision

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        now = ctx.current_time if ctx.current_time is not None else time.time()
        state = dict(ctx.policy_state or {})
        g = dict(state.get("gpuserve", {}))
        if now - g.get("t", -math.inf) < self.policy.interval_s and "replicas" in g:
            return g["replicas"], state
        metrics = ctx.aggregated_metrics or {}
        arrivals, totals = self._arrivals(ctx, g, now, metrics)
        # Each replica's latest report, not Ray's mean over the look-back window: a replica idle until
        # just now reports 0 (nothing served in its window), and averaged with those zeros the first
        # seconds of load read as a fraction of the work (seen end to end: 0.3 s for a 1 s request,
        # and the policy scaled up 6 s later than the simulator did).
        service = [v for v in self._latest_by_replica(ctx, SERVICE).values() if v > 0] or [
            v for v in metrics.get(SERVICE, {}).values() if v > 0
        ]
        work = sum(service) / len(service) if service else g.get("work", self.default_service_s)
        seen = set(g.get("seen", []))
        startups = []
        for rid, v in metrics.get(STARTUP, {}).items():
            key = str(getattr(rid, "unique_id", rid))
            if key not in seen:
                seen.add(key)
                startups.append(float(v))
        running = ctx.current_num_replicas
        # Ray counts the requests at the replicas and in its routers; the gateways' own queue it never
        # sees. Each replica reports the gateways' queues as it last heard them: the largest report.
        in_gateways = self._latest(ctx, GATEWAY_QUEUED)
        queued = (ctx.total_queued_requests or 0.0) + in_gateways
        pctx = PolicyContext(
            now_s=now,
            ready_replicas=running,
            starting_replicas=max(0, ctx.target_num_replicas - running),
            min_replicas=ctx.capacity_adjusted_min_replicas,
            max_replicas=ctx.capacity_adjusted_max_replicas,
            slots_per_replica=self.slots,
            arrivals_per_s=arrivals,
            work_s_per_request=work,
            ongoing_requests=ctx.total_num_requests + in_gateways,
            queued_requests=queued,
            startup_s=tuple(startups),
            memory_headroom_ratio=min(metrics[MEMORY_HEADROOM].values()) if metrics.get(MEMORY_HEADROOM) else None,
        )
        decision, pstate = self.policy.decide(pctx, g.get("state", {}))
        if self.node_bundle is not None and decision.nodes is not None:
            # Ask only while the nodes wanted exceed the replicas running. Ray's autoscaler places
            # request_resources bundles on nodes' total resources, and a bundle placed on an idle
            # node keeps it from idle termination: a standing request for as many nodes as there are
            # running replicas could hold an idle node for ever, while the replicas hold their own.
            nodes = decision.nodes if decision.nodes > ctx.current_num_replicas else 0
            _node_requests.update(str(ctx.deployment_id), nodes, self.node_bundle, self.node_label_selector)
        if decision.replicas != ctx.target_num_replicas or self.log_every_decision:
            # One line per change (or per decision when asked), in the Serve controller's log: what was
            # decided, why, and on what inputs; a policy's timing can then be compared with the simulator's.
            logger.info(
                "gpuserve autoscaling %s: %d -> %d replicas, nodes %s (%s) [%s]",
                ctx.deployment_id,
                ctx.target_num_replicas,
                decision.replicas,
                decision.nodes,
                decision.reason,
                describe_inputs(pctx),
            )
        state["gpuserve"] = {
            "t": now,
            "replicas": decision.replicas,
            "nodes": decision.nodes,
            "reason": decision.reason,
            "work": work,
            # Replica IDs live as long as the replicas; keep the set from growing without bound.
            "seen": sorted(seen)[-256:],
            "totals": totals,
            "state": pstate,
        }
        return decision.replicas, state

    @staticmethod
    def _latest_by_replica(ctx: Any, name: str) -> dict[str, float]:
        """Each replica's latest report of ``name`` (Ray's raw series), by replica id."""
        raw = (getattr(ctx, "raw_metrics", None) or {}).get(name, {})
        return {
            str(getattr(rid, "unique_id", rid)): float(getattr(series[-1], "value", series[-1]))
            for rid, series in raw.items()
            if series
        }

    @classmethod
    def _latest(cls, ctx: Any, name: str) -> float:
        """The largest of the replicas' latest reports of ``name`` (0 when none reported it)."""
        return max(cls._latest_by_replica(ctx, name).values(), default=0.0)

    @classmethod
    def _arrivals(cls, ctx: Any, g: dict[str, Any], now: float, metrics: dict[str, Any]) -> tuple[float, dict[str, float]]:
        """Arrivals per second since the previous decision, from each replica's latest total.

        A replica new since then counts from its start; one gone since then no longer counts (its
        last arrivals were counted at the decision before). Without totals from the previous decision
        (the first one, or replicas that did not report yet), the replicas' windowed rates are summed.
        """
        totals = cls._latest_by_replica(ctx, ARRIVALS_TOTAL)
        prev, prev_t = g.get("totals"), g.get("t")
        if totals and prev and prev_t is not None and now > prev_t:
            delta = sum(max(0.0, v - prev.get(k, 0.0)) for k, v in totals.items())
            return delta / (now - prev_t), totals
        return sum(metrics.get(ARRIVALS, {}).values()), totals


def describe_inputs(pctx: PolicyContext) -> str:
    """The inputs of one decision as ``key=value`` pairs (parsed back by :func:`parse_inputs`)."""
    return " ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in (
            ("ready", pctx.ready_replicas),
            ("starting", pctx.starting_replicas),
            ("arrivals_per_s", float(pctx.arrivals_per_s)),
            ("work_s", float(pctx.work_s_per_request)),
            ("ongoing", float(pctx.ongoing_requests)),
            ("queued", float(pctx.queued_requests)),
        )
    )


def parse_inputs(text: str) -> dict[str, float]:
    """The ``key=value`` pairs of :func:`describe_inputs`, as numbers."""
    return {k: float(v) for k, v in (pair.split("=", 1) for pair in text.split())}
