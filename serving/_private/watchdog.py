"""Stall watchdog: requests in flight but nothing completing means the request path is stuck.

Pure: every method takes ``now_s``; the replica feeds it a monotonic clock and
tests feed it a fake one.
"""

from __future__ import annotations

from typing import Optional


class StallWatchdog:
    """Tracks in-flight requests and the last sign of progress.

    Progress is a completion, a sign of progress inside a running request that the
    task reports (a generated token: a long generation is not a stall, a hung decode
    step is), or the moment the replica went from idle to busy (an idle replica is
    never stalled, however long ago it last finished).
    """

    def __init__(self, stall_after_s: float):
        if stall_after_s <= 0:
            raise ValueError(f"stall_after_s ({stall_after_s}) must be > 0")
        self.stall_after_s = stall_after_s
        self.in_flight = 0
        self.last_progress_s: Optional[float] = None

    def started(self, now_s: float) -> None:
        if self.in_flight == 0:
            self.last_progress_s = now_s
        self.in_flight += 1

    def finished(self, now_s: float) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last_progress_s = now_s

    def progress(self, at_s: float) -> None:
        """A sign of progress inside a running request (a generated token) at ``at_s``."""
        if self.in_flight > 0 and (self.last_progress_s is None or at_s > self.last_progress_s):
            self.last_progress_s = at_s

    def stalled_for_s(self, now_s: float) -> float:
        if self.in_flight == 0 or self.last_progress_s is None:
            return 0.0
        return max(0.0, now_s - self.last_progress_s)

    def check(self, now_s: float) -> Optional[str]:
        """A reason string if the request path is stalled, else None."""
        stalled = self.stalled_for_s(now_s)
        if stalled > self.stall_after_s:
            return (
                f"request path stalled: {self.in_flight} request(s) in flight and none completed for "
                f"{stalled:.1f}s (limit {self.stall_after_s:.1f}s, health.stall_after_s)"
            )
        return None
