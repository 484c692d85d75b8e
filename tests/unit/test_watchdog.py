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
