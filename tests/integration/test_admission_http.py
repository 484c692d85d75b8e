"""Admission control on real Ray Serve over HTTP: the deployment-wide bound, computed Retry-After,
priority classes, deadlines, counters (JSON and Prometheus) and drain during a scale-down."""

import concurrent.futures as cf
import time
import uuid

import httpx
import pytest

from serving import BatchingSpec, ModelDeployment, ModelSource, QueueSpec, WarmupSpec
from tests.conftest import MINILM
from tests.integration.stall_task import seen_texts

TASK = "tests.integration.stall_task:RecordingSlowTask"


def spec(name, replicas=1, **queue):
    # One gateway unless a test asks for more: these tests pin the exact semantics of one queue (how
    # two gateways split it is tested on its own below and in test_gateway_paths).
    queue.setdefault("gateway_replicas", 1)
    return ModelDeployment(
        name=name,
        task=TASK,
        model=ModelSource(path=MINILM),
        replicas=replicas,
        queue=QueueSpec(max_ongoing_requests=1, **queue),
        batching=BatchingSpec(enabled=False, max_batch_size=1),
        warmup=WarmupSpec(cover_max_input=False, min_rounds=1, max_rounds=1),
    )


@pytest.fixture(scope="module")
def adm(deploy):
    client = deploy(spec("adm", max_queued_requests=4).build(), "adm", "/adm")
    yield client
    from ray import serve

    serve.delete("adm")


def post(base, texts, headers=None, timeout=60):
    """POST from a fresh connection (one per thread); returns (status, headers, body, seconds)."""
    t0 = time.perf_counter()
    r = httpx.post(str(base).rstrip("/") + "/v1/embeddings", json={"input": texts}, headers=headers or {}, timeout=timeout)
    return r.status_code, r.headers, r.json(), time.perf_counter() - t0


def state(client):
    r = client.get("/admission")
    assert r.status_code == 200
    return r.json()


def wait_for(client, pred, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = state(client)
        if pred(s):
            return s
        time.sleep(0.02)
    raise AssertionError(f"admission state never matched: {state(client)}")


def idle(client):
    return wait_for(client, lambda s: s["in_flight"] == 0 and sum(s["queued"].values()) == 0, 60)


def hold(pool, client, seconds, n_queued, priority=None):
    """One request running for `seconds`, then `n_queued` more waiting behind it (one at a time, in order)."""
    headers = {"x-gpuserve-priority": priority} if priority else {}
    futs = [pool.submit(post, client.base_url, [f"SLOW:{seconds}"], headers)]
    wait_for(client, lambda s: s["in_flight"] == 1)
    for i in range(n_queued):
        futs.append(pool.submit(post, client.base_url, ["SLOW:0.05"], headers))
        wait_for(client, lambda s, i=i: sum(s["queued"].values()) == i + 1)
    return futs


def test_bound_is_deployment_wide_and_the_rest_are_rejected_at_once(adm):
    idle(adm)
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda _: post(adm.base_url, ["SLOW:0.6"]), range(12)))
    ok = [r for r in results if r[0] == 200]
    rejected = [r for r in results if r[0] == 429]
    # One running (1 replica x 1 slot) + 4 waiting; every other request refused, none lost.
    assert len(ok) == 5 and len(rejected) == 7, [r[0] for r in results]
    for status, headers, body, took in rejected:
        assert body["error"]["type"] == "rate_limit_exceeded" and body["error"]["code"] == "queue_full"
        assert "queue is full (4 of 4 requests waiting" in body["error"]["message"]
        assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) > 0
        assert took < 2.0, "a rejection does not wait for capacity"


def test_retry_after_is_computed_and_grows_with_the_queue(adm):
    idle(adm)
    post(adm.base_url, ["SLOW:0.3"])  # at least one completion measured
    mean_s = state(adm)["mean_service_s"]
    waits_ms = []
    with cf.ThreadPoolExecutor(8) as pool:
        for queued in (0, 2, 4):
            futs = hold(pool, adm, 1.5 + 0.1 * queued, queued)
            # A deadline too short to be met is refused at admission, with the wait it would have had.
            status, headers, body, took = post(adm.base_url, ["x"], {"x-gpuserve-timeout-s": "0.01"})
            assert status == 429 and body["error"]["code"] == "deadline_unreachable", body
            waits_ms.append(int(headers["retry-after-ms"]))
            assert all(f.result()[0] == 200 for f in futs)
            idle(adm)
    assert waits_ms[0] < waits_ms[1] < waits_ms[2], waits_ms
    # Position / drain rate: the 4-deep queue's wait is about 5 service times, the empty one's 1.
    assert waits_ms[2] > 3 * waits_ms[0], (waits_ms, mean_s)


def test_higher_class_is_served_first_and_lower_is_shed_first(adm):
    idle(adm)
    tag = uuid.uuid4().hex[:8]
    batch = {"x-gpuserve-priority": "batch"}
    inter = {"x-gpuserve-priority": "interactive"}
    with cf.ThreadPoolExecutor(8) as pool:
        futs = hold(pool, adm, 1.5, 0)
        b = []
        for i in range(4):  # fills the 4-deep queue with batch work
            b.append(pool.submit(post, adm.base_url, [f"SEEN:{tag}-b{i}"], batch))
            wait_for(adm, lambda s, i=i: s["queued"]["batch"] == i + 1)
        i1 = pool.submit(post, adm.base_url, [f"SEEN:{tag}-i1"], inter)
        wait_for(adm, lambda s: s["queued"]["interactive"] == 1)
        i2 = pool.submit(post, adm.base_url, [f"SEEN:{tag}-i2"], inter)
        results = {name: f.result() for name, f in [("i1", i1), ("i2", i2)] + [(f"b{i}", f) for i, f in enumerate(b)]}
        assert futs[0].result()[0] == 200
    # The two interactive requests displaced the two newest batch requests...
    assert [results[k][0] for k in ("i1", "i2", "b0", "b1", "b2", "b3")] == [200, 200, 200, 200, 429, 429]
    for k in ("b2", "b3"):
        assert results[k][2]["error"]["code"] == "shed"
        assert int(results[k][1]["retry-after-ms"]) > 0
    # ...and ran before the older batch ones; the shed ones never reached the model.
    ran = [t.split("-", 1)[1] for t in seen_texts() if t.startswith(f"SEEN:{tag}")]
    assert ran == ["i1", "i2", "b0", "b1"]


def test_deadline_passing_in_the_queue_answers_504_and_never_reaches_the_model(adm):
    idle(adm)
    tag = uuid.uuid4().hex[:8]
    mean_s = state(adm)["mean_service_s"]
    # Admission estimates a short wait (one normal service time), but the running request holds
    # the replica far longer: the queued request's deadline passes while it waits.
    timeout_s = 2 * mean_s + 0.5
    with cf.ThreadPoolExecutor(4) as pool:
        futs = hold(pool, adm, timeout_s + 2.0, 0)
        status, headers, body, took = post(adm.base_url, [f"SEEN:{tag}"], {"x-gpuserve-timeout-s": str(timeout_s)})
        assert futs[0].result()[0] == 200
    assert status == 504 and body["error"]["code"] == "deadline_expired", body
    assert timeout_s - 0.1 < took < timeout_s + 1.5
    idle(adm)
    assert not [t for t in seen_texts() if t.startswith(f"SEEN:{tag}")]


def test_deployment_default_deadline_applies_without_a_header(deploy):
    client = deploy(spec("adm-deadline", max_queued_requests=4, default_timeout_s=0.5).build(), "adm-deadline", "/adm-deadline")
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            futs = hold(pool, client, 2.0, 0)
            status, _, body, took = post(client.base_url, ["x"])
            # Admitted with no estimate yet (nothing completed), expired at its 0.5 s default deadline...
            assert status == 504 and took < 1.8, body
            # (expired while queued, or dispatched when the first was cut at its own deadline and then cut)
            assert body["error"]["code"] in ("deadline_expired", "deadline_exceeded"), body
            # ...and the deadline is end to end: the running request is cut at it too, cancelled on the
            # replica instead of holding its slot for 2 s (it used to run on to 200).
            status, _, body, took = futs[0].result()
            assert status == 504 and body["error"]["code"] == "deadline_exceeded" and took < 1.8, body
    finally:
        from ray import serve

        serve.delete("adm-deadline")


def test_bad_admission_headers_are_400s_naming_the_header(adm):
    for headers, code in [
        ({"x-gpuserve-priority": "urgent"}, "invalid_priority"),
        ({"x-gpuserve-timeout-s": "soon"}, "invalid_timeout"),
        ({"x-gpuserve-timeout-s": "-1"}, "invalid_timeout"),
        ({"x-gpuserve-timeout-s": "nan"}, "invalid_timeout"),
    ]:
        r = adm.post("/v1/embeddings", json={"input": "x"}, headers=headers)
        assert r.status_code == 400 and r.json()["error"]["code"] == code
        assert r.json()["error"]["param"] in headers


def test_a_client_that_leaves_while_queued_is_counted_and_its_request_never_runs(adm):
    idle(adm)
    tag = uuid.uuid4().hex[:8]
    before = state(adm)["counts"]["failed"]
    with cf.ThreadPoolExecutor(4) as pool:
        futs = hold(pool, adm, 3.0, 0)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(str(adm.base_url).rstrip("/") + "/v1/embeddings", json={"input": [f"SEEN:{tag}"]}, timeout=0.8)
        assert futs[0].result()[0] == 200
    s = idle(adm)
    assert s["counts"]["failed"] == before + 1
    assert any(o["reason"] == "client_disconnected" for o in s["outcomes"])
    assert not [t for t in seen_texts() if t.startswith(f"SEEN:{tag}")]


def test_counters_reconcile_in_json_and_prometheus(adm, metrics_port):
    s = idle(adm)
    c = s["counts"]
    assert c["pending"] == 0
    assert c["received"] == c["served"] + c["rejected"] + c["expired"] + c["failed"]
    assert c["served"] > 0 and c["rejected"] > 0 and c["expired"] > 0
    reasons = {(o["outcome"], o["reason"]) for o in s["outcomes"]}
    assert {("rejected", "queue_full"), ("rejected", "shed"), ("rejected", "deadline_unreachable")} <= reasons
    assert ("expired", "deadline") in reasons

    def scrape():
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
        received, by_outcome = None, {}
        for line in text.splitlines():
            if 'deployment="adm"' not in line or line.startswith("#"):
                continue
            name, value = line.rsplit(" ", 1)
            if name.startswith("ray_gpuserve_requests_received_total"):
                received = float(value)
            elif name.startswith("ray_gpuserve_requests_total"):
                outcome = name.split('outcome="', 1)[1].split('"', 1)[0]
                by_outcome[outcome] = by_outcome.get(outcome, 0.0) + float(value)
        return received, by_outcome

    deadline = time.monotonic() + 60
    while True:
        received, by_outcome = scrape()
        if received == c["received"] and sum(by_outcome.values()) == received:
            break
        assert time.monotonic() < deadline, (received, by_outcome, c)
        time.sleep(1)
    assert by_outcome["served"] == c["served"] and by_outcome["expired"] == c["expired"]


def test_scale_down_drains_and_loses_nothing(deploy, serve_instance):
    from ray import serve

    client = deploy(spec("drain", replicas=2, max_queued_requests=64).build(), "drain", "/drain")
    try:
        wait_for(client, lambda s: s["replicas"]["running"] == 2 and s["capacity"] == 2, 60)
        stop_at = time.monotonic() + 8.0

        def steady(k):
            out = []
            while time.monotonic() < stop_at:
                out.append(post(client.base_url, ["SLOW:0.2", f"w{k}"])[0])
            return out

        with cf.ThreadPoolExecutor(4) as pool:
            futs = [pool.submit(steady, k) for k in range(4)]
            time.sleep(2.0)
            # A lightweight update to one replica: Serve stops one while requests run and wait.
            serve.run(spec("drain", replicas=1, max_queued_requests=64).build(), name="drain", route_prefix="/drain", blocking=False)
            statuses = [st for f in futs for st in f.result()]
        assert len(statuses) > 20 and set(statuses) == {200}, statuses
        s = wait_for(client, lambda s: s["replicas"]["running"] == 1, 60)
        assert s["counts"]["failed"] == 0
    finally:
        serve.delete("drain")


def test_two_gateways_on_real_serve_split_the_bound_by_rank(deploy):
    from ray import serve

    client = deploy(spec("adm-two", max_queued_requests=5, gateway_replicas=2).build(), "adm-two", "/adm-two")
    try:
        _both_gateways_answer(client)
    finally:
        serve.delete("adm-two")


def _both_gateways_answer(client):
    seen = {}
    deadline = time.monotonic() + 60
    # Ray's proxy spreads requests over the gateways; poll until both have answered with their share.
    while len(seen) < 2 and time.monotonic() < deadline:
        a = client.get("/admission").json()
        if a["gateway"]["members"] == 2:
            seen[a["gateway"]["rank"]] = a["max_queued_requests"]
        time.sleep(0.2)
    assert sorted(seen) == [0, 1], seen
    assert sum(seen.values()) == 5  # the shares add up to the deployment's bound exactly
    assert client.post("/v1/embeddings", json={"input": "x"}).status_code == 200
