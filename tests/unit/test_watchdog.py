"""The stall watchdog on a fake clock."""

import pytest

from serving._private.watchdog import StallWatchdog


def test_idle_replica_is_never_stalled():
    w = StallWatchdog(5)
    assert w.check(1000.0) is None
    w.started(0.0)
    w.finished(1.0)
    assert w.check(10_000.0) is None


def test_in_flight_without_completion_is_a_stall():
    w = StallWatchdog(5)
    w.started(100.0)
    assert w.check(104.0) is None
    reason = w.check(106.0)
    assert reason is not None and "1 request(s) in flight" in reason and "limit 5.0s" in reason


def test_completions_are_progress_even_with_a_backlog():
    w = StallWatchdog(5)
    for _ in range(10):
        w.started(0.0)
    for t in range(1, 10):
        w.finished(float(t * 4))  # one completion every 4 s
        assert w.check(t * 4 + 4.5) is None
    assert w.in_flight == 1


def test_busy_since_idle_counts_from_the_first_start():
    w = StallWatchdog(5)
    w.started(0.0)
    w.finished(1.0)
    w.started(50.0)  # long idle gap must not count
    assert w.check(54.0) is None
    assert w.check(56.0) is not None


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="stall_after_s"):
        StallWatchdog(0)


def test_a_long_generation_that_keeps_making_tokens_is_alive_and_a_hung_step_is_not():
    w = StallWatchdog(5)
    w.started(0.0)
    # One request for 600 s, a token every 2 s: never a stall, though nothing completes.
    for t in range(2, 600, 2):
        w.progress(float(t))
        assert w.check(t + 4.9) is None
    # Then the decode step hangs: no token for longer than the limit is a stall.
    assert w.check(598.0 + 5.1) is not None


def test_progress_from_before_a_request_or_out_of_order_does_not_revive_a_stall():
    w = StallWatchdog(5)
    w.progress(50.0)  # idle: progress means nothing
    w.started(100.0)
    w.progress(90.0)  # older than the start of the busy period
    assert w.check(106.0) is not None
    w.progress(104.0)
    assert w.check(106.0) is None
