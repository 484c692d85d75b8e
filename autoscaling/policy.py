"""The policy contract: a context in, a decision and new state out; one guardrail; a registry by name.

Policies are pure: everything they know arrives in :class:`PolicyContext` (``now_s`` included) and
everything they remember lives in a JSON-serialisable ``state`` dict that the caller stores and hands
back (Ray Serve keeps it as the policy state; the simulator keeps it in memory). No clock reads, no
I/O, no Ray imports here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Protocol


@dataclass(frozen=True)
class PolicyContext:
    """What a policy sees at one decision.

    Attributes:
        now_s: The decision time, seconds (the caller's clock; simulated time in the simulator).
        ready_replicas: Replicas serving now.
        starting_replicas: Replicas asked for and not yet serving (waiting for a node, loading, warming).
        min_replicas: Lower bound on replicas.
        max_replicas: Upper bound on replicas.
        slots_per_replica: Requests one replica serves at once (``max_ongoing_requests``).
        arrivals_per_s: Arrival rate observed since the previous decision.
        work_s_per_request: Mean slot-seconds one request occupies (its service time).
        ongoing_requests: Requests running or queued, averaged since the previous decision.
        queued_requests: Requests waiting for a slot now.
        startup_s: Load + warm-up times of replicas that became ready since the previous decision,
            counted from the moment they had a node.
        node_startup_s: Provisioning times (ask → ready) of GPU nodes that came up since the previous decision.
        nodes: GPU nodes held or being provisioned for this pool, if the caller knows.
        memory_headroom_ratio: The smallest GPU memory headroom below the high-water mark over the
            replicas (a fraction of device memory), if reported.
    """

    now_s: float
    ready_replicas: int
    starting_replicas: int
    min_replicas: int
    max_replicas: int
    slots_per_replica: int
    arrivals_per_s: float
    work_s_per_request: float
    ongoing_requests: float
    queued_requests: float = 0.0
    startup_s: tuple[float, ...] = ()
    node_startup_s: tuple[float, ...] = ()
    nodes: int | None = None
    memory_headroom_ratio: float | None = None

    @property
    def replicas(self) -> int:
        """Ready plus starting replicas: the capacity already paid for."""
        return self.ready_replicas + self.starting_replicas


@dataclass(frozen=True)
class Decision:
    """A policy's answer.

    Attributes:
        replicas: Target replica count (bounds applied by the guardrail).
        nodes: GPU nodes to hold for this pool ahead of replicas (``request_resources``), or None
            to leave node scaling to pending replicas.
        reason: One line saying why, for logs and the simulator's event list.
    """

    replicas: int
    nodes: int | None = None
    reason: str = ""


class Policy(Protocol):
    """What every policy implements. ``interval_s`` is how often its caller should ask it."""

    interval_s: float

    def decide(self, ctx: PolicyContext, state: dict[str, Any]) -> tuple[Decision, dict[str, Any]]:
        """Return the decision and the new state (the input state is not modified)."""
        ...


def replicas_for(rate_per_s: float, work_s: float, slots: int, utilization: float) -> float:
    """Replicas (fractional) that carry ``rate_per_s`` at the given slot utilisation (Little's law)."""
    return rate_per_s * work_s / (slots * utilization)


def replicas_staffed(rate_per_s: float, work_s: float, slots: int, beta: float, max_utilization: float) -> float:
    """Replicas (fractional) by square-root staffing: offered load R slots plus ``beta * sqrt(R)`` spare.

    A pooled queue over many slots needs less relative headroom than a small one (Halfin-Whitt):
    spare capacity grows with the square root of the load, so a large pool runs hotter for the same
    chance of waiting. ``beta`` sets that chance (about 0.2 at 1, 0.08 at 1.5, 0.02 at 2 for Poisson
    arrivals); ``max_utilization`` caps how hot any pool is planned to run.
    """
    load = max(0.0, rate_per_s * work_s)
    return max(load / max_utilization, load + beta * math.sqrt(load)) / slots


@dataclass(frozen=True)
class Guardrail:
    """Bounds and churn control shared by gpuserve's policies.

    Scale up at once. Scale down only to the highest count the inner policy wanted during the last
    ``downscale_delay_s`` (a stabilisation window: a noisy signal cannot walk the count down, and one
    high reading holds it), never within ``cooldown_after_up_s`` of a scale-up, and by at most
    ``max_down_step`` replicas at a time (0: no limit). A missing state (a restarted controller)
    starts a fresh window: the first ``downscale_delay_s`` after a restart can scale up but not down.
    """

    downscale_delay_s: float = 300.0
    cooldown_after_up_s: float = 300.0
    max_down_step: int = 0

    def apply(
        self, ctx: PolicyContext, wanted: int, state: dict[str, Any]
    ) -> tuple[int, dict[str, Any], str]:
        """Clamp and delay ``wanted``; returns (replicas, new state, what the guardrail did)."""
        st = dict(state)
        current = ctx.replicas
        st.setdefault("since_s", ctx.now_s)
        st.setdefault("last_up_s", -float("inf"))
        target = min(max(wanted, ctx.min_replicas), ctx.max_replicas)
        recs = [r for r in st.get("recs", []) if r[0] > ctx.now_s - self.downscale_delay_s]
        recs.append((ctx.now_s, target))
        st["recs"] = recs
        if target > current:
            st["last_up_s"] = ctx.now_s
            return target, st, "up"
        if target == current:
            return current, st, "hold"
        if ctx.now_s - st["since_s"] < self.downscale_delay_s:
            return current, st, "down-delayed (fresh state)"
        if ctx.now_s - st["last_up_s"] < self.cooldown_after_up_s:
            return current, st, "down-delayed (cooldown)"
        stable = max(r for _, r in recs)
        if self.max_down_step:
            stable = max(stable, current - self.max_down_step)
        if stable >= current:
            return current, st, "down-delayed (window)"
        return stable, st, "down"


PolicyFactory = Callable[..., Policy]
_REGISTRY: dict[str, PolicyFactory] = {}


def register(name: str) -> Callable[[PolicyFactory], PolicyFactory]:
    """Register a built-in policy factory under ``name``."""

    def wrap(factory: PolicyFactory) -> PolicyFactory:
        _REGISTRY[name] = factory
        return factory

    return wrap


def policy_names() -> list[str]:
    """Names of the built-in policies."""
    _load_builtins()
    return sorted(_REGISTRY)


def make_policy(name: str, **params: Any) -> Policy:
    """Build a policy by registry name or ``module:attr`` import path.

    Raises:
        ValueError: unknown name (the message lists the valid ones) or a bad parameter.
    """
    _load_builtins()
    if name in _REGISTRY:
        factory = _REGISTRY[name]
    elif ":" in name:
        import importlib

        module, _, attr = name.partition(":")
        factory = getattr(importlib.import_module(module), attr)
    else:
        raise ValueError(
            f"policy {name!r} is not a built-in policy; use one of {', '.join(policy_names())} "
            "or an import path 'package.module:factory'"
        )
    try:
        return factory(**params)
    except TypeError as e:
        raise ValueError(f"policy {name!r}: bad parameters {sorted(params)}: {e}") from None


def _load_builtins() -> None:
    # Imported on first use so that importing this module registers nothing as a side effect.
    from autoscaling import baselines, oracle, predictive  # noqa: F401


def ceil_replicas(x: float) -> int:
    """Round a fractional replica need up, ignoring float noise just above an integer."""
    return max(0, math.ceil(x - 1e-9))

