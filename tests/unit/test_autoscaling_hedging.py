"""The predictive policy off its home traces: bounded hedging, recurring bursts, drained backlogs."""

import math

import pytest

from autoscaling.policy import PolicyContext, replicas_staffed
from autoscaling.predictive import PredictivePolicy


def ctx(now, rate, ready, ongoing=None, queued=0.0, work=1.0, max_replicas=60):
    return PolicyContext(
        now_s=now,
        ready_replicas=ready,
        starting_replicas=0,
        min_replicas=1,
        max_replicas=max_replicas,
        slots_per_replica=16,
        arrivals_per_s=rate,
        work_s_per_request=work,
        ongoing_requests=rate * work if ongoing is None else ongoing,
        queued_requests=queued,
    )


def run(pol, rates, ready=1, t0=0.0):
    """Feed one rate per interval; replicas become ready at once (the policy logic, not the pool)."""
    st: dict = {}
    out = []
    for k, rate in enumerate(rates):
        d, st = pol.decide(ctx(t0 + k * pol.interval_s, rate, ready), st)
        ready = d.replicas
        out.append(d)
    return out, st


def test_a_drained_backlog_is_not_read_as_concurrency():
    """Right after a queue drains, the interval's average in-flight count still holds the queue it had
    (here 1200 with 12 x 16 = 192 slots). Read as concurrency it asked for the ceiling; requests in
    flight on replicas can never exceed the slots that exist (in Ray, total requests are those running
    on replicas plus those queued at handles, reported apart)."""
    pol = PredictivePolicy()
    _, st = run(pol, [96.0] * 60, ready=13)
    d, _ = pol.decide(ctx(600.0, 30.0, ready=12, ongoing=1200.0, queued=0.0), st)
    assert d.replicas <= 13
    assert d.nodes is not None and d.nodes <= 14


def bursts(background, peak, on_intervals, period_intervals, count):
    rates = []
    for _ in range(count):
        rates += [peak] * on_intervals + [background] * (period_intervals - on_intervals)
    return rates


def test_recurring_bursts_hold_the_recent_peak_without_climbing_and_release_when_they_stop():
    pol = PredictivePolicy()
    # 1-minute bursts of 160/s every 7 minutes over 20/s, for about an hour, then 40 minutes of background.
    rates = bursts(20.0, 160.0, 6, 42, 9) + [20.0] * 240
    decisions, _ = run(pol, rates, ready=2)
    peak_need = math.ceil(replicas_staffed(160.0, 1.0, 16, pol.headroom_beta, pol.utilization))  # 11
    during = [d.replicas for d in decisions[2 * 42 : 9 * 42]]
    # Held through the gaps (the bursts recur faster than a node comes), never far above the peak's need.
    assert min(during) >= peak_need
    # The most it ever asks: the peak lifted by the largest trend the forecaster may extrapolate.
    bound = math.ceil(replicas_staffed(160.0 * (1 + pol.forecast.max_trend_lift), 1.0, 16, pol.headroom_beta, pol.utilization))
    assert max(d.replicas for d in decisions) <= bound < 60
    # Once the bursts stop, the capacity goes back to what the background needs.
    background_need = math.ceil(replicas_staffed(20.0, 1.0, 16, pol.headroom_beta, pol.utilization))
    assert decisions[-1].replicas == background_need
    released_at = next(k for k in range(9 * 42, len(decisions)) if decisions[k].replicas < peak_need)
    # ... after the recurrence window (1.5 x the 420 s gap) plus the guardrail's scale-down window.
    assert (released_at - (9 * 42 - 36)) * pol.interval_s <= 1.5 * 420 + pol.guardrail.downscale_delay_s + 60


def test_a_single_drop_releases_after_one_lead_not_the_recurrence_window():
    pol = PredictivePolicy()
    decisions, st = run(pol, [160.0] * 120 + [20.0] * 180, ready=11)
    h_node = pol.horizons_s(st)[1]
    released_at = next(k for k in range(120, len(decisions)) if decisions[k].replicas < decisions[119].replicas)
    # No bursts recurred: the peak is held one node + replica lead, then the guardrail's window.
    assert (released_at - 120) * pol.interval_s <= h_node + pol.guardrail.downscale_delay_s + 2 * pol.interval_s


def test_every_replica_over_the_floor_is_explained_with_its_cost():
    pol = PredictivePolicy()
    decisions, _ = run(pol, bursts(20.0, 160.0, 6, 42, 3), ready=2)
    d = decisions[-1]  # between bursts: held for the recent peak
    assert "floor" in d.reason and "hedge" in d.reason and "peak 160.0/s" in d.reason
    assert "GPU-h per hour" in d.reason
    floor = int(d.reason.split("floor ")[1].split(" ")[0])
    extra = int(d.reason.split("; ")[1].split(" over the floor")[0])
    assert extra == d.replicas - floor > 0


@pytest.mark.parametrize("margin,expect_held", [(1.5, True), (0.5, False)])
def test_the_recurrence_margin_decides_whether_a_gap_is_bridged(margin, expect_held):
    pol = PredictivePolicy(recurrence_margin=margin, peak_window_s=60.0)
    pol.guardrail = type(pol.guardrail)(downscale_delay_s=60.0, cooldown_after_up_s=60.0)
    decisions, _ = run(pol, bursts(20.0, 160.0, 6, 60, 5), ready=2)
    last_gap = [d.replicas for d in decisions[4 * 60 + 6 : 5 * 60]]
    peak_need = math.ceil(replicas_staffed(160.0, 1.0, 16, pol.headroom_beta, pol.utilization))
    assert (min(last_gap) >= peak_need) is expect_held


def test_the_recent_peak_equals_the_highest_smoothed_rate_in_any_window():
    """The sliding-window maximum keeps few samples, yet answers as a scan of all of them would, whatever
    the window asked (it changes from decision to decision as bursts recur and stop)."""
    import random

    from autoscaling import forecast as fc

    rng = random.Random(7)
    state: dict = {}
    seen: list[tuple[float, float]] = []  # (t, smoothed), every sample
    rates: list[tuple[float, float]] = []
    t = 0.0
    for _ in range(2000):
        t += rng.choice([1.0, 10.0, 10.0, 25.0])
        rate = rng.expovariate(1 / 50.0)
        window = rng.choice([5.0, 60.0, 370.0, 900.0, 3600.0])
        state, peak = fc.recent_peak(state, t, rate, 30.0, window, 3600.0)
        rates.append((t, rate))
        inside = [r for s, r in rates if s > t - 30.0]
        seen.append((t, sum(inside) / len(inside)))
        assert peak == pytest.approx(max(v for s, v in seen if s > t - max(window, 30.0)))
    assert len(state["peaks"]) < 60  # an hour of decisions, kept as a short falling run
