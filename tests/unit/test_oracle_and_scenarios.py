"""The SLO-feasible oracle, the fair start, and the scenario generators."""

import json

import numpy as np
import pytest

from autoscaling.oracle import OraclePolicy, plan_schedule
from autoscaling.policy import make_policy
from autoscaling.scenarios import make_scenario, scenario_names
from autoscaling.simulator import SimConfig, max_replicas_for, prepare, simulate
from serving.cli import main

# Small pools keep these fast: the peak needs 4 replicas of 16 slots at 2 s per request (32 req/s).
SMALL = SimConfig(peak_replicas=4.0)


def small(name, seed=0):
    return prepare(make_scenario(name, peak_rate_per_s=32.0, seed=seed), SMALL)


@pytest.mark.parametrize("name", ["on_off_bursts", "mmpp", "idle_then_surge"])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_oracle_meets_the_slo_target_on_bursty_traces(name, seed):
    p = small(name, seed)
    r = simulate(p, make_policy("oracle"), SMALL, name="oracle")
    assert r.slo_attainment >= SMALL.slo_target
    assert r.requests > 0 and r.scored_from_s == SMALL.scored_from_s()


def test_a_lower_target_gives_a_cheaper_feasible_oracle():
    p = small("on_off_bursts")
    strict = simulate(p, make_policy("oracle"), SMALL)
    loose_cfg = SimConfig(peak_replicas=4.0, slo_target=0.9)
    loose = simulate(p, make_policy("oracle"), loose_cfg)
    assert loose.slo_attainment >= 0.9
    assert loose.gpu_hours < strict.gpu_hours


def test_the_plan_follows_the_load_window_by_window():
    """A step from 16 to 64 req/s at 600 s (2 s each, 16 slots): the fluid plan needs 2 then 8 replicas."""
    cfg = SimConfig(peak_replicas=None, score_from_s=0.0)
    arrivals = np.concatenate([np.arange(0, 600, 1 / 16), np.arange(600, 1200, 1 / 64)])
    from autoscaling.traces import RequestTrace

    p = prepare(RequestTrace(arrivals, None, None, source="step"), cfg)
    sched = plan_schedule(p, cfg, max_replicas_for(p, cfg), target=0.99)
    assert list(sched[:10]) == [2] * 10
    assert list(sched[10:20]) == [8] * 10


def test_an_infeasible_pool_is_an_error_not_a_silent_miss():
    # A queue of 0 and a 10 ms SLO with 2 s service and at most 1 replica: nothing can meet it.
    cfg = SimConfig(peak_replicas=4.0, max_replicas=1, max_queued_requests=0)
    with pytest.raises(RuntimeError, match="cannot serve this trace"):
        simulate(small("on_off_bursts"), OraclePolicy(max_repairs=2), cfg)


def test_scoring_starts_after_the_warm_start_and_gpu_time_is_charged_from_it():
    cfg = SimConfig(peak_replicas=4.0)
    assert cfg.scored_from_s() == 120 + 300 + 60  # hold + longest provisioning + replica start
    assert SimConfig(score_from_s=100.0).scored_from_s() == 120.0  # rounded up to a whole step
    p = small("slow_ramp")
    scored = simulate(p, make_policy("hpa"), cfg)
    whole = simulate(p, make_policy("hpa"), SimConfig(peak_replicas=4.0, score_from_s=0.0))
    assert scored.requests == pytest.approx(sum(scored.window_requests[8:]))
    assert whole.requests == pytest.approx(sum(whole.window_requests))
    assert scored.gpu_hours < whole.gpu_hours
    with pytest.raises(ValueError, match="score_from_s"):
        SimConfig(score_from_s=-1.0)


def test_simulate_reports_where_scoring_starts(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = ["simulate", "--scenario", "abrupt_drop", "--peak-replicas", "3", "--policy", "hpa", "--policy", "oracle"]
    assert main([*argv, "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "scored from 480 s" in table and "x_oracle" in table
    doc = json.loads(out.read_text())
    assert doc["scored_from_s"] == 480.0
    assert doc["policies"]["oracle"]["slo_attainment"] >= 0.99
    assert doc["policies"]["hpa"]["scored_from_s"] == 480.0


def test_scenarios_are_reproducible_and_shaped_as_named():
    assert set(scenario_names()) == {
        "on_off_bursts", "mmpp", "diurnal_flash_crowd", "slow_ramp", "abrupt_drop", "idle_then_surge"
    }
    a, b = make_scenario("mmpp", 50.0, seed=3), make_scenario("mmpp", 50.0, seed=3)
    assert np.array_equal(a.arrival_s, b.arrival_s)
    assert not np.array_equal(a.arrival_s, make_scenario("mmpp", 50.0, seed=4).arrival_s)
    counts = np.bincount(make_scenario("idle_then_surge", 100.0).arrival_s.astype(int))
    assert counts[:3600].mean() < 5 and counts[3800:5300].mean() == pytest.approx(100.0, rel=0.05)
    on_off = np.bincount(make_scenario("on_off_bursts", 100.0).arrival_s.astype(int))
    minute = on_off[: len(on_off) // 60 * 60].reshape(-1, 60).mean(axis=1)
    starts = np.sum((minute[1:] > 50) & (minute[:-1] <= 50))
    assert 10 <= starts <= 40  # minute-scale bursts, many of them
    day = make_scenario("diurnal_flash_crowd", 100.0)
    assert day.window_s == 60.0 and day.duration_s == 2 * 86400


def test_an_unknown_scenario_lists_the_valid_ones(capsys):
    with pytest.raises(ValueError, match="on_off_bursts"):
        make_scenario("nope")
    assert main(["simulate", "--scenario", "nope"]) == 2
    assert "idle_then_surge" in capsys.readouterr().err


def test_predictive_never_climbs_to_the_ceiling_on_bursty_scenarios():
    for name in ("on_off_bursts", "mmpp"):
        p = small(name)
        r = simulate(p, make_policy("predictive"), SMALL)
        assert max(r.timeline["replicas"]) < max_replicas_for(p, SMALL)
