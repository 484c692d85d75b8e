"""Replay a trace against a model of a GPU pool under an autoscaling policy. No Ray at run time.

The model:

* **Nodes**: one GPU each (one replica per node). A node asked for is ready after a provisioning
  delay drawn uniformly from ``provision_delay_s``; an idle node (no replica) is released after
  ``idle_timeout_s`` unless the policy holds it (``Decision.nodes``, Ray's ``request_resources``).
  GPU cost counts every node from the moment it is asked for to its release.
* **Replicas**: a replica needs a node; once its node is ready it loads and warms up for
  ``replica_start_s`` and then serves ``slots_per_replica`` requests at once. Removed replicas drain
  (their requests finish; no new ones start there).
* **Requests**: FIFO into a deployment-wide queue bounded at ``max_queued_requests`` (beyond it:
  rejected); a request still queued after ``deadline_s`` expires. Service time is
  ``prefill_s_per_token * input + decode_s_per_token * output`` where the trace has tokens, else
  ``service_time_s``. The SLO is on time to first token: queue wait + prefill ≤ ``slo_s``.
  Rejected and expired requests count as misses. ``slo_target`` (0.99) is the fraction of requests
  the SLO is met for that counts as meeting it (the oracle plans for it).
* **Start**: the pool starts with what the first five minutes need at ``initial_utilization``, and
  policies take over after ``hold_s`` (the system fills from empty first); the same for every policy.
* **Fair scoring**: a deployment that is already running has had time to get whatever capacity it
  asked for, so nothing before ``score_from_s`` is scored: by default one decision hold plus the
  longest node provisioning plus a replica start (``hold_s + max(provision_delay_s) +
  replica_start_s``), rounded up to a whole ``timeline_step_s``. Before it the trace warms the pool
  and every policy's state; from it on requests count (by arrival time) and GPU time is charged.
* **What the policy sees**: the arrivals, their work, the requests in flight and the queue of each
  simulated second. With ``metrics_lag_s`` it sees them that many seconds late (whole seconds), as a
  policy on Ray does: replicas push their metrics every ``metrics_interval_s``, and behind the
  admission gateways an arrival is reported with the next dispatch. 0 (the default) shows the policy
  the second just past.
* **Two engines**: per-request (event-driven, exact times) for request traces; fluid (per-second
  counts, FIFO cohorts, 1-second resolution for waits) for rate traces.
"""

from __future__ import annotations

import heapq
import math
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from autoscaling.policy import Decision, Policy, PolicyContext, ceil_replicas, replicas_for
from autoscaling.traces import RateTrace, RequestTrace, Trace, per_second_counts, replicate


@dataclass(frozen=True)
class SimConfig:
    """The pool, the service and the SLO (see the module docstring for the model)."""

    slo_s: float = 2.0
    slo_target: float = 0.99
    deadline_s: float = 30.0
    max_queued_requests: int = 1024
    provision_delay_s: tuple[float, float] = (180.0, 300.0)
    replica_start_s: float = 60.0
    idle_timeout_s: float = 60.0
    slots_per_replica: int = 16
    service_time_s: float = 2.0
    prefill_s_per_token: float = 0.0002
    decode_s_per_token: float = 0.02
    peak_replicas: float | None = 20.0
    min_replicas: int = 1
    max_replicas: int | None = None
    initial_utilization: float = 0.8
    seed: int = 0
    timeline_step_s: float = 60.0
    max_window_cv: float = 4.0
    hold_s: float = 120.0
    initial_replicas: int | None = None
    score_from_s: float | None = None
    metrics_lag_s: float = 0.0

    def __post_init__(self) -> None:
        lo, hi = self.provision_delay_s
        if not 0 <= lo <= hi:
            raise ValueError(f"provision_delay_s ({lo}, {hi}) must satisfy 0 <= min <= max")
        for name in ("slo_s", "deadline_s", "service_time_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} ({getattr(self, name)}) must be > 0")
        if not 0 < self.slo_target <= 1:
            raise ValueError(f"slo_target ({self.slo_target}) must be in (0, 1], e.g. 0.99")
        if self.slots_per_replica < 1:
            raise ValueError(f"slots_per_replica ({self.slots_per_replica}) must be >= 1")
        if self.score_from_s is not None and self.score_from_s < 0:
            raise ValueError(f"score_from_s ({self.score_from_s}) must be >= 0 (0 scores the whole trace)")
        if self.timeline_step_s < 1:
            raise ValueError(f"timeline_step_s ({self.timeline_step_s}) must be >= 1")
        if not 0 <= self.metrics_lag_s <= 600:
            raise ValueError(f"metrics_lag_s ({self.metrics_lag_s}) must be in [0, 600] seconds; 0 shows the policy the last second")

    def peak_rate_per_s(self) -> float:
        """Arrivals per second whose load needs ``peak_replicas`` (20 when unset) replicas at full use,
        at ``service_time_s`` each: the rate synthetic scenarios are drawn at."""
        return (self.peak_replicas or 20.0) * self.slots_per_replica / self.service_time_s

    def scored_from_s(self) -> float:
        """Where scoring starts: ``score_from_s``, or the warm start, rounded up to a whole timeline step."""
        start = self.score_from_s
        if start is None:
            start = self.hold_s + self.provision_delay_s[1] + self.replica_start_s
        step = self.timeline_step_s
        return math.ceil(start / step - 1e-9) * step


@dataclass
class SimResult:
    """What one policy achieved on one trace."""

    policy: str
    requests: float
    served_within_slo: float
    rejected: float
    expired: float
    slo_attainment: float
    rejected_fraction: float
    p50_latency_s: float
    p99_latency_s: float
    gpu_hours: float
    scale_events: int
    scale_ups: int
    scale_downs: int
    wall_s: float
    simulated_s: float
    scored_from_s: float = 0.0
    timeline: dict[str, list[float]] = field(default_factory=dict, repr=False)
    # Per arrival window of ``timeline_step_s``: requests and those within the SLO (all windows, scored or not).
    window_requests: list[float] = field(default_factory=list, repr=False)
    window_within_slo: list[float] = field(default_factory=list, repr=False)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("timeline", "window_requests", "window_within_slo"):
            d.pop(k)
        return d


class _Node:
    __slots__ = ("asked_s", "ready_s", "replica", "idle_since_s", "seen_ready")

    def __init__(self, asked_s: float, ready_s: float):
        self.asked_s, self.ready_s = asked_s, ready_s
        self.replica: _Replica | None = None
        self.idle_since_s = ready_s
        self.seen_ready = False


class _Replica:
    __slots__ = ("node", "ready_s", "seen_ready")

    def __init__(self, node: _Node, ready_s: float):
        self.node, self.ready_s, self.seen_ready = node, ready_s, False


class Pool:
    """Nodes and replicas of one GPU pool on a simulated clock."""

    def __init__(self, cfg: SimConfig, rng: np.random.Generator, initial: int, charge_from_s: float = 0.0):
        self.cfg, self.rng = cfg, rng
        self.charge_from_s = charge_from_s
        self.nodes: list[_Node] = []
        self.replicas: list[_Replica] = []
        self.node_target: int | None = None
        self.gpu_s = 0.0
        self.ready = 0
        self.replica_obs: list[float] = []
        self.node_obs: list[float] = []
        for _ in range(initial):
            n = _Node(0.0, 0.0)
            n.seen_ready = True
            r = _Replica(n, 0.0)
            r.seen_ready = True
            n.replica = r
            self.nodes.append(n)
            self.replicas.append(r)
        self.ready = initial
        self.next_event_s = math.inf

    def _new_node(self, now: float) -> _Node:
        lo, hi = self.cfg.provision_delay_s
        n = _Node(now, now + float(self.rng.uniform(lo, hi)))
        self.nodes.append(n)
        return n

    def scale_to(self, n: int, now: float) -> None:
        start = self.cfg.replica_start_s
        while len(self.replicas) < n:
            free = [x for x in self.nodes if x.replica is None]
            node = min(free, key=lambda x: x.ready_s) if free else self._new_node(now)
            r = _Replica(node, max(now, node.ready_s) + start)
            node.replica = r
            self.replicas.append(r)
        if len(self.replicas) > n:
            # Remove the replicas furthest from serving first: starting ones, latest first.
            self.replicas.sort(key=lambda r: (r.seen_ready, -r.ready_s))
            for r in self.replicas[: len(self.replicas) - n]:
                if r.seen_ready:
                    self.ready -= 1
                r.node.replica = None
                r.node.idle_since_s = max(now, r.node.ready_s)
            self.replicas = self.replicas[len(self.replicas) - n :]
        self._plan()

    def hold_nodes(self, n: int | None, now: float) -> None:
        self.node_target = n
        if n is not None:
            while len(self.nodes) < n:
                self._new_node(now)
        self._plan()

    def _plan(self) -> None:
        nxt = math.inf
        for r in self.replicas:
            if not r.seen_ready:
                nxt = min(nxt, r.ready_s)
        for x in self.nodes:
            if not x.seen_ready:
                nxt = min(nxt, x.ready_s)
            elif x.replica is None:
                nxt = min(nxt, x.idle_since_s + self.cfg.idle_timeout_s)
        self.next_event_s = nxt

    def advance(self, now: float) -> None:
        """Bring nodes and replicas up to ``now``: readiness, start-up observations, idle releases."""
        for x in self.nodes:
            if not x.seen_ready and x.ready_s <= now:
                x.seen_ready = True
                self.node_obs.append(x.ready_s - x.asked_s)
        for r in self.replicas:
            if not r.seen_ready and r.ready_s <= now:
                r.seen_ready = True
                self.ready += 1
                self.replica_obs.append(self.cfg.replica_start_s)
        keep = self.node_target or 0
        idle = sorted(
            (x for x in self.nodes if x.seen_ready and x.replica is None and now - x.idle_since_s >= self.cfg.idle_timeout_s),
            key=lambda x: x.idle_since_s,
        )
        for x in idle:
            if len(self.nodes) <= keep:
                break
            self.nodes.remove(x)
            self._charge(x, now)
        self._plan()

    def _charge(self, x: _Node, now: float) -> None:
        # GPU time is charged from the ask (or the start of scoring) to the release.
        self.gpu_s += max(0.0, now - max(x.asked_s, self.charge_from_s))

    def close(self, now: float) -> None:
        for x in self.nodes:
            self._charge(x, now)
        self.nodes = []

    def take_observations(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        rep, node = tuple(self.replica_obs), tuple(self.node_obs)
        self.replica_obs, self.node_obs = [], []
        return rep, node


class _Controller:
    """Calls the policy on its interval and applies its decisions to the pool."""

    def __init__(self, policy: Policy, pool: Pool, cfg: SimConfig, max_replicas: int):
        self.policy, self.pool, self.cfg, self.max_replicas = policy, pool, cfg, max_replicas
        self.state: dict[str, Any] = {}
        # Policies take over once the system has filled from empty (in-flight counts start at zero,
        # which every concurrency-driven policy would read as idle); the same for every policy.
        self.next_s = max(cfg.hold_s, policy.interval_s)
        self.last_s = 0.0
        self.arrivals = 0.0
        self.work_s = 0.0
        self.ongoing_integral = 0.0
        self.ups = self.downs = 0
        self.last_work = cfg.service_time_s
        # Seconds observed and not yet seen by the policy (metrics_lag_s): (second, arrivals, work,
        # in flight, queued).
        self.lag_s = int(round(cfg.metrics_lag_s))
        self.pending: deque[tuple[int, float, float, float, float]] = deque()
        self.second = 0
        self.seen_queue = 0.0

    def observe(self, arrivals: float, work_s: float, ongoing: float, queued: float = 0.0) -> None:
        """One simulated second of arrivals, their work, the requests in flight and the queue after it."""
        if self.lag_s:
            self.pending.append((self.second, arrivals, work_s, ongoing, queued))
        else:
            self.arrivals += arrivals
            self.work_s += work_s
            self.ongoing_integral += ongoing
        self.second += 1

    def tick(self, now: float, queued: float) -> None:
        if self.lag_s:
            # The policy sees the seconds that ended metrics_lag_s ago, and the queue as it was then.
            while self.pending and self.pending[0][0] < now - self.lag_s:
                _, a, w, o, self.seen_queue = self.pending.popleft()
                self.arrivals += a
                self.work_s += w
                self.ongoing_integral += o
            queued = self.seen_queue
        span = max(now - self.last_s, 1e-9)
        if self.arrivals > 0:
            self.last_work = self.work_s / self.arrivals
        rep_obs, node_obs = self.pool.take_observations()
        ctx = PolicyContext(
            now_s=now,
            ready_replicas=self.pool.ready,
            starting_replicas=len(self.pool.replicas) - self.pool.ready,
            min_replicas=self.cfg.min_replicas,
            max_replicas=self.max_replicas,
            slots_per_replica=self.cfg.slots_per_replica,
            arrivals_per_s=self.arrivals / span,
            work_s_per_request=self.last_work,
            ongoing_requests=self.ongoing_integral / span,
            queued_requests=queued,
            startup_s=rep_obs,
            node_startup_s=node_obs,
            nodes=len(self.pool.nodes),
        )
        decision, self.state = self.policy.decide(ctx, self.state)
        self.apply(decision, now)
        self.arrivals = self.work_s = self.ongoing_integral = 0.0
        self.last_s = now
        self.next_s = now + self.policy.interval_s

    def apply(self, d: Decision, now: float) -> None:
        before = len(self.pool.replicas)
        target = min(max(d.replicas, self.cfg.min_replicas), self.max_replicas)
        if target > before:
            self.ups += 1
        elif target < before:
            self.downs += 1
        self.pool.scale_to(target, now)
        self.pool.hold_nodes(d.nodes, now)


def _percentile_from_hist(hist: dict[int, float], q: float, offset: float) -> float:
    total = sum(hist.values())
    if total <= 0:
        return 0.0
    acc = 0.0
    for w in sorted(hist):
        acc += hist[w]
        if acc >= q * total:
            return w + offset
    return max(hist) + offset


class _Progress:
    def __init__(self, label: str, total: float, enabled: bool):
        self.label, self.total, self.enabled = label, total, enabled
        self.last = -1

    def __call__(self, done: float) -> None:
        if not self.enabled:
            return
        pct = int(100 * done / self.total) if self.total else 100
        if pct != self.last:
            self.last = pct
            bar = "#" * (pct // 4)
            sys.stderr.write(f"\r{self.label:<12} [{bar:<25}] {pct:3d}%")
            if pct >= 100:
                sys.stderr.write("\n")
            sys.stderr.flush()


def service_times(trace: RequestTrace, cfg: SimConfig) -> tuple[np.ndarray, np.ndarray]:
    """(service time, prefill time) per request."""
    n = len(trace.arrival_s)
    if trace.input_tokens is None or trace.output_tokens is None:
        return np.full(n, cfg.service_time_s), np.zeros(n)
    prefill = trace.input_tokens * cfg.prefill_s_per_token
    return prefill + trace.output_tokens * cfg.decode_s_per_token, prefill


@dataclass
class Prepared:
    """A trace turned into what the engines run: rescaled, with per-request or per-second arrivals."""

    kind: str  # "requests" or "fluid"
    duration_s: float
    work_s: float  # mean service time
    scale: float
    arrival_s: np.ndarray | None = None
    service_s: np.ndarray | None = None
    prefill_s: np.ndarray | None = None
    counts: np.ndarray | None = None
    smooth_rate: np.ndarray | None = None  # per second, 60-s mean: the peak for rescaling and bounds


def _smooth(counts: np.ndarray, window: int = 60) -> np.ndarray:
    c = np.concatenate([[0.0], np.cumsum(counts)])
    n = len(counts)
    lo = np.maximum(np.arange(n) - window // 2, 0)
    hi = np.minimum(np.arange(n) + window // 2, n)
    return (c[hi] - c[lo]) / np.maximum(hi - lo, 1)


def prepare(trace: Trace, cfg: SimConfig) -> Prepared:
    """Rescale the trace so its peak (highest 60-s mean rate) needs ``cfg.peak_replicas`` at full use."""
    if isinstance(trace, RateTrace):
        work = cfg.service_time_s
        peak = float(trace.rate_per_s.max())
        scale = 1.0 if not cfg.peak_replicas else cfg.peak_replicas * cfg.slots_per_replica / (peak * work)
        counts = per_second_counts(trace, scale, cfg.seed, cfg.max_window_cv)
        return Prepared("fluid", len(counts), work, scale, counts=counts, smooth_rate=_smooth(counts))
    svc, _ = service_times(trace, cfg)
    work = float(svc.mean())
    counts = np.bincount(trace.arrival_s.astype(int), minlength=int(trace.duration_s) + 1).astype(float)
    peak = float(_smooth(counts).max())
    scale = 1.0
    if cfg.peak_replicas:
        scale = cfg.peak_replicas * cfg.slots_per_replica / (peak * work)
        trace = replicate(trace, scale, cfg.seed)
    svc, prefill = service_times(trace, cfg)
    counts = np.bincount(trace.arrival_s.astype(int), minlength=int(trace.duration_s) + 1).astype(float)
    return Prepared(
        "requests",
        trace.duration_s,
        float(svc.mean()),
        scale,
        arrival_s=trace.arrival_s,
        service_s=svc,
        prefill_s=prefill,
        counts=counts,
        smooth_rate=_smooth(counts),
    )


def max_replicas_for(prepared: Prepared, cfg: SimConfig) -> int:
    """``cfg.max_replicas``, or three times what the trace's peak 60-s rate needs at full use."""
    peak_need = float(prepared.smooth_rate.max()) * prepared.work_s / cfg.slots_per_replica
    return cfg.max_replicas or max(cfg.min_replicas, 3 * ceil_replicas(peak_need))


def simulate(
    prepared: Prepared, policy: Policy, cfg: SimConfig, name: str = "policy", progress: bool = False
) -> SimResult:
    """Run one policy over a prepared trace."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(cfg.seed + 1)
    max_replicas = max_replicas_for(prepared, cfg)
    first = float(prepared.smooth_rate[:300].mean())
    initial = cfg.initial_replicas
    if initial is None:
        initial = ceil_replicas(replicas_for(first, prepared.work_s, cfg.slots_per_replica, cfg.initial_utilization))
    initial = min(max(cfg.min_replicas, initial), max_replicas)
    scored_from = cfg.scored_from_s()
    pool = Pool(cfg, rng, initial, charge_from_s=scored_from)
    bind = getattr(policy, "bind_future", None)
    if callable(bind):
        # Only the clairvoyant reference has this: it plans with the whole prepared trace.
        bind(prepared, cfg)
    ctl = _Controller(policy, pool, cfg, max_replicas)
    bar = _Progress(name, prepared.duration_s, progress)
    tally = _Tally(cfg, prepared.duration_s, scored_from)
    if prepared.kind == "fluid":
        p50, p99, end_s, timeline = _run_fluid(prepared, cfg, pool, ctl, bar, tally)
    else:
        p50, p99, end_s, timeline = _run_requests(prepared, cfg, pool, ctl, bar, tally)
    pool.close(end_s)
    total, ok, rejected, expired = tally.scored()
    return SimResult(
        policy=name,
        requests=round(total, 3),
        served_within_slo=round(ok, 3),
        rejected=round(rejected, 3),
        expired=round(expired, 3),
        slo_attainment=ok / total if total else 1.0,
        rejected_fraction=rejected / total if total else 0.0,
        p50_latency_s=p50,
        p99_latency_s=p99,
        gpu_hours=pool.gpu_s / 3600.0,
        scale_events=ctl.ups + ctl.downs,
        scale_ups=ctl.ups,
        scale_downs=ctl.downs,
        wall_s=round(time.perf_counter() - t0, 3),
        simulated_s=end_s,
        scored_from_s=scored_from,
        timeline=timeline,
        window_requests=tally.requests.tolist(),
        window_within_slo=tally.ok.tolist(),
    )


class _Tally:
    """Outcomes by the arrival window of each request; totals count only windows from ``scored_from``."""

    def __init__(self, cfg: SimConfig, duration_s: float, scored_from: float):
        self.step = float(cfg.timeline_step_s)
        n = int(math.ceil((duration_s + 1) / self.step)) + 1
        self.requests, self.ok = np.zeros(n), np.zeros(n)
        self.rejected, self.expired = np.zeros(n), np.zeros(n)
        self.first = int(round(scored_from / self.step))
        self.scored_from = scored_from

    def window(self, arrival_s: float) -> int:
        return min(int(arrival_s // self.step), len(self.requests) - 1)

    def scored(self) -> tuple[float, float, float, float]:
        k = self.first
        return (
            float(self.requests[k:].sum()),
            float(self.ok[k:].sum()),
            float(self.rejected[k:].sum()),
            float(self.expired[k:].sum()),
        )


_TIMELINE_KEYS = ("t_s", "arrivals_per_s", "ready_replicas", "replicas", "nodes", "requests_cum", "within_slo_cum")


def _timeline_point(tl: dict[str, list[float]], t: float, rate: float, pool: Pool, total: float, ok: float) -> None:
    tl["requests_cum"].append(total)
    tl["within_slo_cum"].append(ok)
    tl["t_s"].append(t)
    tl["arrivals_per_s"].append(rate)
    tl["ready_replicas"].append(pool.ready)
    tl["replicas"].append(len(pool.replicas))
    tl["nodes"].append(len(pool.nodes))


def _run_fluid(p: Prepared, cfg: SimConfig, pool: Pool, ctl: _Controller, bar: _Progress, tally: _Tally):
    counts = p.counts.tolist()
    work, slots, deadline, qmax = p.work_s, cfg.slots_per_replica, cfg.deadline_s, cfg.max_queued_requests
    slo_wait = int(math.floor(cfg.slo_s + 1e-9))
    scored_from = tally.scored_from
    queue: deque[list[float]] = deque()  # FIFO cohorts: [arrival second, requests left]
    qsum = 0.0
    hist: dict[int, float] = {}
    t_requests, t_ok = tally.requests, tally.ok
    total = ok = 0.0  # cumulative, all windows (timeline)
    tl: dict[str, list[float]] = {k: [] for k in _TIMELINE_KEYS}
    step = int(cfg.timeline_step_s)
    tl_acc = 0.0
    end = len(counts) + int(deadline) + 1
    served_prev = 0.0

    def served_ok(arrival: float, wait: int, n: float) -> None:
        nonlocal ok
        w = tally.window(arrival)
        if arrival >= scored_from:
            hist[wait] = hist.get(wait, 0.0) + n
        if wait <= slo_wait:
            t_ok[w] += n
            ok += n

    for t in range(end):
        a = counts[t] if t < len(counts) else 0.0
        if t >= pool.next_event_s:
            pool.advance(t)
        if t >= ctl.next_s:
            ctl.tick(t, qsum)
        mu = pool.ready * slots / work
        total += a
        tl_acc += a
        if a:
            t_requests[tally.window(t)] += a
        # Expire the head of the queue: the oldest requests go first.
        while queue and t - queue[0][0] > deadline:
            tally.expired[tally.window(queue[0][0])] += queue[0][1]
            qsum -= queue[0][1]
            queue.popleft()
        if not queue and a <= mu:
            served_ok(t, 0, a)
            served = a
        else:
            served = 0.0
            avail = mu
            while queue and avail > 0:
                head = queue[0]
                take = head[1] if head[1] <= avail else avail
                served_ok(head[0], t - int(head[0]), take)
                head[1] -= take
                qsum -= take
                avail -= take
                served += take
                if head[1] <= 1e-12:
                    queue.popleft()
            if not queue:
                qsum = 0.0  # float residue of many subtractions must not read as a queue
            now_take = min(a, avail) if not queue else 0.0
            if now_take > 0:
                served_ok(t, 0, now_take)
                served += now_take
            rest = a - now_take
            if rest > 0:
                room = max(0.0, qmax - qsum)
                admit = rest if rest <= room else room
                tally.rejected[tally.window(t)] += rest - admit
                if admit > 0:
                    queue.append([float(t), admit])
                    qsum += admit
        # In flight ≈ served per second x service time (Little), plus the queue.
        ctl.observe(a, a * work, min(served_prev * work, pool.ready * slots) + qsum, qsum)
        served_prev = served
        if t % step == 0:
            _timeline_point(tl, float(t), tl_acc / step if t else a, pool, total, ok)
            tl_acc = 0.0
            bar(min(t, len(counts)))
    for arrival, left in queue:
        tally.expired[tally.window(arrival)] += left
    bar(len(counts))
    return _percentile_from_hist(hist, 0.5, work), _percentile_from_hist(hist, 0.99, work), float(end), tl


def _run_requests(p: Prepared, cfg: SimConfig, pool: Pool, ctl: _Controller, bar: _Progress, tally: _Tally):
    arr = p.arrival_s.tolist()
    svc = p.service_s.tolist()
    pre = p.prefill_s.tolist()
    n = len(arr)
    slots, deadline, qmax, slo = cfg.slots_per_replica, cfg.deadline_s, cfg.max_queued_requests, cfg.slo_s
    scored_from = tally.scored_from
    win_arr = np.minimum((p.arrival_s // tally.step).astype(int), len(tally.requests) - 1)
    tally.requests += np.bincount(win_arr, minlength=len(tally.requests))
    win = win_arr.tolist()
    t_ok, t_rej, t_exp = tally.ok, tally.rejected, tally.expired
    comp: list[float] = []
    queue: deque[int] = deque()
    latencies: list[float] = []
    ok = 0
    in_service = 0
    tl: dict[str, list[float]] = {k: [] for k in _TIMELINE_KEYS}
    step = int(cfg.timeline_step_s)
    tl_acc = 0
    i = 0
    end = int(math.ceil(p.duration_s)) + int(deadline) + 2

    def start(j: int, now: float) -> None:
        nonlocal in_service, ok
        wait = now - arr[j]
        in_service += 1
        heapq.heappush(comp, now + svc[j])
        if arr[j] >= scored_from:
            latencies.append(wait + svc[j])
        if wait + pre[j] <= slo:
            ok += 1
            t_ok[win[j]] += 1

    def drain_queue(now: float) -> None:
        cap = pool.ready * slots
        while queue and in_service < cap:
            j = queue.popleft()
            if now - arr[j] > deadline:
                t_exp[win[j]] += 1
                continue
            start(j, now)

    for t in range(end):
        if t >= pool.next_event_s:
            pool.advance(t)
            drain_queue(float(t))
        if t >= ctl.next_s:
            ctl.tick(t, len(queue))
            drain_queue(float(t))
        while queue and t - arr[queue[0]] > deadline:
            t_exp[win[queue.popleft()]] += 1
        arrived = work = 0.0
        t1 = t + 1
        while True:
            nc = comp[0] if comp else math.inf
            na = arr[i] if i < n else math.inf
            if nc >= t1 and na >= t1:
                break
            if nc <= na:
                heapq.heappop(comp)
                in_service -= 1
                drain_queue(nc)
            else:
                arrived += 1
                work += svc[i]
                if not queue and in_service < pool.ready * slots:
                    start(i, na)
                elif len(queue) < qmax:
                    queue.append(i)
                else:
                    t_rej[win[i]] += 1
                i += 1
        tl_acc += arrived
        ctl.observe(arrived, work, in_service + len(queue), float(len(queue)))
        if t % step == 0:
            _timeline_point(tl, float(t), tl_acc / step if t else arrived, pool, float(i), float(ok))
            tl_acc = 0
            bar(min(t, p.duration_s))
        if i >= n and not queue and not comp:
            end = t + 1
            break
    for j in queue:
        t_exp[win[j]] += 1
    bar(p.duration_s)
    lat = np.array(latencies) if latencies else np.zeros(1)
    return float(np.percentile(lat, 50)), float(np.percentile(lat, 99)), float(end), tl


def run_many(
    trace: Trace,
    policies: dict[str, Policy],
    cfg: SimConfig,
    progress: bool = False,
) -> tuple[Prepared, list[SimResult]]:
    """Run several policies on the same prepared trace (same arrivals, same provisioning draws)."""
    prepared = prepare(trace, cfg)
    return prepared, [simulate(prepared, pol, cfg, name=name, progress=progress) for name, pol in policies.items()]
