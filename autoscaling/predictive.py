"""The predictive policy: size for the forecast at the pool's lead time, keep a reactive floor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autoscaling import forecast as fc
from autoscaling.policy import Decision, Guardrail, PolicyContext, ceil_replicas, register, replicas_staffed


@dataclass
class PredictivePolicy:
    """Forecast-driven, lead-time-aware scaling for a GPU pool.

    At each decision:

    1. fold the observed rate into the forecaster (level, damped trend capped at a fraction of the
       level, daily profile);
    2. learn the lead times from observed start-ups (node provisioning and replica load are learned
       apart, each starting from its prior);
    3. remember the recent peak (the highest 30 s mean rate) over the peak window: one node + replica
       lead, or, while bursts recur, 1.5 times the longest recent gap between burst starts;
    4. replicas = what the higher of the peak forecast over the next replica lead time and the
       recent peak needs by square-root staffing; never below the reactive floor (what the rate
       seen now and the requests in flight need). The recent peak is the hedge: it is bounded by
       load actually seen, so large forecast errors never climb to ``max_replicas``, and it lets go
       once the bursts stop;
    5. nodes = the same over the longer node + replica lead time, so nodes are asked for before
       the replicas that will need them (``pre_provision``), and released when the need falls;
    6. while bursting (arrivals above the forecast, or a queue), never scale down;
    7. never release a replica whose node the node forecast (5.) holds: it costs no more than the node;
    8. the :class:`Guardrail` applies bounds, the scale-down delay and the cooldown after a scale-up.

    Every decision's reason splits the count into the reactive floor, what the forecast adds, what
    the recent-peak hedge adds and what the guardrail or a held node keeps, with the GPU-hours per hour above the
    floor.

    Attributes:
        utilization: The highest fraction of slots to plan to use, however large the pool.
        headroom_beta: Spare slots as ``beta * sqrt(load)`` (square-root staffing; see
            :func:`~autoscaling.policy.replicas_staffed`).
        replica_lead_prior_s: Prior for replica load + warm-up on a ready node.
        node_lead_prior_s: Prior for GPU node provisioning (node, drivers, image).
        pre_provision: Ask for nodes ahead of replicas.
        burst_tolerance: Arrivals more than this fraction above the forecast count as a burst.
        low_memory_headroom: GPU memory headroom (below the high-water mark) under which a replica is
            short of memory: one more replica is asked for and none removed.
        peak_window_s: How far back the recent peak reaches (None: the learned node + replica lead).
        peak_smoothing_s: The recent peak is of the arrival rate averaged over this many seconds.
        recurrence_margin: While bursts recur, the peak is held this many times the longest recent
            gap between burst starts.
        max_peak_window_s: The longest the recent peak is held (and burst starts remembered).
        interval_s: How often to decide.
        forecast: Forecaster settings.
        guardrail: Bounds and cooldowns.
    """

    utilization: float = 0.95
    headroom_beta: float = 1.0
    replica_lead_prior_s: float = 60.0
    node_lead_prior_s: float = 300.0
    pre_provision: bool = True
    burst_tolerance: float = 0.2
    interval_s: float = 10.0
    smooth_floor: bool = True
    low_memory_headroom: float = 0.05
    peak_window_s: float | None = None
    peak_smoothing_s: float = 30.0
    recurrence_margin: float = 1.5
    max_peak_window_s: float = 3600.0
    forecast: fc.ForecastParams = field(default_factory=fc.ForecastParams)
    guardrail: Guardrail = field(default_factory=Guardrail)

    def __post_init__(self) -> None:
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization ({self.utilization}) must be in (0, 1]; e.g. 0.8")

    def horizons_s(self, state: dict[str, Any]) -> tuple[float, float]:
        """(replica lead, node + replica lead) as learned so far."""
        rep = fc.lead_time_s(state, "replica_leads", self.replica_lead_prior_s)
        node = fc.lead_time_s(state, "node_leads", self.node_lead_prior_s)
        return rep + self.interval_s, node + rep + self.interval_s

    def peak_window(self, state: dict[str, Any], now_s: float) -> float:
        """Seconds of recent arrivals whose peak bounds (and holds) the hedge.

        At least one node + replica lead (capacity released sooner cannot be back for a burst that
        returns within it). While bursts recur, the longest recent gap between burst starts times
        ``recurrence_margin``, so the capacity for the peaks is held through the gaps; once no burst
        has started within that time, the bursts have stopped and the window is one lead again.
        """
        base = self.peak_window_s if self.peak_window_s is not None else self.horizons_s(state)[1]
        starts = state.get("burst_starts", [])
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        if not gaps:
            return base
        hold = min(self.max_peak_window_s, max(base, self.recurrence_margin * max(gaps)))
        return hold if now_s - starts[-1] <= hold else base

    def decide(self, ctx: PolicyContext, state: dict[str, Any]) -> tuple[Decision, dict[str, Any]]:
        st = dict(state)
        st = fc.learn_lead_time(st, "replica_leads", ctx.startup_s)
        st = fc.learn_lead_time(st, "node_leads", ctx.node_startup_s)
        h_rep, h_node = self.horizons_s(st)
        f = self.forecast
        fstate = fc.update(f, st.get("forecast", {}), ctx.now_s, ctx.arrivals_per_s)
        expected_now = fc.forecast(f, st.get("forecast", {}), ctx.now_s, 0.0) if st.get("forecast") else ctx.arrivals_per_s
        st["forecast"] = fstate
        work, slots = ctx.work_s_per_request, ctx.slots_per_replica
        # In flight on replicas: the interval's average less the queue now, but never more than the
        # slots that exist (Ray: total requests = running on replicas + queued at handles). Right
        # after a backlog drains, the average still holds the queue it had: read as concurrency, it
        # asked for the ceiling.
        running = min(max(0.0, ctx.ongoing_requests - ctx.queued_requests), float(ctx.ready_replicas * slots))

        def size(rate: float) -> float:
            return replicas_staffed(rate, work, slots, self.headroom_beta, self.utilization)

        # Without node pre-provisioning a new replica may wait for a node, so it must be asked for
        # a whole node + replica lead ahead.
        h_ask = h_rep if self.pre_provision else h_node
        rate_fc = fc.peak_forecast(f, fstate, ctx.now_s, h_ask)
        need_fc = size(rate_fc)
        # A burst is arrivals above the forecast by more than the tolerance plus counting noise
        # (three standard deviations of a Poisson count over one interval), or a queue.
        noise = 3.0 / max(1.0, expected_now * self.interval_s) ** 0.5
        surge = ctx.arrivals_per_s > expected_now * (1 + self.burst_tolerance + noise)
        # Memory nearly full on some replica: more load would push it into out-of-memory recovery.
        short_of_memory = ctx.memory_headroom_ratio is not None and ctx.memory_headroom_ratio < self.low_memory_headroom
        bursting = ctx.queued_requests >= 1 or surge or short_of_memory
        if surge and not st.get("surging", False):
            starts = [t for t in st.get("burst_starts", []) if t > ctx.now_s - self.max_peak_window_s]
            st["burst_starts"] = (starts + [ctx.now_s])[-16:]
        st["surging"] = surge
        # The recent peak: the highest short-window mean rate over the peak window. It bounds the
        # hedge (capacity is never asked for a load higher than has been seen recently or is forecast)
        # and holds capacity through recurring bursts that come back faster than a node can.
        window = self.peak_window(st, ctx.now_s)
        st["recent"], peak = fc.recent_peak(
            st.get("recent", {}), ctx.now_s, ctx.arrivals_per_s, self.peak_smoothing_s, window, self.max_peak_window_s
        )
        rate_hedge = max(rate_fc, peak)
        need = size(rate_hedge)
        # Reactive floor: what arrives now and what is in flight now, whatever the forecast says.
        # Normally the rate is taken smoothed (the level): second-to-second noise is what the
        # headroom and the queue absorb. In a surge the raw rate is used at once: the level would
        # take several intervals to catch up, and every interval lost is added to a node's lead.
        seen = max(fstate["level"], ctx.arrivals_per_s) if (surge or not self.smooth_floor) else fstate["level"]
        floor = max(size(seen), size(running / work) if work > 0 else 0.0)
        # A backlog is not concurrency: it needs the capacity to drain it within the replica lead
        # time (sooner no new replica can help), not one slot per queued request.
        floor += ctx.queued_requests / h_rep * work / slots
        wanted = ceil_replicas(max(need, floor))
        if bursting:
            wanted = max(wanted, ctx.replicas)
        if short_of_memory and ctx.starting_replicas == 0:
            # One at a time: the next is asked for only once this one serves and the headroom is seen again.
            wanted = max(wanted, ctx.replicas + 1)
        nodes_fc = 0
        if self.pre_provision:
            nodes_fc = ceil_replicas(size(max(fc.peak_forecast(f, fstate, ctx.now_s, h_node), peak)))
            # A replica whose node the node forecast holds costs nothing more than that node. Releasing
            # it only to ask it back within the node lead is churn (and the replica lead again).
            wanted = max(wanted, min(ctx.replicas, nodes_fc))
        replicas, gstate, action = self.guardrail.apply(ctx, wanted, st.get("guard", {}))
        st["guard"] = gstate
        nodes = min(max(replicas, nodes_fc), ctx.max_replicas) if self.pre_provision else None
        # Every replica above the reactive floor is explained: how many the forecast adds, how many the
        # recent-peak hedge adds, how many the guardrail holds, and what they cost (one GPU-hour per hour each).
        n_floor = ceil_replicas(floor)
        n_fc = max(0, ceil_replicas(need_fc) - n_floor)
        n_hedge = max(0, ceil_replicas(max(need, floor)) - n_floor - n_fc)
        extra = max(0, replicas - n_floor)
        reason = (
            f"{action}: {replicas} replicas = floor {n_floor} (rate {seen:.1f}/s, {running:.0f} running, "
            f"{ctx.queued_requests:.0f} queued) + forecast {n_fc} ({rate_fc:.1f}/s within {h_ask:.0f}s) + hedge {n_hedge} "
            f"(the {window:.0f}s peak {peak:.1f}/s)"
            f"{' + held ' + str(extra - n_fc - n_hedge) if extra > n_fc + n_hedge else ''}; "
            f"{extra} over the floor cost {extra} GPU-h per hour{', bursting' if bursting else ''}"
        )
        return Decision(replicas=replicas, nodes=nodes, reason=reason), st


@register("predictive")
def _predictive(**params: Any) -> PredictivePolicy:
    fparams = {k[len("forecast_") :]: params.pop(k) for k in list(params) if k.startswith("forecast_")}
    gparams = {k: params.pop(k) for k in ("downscale_delay_s", "cooldown_after_up_s", "max_down_step") if k in params}
    policy = PredictivePolicy(**params)
    if fparams:
        policy.forecast = fc.ForecastParams(**fparams)
    if gparams:
        base = policy.guardrail
        policy.guardrail = Guardrail(
            downscale_delay_s=gparams.get("downscale_delay_s", base.downscale_delay_s),
            cooldown_after_up_s=gparams.get("cooldown_after_up_s", base.cooldown_after_up_s),
            max_down_step=gparams.get("max_down_step", base.max_down_step),
        )
    return policy
