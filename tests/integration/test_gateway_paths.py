"""The gateway's failure paths, driven with a stand-in model handle (no cluster): requests Ray could not
deliver are handed back and served, a replica that dies mid-request is answered 503 without a retry,
repeated hand-backs end in one answer, and a client that leaves frees its slot. In every case the
slot count returns to zero and the counters reconcile."""

import asyncio
import json

from ray.exceptions import ActorUnavailableError, RayActorError
from starlette.requests import Request

from serving import BatchingSpec, ModelDeployment, ModelSource, QueueSpec
from serving._private.gateway import Gateway
from serving._private.surface import Reply

SPEC = ModelDeployment(
    name="m",
    task="embeddings",
    model=ModelSource(path="/models/x"),
    queue=QueueSpec(max_ongoing_requests=1),
    batching=BatchingSpec(enabled=False, max_batch_size=1),
).model_dump(mode="json")


class Metrics:
    def arrived(self):
        pass

    def answered(self, outcome, reason):
        pass

    def gauges(self, *a):
        pass


class Pending:
    """Stands in for a DeploymentResponse: awaitable, and cancellable as Serve's is."""

    def __init__(self, coro, model):
        self.task, self.model = asyncio.ensure_future(coro), model

    def __await__(self):
        return self.task.__await__()

    def cancel(self):
        self.model.cancelled += 1
        self.task.cancel()


class Model:
    """Stands in for the DeploymentHandle: each call takes the next step of a script."""

    def __init__(self, *script):
        self.script, self.calls, self.cancelled = list(script), 0, 0

    @property
    def reply(self):
        model = self

        class Remote:
            def remote(self, endpoint, body, arrivals, gateway=None, queued=0):
                return Pending(model._call(), model)

        return Remote()

    async def _call(self):
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        await asyncio.sleep(step)
        return Reply({"object": "list"})


def gateway(model):
    g = Gateway.__new__(Gateway)
    g._setup(SPEC, model, lambda: (1, 0, 1), Metrics())
    return g


def request(body=b'{"input": "x"}', headers=()):
    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": raw, "query_string": b""}
    return Request(scope, receive)


def settled(g):
    c = g.queue.counts()
    assert c["pending"] == 0 and g.queue.in_flight == 0 and len(g.queue) == 0
    assert c["received"] == c["served"] + c["rejected"] + c["expired"] + c["failed"]
    return c


def run(coro):
    return asyncio.run(coro)


def test_undelivered_request_is_handed_back_and_served():
    async def main():
        g = gateway(model := Model(ActorUnavailableError("replica stopping", None), 0.0))
        resp = await g._admit_and_forward("embeddings", request())
        return g, model, resp

    g, model, resp = run(main())
    assert resp.status_code == 200 and model.calls == 2
    assert settled(g)["served"] == 1


def test_replica_dying_mid_request_is_answered_503_and_not_retried():
    async def main():
        g = gateway(model := Model(RayActorError(), 0.0))
        return g, model, await g._admit_and_forward("embeddings", request())

    g, model, resp = run(main())
    assert resp.status_code == 503 and json.loads(resp.body)["error"]["code"] == "replica_died"
    assert float(resp.headers["retry-after"]) >= 1  # every platform 503 says when to come back
    assert model.calls == 1 and settled(g)["failed"] == 1


def test_a_body_that_killed_two_replicas_is_quarantined_and_others_still_pass():
    poison, fine = b'{"input": "poison"}', b'{"input": "fine"}'
    # The same JSON, spaced differently, is the same request.
    poison_spaced = b'{ "input" :  "poison" }'

    async def main():
        g = gateway(model := Model(RayActorError(), RayActorError(), 0.0))
        first = await g._admit_and_forward("embeddings", request(poison))
        second = await g._admit_and_forward("embeddings", request(poison_spaced))
        third = await g._admit_and_forward("embeddings", request(poison))
        other = await g._admit_and_forward("embeddings", request(fine))
        g._poller.cancel()
        return g, model, first, second, third, other

    g, model, first, second, third, other = run(main())
    assert first.status_code == 503  # once: it may have been the node, not the input
    for resp in (second, third):
        err = json.loads(resp.body)["error"]
        assert resp.status_code == 422 and err["code"] == "input_quarantined"
        assert "2 replicas" in err["message"]
    assert model.calls == 3  # the third copy never reached a replica
    assert other.status_code == 200
    c = settled(g)
    assert c["failed"] == 2 and c["rejected"] == 1 and c["served"] == 1


def test_a_retry_that_meets_the_same_dead_replica_or_a_lost_node_is_not_a_second_kill():
    body = b'{"input": "innocent"}'
    same = RayActorError(actor_id="a1")  # Ray's router sent the retry to the replica already dead
    lost = RayActorError(actor_id="a2", preempted=True)  # the node went away under the replica

    async def main():
        g = gateway(Model(RayActorError(actor_id="a1"), same, lost, 0.0))
        codes = [(await g._admit_and_forward("embeddings", request(body))).status_code for _ in range(4)]
        g._poller.cancel()
        return g, codes

    g, codes = run(main())
    assert codes == [503, 503, 503, 200]
    assert settled(g)["served"] == 1


def test_repeated_hand_backs_end_in_one_answer_and_leave_nothing_queued():
    async def main():
        g = gateway(Model(*[ActorUnavailableError("gone", None) for _ in range(4)]))
        return g, await g._admit_and_forward("embeddings", request())

    g, resp = run(main())
    assert resp.status_code == 503 and json.loads(resp.body)["error"]["code"] == "replicas_gone"
    assert settled(g)["failed"] == 1


def test_clients_leaving_while_running_and_while_queued_free_their_slots():
    async def main():
        g = gateway(Model(0.3, 5.0))
        first = asyncio.create_task(g._admit_and_forward("embeddings", request()))
        await asyncio.sleep(0.05)
        second = asyncio.create_task(g._admit_and_forward("embeddings", request()))
        await asyncio.sleep(0.05)
        assert len(g.queue) == 1  # one slot: the second waits
        second.cancel()  # leaves while queued
        await asyncio.gather(second, return_exceptions=True)
        assert (await first).status_code == 200
        third = asyncio.create_task(g._admit_and_forward("embeddings", request()))
        await asyncio.sleep(0.1)
        assert g.queue.in_flight == 1
        third.cancel()  # leaves while its request runs
        await asyncio.gather(third, return_exceptions=True)
        return g

    c = settled(run(main()))
    assert c["served"] == 1 and c["failed"] == 2


class Gate:
    """A model step that finishes when the test says so."""

    def __init__(self):
        self.event = asyncio.Event()

    async def __call__(self):
        await self.event.wait()


class GatedModel(Model):
    async def _call(self):
        self.calls += 1
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        if isinstance(step, Gate):
            await step()
        else:
            await asyncio.sleep(step)
        return Reply({"object": "list"})


def test_a_queued_client_leaving_in_the_same_tick_as_a_completion_leaks_nothing():
    # One slot. A runs, B waits. A's call completes and B's client leaves in the same turn of the
    # event loop: A's task runs first, frees the slot and dispatches B, whose future is already
    # cancelled. Before the fix that raised InvalidStateError inside A (answered 500), B's slot was
    # never given back, and with one slot nothing was dispatched again.
    async def main():
        gate = Gate()
        g = gateway(GatedModel(gate, 0.0))
        a = asyncio.create_task(g._admit_and_forward("embeddings", request()))
        await asyncio.sleep(0.05)
        b = asyncio.create_task(g._admit_and_forward("embeddings", request()))
        await asyncio.sleep(0.05)
        assert g.queue.in_flight == 1 and len(g.queue) == 1
        gate.event.set()  # A's task is scheduled first ...
        b.cancel()  # ... B's in the same tick
        resp_a = await a
        await asyncio.gather(b, return_exceptions=True)
        assert b.cancelled()
        c = await asyncio.wait_for(g._admit_and_forward("embeddings", request()), 2.0)
        return g, resp_a, c

    g, resp_a, c = run(main())
    assert resp_a.status_code == 200 and c.status_code == 200
    counts = settled(g)
    assert counts["served"] == 2 and counts["failed"] == 1


def test_a_hung_controller_poll_gates_nothing_and_is_timed_out(monkeypatch):
    # The first poll of the Serve controller never returns. Admission must not wait for it:
    # requests are dispatched on a conservative capacity (one replica's slots) meanwhile.
    import threading

    from serving._private import gateway as gw

    monkeypatch.setattr(gw, "POLL_TIMEOUT_S", 0.2)
    hang, calls = threading.Event(), []

    def hung_states():
        calls.append(1)
        hang.wait(10)
        return 1, 0, 1

    async def main():
        g = Gateway.__new__(Gateway)
        g._setup(SPEC, Model(0.0, 0.0), hung_states, Metrics())
        first = await asyncio.wait_for(g._admit_and_forward("embeddings", request()), 2.0)
        second = await asyncio.wait_for(g._admit_and_forward("embeddings", request()), 2.0)
        await asyncio.sleep(1.0)  # several poll periods: the hung call is not stacked again
        healthy = not g._poller.done()
        g._poller.cancel()
        hang.set()  # let the hung thread end before the loop closes
        return g, first, second, healthy

    try:
        g, first, second, healthy = run(main())
    finally:
        hang.set()
    assert first.status_code == 200 and second.status_code == 200 and healthy
    assert len(calls) == 1
    assert settled(g)["served"] == 2


def test_the_poller_survives_its_own_errors_and_the_health_check_restarts_it():
    class FlakyMetrics(Metrics):
        fails = 2

        def gauges(self, *a):
            if self.fails:
                self.fails -= 1
                raise RuntimeError("exporter hiccup")

    async def main():
        g = Gateway.__new__(Gateway)
        g._setup(SPEC, Model(0.0), lambda: (1, 0, 1), FlakyMetrics())
        assert (await g._admit_and_forward("embeddings", request())).status_code == 200
        await asyncio.sleep(1.5)  # three poll periods, two of them failing
        survived = not g._poller.done()
        g._poller.cancel()
        await asyncio.gather(g._poller, return_exceptions=True)
        await g.check_health()  # finds it dead, starts it again
        restarted = not g._poller.done()
        g._poller.cancel()
        return survived, restarted

    assert run(main()) == (True, True)


def test_the_health_check_fails_when_the_slot_count_disagrees_with_the_dispatched_requests():
    import pytest

    async def main():
        g = gateway(Model(0.0))
        assert (await g._admit_and_forward("embeddings", request())).status_code == 200
        await g.check_health()
        g.queue.in_flight += 1  # a slot taken with no request behind it: a leak
        with pytest.raises(RuntimeError, match="in_flight"):
            await g.check_health()
        g._poller.cancel()

    run(main())


def test_a_dispatched_call_is_bounded_by_the_request_deadline_and_cancelled_on_expiry():
    async def main():
        g = gateway(model := Model(5.0, 0.0))
        resp = await asyncio.wait_for(
            g._admit_and_forward("embeddings", request(headers=[("X-Gpuserve-Timeout-S", "0.3")])), 2.0
        )
        after = await asyncio.wait_for(g._admit_and_forward("embeddings", request()), 2.0)  # the slot came back
        g._poller.cancel()
        return g, model, resp, after

    g, model, resp, after = run(main())
    assert resp.status_code == 504 and json.loads(resp.body)["error"]["code"] == "deadline_exceeded"
    assert model.cancelled == 1 and after.status_code == 200
    c = settled(g)
    assert c["expired"] == 1 and c["served"] == 1


def test_a_request_without_a_deadline_is_bounded_by_the_server_timeout():
    spec = dict(SPEC, queue=dict(SPEC["queue"], server_timeout_s=0.3))

    async def main():
        g = Gateway.__new__(Gateway)
        g._setup(spec, model := Model(5.0), lambda: (1, 0, 1), Metrics())
        resp = await asyncio.wait_for(g._admit_and_forward("embeddings", request()), 2.0)
        g._poller.cancel()
        return g, model, resp

    g, model, resp = run(main())
    assert resp.status_code == 504 and model.cancelled == 1
    assert "server_timeout_s" in json.loads(resp.body)["error"]["message"]
    assert settled(g)["expired"] == 1


def test_admission_comes_before_the_body_and_a_bad_body_gives_its_place_back():
    spec = dict(SPEC, queue=dict(SPEC["queue"], max_queued_requests=1))
    read = []

    def tracked(body):
        async def receive():
            read.append(body)
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": [], "query_string": b""}
        return Request(scope, receive)

    async def main():
        g = Gateway.__new__(Gateway)
        g._setup(spec, Model(0.5, 0.0), lambda: (1, 0, 1), Metrics())
        running = asyncio.create_task(g._admit_and_forward("embeddings", tracked(b'{"input": "a"}')))
        await asyncio.sleep(0.05)
        waiting = asyncio.create_task(g._admit_and_forward("embeddings", tracked(b'{"input": "b"}')))
        await asyncio.sleep(0.05)
        refused = await g._admit_and_forward("embeddings", tracked(b'{"input": "never read"}'))
        bad = None
        results = await asyncio.gather(running, waiting)
        # An admitted request whose body is not JSON is answered 400 and frees what it held.
        bad = await g._admit_and_forward("embeddings", tracked(b"{not json"))
        g._poller.cancel()
        return g, refused, results, bad

    g, refused, results, bad = run(main())
    assert refused.status_code == 429 and b'{"input": "never read"}' not in read
    assert [r.status_code for r in results] == [200, 200]
    assert bad.status_code == 400
    c = settled(g)
    assert c["served"] == 2 and c["rejected"] == 2


def test_two_gateways_enforce_one_deployment_wide_bound_and_slot_count():
    # One replica with 2 slots, a bound of 2 waiting, two gateways (ranks 0 and 1) fed alternately.
    spec = dict(SPEC, queue=dict(SPEC["queue"], max_ongoing_requests=2, max_queued_requests=2, gateway_replicas=2))

    class Counting(Model):
        running = peak = 0

        async def _call(self):
            self.calls += 1
            Counting.running += 1
            Counting.peak = max(Counting.peak, Counting.running)
            try:
                await asyncio.sleep(0.3)
            finally:
                Counting.running -= 1
            return Reply({"object": "list"})

    async def main():
        model = Counting()
        gateways = []
        for rank in (0, 1):
            g = Gateway.__new__(Gateway)
            g._setup(spec, model, lambda: (1, 0, 2), Metrics(), rank=rank)
            gateways.append(g)
        await asyncio.sleep(0.1)  # both have polled
        tasks = [asyncio.create_task(gateways[i % 2]._admit_and_forward("embeddings", request())) for i in range(8)]
        resps = await asyncio.gather(*tasks)
        for g in gateways:
            g._poller.cancel()
        return gateways, model, resps

    gateways, model, resps = run(main())
    codes = sorted(r.status_code for r in resps)
    assert codes == [200] * 4 + [429] * 4  # 2 running + 2 waiting, deployment-wide; the rest refused at once
    assert Counting.peak == 2 and model.calls == 4
    assert [(g.drain.capacity, g.queue.max_queued) for g in gateways] == [(1, 1), (1, 1)]
    for g in gateways:
        settled(g)


def test_the_queue_holds_only_waiting_requests_while_bodies_are_read():
    # Bodies arrive slowly (each read yields to the loop). An admitted request that a free slot takes
    # is dispatched at admission, so the queue never counts it: reproduced first as "5 of 4 waiting".
    spec = dict(SPEC, queue=dict(SPEC["queue"], max_queued_requests=4, gateway_replicas=1))

    def slow_body():
        async def receive():
            await asyncio.sleep(0.01)
            return {"type": "http.request", "body": b'{"input": "x"}', "more_body": False}

        scope = {"type": "http", "method": "POST", "path": "/v1/embeddings", "headers": [], "query_string": b""}
        return Request(scope, receive)

    async def main():
        g = Gateway.__new__(Gateway)
        g._setup(spec, Model(*[0.2] * 5), lambda: (1, 0, 1), Metrics())
        resps = await asyncio.gather(*[g._admit_and_forward("embeddings", slow_body()) for _ in range(12)])
        g._poller.cancel()
        return g, resps

    g, resps = run(main())
    assert sorted(r.status_code for r in resps) == [200] * 5 + [429] * 7
    for r in resps:
        if r.status_code == 429:
            assert "(4 of 4 requests waiting" in json.loads(r.body)["error"]["message"]
    settled(g)


class StandInLedger:
    """Stands in for the cluster store: a dead gateway's calls running on one replica."""

    def __init__(self, now_s, load):
        self.now_s, self.load, self.beats = now_s, load, []

    def heartbeat(self, gateway):
        self.beats.append(gateway)

    def read(self):
        return self.now_s, [(self.now_s - 0.5, dict(self.load))], {"dead": self.now_s - 60.0, "me": self.now_s}


def test_a_new_gateway_keeps_the_calls_a_dead_one_left_running_out_of_its_slots():
    spec = {**SPEC, "queue": {**SPEC["queue"], "max_ongoing_requests": 4}}
    ledger = StandInLedger(1000.0, {"dead": 3, "me": 1})

    async def main():
        g = Gateway.__new__(Gateway)
        g._setup(spec, Model(), lambda: (1, 0, 1), Metrics(), ledger=ledger, gateway_id="me")
        g.queue.members(1, 0)  # as the controller poll says once the dead gateway is gone: all 4 slots
        before = g.drain.capacity
        await g._read_ledger()
        during = g.drain.capacity
        ledger.load = {"me": 1}  # the dead gateway's calls are done
        await g._read_ledger()
        return before, during, g.drain.capacity

    before, during, after = run(main())
    assert ledger.beats == ["me", "me"]  # its own heartbeat, so the others never count its calls
    assert (before, during, after) == (4, 1, 4)


def test_a_survivor_takes_the_larger_share_only_once_the_ledger_can_show_the_dead_ones_calls():
    async def main():
        g = Gateway.__new__(Gateway)
        g._setup(SPEC, Model(), lambda: (1, 0, 1), Metrics(), ledger=StandInLedger(0.0, {}), gateway_id="me")
        assert g.drain.members == 2
        # The controller stops counting a dead gateway within a second; its heartbeat goes stale later.
        early = [g._members(1, t) for t in (10.0, 11.0, 12.0)]
        late = g._members(1, 12.6)
        return early, late, g._members(3, 13.0)

    early, late, grown = run(main())
    assert early == [2, 2, 2] and late == 1
    assert grown == 3  # growing needs no wait: a new gateway's share only shrinks the others'


def test_readiness_says_not_ready_only_on_a_fresh_count(monkeypatch):
    # serve.run returns once the controller counts the model replica RUNNING, but a gateway's last count
    # can be a poll period older: a probe right then was told "no replica is running yet" (seen in CI,
    # 0.3 s after the replica started). Ready may come from the last count; not ready is asked again.
    from serving._private import gateway as gw

    monkeypatch.setattr(gw, "POLL_PERIOD_S", 60.0)  # no second poll in this test unless a probe wakes it
    counts = {"running": 0, "asked": 0}

    def states():
        counts["asked"] += 1
        return counts["running"], 1, 1

    async def main():
        g = Gateway.__new__(Gateway)
        g._setup(SPEC, Model(0.0), states, Metrics())
        g._ensure_poller()
        await asyncio.wait_for(g._counted.wait(), 5.0)
        starting = (await g._readiness()).status_code  # counted 0, and a fresh count says 0 too
        counts["running"] = 1  # the replica turned RUNNING after the poller's count
        now_ready = (await g._readiness()).status_code
        asked = counts["asked"]
        again = (await g._readiness()).status_code  # from the count the last probe woke the poller for
        g._poller.cancel()
        return starting, now_ready, again, asked

    starting, now_ready, again, asked = run(main())
    assert (starting, now_ready, again) == (503, 200, 200)
    assert asked == 3  # the poller's first count, then one count per probe that would say not ready


def test_readiness_waits_for_the_controllers_count_and_follows_it(monkeypatch):
    # Before the first poll answers, the gateway admits on one replica's slots (it must not wait), but a
    # probe must not be told "ready" on that assumption: a deployment at zero replicas would look ready.
    import threading

    from serving._private import gateway as gw

    monkeypatch.setattr(gw, "POLL_TIMEOUT_S", 0.2)
    answer, counts = threading.Event(), {"running": 0}

    def states():
        answer.wait(10)
        return counts["running"], 0, 1

    async def main():
        g = Gateway.__new__(Gateway)
        g._setup(SPEC, Model(0.0), states, Metrics())
        before = (await g._readiness()).status_code  # waits a poll's timeout for the first count, no more
        answer.set()
        await asyncio.wait_for(g._counted.wait(), 5.0)
        at_zero = (await g._readiness()).status_code  # counted: no replica running
        counts["running"] = 1
        for _ in range(50):
            if g.drain.running == 1:
                break
            await asyncio.sleep(0.1)
        running = (await g._readiness()).status_code
        g._poller.cancel()
        return before, at_zero, running

    try:
        assert run(main()) == (503, 503, 200)
    finally:
        answer.set()
