"""Per-replica load signals for the autoscaler (Ray Serve's ``record_autoscaling_stats``).

Pure: the caller passes the time, so the windows are tested on a fake clock.
"""

from __future__ import annotations

from collections import deque

from autoscaling.signals import ARRIVALS, ARRIVALS_TOTAL, GATEWAY_QUEUED, MEMORY_HEADROOM, SERVICE, STARTUP

__all__ = ["LoadSignals", "MEMORY_HEADROOM"]


# A gateway not heard from for this long (it died, or dispatched nothing) no longer counts: its last
# report may be a queue that has since expired or left with it.
GATEWAY_REPORT_TTL_S = 60.0


class LoadSignals:
    """Arrivals (per second over a sliding window, and in total), mean service time, and the replica's start-up time.

    Args:
        started_s: When the replica began serving (same clock as the calls).
        startup_s: Constructor start to ready, seconds: the replica lead time the policy learns.
        window_s: The sliding window.
    """

    def __init__(self, started_s: float, startup_s: float, window_s: float = 30.0):
        self.started_s, self.startup_s, self.window_s = started_s, startup_s, window_s
        self._arrivals: deque[tuple[float, int]] = deque()
        self._total = 0
        self._service: deque[tuple[float, float]] = deque()
        self._gateway_queues: dict[str, tuple[float, int]] = {}

    def gateway_queue(self, now_s: float, gateway: str, queued: int) -> None:
        """A gateway's queue length, as it sent it with a request (after taking that request out)."""
        self._gateway_queues[gateway] = (now_s, queued)

    def arrival(self, now_s: float, count: int = 1) -> None:
        """Count arrivals; behind the gateway one dispatched request carries the requests that arrived
        (admitted or not) since the previous one, so rejected demand still reaches the autoscaler."""
        self._arrivals.append((now_s, count))
        self._total += count

    def served(self, now_s: float, service_s: float) -> None:
        self._service.append((now_s, service_s))

    def snapshot(self, now_s: float) -> dict[str, float]:
        """The signals as Ray's custom autoscaling metrics (names shared with the policy adapter)."""
        horizon = now_s - self.window_s
        while self._arrivals and self._arrivals[0][0] < horizon:
            self._arrivals.popleft()
        while self._service and self._service[0][0] < horizon:
            self._service.popleft()
        # A young replica has not seen a whole window yet: divide by what it has seen.
        span = max(1e-3, min(self.window_s, now_s - self.started_s))
        mean = sum(s for _, s in self._service) / len(self._service) if self._service else 0.0
        # The total lets the policy count exactly the arrivals between two of its decisions; the
        # windowed rate lags a change by half the window and is only the fallback.
        out = {
            ARRIVALS: sum(n for _, n in self._arrivals) / span,
            ARRIVALS_TOTAL: float(self._total),
            SERVICE: mean,
            STARTUP: self.startup_s,
        }
        if self._gateway_queues:  # behind gateways only: a direct ingress has Ray's own queue count
            fresh = {g: v for g, v in self._gateway_queues.items() if now_s - v[0] <= GATEWAY_REPORT_TTL_S}
            self._gateway_queues = fresh
            out[GATEWAY_QUEUED] = float(sum(n for _, n in fresh.values()))
        return out
