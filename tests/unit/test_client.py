"""Client retry rules: Retry-After parsing, jittered backoff bounds, the overall deadline."""

import random
from email.utils import formatdate

import httpx
import pytest

from serving.client import Client, DeadlineExceeded, RequestFailed, RetryPolicy, retry_after_s


def test_retry_after_forms():
    assert retry_after_s("3") == 3.0
    assert retry_after_s(" 1.5 ") == 1.5
    assert retry_after_s("-2") == 0.0
    assert retry_after_s(None) is None
    assert retry_after_s("soon") is None
    assert retry_after_s(formatdate(1000.0 + 30, usegmt=True), now_s=1000.0) == pytest.approx(30, abs=1)


def test_never_earlier_than_the_server_asked_and_spread_out():
    policy = RetryPolicy(spread=0.25, rng=random.Random(1))
    waits = [policy.delay_s(1, 2.0) for _ in range(200)]
    assert min(waits) >= 2.0 and max(waits) <= 2.5
    assert len({round(w, 3) for w in waits}) > 100, "jitter spreads clients out"


def test_backoff_without_retry_after_grows_and_is_capped():
    policy = RetryPolicy(base_s=0.1, cap_s=1.0, rng=random.Random(2))
    assert all(0 <= policy.delay_s(1, None) <= 0.1 for _ in range(100))
    assert max(policy.delay_s(3, None) for _ in range(200)) > 0.2
    assert all(policy.delay_s(20, None) <= 1.0 for _ in range(100))
    assert policy.delay_s(1, 99.0) == 1.0  # a Retry-After above the cap waits the cap


def response(status, retry_after=None, body=None):
    headers = {"retry-after": retry_after} if retry_after else {}
    return httpx.Response(status, headers=headers, json=body or {"error": {"message": "full"}})


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_next_wait_rules():
    clock = Clock()
    c = Client("http://unused", deadline_s=10, clock=clock, policy=RetryPolicy(max_attempts=3, rng=random.Random(0)))
    assert 2.0 <= c._next_wait(response(429, "2"), attempt=1, started=0.0) <= 2.5
    with pytest.raises(RequestFailed, match="HTTP 400 after 1 attempt"):
        c._next_wait(response(400, body={"error": {"message": "bad input"}}), attempt=1, started=0.0)
    with pytest.raises(RequestFailed, match="after 3 attempt"):
        c._next_wait(response(429, "1"), attempt=3, started=0.0)
    clock.t = 9.0
    with pytest.raises(DeadlineExceeded, match="deadline of 10s would pass"):
        c._next_wait(response(503, "2"), attempt=1, started=0.0)
    c.close()


def test_transport_errors():
    clock = Clock()
    c = Client("http://unused", deadline_s=10, clock=clock, policy=RetryPolicy(max_attempts=3, rng=random.Random(0)))
    with pytest.raises(DeadlineExceeded):
        c._on_transport_error(httpx.ReadTimeout("slow"), attempt=1, started=0.0)
    assert 0 <= c._on_transport_error(httpx.ConnectError("refused"), attempt=1, started=0.0) <= 0.1
    with pytest.raises(httpx.ConnectError):
        c._on_transport_error(httpx.ConnectError("refused"), attempt=3, started=0.0)
    with pytest.raises(httpx.RemoteProtocolError):
        c._on_transport_error(httpx.RemoteProtocolError("cut"), attempt=1, started=0.0)
    c.close()


def test_connection_refused_is_retried_until_the_deadline():
    # A real socket nobody listens on: the request never reaches a server, so retrying is safe.
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    slept = []
    with Client(f"http://127.0.0.1:{port}", deadline_s=1.0, sleep=slept.append,
                policy=RetryPolicy(max_attempts=4, rng=random.Random(0))) as c:
        with pytest.raises(httpx.ConnectError):
            c.embeddings("x")
    assert len(slept) == 3


def test_priority_and_remaining_deadline_travel_with_every_attempt_and_ms_retry_after_wins():
    clock = Clock()
    c = Client("http://unused", deadline_s=10, priority="batch", clock=clock, policy=RetryPolicy(spread=0.0))
    clock.t = 4.0
    h = c._attempt_headers(started=0.0)
    assert h["x-gpuserve-priority"] == "batch" and float(h["x-gpuserve-timeout-s"]) == pytest.approx(6.0)
    # The millisecond form keeps the server's estimate: 0.25 s, not the whole-second ceiling of 1 s.
    r = httpx.Response(429, headers={"retry-after": "1", "retry-after-ms": "250"}, json={})
    assert c._next_wait(r, attempt=1, started=0.0) == pytest.approx(0.25)
    r = httpx.Response(429, headers={"retry-after": "1", "retry-after-ms": "junk"}, json={})
    assert c._next_wait(r, attempt=1, started=0.0) == pytest.approx(1.0)
    c.close()


def test_a_replica_death_or_a_quarantined_input_is_not_retried_whatever_its_status():
    c = Client("http://unused", deadline_s=10, clock=Clock(), policy=RetryPolicy(rng=random.Random(0)))
    died = response(503, "1", body={"error": {"message": "replica died", "code": "replica_died"}})
    with pytest.raises(RequestFailed, match="HTTP 503 after 1 attempt"):
        c._next_wait(died, attempt=1, started=0.0)
    assert c._next_wait(response(503, "1", body={"error": {"code": "model_not_ready"}}), 1, 0.0) >= 1.0
    c.close()
