"""Deployment-wide admission: one bounded priority queue, deadlines, and an honest Retry-After.

Pure: no Ray, no asyncio, no clock reads. The gateway passes ``now_s`` and
drives it from its event loop; tests drive it on a fake clock.

The model: the gateway holds every request waiting for the deployment in one
queue (so the bound holds whatever the number of proxies and handles), ordered
by priority class and then arrival, and lets at most ``capacity`` requests run
on the replicas at once. Completions measure how fast the replicas drain it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Optional

# Before any completion is measured, or when the replicas are gone, a request's
# wait cannot be estimated; Retry-After falls back to the configured constant.
# A replica start-up not yet observed is assumed to take this long.
STARTUP_PRIOR_S = 60.0
# Service-time samples averaged for the drain rate: recent enough to follow a
# change of model speed within a few seconds of load, long enough to be stable.
SERVICE_WINDOW = 64

# Outcomes every received request ends in exactly one of (the counters reconcile on them).
SERVED, REJECTED, EXPIRED, FAILED = "served", "rejected", "expired", "failed"
OUTCOMES = (SERVED, REJECTED, EXPIRED, FAILED)


@dataclass(eq=False)
class Ticket:
    """One admitted request waiting in (or dispatched from) the queue.

    ``handle`` is for the caller (the gateway keeps its future there).
    """

    priority: int
    deadline_s: Optional[float]
    handle: object = None
    queued: bool = True
    settled: bool = False  # its dispatched run has been accounted for (slot freed, outcome counted)


@dataclass(frozen=True)
class Rejection:
    """Why a request is refused, and when retrying makes sense."""

    reason: str  # queue_full | shed | deadline_unreachable
    message: str
    retry_after_s: float


@dataclass
class Admission:
    """The result of ``offer``: the new ticket or a rejection, plus any lower-class ticket it displaced."""

    ticket: Optional[Ticket] = None
    rejection: Optional[Rejection] = None
    shed: list[tuple[Ticket, Rejection]] = field(default_factory=list)


def share_of(total: int, members: int, rank: Optional[int]) -> int:
    """One member's part of ``total`` split among ``members`` gateways.

    The parts of ranks ``0 .. members-1`` add up to ``total`` exactly (the first ``total % members``
    ranks take one more). A rank that is unknown or outside the membership (it is changing) takes
    the larger part, so a gateway never starves while the controller catches up.
    """
    members = max(1, members)
    base, extra = divmod(max(0, total), members)
    if rank is None or not 0 <= rank < members:
        return base + (1 if extra else 0)
    return base + (1 if rank < extra else 0)


def orphaned_calls(
    now_s: float,
    replicas: list[tuple[float, dict[str, int]]],
    gateways: dict[str, float],
    me: str,
    replica_stale_s: float,
    gateway_stale_s: float,
) -> int:
    """Calls still running on the replicas for a gateway that is gone (it died, or stopped answering).

    Args:
        now_s: The reader's wall clock.
        replicas: Each model replica's last report: (when it was made, calls running by the gateway that
            sent them). A report older than ``replica_stale_s`` is ignored: its replica died, and its
            calls with it (a replica with calls running reports again well within that time).
        gateways: Each gateway's last heartbeat (when). A gateway with a heartbeat older than
            ``gateway_stale_s`` is taken for gone; its calls then count here.
        me: The reader's own id: always alive.
        replica_stale_s: How old a replica's report may be and still count.
        gateway_stale_s: How old a gateway's heartbeat may be and the gateway still count as alive.
    """
    live = {g for g, at_s in gateways.items() if now_s - at_s <= gateway_stale_s} | {me}
    return sum(
        n
        for at_s, load in replicas
        if now_s - at_s <= replica_stale_s
        for owner, n in load.items()
        if owner not in live
    )


class DrainModel:
    """How fast the replicas drain the queue, and how long a given position waits.

    Per-replica drain rate is Little's law on a full replica: ``slots / mean
    time a dispatched request takes``. The mean is over recent completions, so
    it follows the live service time; under overload (when estimates matter)
    every slot is busy and the law is exact.
    """

    def __init__(self, slots_per_replica: int, fallback_s: float):
        self.slots_per_replica = slots_per_replica
        self.fallback_s = fallback_s
        self._service: deque[float] = deque(maxlen=SERVICE_WINDOW)
        self.running = 0
        self.starting = 0
        self.startup_remaining_s = 0.0
        # This gateway's place among the deployment's gateways: it owns its share of the slots.
        self.members = 1
        self.rank: Optional[int] = None
        # Calls a gone gateway left running on the replicas: they hold slots nobody here dispatched.
        self.orphaned = 0

    def completed(self, service_s: float) -> None:
        self._service.append(max(0.0, service_s))

    def replicas(self, running: int, starting: int, startup_remaining_s: float) -> None:
        self.running, self.starting, self.startup_remaining_s = running, starting, max(0.0, startup_remaining_s)

    @property
    def mean_service_s(self) -> Optional[float]:
        return sum(self._service) / len(self._service) if self._service else None

    def _slots(self, replicas: int) -> int:
        """This gateway's share of the slots of ``replicas`` replicas."""
        return share_of(replicas * self.slots_per_replica, self.members, self.rank)

    @property
    def capacity(self) -> int:
        """Requests this gateway lets run on the replicas at once: its share of their slots.

        Less this gateway's part of the calls a gone gateway left running (``orphaned``): the deployment
        stays within its slots while those finish, whichever gateway takes the dead one's place.

        At least one: with no replica running, one request still goes through to Ray Serve's router
        and waits there (what Ray's autoscaler sees to scale up from zero); with fewer slots than
        gateways, each still dispatches one (the deployment is then over-committed by at most
        ``members - 1`` requests, which wait in Ray's router, never lost).
        """
        orphaned = share_of(self.orphaned, self.members, self.rank) if self.orphaned else 0
        return max(1, self._slots(self.running) - orphaned)

    def drain_rate_per_s(self) -> Optional[float]:
        """Completions per second through this gateway's slots (None before any completion)."""
        mean = self.mean_service_s
        if mean is None or self.running == 0:
            return None
        return self.capacity / max(mean, 1e-3)

    def wait_s(self, position: int) -> Optional[float]:
        """Seconds until ``position`` more requests have completed (None: no estimate possible).

        Replicas still starting add their slots once their start-up is over.
        """
        if position <= 0:
            return 0.0
        mean = self.mean_service_s
        if mean is None:
            return None
        per_slot = 1.0 / max(mean, 1e-3)
        now_rate = self._slots(self.running) * per_slot
        if self.starting == 0:
            return position / now_rate if now_rate > 0 else None
        later_rate = self._slots(self.running + self.starting) * per_slot
        done_by_startup = now_rate * self.startup_remaining_s
        if done_by_startup >= position:
            return position / now_rate
        return self.startup_remaining_s + (position - done_by_startup) / later_rate


class AdmissionQueue:
    """The bounded priority queue and its counters.

    Args:
        max_queued: Requests allowed to wait, deployment-wide.
        classes: Priority class names, highest first.
        drain: The drain model used for Retry-After and deadline checks.
    """

    def __init__(self, max_queued: int, classes: tuple[str, ...], drain: DrainModel):
        self.max_queued_total = max_queued
        self.max_queued = max_queued
        self.classes = classes
        self.drain = drain
        self._queues: list[deque[Ticket]] = [deque() for _ in classes]
        self.in_flight = 0
        self.received = 0
        self.outcomes: dict[tuple[str, str], int] = {}

    def members(self, members: int, rank: Optional[int]) -> None:
        """Take this gateway's share of the deployment's queue bound and slots among ``members`` gateways.

        The shares add up to the deployment's bound exactly while ranks are ``0 .. members-1``. A
        smaller share than the requests already waiting sheds nobody: they drain, and new ones wait.
        """
        self.drain.members, self.drain.rank = max(1, members), rank
        self.max_queued = share_of(self.max_queued_total, members, rank)

    # -- bookkeeping ---------------------------------------------------------

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues)

    def queued_by_class(self) -> dict[str, int]:
        return {name: len(q) for name, q in zip(self.classes, self._queues)}

    def arrived(self) -> None:
        """Count a request that reached the gateway (before any check: every one is answered once)."""
        self.received += 1

    def record(self, outcome: str, reason: str) -> None:
        """Count a request's one final answer."""
        key = (outcome, reason)
        self.outcomes[key] = self.outcomes.get(key, 0) + 1

    def counts(self) -> dict[str, int]:
        """Totals per outcome, plus ``received``; they reconcile once nothing is pending."""
        out = {o: 0 for o in OUTCOMES}
        for (outcome, _), n in self.outcomes.items():
            out[outcome] += n
        out["received"] = self.received
        out["pending"] = len(self) + self.in_flight
        return out

    def _ahead_of(self, priority: int) -> int:
        # Everything of this class or a higher one is served first, plus the requests already running.
        return sum(len(q) for q in self._queues[: priority + 1])

    def _retry_after_s(self, position: int) -> float:
        wait = self.drain.wait_s(position)
        return self.drain.fallback_s if wait is None else wait

    # -- the queue -----------------------------------------------------------

    def offer(self, now_s: float, priority: int, deadline_s: Optional[float]) -> Admission:
        """Admit a request into the queue, or say why not. Always answers at once."""
        free_slots = self.drain.capacity - self.in_flight
        ahead = self._ahead_of(priority)
        # Requests ahead of it beyond the free slots must complete before it starts.
        position = max(0, ahead + 1 - max(0, free_slots))
        if deadline_s is not None:
            wait = self.drain.wait_s(position)
            mean = self.drain.mean_service_s or 0.0
            if now_s >= deadline_s or (wait is not None and now_s + wait + mean > deadline_s):
                est = "unknown" if wait is None else f"{wait + mean:.3f} s"
                return Admission(
                    rejection=Rejection(
                        "deadline_unreachable",
                        f"the request cannot be answered within its deadline ({max(0.0, deadline_s - now_s):.3f} s "
                        f"left, estimated {est} with {ahead} requests ahead); retry later or allow more time",
                        self._retry_after_s(position),
                    )
                )
        shed: list[tuple[Ticket, int]] = []
        # The bound is on requests that wait: one a free slot takes at once never waits, so a
        # bound of 0 means "nobody waits", not "nobody gets in".
        if len(self) + 1 - max(0, free_slots) > self.max_queued:
            victim_class = next(
                (c for c in range(len(self.classes) - 1, priority, -1) if self._queues[c]), None
            )
            if victim_class is None:
                return Admission(
                    rejection=Rejection(
                        "queue_full",
                        f"the deployment's queue is full ({len(self)} of {self.max_queued} requests waiting, "
                        f"{ahead} at priority {self.classes[priority]!r} or higher); retry after the Retry-After delay",
                        self._retry_after_s(position),
                    )
                )
            # The newest request of the lowest class waiting gives way: it has waited least.
            victim = self._queues[victim_class].pop()
            victim.queued = False
            shed.append((victim, victim_class))
        ticket = Ticket(priority, deadline_s)
        self._queues[priority].append(ticket)
        return Admission(
            ticket=ticket,
            shed=[
                (
                    victim,
                    Rejection(
                        "shed",
                        f"shed from the queue for higher-priority work (class {self.classes[c]!r}); "
                        "retry after the Retry-After delay",
                        # Where it would stand now, behind the request that displaced it.
                        self._retry_after_s(self._ahead_of(c) + 1),
                    ),
                )
                for victim, c in shed
            ],
        )

    def next_to_run(self) -> Optional[Ticket]:
        """Pop the next ticket to dispatch if a slot is free: highest class first, FIFO within it."""
        if self.in_flight >= self.drain.capacity:
            return None
        for q in self._queues:
            if q:
                t = q.popleft()
                t.queued = False
                self.in_flight += 1
                return t
        return None

    def finished(self, service_s: Optional[float]) -> None:
        """A dispatched request completed (``service_s`` None: it failed without measuring the model)."""
        self.in_flight -= 1
        if service_s is not None:
            self.drain.completed(service_s)

    def requeue(self, ticket: Ticket) -> None:
        """Hand a dispatched request back to the head of its class (its replica went away before answering)."""
        self.in_flight -= 1
        ticket.queued = True
        self._queues[ticket.priority].appendleft(ticket)

    def remove(self, ticket: Ticket) -> bool:
        """Take a still-queued ticket out (deadline passed, client gone). False if it already left."""
        if not ticket.queued:
            return False
        self._queues[ticket.priority].remove(ticket)
        ticket.queued = False
        return True


class StartupTracker:
    """Learns how long a replica takes to start from the replica counts the gateway polls.

    A start-up is timed from the poll that first saw the replica STARTING to the
    poll that saw one more RUNNING; the estimate is the mean of what was seen,
    with the prior counted as one observation.
    """

    def __init__(self, prior_s: float = STARTUP_PRIOR_S):
        self._sum, self._n = prior_s, 1
        self._since: deque[float] = deque()
        self._running = 0

    @property
    def estimate_s(self) -> float:
        return self._sum / self._n

    def observe(self, now_s: float, running: int, starting: int) -> float:
        """Update from one poll; returns the seconds the oldest start-up still needs (0 if none)."""
        became_ready = max(0, running - self._running)
        self._running = running
        for _ in range(min(became_ready, len(self._since))):
            self._sum += now_s - self._since.popleft()
            self._n += 1
        while len(self._since) > starting:
            self._since.pop()  # a start-up was abandoned (scale-down before ready)
        while len(self._since) < starting:
            self._since.append(now_s)
        if not self._since:
            return 0.0
        return max(0.0, self.estimate_s - (now_s - self._since[0]))
