"""The deployment-wide admission queue on a fake clock: bound, priorities, deadlines, Retry-After, counters."""

import pytest

from serving._private.admission import (
    EXPIRED,
    REJECTED,
    SERVED,
    AdmissionQueue,
    DrainModel,
    StartupTracker,
    orphaned_calls,
)
from serving._private.ledger import CallsByGateway

INTERACTIVE, BATCH = 0, 1


def make(max_queued=4, slots=1, running=1, service_s=None, fallback_s=1.0):
    drain = DrainModel(slots, fallback_s)
    drain.replicas(running, 0, 0.0)
    if service_s is not None:
        drain.completed(service_s)
    return AdmissionQueue(max_queued, ("interactive", "batch"), drain)


def fill_slots(q):
    while q.next_to_run() is not None:
        pass


def offer(q, now_s, priority, deadline_s=None):
    """Offer a request, then dispatch what fits, as the gateway does after each admission."""
    r = q.offer(now_s, priority, deadline_s)
    fill_slots(q)
    return r


def test_bound_holds_and_admitted_requests_wait_in_order():
    q = make(max_queued=3, slots=2, service_s=0.5)
    tickets = [q.offer(0.0, INTERACTIVE, None).ticket for _ in range(2)]
    assert [q.next_to_run() for _ in range(2)] == tickets
    tickets += [q.offer(0.0, INTERACTIVE, None).ticket for _ in range(3)]
    # Two run at once, three wait: all five admitted.
    assert q.next_to_run() is None  # slots full
    rejected = q.offer(0.0, INTERACTIVE, None)
    assert rejected.ticket is None and rejected.rejection.reason == "queue_full"
    assert "3 of 3 requests waiting" in rejected.rejection.message
    q.finished(0.5)
    assert q.next_to_run() is tickets[2]  # FIFO within a class


def test_retry_after_is_computed_from_drain_rate_and_position_and_grows_with_the_queue():
    # One replica, 2 slots, each request takes 0.5 s in a slot: it drains 4 requests/s.
    waits = []
    for queued in (1, 3, 7):
        q = make(max_queued=queued, slots=2, service_s=0.5)
        for _ in range(queued + 2):
            offer(q, 0.0, INTERACTIVE)
        waits.append(q.offer(0.0, INTERACTIVE, None).rejection.retry_after_s)
    # Position = everything queued ahead + 1; wait = position / 4 per second.
    assert waits == pytest.approx([2 / 4, 4 / 4, 8 / 4])


def test_retry_after_counts_replicas_already_starting():
    q = make(max_queued=8, slots=1, service_s=1.0)  # 1 replica draining 1/s
    for _ in range(9):
        offer(q, 0.0, INTERACTIVE)
    alone = q.offer(0.0, INTERACTIVE, None).rejection.retry_after_s
    assert alone == pytest.approx(9.0)
    # Three more replicas ready in 2 s: 2 done by then, the other 7 at 4/s.
    q.drain.replicas(1, 3, 2.0)
    helped = q.offer(0.0, INTERACTIVE, None).rejection.retry_after_s
    assert helped == pytest.approx(2.0 + 7 / 4)


def test_retry_after_falls_back_to_the_constant_before_any_completion():
    q = make(max_queued=1, fallback_s=3.0)
    offer(q, 0.0, INTERACTIVE)
    offer(q, 0.0, INTERACTIVE)
    assert q.offer(0.0, INTERACTIVE, None).rejection.retry_after_s == 3.0


def test_higher_class_is_served_first_and_displaces_the_newest_lower_one():
    q = make(max_queued=3, slots=1, service_s=0.1)
    running = q.offer(0.0, BATCH, None).ticket
    assert q.next_to_run() is running
    b = [q.offer(0.0, BATCH, None).ticket for _ in range(3)]
    hi = q.offer(0.0, INTERACTIVE, None)
    assert hi.ticket is not None, "interactive is admitted into a queue full of batch work"
    (victim, why), = hi.shed
    assert victim is b[-1] and why.reason == "shed" and not victim.queued
    assert q.queued_by_class() == {"interactive": 1, "batch": 2}
    # A batch request cannot displace anything: it is refused.
    assert q.offer(0.0, BATCH, None).rejection.reason == "queue_full"
    q.finished(0.1)
    assert q.next_to_run() is hi.ticket  # jumps the older batch requests


def test_a_queue_full_of_interactive_refuses_more_interactive():
    q = make(max_queued=2, slots=1, service_s=0.1)
    for _ in range(3):
        offer(q, 0.0, INTERACTIVE)
    assert q.offer(0.0, INTERACTIVE, None).rejection.reason == "queue_full"


def test_batch_waits_behind_interactive_in_its_retry_after():
    q = make(max_queued=4, slots=1, service_s=1.0)
    offer(q, 0.0, BATCH)
    for _ in range(2):
        q.offer(0.0, INTERACTIVE, None)
    for _ in range(2):
        q.offer(0.0, BATCH, None)
    hi = q.offer(0.0, INTERACTIVE, None)  # displaces a batch request
    (_, why), = hi.shed
    # The shed batch request would wait behind 3 interactive + 1 batch still queued.
    assert why.retry_after_s == pytest.approx(5.0)


def test_deadline_that_cannot_be_met_is_rejected_at_admission():
    q = make(max_queued=10, slots=1, service_s=1.0)
    for _ in range(4):
        offer(q, 0.0, INTERACTIVE)
    # 3 queued ahead + itself = 4 s wait, + 1 s of service: a 2 s deadline cannot be met.
    r = q.offer(10.0, INTERACTIVE, 12.0)
    assert r.rejection.reason == "deadline_unreachable" and r.rejection.retry_after_s == pytest.approx(4.0)
    assert q.offer(10.0, INTERACTIVE, 15.5).ticket is not None
    # A batch request's wait includes the interactive ones ahead but an interactive one's does not
    # include batch work.
    assert q.offer(10.0, BATCH, 15.9).rejection is not None


def test_no_estimate_yet_admits_a_deadline_request_and_leaves_expiry_to_the_queue():
    q = make(max_queued=10, slots=1)
    offer(q, 0.0, INTERACTIVE)
    assert q.offer(0.0, INTERACTIVE, 0.5).ticket is not None
    assert q.offer(1.0, INTERACTIVE, 0.5).rejection.reason == "deadline_unreachable"  # already past


def test_remove_and_requeue():
    q = make(max_queued=4, slots=1, service_s=0.1)
    a, b = (q.offer(0.0, INTERACTIVE, None).ticket for _ in range(2))
    assert q.next_to_run() is a
    assert q.remove(b) and not q.remove(b)
    assert not q.remove(a)  # running, not queued
    q.requeue(a)  # its replica went away: back at the head, the slot freed
    assert q.in_flight == 0 and q.next_to_run() is a


def test_counters_reconcile():
    q = make(max_queued=1, slots=1, service_s=0.1)
    for _ in range(4):
        q.arrived()
    a = offer(q, 0.0, INTERACTIVE).ticket
    b = offer(q, 0.0, INTERACTIVE).ticket
    q.record(REJECTED, q.offer(0.0, INTERACTIVE, None).rejection.reason)
    assert q.counts()["pending"] == 2
    q.finished(0.1)
    q.record(SERVED, "ok")
    assert q.remove(b)
    q.record(EXPIRED, "deadline")
    q.record(REJECTED, "unauthorized")
    c = q.counts()
    assert c["pending"] == 0 and a is not None
    assert c["received"] == c["served"] + c["rejected"] + c["expired"] + c["failed"] == 4


def test_startup_tracker_learns_and_counts_down():
    t = StartupTracker(prior_s=60.0)
    assert t.observe(0.0, 1, 0) == 0.0
    assert t.observe(10.0, 1, 2) == pytest.approx(60.0)
    assert t.observe(40.0, 1, 2) == pytest.approx(30.0)
    # Both became ready at 50 s (40 s each): the estimate is (60 + 40 + 40) / 3.
    assert t.observe(50.0, 3, 0) == 0.0
    assert t.estimate_s == pytest.approx(140 / 3)
    t.observe(60.0, 3, 1)
    assert t.observe(60.0, 3, 0) == 0.0  # abandoned: no sample
    assert t.estimate_s == pytest.approx(140 / 3)


def test_with_no_replica_running_one_request_reaches_ray_so_scale_from_zero_sees_demand():
    q = make(max_queued=4, slots=2, running=0)
    a, b = (offer(q, 0.0, INTERACTIVE).ticket for _ in range(2))
    assert not a.queued and b.queued and q.in_flight == 1
    q.drain.replicas(1, 0, 0.0)
    assert q.next_to_run() is b  # the replica is up: its slots open


def test_a_zero_queue_bound_admits_a_request_a_free_slot_takes_at_once():
    # max_queued_requests = 0 means "nobody waits", not "nobody gets in": a request that runs
    # at once never waits, so a free slot takes it; only a request that would wait is refused.
    q = make(max_queued=0, slots=2, service_s=0.5)
    first = offer(q, 0.0, INTERACTIVE)
    second = offer(q, 0.0, INTERACTIVE)
    assert first.ticket is not None and second.ticket is not None and q.in_flight == 2
    third = offer(q, 0.0, INTERACTIVE)
    assert third.rejection is not None and third.rejection.reason == "queue_full"
    q.finished(0.5)
    assert offer(q, 0.1, BATCH).ticket is not None and len(q) == 0


def test_the_bound_counts_waiting_requests_not_running_ones():
    q = make(max_queued=1, slots=2, service_s=0.5)
    assert all(offer(q, 0.0, INTERACTIVE).ticket is not None for _ in range(3))  # 2 run, 1 waits
    assert q.in_flight == 2 and len(q) == 1
    assert offer(q, 0.0, INTERACTIVE).rejection.reason == "queue_full"


def test_shares_add_up_to_the_whole_and_an_unknown_rank_takes_the_larger_part():
    from serving._private.admission import share_of

    for total in range(0, 40):
        for members in range(1, 7):
            parts = [share_of(total, members, r) for r in range(members)]
            assert sum(parts) == total and max(parts) - min(parts) <= 1
            assert share_of(total, members, None) == max(parts) == share_of(total, members, members + 3)


def test_two_gateways_split_the_bound_and_the_slots_and_a_survivor_takes_them_all():
    queues = []
    for rank in (0, 1):
        drain = DrainModel(3, 1.0)  # 3 slots per replica
        drain.replicas(1, 0, 0.0)
        drain.completed(0.5)
        q = AdmissionQueue(5, ("interactive", "batch"), drain)
        q.members(2, rank)
        queues.append(q)
    assert [q.drain.capacity for q in queues] == [2, 1] and [q.max_queued for q in queues] == [3, 2]
    for q in queues:
        while offer(q, 0.0, INTERACTIVE).ticket is not None:
            pass
    # Deployment-wide: never more running than the replica's 3 slots, never more waiting than 5.
    assert sum(q.in_flight for q in queues) == 3 and sum(len(q) for q in queues) == 5
    # Each Retry-After counts only its own share of the drain: the same position waits longer on the
    # gateway with fewer slots.
    assert queues[1].drain.wait_s(2) == pytest.approx(2 * queues[0].drain.wait_s(2))
    survivor = queues[1]
    survivor.members(1, 1)  # the other gateway died; its rank is out of range now
    assert survivor.drain.capacity == 3 and survivor.max_queued == 5
    fill_slots(survivor)
    assert survivor.in_flight == 3


def test_fewer_slots_than_gateways_still_lets_each_dispatch_one():
    drain = DrainModel(1, 1.0)
    drain.replicas(1, 0, 0.0)
    q = AdmissionQueue(0, ("interactive",), drain)
    q.members(3, 2)
    assert q.drain.capacity == 1 and q.max_queued == 0


# -- calls a gone gateway left running on the replicas -----------------------------------------


def test_only_calls_of_gateways_gone_quiet_count_as_orphaned_and_stale_replica_reports_do_not():
    now, stale = 1000.0, 5.0
    replicas = [
        (now - 1.0, {"me": 2, "alive": 1, "dead": 2}),
        (now - 0.5, {"dead": 1, "never-heard": 1}),
        (now - 30.0, {"dead": 4}),  # a replica that died: its calls died with it
    ]
    gateways = {"alive": now - 1.0, "dead": now - 12.0}
    assert orphaned_calls(now, replicas, gateways, "me", stale, 2.0) == 4
    # The reader never counts its own calls, even before its first heartbeat is written.
    assert orphaned_calls(now, [(now, {"me": 3})], {}, "me", stale, 2.0) == 0


def test_orphaned_calls_take_their_slots_out_of_each_gateways_share():
    drain = DrainModel(slots_per_replica=2, fallback_s=1.0)
    drain.replicas(2, 0, 0.0)  # 4 slots
    drain.members, drain.rank = 2, 0
    assert drain.capacity == 2
    drain.orphaned = 2  # split like the slots: one each, the deployment stays within its 4
    assert drain.capacity == 1
    drain.rank = 1
    assert drain.capacity == 1
    drain.members, drain.rank = 1, 0  # the survivor alone: all the slots, less all the orphans
    assert drain.capacity == 2
    drain.orphaned = 9  # more than the slots: still one, so the queue never stalls for good
    assert drain.capacity == 1


def test_a_gateway_replacing_a_dead_one_dispatches_only_into_slots_the_dead_ones_calls_left_free():
    q = make(max_queued=8, slots=4, running=1)
    q.drain.orphaned = 3
    for i in range(4):
        q.offer(float(i), INTERACTIVE, None)
    fill_slots(q)
    assert q.in_flight == 1 and len(q) == 3
    q.drain.orphaned = 0  # the dead gateway's calls finished
    fill_slots(q)
    assert q.in_flight == 4


def test_a_replica_writes_its_calls_by_gateway_once_a_period_and_removes_them_once_done():
    calls = CallsByGateway()
    assert calls.due() is None  # nothing ever ran: nothing to write
    calls.started("g1")
    calls.started("g1")
    calls.started(None)  # direct HTTP, no gateway: not in the ledger
    calls.started("g2")
    assert calls.due() == {"g1": 2, "g2": 1}
    assert calls.due() == {"g1": 2, "g2": 1}  # rewritten each period while calls run: the entry stays fresh
    for g in ("g1", "g1", "g2", None):
        calls.ended(g)
    assert calls.due() == {}  # once: the entry is removed
    assert calls.due() is None
