"""The simulator on hand-computable scenarios, the trace formats, and ``gpuserve simulate``."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from autoscaling.policy import Decision
from autoscaling.simulator import SimConfig, prepare, simulate
from autoscaling.traces import RateTrace, TraceFormatError, load_trace, per_second_counts, replicate
from serving.cli import main

SHARED = Path(__file__).resolve().parents[3] / "shared" / "traces"
AZURE = SHARED / "azure_llm_2023_conv" / "AzureLLMInferenceTrace_conv.csv"
SERVEGEN = SHARED / "servegen_m_small_14d" / "servegen_m_small_rate_10min.csv"


@dataclass
class StepPolicy:
    """Asks for ``before`` replicas until ``at_s``, then ``after``; optionally holds ``nodes``."""

    before: int
    after: int
    at_s: float
    nodes: int | None = None
    interval_s: float = 1.0

    def decide(self, ctx, state):
        n = self.before if ctx.now_s < self.at_s else self.after
        return Decision(replicas=n, nodes=self.nodes), state


def write_generic(path: Path, times, tokens=None) -> Path:
    lines = ["arrival_s,input_tokens,output_tokens"]
    for i, t in enumerate(times):
        lines.append(f"{t:.6f},{tokens[i][0]},{tokens[i][1]}" if tokens else f"{t:.6f},,")
    path.write_text("\n".join(lines) + "\n")
    return path


def step_cfg(**kw):
    base = dict(
        peak_replicas=None,
        slots_per_replica=1,
        service_time_s=0.9,
        provision_delay_s=(180.0, 180.0),
        replica_start_s=20.0,
        max_queued_requests=0,
        initial_replicas=1,
        hold_s=0.0,
        slo_s=0.5,
        # These scenarios are computed by hand from t=0: score the whole trace.
        score_from_s=0.0,
    )
    base.update(kw)
    return SimConfig(**base)


def step_trace(tmp_path):
    # 1 req/s until t=100, then 3 req/s until t=400; no arrival coincides with a completion.
    times = [k + 0.001 for k in range(100)] + [100.001 + k / 3 for k in range(900)]
    return load_trace(write_generic(tmp_path / "step.csv", times))


def test_step_load_with_known_provisioning_delay_gives_a_known_miss_count(tmp_path):
    """One 1-slot replica, service 0.9 s, no queue. At t=100 the load triples and the policy asks for 3
    replicas; new nodes take 180 s and replicas 20 s more, so from 100 to 300 one replica serves one
    request per second and rejects the other two: 400 misses, nothing else."""
    p = prepare(step_trace(tmp_path), step_cfg())
    r = simulate(p, StepPolicy(1, 3, at_s=100.0), step_cfg())
    assert r.requests == 1000
    assert r.rejected == 400 and r.expired == 0
    assert r.served_within_slo == 600
    assert r.slo_attainment == pytest.approx(0.6)
    assert (r.scale_ups, r.scale_downs) == (1, 0)
    # GPU time: the first node for the whole run, two more from their request at t=100.
    assert r.gpu_hours * 3600 == pytest.approx(r.simulated_s + 2 * (r.simulated_s - 100.0))


def test_prewarmed_nodes_cut_the_lead_to_the_replica_start(tmp_path):
    """Nodes held from the first decision (t=1, ready at 181): when the load triples at t=300 the new
    replicas are ready 20 s after the ask, so only 20 s x 2 req/s are rejected."""
    times = [k + 0.001 for k in range(300)] + [300.001 + k / 3 for k in range(300)]
    p = prepare(load_trace(write_generic(tmp_path / "late.csv", times)), step_cfg())
    r = simulate(p, StepPolicy(1, 3, at_s=300.0, nodes=3), step_cfg())
    assert r.rejected == 40
    # Paid for: one node all along, two held from t=1 (idle until the replicas came).
    assert r.gpu_hours * 3600 == pytest.approx(r.simulated_s + 2 * (r.simulated_s - 1.0))


def test_queue_deadline_expires_and_waits_count_against_the_slo(tmp_path):
    cfg = step_cfg(max_queued_requests=10_000, deadline_s=5.0)
    p = prepare(step_trace(tmp_path), cfg)
    r = simulate(p, StepPolicy(1, 3, at_s=100.0), cfg)
    assert r.rejected == 0
    assert r.expired > 0
    # Every request is answered exactly once: within the SLO, late, rejected or expired.
    assert r.served_within_slo + r.expired <= r.requests
    assert r.p99_latency_s > 0.9


def test_idle_nodes_are_released_after_the_idle_timeout(tmp_path):
    cfg = step_cfg(initial_replicas=3, idle_timeout_s=60.0)
    times = [k + 0.001 for k in range(400)]
    p = prepare(load_trace(write_generic(tmp_path / "flat.csv", times)), cfg)
    r = simulate(p, StepPolicy(3, 1, at_s=100.0), cfg)
    # Two nodes go idle at t=100 and are released at the first tick after 160 s.
    assert r.gpu_hours * 3600 == pytest.approx(r.simulated_s + 2 * 160.0, abs=2.0)
    assert r.slo_attainment == 1.0


def test_fluid_engine_matches_capacity_arithmetic():
    """Rate trace: 10 req/s for 20 minutes with no variation; 1 replica of 16 slots at 2 s per request
    serves 8 req/s. Asking for a second replica at t=0 (lead 200 s) leaves 200 s at 2 req/s excess."""
    trace = RateTrace(window_s=600.0, rate_per_s=np.array([10.0, 10.0]), cv=np.array([1e-9, 1e-9]), source="t")
    cfg = step_cfg(slots_per_replica=16, service_time_s=2.0, slo_s=2.0)
    p = prepare(trace, cfg)
    assert p.kind == "fluid" and p.counts.sum() == pytest.approx(12_000, rel=1e-6)
    r = simulate(p, StepPolicy(2, 2, at_s=0.0), cfg)
    # The ask happens at the first tick (t=1): ready at 201; seconds 0..200 reject 2 req/s.
    assert r.rejected == pytest.approx(2.0 * 201, abs=0.01)
    assert r.slo_attainment == pytest.approx(1 - 402 / 12_000, abs=1e-6)


def test_per_second_counts_keep_the_mean_and_follow_the_cv():
    trace = RateTrace(window_s=600.0, rate_per_s=np.array([100.0] * 20), cv=np.array([1.0] * 10 + [3.0] * 10), source="t")
    c = per_second_counts(trace, 1.0, seed=1)
    assert c.mean() == pytest.approx(100.0, rel=0.02)
    low, high = c[:6000], c[6000:]
    assert low.var() == pytest.approx(100.0, rel=0.1)  # Poisson-like
    assert high.var() == pytest.approx(900.0, rel=0.15)  # rate x cv^2


def test_replicate_scales_the_rate_and_keeps_the_span(tmp_path):
    times = np.sort(np.random.default_rng(0).uniform(0, 600, 3000))
    tr = load_trace(write_generic(tmp_path / "g.csv", times, [(100, 10)] * 3000))
    big = replicate(tr, 2.5, seed=0)
    assert len(big.arrival_s) == pytest.approx(7500, rel=0.03)
    assert big.arrival_s[-1] <= tr.arrival_s[-1] + 10.0
    assert np.all(np.diff(big.arrival_s) >= 0)
    small = replicate(tr, 0.5, seed=0)
    assert len(small.arrival_s) == pytest.approx(1500, rel=0.1)


def test_rescale_makes_the_peak_need_the_asked_replicas(tmp_path):
    times = np.sort(np.random.default_rng(0).uniform(0, 1200, 6000))
    tr = load_trace(write_generic(tmp_path / "g.csv", times))
    cfg = SimConfig(peak_replicas=20, slots_per_replica=16, service_time_s=2.0)
    p = prepare(tr, cfg)
    assert p.smooth_rate.max() * p.work_s / 16 == pytest.approx(20, rel=0.1)


# -- trace formats ---------------------------------------------------------------------------


def test_azure_format_parses_seven_digit_fractions(tmp_path):
    f = tmp_path / "az.csv"
    f.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\r\n"
        "2023-11-16 18:15:46.6805900,374,44\r\n2023-11-16 18:15:50.9951690,396,109"
    )
    tr = load_trace(f)
    assert tr.arrival_s.tolist() == pytest.approx([0.0, 4.314579])
    assert tr.input_tokens.tolist() == [374, 396] and tr.output_tokens.tolist() == [44, 109]


def test_servegen_format_interpolates_collection_gaps(tmp_path):
    f = tmp_path / "sg.csv"
    f.write_text(
        "window_start_s,day_index,hour_of_day,rate_rps,requests_in_window,active_clients,rate_weighted_cv,all_zero\n"
        "0,0,0,10,6000,1,1.0,0\n600,0,0.16,0,0,0,0,1\n1200,0,0.33,30,18000,1,2.0,0\n"
    )
    tr = load_trace(f)
    assert isinstance(tr, RateTrace) and tr.window_s == 600
    assert tr.rate_per_s.tolist() == [10, 20, 30] and tr.interpolated_windows == 1


@pytest.mark.parametrize(
    "text, match",
    [
        ("a,b,c\n1,2,3\n", "not a known format"),
        ("", "empty file"),
        ("arrival_s\n-1\n", "must be >= 0"),
        ("arrival_s,input_tokens,output_tokens\nsoon,1,1\n", "line 2"),
        ("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,1\n", "line 2"),
    ],
)
def test_bad_traces_are_named_with_line_and_fix(tmp_path, text, match):
    f = tmp_path / "bad.csv"
    f.write_text(text)
    with pytest.raises(TraceFormatError, match=match):
        load_trace(f)


def test_simconfig_rejects_impossible_settings():
    with pytest.raises(ValueError, match="provision_delay_s"):
        SimConfig(provision_delay_s=(300.0, 100.0))
    with pytest.raises(ValueError, match="slots_per_replica"):
        SimConfig(slots_per_replica=0)


# -- the CLI ---------------------------------------------------------------------------------


def test_simulate_cli_writes_json_and_a_plot(tmp_path, capsys):
    times = np.sort(np.random.default_rng(0).uniform(0, 1800, 20000))
    trace = write_generic(tmp_path / "g.csv", times, [(500, 100)] * 20000)
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(
        [
            "simulate", "--trace", str(trace), "--policy", "predictive", "--policy", "hpa", "--policy", "oracle",
            "--param", "predictive.headroom_beta=1.5", "--json", str(out), "--plot", str(png), "--peak-replicas", "8",
        ]
    )
    assert rc == 0
    doc = json.loads(out.read_text())
    assert set(doc["policies"]) == {"predictive", "hpa", "oracle"}
    for res in doc["policies"].values():
        assert {"slo_attainment", "rejected_fraction", "p50_latency_s", "p99_latency_s", "gpu_hours", "scale_events"} <= set(res)
        assert 0 <= res["slo_attainment"] <= 1
    assert doc["params"] == {"predictive": {"headroom_beta": 1.5}}
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "predictive" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, match",
    [
        (["--policy", "nope"], "not a built-in policy"),
        (["--policy", "predictive", "--param", "hpa.x=1"], "not among --policy"),
        (["--param", "predictive"], "POLICY.KEY=VALUE"),
        (["--policy", "predictive", "--param", "predictive.bogus=1"], "bad parameters"),
    ],
)
def test_simulate_cli_errors_name_the_fix(tmp_path, capsys, args, match):
    trace = write_generic(tmp_path / "g.csv", [0.0, 1.0, 2.0])
    assert main(["simulate", "--trace", str(trace), *args]) == 2
    assert match in capsys.readouterr().err


@pytest.mark.skipif(not AZURE.exists(), reason="shared traces not present")
def test_azure_trace_replays_fast_and_the_predictive_policy_meets_its_slo():
    trace = load_trace(AZURE)
    cfg = SimConfig()
    p = prepare(trace, cfg)
    from autoscaling.policy import make_policy

    r = simulate(p, make_policy("predictive"), cfg)
    oracle = simulate(p, make_policy("oracle"), cfg)
    # Scored from the warm start: 120 s hold + 300 s worst provisioning + 60 s replica start.
    assert r.scored_from_s == oracle.scored_from_s == 480.0
    assert sum(r.window_requests) > 150_000 and r.requests > 135_000
    assert oracle.slo_attainment >= cfg.slo_target
    assert r.slo_attainment >= 0.99
    # The goal against the SLO-feasible oracle.
    assert r.gpu_hours <= 1.25 * oracle.gpu_hours


def test_progress_bar_reaches_100_percent_on_stderr(tmp_path, capsys):
    p = prepare(step_trace(tmp_path), step_cfg())
    simulate(p, StepPolicy(1, 1, at_s=0.0), step_cfg(), name="steady", progress=True)
    err = capsys.readouterr().err
    assert "steady" in err and "100%" in err and err.endswith("\n")


@dataclass
class WatchingPolicy:
    """Holds one replica and records what it saw: (now, arrivals per second, queued)."""

    interval_s: float = 1.0
    seen: list = None

    def decide(self, ctx, state):
        self.seen = (self.seen or []) + [(ctx.now_s, ctx.arrivals_per_s, ctx.queued_requests)]
        return Decision(replicas=1), state


@pytest.mark.parametrize("engine", ["requests", "fluid"])
def test_metrics_lag_shows_the_policy_the_load_that_many_seconds_late(tmp_path, engine):
    """On Ray a policy sees the load as of the replicas' last push (and, behind the gateways, of the last
    dispatch): the simulator's ``metrics_lag_s`` models it. The step at t=100 reaches the policy 5 s later;
    without the lag, at the first decision after it."""
    if engine == "requests":
        trace = step_trace(tmp_path)
    else:
        trace = RateTrace(window_s=100.0, rate_per_s=np.array([1.0, 3.0, 3.0, 3.0]), cv=np.array([1e-9] * 4), source="t")

    def first_rise(lag):
        cfg = step_cfg(metrics_lag_s=lag, max_queued_requests=10_000, deadline_s=1000.0)
        pol = WatchingPolicy()
        simulate(prepare(trace, cfg), pol, cfg)
        rates = {t: a for t, a, _ in pol.seen}
        queues = {t: q for t, _, q in pol.seen}
        return min(t for t, a in rates.items() if a > 2.0), min(t for t, q in queues.items() if q > 0), rates

    t0, q0, r0 = first_rise(0.0)
    t5, q5, r5 = first_rise(5.0)
    assert t0 == 101 and t5 == t0 + 5  # the second from 100 to 101 ends at 101
    assert q5 == q0 + 5
    # Late, not lost: the same arrivals are seen, shifted.
    assert r5[150] == pytest.approx(r0[145])
    with pytest.raises(ValueError, match=r"metrics_lag_s \(-1.0\) must be in \[0, 600\]"):
        step_cfg(metrics_lag_s=-1.0)
