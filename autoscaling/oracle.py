"""The clairvoyant reference: the cheapest replica schedule found, knowing every future arrival, that meets the SLO.

It is a yardstick for the simulator, not a policy to deploy (it needs the future; ``serving`` refuses it).

Planning, once per prepared trace (:meth:`OraclePolicy.bind_future`):

1. **Plan.** Per window of ``window_s`` (the simulator's ``timeline_step_s``), the fewest replicas whose
   queue meets the SLO target for that window's arrivals, carrying the backlog from the window before.
   The queue is a fluid one over the realised per-second work (requests x service time, so bursts
   within the window count): the backlog follows Lindley's recursion, and a second's arrivals are
   within the SLO when the backlog ahead of them drains within ``slo_s``.
2. **Verify and repair.** The schedule runs in the simulator itself (the same pool model every policy
   faces); every scored window whose attainment is below the target gets more replicas, and the run is
   repeated until the scored attainment reaches the target. The result is feasible by construction on
   that trace; a trace on which it cannot be made feasible within ``max_repairs`` raises.
3. **Act.** At each decision the oracle asks for the highest scheduled count over the next replica
   start plus one interval (replicas) and over the longest node provisioning plus that (nodes, held
   through ``request_resources`` semantics), so capacity is ready when its window starts however slow
   the node, and releases it as soon as no upcoming window needs it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoscaling.policy import Decision, PolicyContext, register


def _window_need(work: np.ndarray, counts: np.ndarray, backlog: float, slots: int, slo_s: float,
                 target: float, lo: int, hi: int) -> tuple[int, float]:
    """Fewest replicas in [lo, hi] meeting ``target`` for one window; returns (replicas, backlog after)."""

    def run(r: int) -> tuple[float, float]:
        c = max(r * slots, 1e-9)  # slot-seconds served per second
        s = np.cumsum(work - c)
        # Lindley: B_t = S_t + max(B_0, max_{k<=t} -S_k) with S_0 = 0.
        after = s + np.maximum(backlog, np.maximum.accumulate(np.maximum(-s, 0.0)))
        before = np.concatenate([[backlog], after[:-1]])
        ok = counts[before / c <= slo_s].sum()
        total = counts.sum()
        return (ok / total if total > 0 else 1.0), float(after[-1]) if len(after) else backlog

    best = run(hi)
    if best[0] < target:
        return hi, best[1]
    # Bisect, keeping the outcome of the fewest replicas found to meet the target.
    while lo < hi:
        mid = (lo + hi) // 2
        outcome = run(mid)
        if outcome[0] >= target:
            hi, best = mid, outcome
        else:
            lo = mid + 1
    return hi, best[1]


def plan_schedule(prepared: Any, cfg: Any, max_replicas: int, target: float) -> np.ndarray:
    """Replicas per window from the fluid plan (step 1 of the module docstring)."""
    step = int(cfg.timeline_step_s)
    counts = np.asarray(prepared.counts, dtype=float)  # arrivals per second, both engines
    if prepared.kind == "fluid":
        work = counts * prepared.work_s
    else:
        # The plan runs to the second after the last arrival's, as the request engine does.
        counts = np.pad(counts, (0, max(0, int(math.ceil(prepared.duration_s)) + 1 - len(counts))))
        work = np.bincount(prepared.arrival_s.astype(int), weights=prepared.service_s, minlength=len(counts))
    windows = int(math.ceil(len(counts) / step))
    sched = np.zeros(windows + 1, dtype=int)
    backlog = 0.0
    for w in range(windows):
        a, b = w * step, min(len(counts), (w + 1) * step)
        sched[w], backlog = _window_need(
            work[a:b], counts[a:b], backlog, cfg.slots_per_replica, cfg.slo_s, target, cfg.min_replicas, max_replicas
        )
    sched[-1] = sched[-2] if windows else cfg.min_replicas
    return np.maximum(sched, cfg.min_replicas)


@dataclass
class _Scheduled:
    """Follows a per-window schedule with the oracle's ask-ahead rule (no planning of its own)."""

    schedule: np.ndarray
    window_s: float
    replica_ahead_s: float
    node_ahead_s: float
    interval_s: float = 10.0

    def _max_over(self, t0: float, t1: float) -> int:
        a = max(0, int(t0 // self.window_s))
        b = min(len(self.schedule) - 1, int(t1 // self.window_s))
        return int(self.schedule[min(a, b) : b + 1].max())

    def decide(self, ctx: PolicyContext, state: dict[str, Any]) -> tuple[Decision, dict[str, Any]]:
        replicas = self._max_over(ctx.now_s, ctx.now_s + self.replica_ahead_s)
        nodes = max(replicas, self._max_over(ctx.now_s, ctx.now_s + self.node_ahead_s))
        replicas = min(max(replicas, ctx.min_replicas), ctx.max_replicas)
        return Decision(replicas=replicas, nodes=min(nodes, ctx.max_replicas), reason="oracle schedule"), state


@dataclass
class OraclePolicy:
    """Clairvoyant and SLO-feasible: the reference the other policies' GPU-hours are compared with.

    Attributes:
        slo_target: Fraction of scored requests to serve within the SLO (default: the simulator's
            ``slo_target``).
        interval_s: How often it acts.
        max_repairs: Verify-and-repair rounds before giving up.
    """

    slo_target: float | None = None
    interval_s: float = 10.0
    max_repairs: int = 30
    repairs: int = field(default=0, init=False)
    _follow: _Scheduled | None = field(default=None, init=False, repr=False)

    def bind_future(self, prepared: Any, cfg: Any) -> None:
        """Plan, verify and repair the schedule for this trace (called by the simulator before the run)."""
        from autoscaling.simulator import max_replicas_for, simulate

        target = self.slo_target if self.slo_target is not None else cfg.slo_target
        hi = max_replicas_for(prepared, cfg)
        sched = plan_schedule(prepared, cfg, hi, target)
        step = float(cfg.timeline_step_s)
        follow = _Scheduled(
            sched,
            step,
            replica_ahead_s=cfg.replica_start_s + self.interval_s,
            node_ahead_s=cfg.provision_delay_s[1] + cfg.replica_start_s + self.interval_s,
            interval_s=self.interval_s,
        )
        first = int(round(cfg.scored_from_s() / step))
        for self.repairs in range(self.max_repairs + 1):
            r = simulate(prepared, follow, cfg, name="oracle-plan")
            req = np.asarray(r.window_requests)
            ok = np.asarray(r.window_within_slo)
            bad = [w for w in range(first, min(len(req), len(sched))) if req[w] > 0 and ok[w] < target * req[w]]
            if r.slo_attainment >= target or not bad or all(sched[w] >= hi for w in bad):
                break
            for w in bad:
                # A window that misses by more gets more at once; at least one replica.
                short = 1.0 - ok[w] / req[w]
                sched[w] = min(hi, sched[w] + max(1, math.ceil(sched[w] * short)))
        if r.slo_attainment < target:
            raise RuntimeError(
                f"oracle: no schedule within {hi} replicas met the SLO target {target} after {self.repairs} "
                f"repairs (attainment {r.slo_attainment:.4f}); the pool cannot serve this trace"
            )
        self._follow = follow

    def decide(self, ctx: PolicyContext, state: dict[str, Any]) -> tuple[Decision, dict[str, Any]]:
        if self._follow is None:
            raise ValueError("the oracle policy needs future arrivals; it runs only in the simulator")
        decision, _ = self._follow.decide(ctx, state)
        return Decision(replicas=decision.replicas, nodes=decision.nodes, reason="oracle"), state


register("oracle")(lambda **p: OraclePolicy(**p))
