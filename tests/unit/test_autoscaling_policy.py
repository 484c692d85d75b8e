"""Policies on a fake clock: forecasting, lead-time learning, guardrail, consolidation, restart without churn."""

import json
import math

import numpy as np
import pytest

from autoscaling import forecast as fc
from autoscaling.baselines import HpaLikePolicy, KpaLikePolicy
from autoscaling.oracle import OraclePolicy, _Scheduled
from autoscaling.policy import Guardrail, PolicyContext, make_policy, policy_names, replicas_staffed
from autoscaling.predictive import PredictivePolicy


def ctx(now_s, rate, ready=4, starting=0, work=1.0, slots=16, queued=0.0, ongoing=None, lo=1, hi=100, **kw):
    return PolicyContext(
        now_s=now_s,
        ready_replicas=ready,
        starting_replicas=starting,
        min_replicas=lo,
        max_replicas=hi,
        slots_per_replica=slots,
        arrivals_per_s=rate,
        work_s_per_request=work,
        ongoing_requests=rate * work + queued if ongoing is None else ongoing,
        queued_requests=queued,
        **kw,
    )


# -- forecasting ---------------------------------------------------------------


def test_holt_follows_a_linear_ramp_and_extrapolates_it():
    p = fc.ForecastParams(trend_damping_s=1e9)  # undamped: a pure line must be extrapolated exactly
    st: dict = {}
    for k in range(200):
        st = fc.update(p, st, k * 10.0, 100.0 + 0.5 * k * 10.0)  # +0.5 req/s every second
    now = 1990.0
    assert fc.forecast(p, st, now, 0.0) == pytest.approx(100 + 0.5 * now, rel=0.01)
    assert fc.forecast(p, st, now, 300.0) == pytest.approx(100 + 0.5 * (now + 300), rel=0.01)


def test_trend_lift_is_capped_at_half_the_level_and_ignored_during_warmup():
    p = fc.ForecastParams()
    st: dict = {}
    for k in range(3):
        st = fc.update(p, st, k * 10.0, 10.0 * (k + 1) ** 3)
    # Three updates are below warmup_updates: no trend yet.
    assert fc.forecast(p, st, 20.0, 600.0) == pytest.approx(st["level"])
    for k in range(3, 40):
        st = fc.update(p, st, k * 10.0, 10.0 * (k + 1) ** 3)
    assert fc.forecast(p, st, 390.0, 1e6) <= 1.5 * st["level"] + 1e-9


def test_level_never_goes_negative_when_traffic_stops_after_a_fall():
    p = fc.ForecastParams()
    st: dict = {}
    for k in range(30):
        st = fc.update(p, st, k * 10.0, max(0.0, 1000.0 - 100.0 * k))
    assert st["level"] >= 0.0
    assert fc.forecast(p, st, 290.0, 600.0) >= 0.0
    assert replicas_staffed(-5.0, 1.0, 4, beta=2.0, max_utilization=0.9) == 0.0


def test_daily_profile_anticipates_tomorrows_peak():
    p = fc.ForecastParams(season_s=1000.0, season_bins=10, trend_beta=0.0)

    def rate(t):
        return 100.0 if (t % 1000.0) >= 500.0 else 10.0  # a "day" with a high second half

    st: dict = {}
    for k in range(300):  # three days, one update per 10 s
        st = fc.update(p, st, k * 10.0, rate(k * 10.0))
    now = 3000.0 + 350.0  # the low half of day four, 150 s before the step
    for k in range(300, 335):
        st = fc.update(p, st, k * 10.0, rate(k * 10.0))
    assert fc.forecast(p, st, now, 0.0) == pytest.approx(10.0, rel=0.2)
    # The profile says the step is coming: the forecast 250 s ahead is the high level.
    assert fc.forecast(p, st, now, 250.0) == pytest.approx(100.0, rel=0.2)
    assert fc.peak_forecast(p, st, now, 250.0) >= 80.0


def test_lead_time_is_learned_from_startups_with_the_prior_as_one_observation():
    st: dict = {}
    assert fc.lead_time_s(st, "node_leads", 300.0) == 300.0
    st = fc.learn_lead_time(st, "node_leads", (200.0,))
    # One fast start-up cannot shrink the horizon below the prior's weight at q=0.9.
    assert fc.lead_time_s(st, "node_leads", 300.0) == 300.0
    st = fc.learn_lead_time(st, "node_leads", tuple([420.0] * 20))
    assert fc.lead_time_s(st, "node_leads", 300.0) == 420.0
    assert len(st["node_leads"]) == 20


def test_predictive_horizon_grows_with_observed_slow_nodes():
    pol = PredictivePolicy()
    st: dict = {}
    rep0, node0 = pol.horizons_s(st)
    _, st = pol.decide(ctx(10.0, 50.0, node_startup_s=(600.0,) * 5, startup_s=(120.0,) * 5), st)
    rep1, node1 = pol.horizons_s(st)
    assert rep1 == pytest.approx(120.0 + pol.interval_s) and rep1 > rep0
    assert node1 == pytest.approx(600.0 + 120.0 + pol.interval_s) and node1 > node0


# -- sizing ----------------------------------------------------------------------


def test_square_root_staffing_runs_large_pools_hotter():
    small = replicas_staffed(10.0, 1.0, 1, beta=2.0, max_utilization=0.95)
    large = replicas_staffed(1000.0, 1.0, 1, beta=2.0, max_utilization=0.95)
    assert small == pytest.approx(10 + 2 * math.sqrt(10))
    assert 10 / small < 1000 / large  # utilisation of the large pool is higher
    assert replicas_staffed(1e6, 1.0, 1, beta=0.0, max_utilization=0.95) == pytest.approx(1e6 / 0.95)


# -- the guardrail -----------------------------------------------------------------


def test_guardrail_scales_up_at_once_and_down_only_after_window_and_cooldown():
    g = Guardrail(downscale_delay_s=300, cooldown_after_up_s=200)
    st: dict = {}
    n, st, act = g.apply(ctx(0.0, 0, ready=4), 8, st)
    assert (n, act) == (8, "up")
    # Fresh state counts as just started; the window also holds the 8.
    for t in (10.0, 100.0, 250.0):
        n, st, act = g.apply(ctx(t, 0, ready=8), 3, st)
        assert n == 8 and act.startswith("down-delayed")
    n, st, act = g.apply(ctx(301.0, 0, ready=8), 3, st)
    assert (n, act) == (3, "down")


def test_guardrail_window_keeps_the_highest_recent_want():
    g = Guardrail(downscale_delay_s=100, cooldown_after_up_s=0)
    st = {"since_s": -1000.0}
    for t, want in ((0.0, 6), (50.0, 4), (90.0, 3)):
        n, st, _ = g.apply(ctx(t, 0, ready=8), want, st)
    assert n == 6  # 6 was wanted within the last 100 s
    n, st, _ = g.apply(ctx(120.0, 0, ready=6), 3, st)
    assert n == 4  # the 6 left the window; 4 (t=50) is still in it


def test_guardrail_bounds_and_step_limit():
    g = Guardrail(downscale_delay_s=0, cooldown_after_up_s=0, max_down_step=2)
    st = {"since_s": -1.0}
    assert g.apply(ctx(0.0, 0, ready=5, hi=7), 50, st)[0] == 7
    assert g.apply(ctx(1.0, 0, ready=10, lo=1), 1, {"since_s": -1.0})[0] == 8
    assert g.apply(ctx(1.0, 0, ready=3, lo=3), 0, {"since_s": -1.0})[0] == 3


# -- predictive decisions ----------------------------------------------------------


def steady(pol, rate, until_s, ready, st=None, **kw):
    st = st or {}
    d = None
    t = 0.0
    while t <= until_s:
        d, st = pol.decide(ctx(t, rate, ready=ready, **kw), st)
        ready = d.replicas
        t += pol.interval_s
    return d, st, ready


def test_predictive_sizes_a_steady_load_by_square_root_staffing():
    pol = PredictivePolicy()
    d, st, ready = steady(pol, rate=64.0, until_s=1200, ready=4)
    load = 64.0  # slot-seconds per second: 64 req/s x 1 s
    assert d.replicas == math.ceil((load + 2.0 * math.sqrt(load)) / 16)  # 5
    assert d.nodes >= d.replicas


def test_predictive_asks_ahead_on_a_ramp_and_holds_nodes_further_ahead():
    pol = PredictivePolicy()
    st: dict = {}
    ready = 4
    for k in range(120):
        t = k * 10.0
        rate = 50.0 + 0.2 * t  # +12 req/s per minute
        d, st = pol.decide(ctx(t, rate, ready=ready), st)
        ready = d.replicas
    lead = pol.horizons_s(st)[0]
    ahead = 50.0 + 0.2 * (t + lead)
    # Capacity for the rate one replica lead ahead (not only for the rate now) ...
    assert d.replicas >= math.ceil(replicas_staffed(ahead, 1.0, 16, pol.headroom_beta, pol.utilization))
    # ... and nodes for the rate a node lead ahead (the trend's lift is capped at 20 % of the level).
    assert d.nodes > d.replicas


def test_predictive_does_not_scale_down_while_bursting():
    pol = PredictivePolicy()
    d, st, ready = steady(pol, rate=64.0, until_s=1500, ready=20)
    assert d.replicas < 20  # it did come down on a steady load
    # Now a queue appears while the forecast still says "low": no scale-down however long it lasts.
    held = d.replicas
    t = 1510.0
    for _ in range(60):
        d, st = pol.decide(ctx(t, 64.0, ready=held, queued=50.0), st)
        assert d.replicas >= held
        t += 10.0


def test_predictive_consolidates_only_when_one_fewer_replica_carries_the_peak():
    pol = PredictivePolicy(headroom_beta=0.0, guardrail=Guardrail(downscale_delay_s=0, cooldown_after_up_s=0))
    # A load that needs 4.6 replicas at the planned 95 %: from 7 it comes down to 5, never to 4.
    rate = 0.95 * 16 * 4.6
    seen = []
    st: dict = {"guard": {"since_s": -1e9}}
    ready = 7
    for k in range(60):
        d, st = pol.decide(ctx(k * 10.0, rate, ready=ready), st)
        ready = d.replicas
        seen.append(ready)
    assert seen[-1] == 5 and min(seen) == 5


def test_restart_without_state_causes_no_scale_down_churn():
    """A controller restart loses the policy state: the next decisions must not shrink the pool."""
    pol = PredictivePolicy()
    d, st, ready = steady(pol, rate=64.0, until_s=2000, ready=5)
    assert d.replicas == 5
    # The pool is somewhat over-provisioned (e.g. after a burst) when the controller restarts.
    fresh: dict = {}
    decisions = []
    for k in range(25):
        d, fresh = pol.decide(ctx(2000.0 + k * 10, 64.0, ready=7), fresh)
        decisions.append(d.replicas)
    assert decisions == [7] * 25  # within the down window after the restart: held, not churned
    # And a restart on the right size does not move it at all.
    fresh = {}
    for k in range(60):
        d, fresh = pol.decide(ctx(5000.0 + k * 10, 64.0, ready=5), fresh)
        assert d.replicas == 5


def test_policy_state_is_json_serialisable():
    pol = PredictivePolicy()
    _, st, _ = steady(pol, rate=30.0, until_s=400, ready=3)
    assert json.loads(json.dumps(st))["guard"]


# -- baselines ------------------------------------------------------------------------


def test_hpa_like_stabilises_down_for_300_s_and_limits_scale_up():
    pol = HpaLikePolicy()
    st: dict = {}
    d, st = pol.decide(ctx(0.0, 0, ready=2, ongoing=200.0), st)
    assert d.replicas == 6  # wants 16 but at most max(2x, +4) per sync
    d, st = pol.decide(ctx(15.0, 0, ready=10, ongoing=12.8), st)
    assert d.replicas == 6  # wants 1, but 6 was recommended within the last 300 s
    d, st = pol.decide(ctx(400.0, 0, ready=10, ongoing=12.8), st)
    assert d.replicas == 1


def test_kpa_like_panics_on_a_burst_and_never_scales_down_while_panicking():
    pol = KpaLikePolicy()
    st: dict = {}
    for t in range(0, 60, 2):
        d, st = pol.decide(ctx(float(t), 0, ready=4, ongoing=40.0), st)
    assert d.replicas == 4
    # The 6 s panic window averages 40, 40, 200 → 93 in flight → 8 replicas, twice the 4 ready: panic.
    d, st = pol.decide(ctx(60.0, 0, ready=4, ongoing=200.0), st)
    assert d.replicas == 8
    for t in (70.0, 100.0):
        d, st = pol.decide(ctx(t, 0, ready=8, ongoing=10.0), st)
        assert d.replicas == 8  # still within 60 s of the panic: no scale-down
    d, st = pol.decide(ctx(125.0, 0, ready=8, ongoing=10.0), st)
    assert d.replicas == 4  # panic over: at most halves per decision


def test_oracle_asks_replicas_a_replica_start_and_nodes_a_provisioning_ahead_of_its_schedule():
    # 1 replica until the window at 240 s, then 10; replicas start in 60 s, nodes take up to 300 s.
    sched = np.array([1, 1, 1, 1, 10, 10, 10, 1, 1, 1, 1, 1, 1, 1])
    pol = _Scheduled(sched, 60.0, replica_ahead_s=70.0, node_ahead_s=370.0)
    d, _ = pol.decide(ctx(0.0, 16.0, ready=1), {})
    assert (d.replicas, d.nodes) == (1, 10)  # nodes asked 370 s ahead of the 10-replica window
    d, _ = pol.decide(ctx(160.0, 16.0, ready=1), {})
    assert (d.replicas, d.nodes) == (1, 10)  # 160 + 70 = 230: the replicas wait for the window
    d, _ = pol.decide(ctx(170.0, 16.0, ready=1), {})
    assert d.replicas == 10  # ready at 230 + start, in time for 240
    d, _ = pol.decide(ctx(430.0, 16.0, ready=10), {})
    assert (d.replicas, d.nodes) == (1, 1)  # released as soon as no upcoming window needs them
    with pytest.raises(ValueError, match="only in the simulator"):
        OraclePolicy().decide(ctx(0.0, 1.0), {})


# -- registry ----------------------------------------------------------------------------


def test_registry_lists_builtins_and_names_them_on_a_bad_name():
    assert {"predictive", "ray_default", "kpa", "hpa", "oracle"} <= set(policy_names())
    with pytest.raises(ValueError, match="predictive"):
        make_policy("nope")
    with pytest.raises(ValueError, match="bad parameters"):
        make_policy("hpa", no_such_knob=1)
    pol = make_policy("predictive", headroom_beta=1.0, forecast_level_alpha=0.2, downscale_delay_s=60)
    assert pol.headroom_beta == 1.0 and pol.forecast.level_alpha == 0.2 and pol.guardrail.downscale_delay_s == 60
    assert make_policy("autoscaling.baselines:HpaLikePolicy", utilization=0.5).utilization == 0.5


def test_no_replica_is_released_while_the_policy_holds_its_node():
    """A rising ramp with noisy in-flight counts (one slot per replica, a few requests per decision):
    the floor swings with the noise, and a short scale-down window let a replica go while the node
    forecast still held its node, to be asked back one decision later (seen on Ray: 2 -> 3 -> 2 -> 3
    within 20 s). A replica whose node is held costs nothing more; releasing it is churn."""
    pol = make_policy(
        "predictive",
        interval_s=4.0,
        replica_lead_prior_s=5.0,
        node_lead_prior_s=24.0,
        forecast_max_trend_lift=1.0,
        forecast_trend_beta=0.2,
        forecast_warmup_updates=3,
        downscale_delay_s=10.0,
        cooldown_after_up_s=5.0,
        peak_window_s=5.0,
        max_peak_window_s=30.0,
    )
    # In-flight averages (rate x service x this) swing from one decision to the next, as they do
    # with one slot per replica and a few requests per decision.
    swing = [0.5, 2, 2, 0.5, 1, 2, 1, 2, 2, 0.5, 2, 0.5, 1, 1, 2, 0.5, 0.5, 2, 1, 2, 2, 1, 1, 2, 0.5, 0.5, 2, 0.5, 2, 1]
    st: dict = {}
    ready, seen = 1, []
    for k, m in enumerate(swing):
        t = k * 4.0
        rate = 0.2 + 1.8 * min(1.0, max(0.0, t - 20.0) / 90.0)
        d, st = pol.decide(ctx(t, rate, ready=ready, slots=1, ongoing=rate * m, lo=1, hi=3), st)
        assert d.nodes is not None
        seen.append((t, d.replicas, d.nodes))
        if d.replicas < ready:
            assert d.nodes < ready, (seen, d.reason)
        ready = d.replicas
    downs = [(a, b) for a, b in zip(seen, seen[1:]) if b[1] < a[1]]
    assert not downs, seen


def test_rays_default_sees_the_in_flight_count_as_ray_hands_it_averaged_and_pushed():
    """A 5 s burst of 3 in flight on one 1-slot replica, over a background of 0.3. Ray's controller hands
    its policy the mean over look_back_period_s of what replicas and handles pushed (every
    metrics_interval_s): averaged over 12 s, Ray's default goes to 2 replicas at most. Given the
    instantaneous count (the simulator before), it went to its maximum, 4."""
    from autoscaling.baselines import RayDefaultPolicy

    def run(look_back_s, push_s):
        p = RayDefaultPolicy(
            utilization=0.8,
            upscale_delay_s=3.0,
            downscale_delay_s=30.0,
            look_back_period_s=look_back_s,
            metrics_interval_s=push_s,
        )
        state, replicas, most, first_up = {}, 1, 1, None
        for t in range(60):
            ongoing = 3.0 if 20 <= t < 25 else 0.3
            d, state = p.decide(ctx(float(t), 0.3, ready=replicas, slots=1, ongoing=ongoing, hi=4), state)
            json.dumps(state)  # the state stays JSON-able (Ray keeps it in its policy state)
            if d.replicas > replicas and first_up is None:
                first_up = t
            replicas, most = d.replicas, max(most, d.replicas)
        return most, first_up

    assert run(12.0, 1.0)[0] == 2
    assert run(1.0, 1.0) == (4, 23)  # the instantaneous count: up 3 s into the burst
    # Pushed every 10 s: nothing of the burst is seen before the push at 30 s, 5 s after it ended.
    assert run(12.0, 10.0)[1] >= 30
    with pytest.raises(ValueError, match="look_back_period_s"):
        make_policy("ray_default", look_back_period_s=0)
