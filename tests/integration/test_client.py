"""serving.client against real Ray Serve backpressure: 429 + Retry-After from a full, bounded queue."""

import asyncio
import concurrent.futures as cf
import time

import httpx
import pytest

from serving import BatchingSpec, ModelDeployment, ModelSource, QueueSpec, WarmupSpec
from serving.client import AsyncClient, Client, DeadlineExceeded
from tests.conftest import MINILM


@pytest.fixture(scope="module")
def slow(deploy, serve_instance):
    spec = ModelDeployment(
        name="slow",
        task="tests.integration.stall_task:SlowEmbeddingsTask",
        model=ModelSource(path=MINILM),
        replicas=1,
        # One gateway: the tests count on one exact queue of one place.
        queue=QueueSpec(max_ongoing_requests=1, max_queued_requests=1, retry_after_s=1, gateway_replicas=1),
        batching=BatchingSpec(enabled=False, max_batch_size=1),
        warmup=WarmupSpec(cover_max_input=False, min_rounds=1, max_rounds=1),
    )
    deploy(spec.build(), "slow", "/slow")
    yield serve_instance + "/slow"
    from ray import serve

    serve.delete("slow")


def occupy(pool, url):
    """Fill the replica (1 ongoing) and the queue (1 waiting) with slow requests, one after the other.

    Sent together, the two race through the router and one may be rejected itself.
    """
    first = pool.submit(httpx.post, url + "/v1/embeddings", json={"input": "SLOW:4"}, timeout=60)
    time.sleep(0.7)
    second = pool.submit(httpx.post, url + "/v1/embeddings", json={"input": "SLOW:1"}, timeout=60)
    time.sleep(0.7)
    return [first, second]


def test_full_queue_answers_429_with_retry_after_fast(slow):
    with cf.ThreadPoolExecutor(2) as pool:
        hold = occupy(pool, slow)
        t0 = time.perf_counter()
        r = httpx.post(slow + "/v1/embeddings", json={"input": "x"}, timeout=60)
        took = time.perf_counter() - t0
        assert [f.result().status_code for f in hold] == [200, 200]
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert took < 2.0, "a rejection must not wait for capacity"


def test_clients_ride_out_overload_and_every_request_succeeds(slow):
    def one(i):
        with Client(slow, deadline_s=90) as c:
            out = c.embeddings(f"request {i}")
            return len(out["data"][0]["embedding"]), list(c.attempts_log)

    with cf.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(one, range(6)))
    assert all(dim == 384 for dim, _ in results)
    statuses = [s for _, log in results for s in log]
    assert statuses.count(200) == 6
    assert 429 in statuses, "the bounded queue pushed back at least once"


def test_async_client(slow):
    async def main():
        async with AsyncClient(slow, deadline_s=90) as c:
            return await asyncio.gather(*(c.embeddings(f"async {i}") for i in range(4)))

    outs = asyncio.run(main())
    assert [len(o["data"][0]["embedding"]) for o in outs] == [384] * 4


def test_deadline_is_honoured_instead_of_waiting(slow):
    with cf.ThreadPoolExecutor(2) as pool:
        hold = occupy(pool, slow)
        t0 = time.perf_counter()
        # Rejected with Retry-After 1 s (or, if it slipped into the queue, not answered in time):
        # either way the client gives up at its deadline instead of waiting or hanging.
        with Client(slow, deadline_s=0.8) as c, pytest.raises(DeadlineExceeded):
            c.embeddings("cannot wait a whole second")
        assert time.perf_counter() - t0 < 1.5
        for f in hold:
            f.result()
