"""The end-to-end bench's measurement of replica start-up (``bench/autoscaling_e2e.py``), on samples.

The simulator's replica start is the median of what this measures, so a wrong pairing of STARTING and
RUNNING moves every simulated replica (no Ray here: the samples are Serve's replica counts over time).
"""

from bench.autoscaling_e2e import ReplicaStarts


def feed(samples):
    starts = ReplicaStarts()
    for now, starting, running in samples:
        starts.sample(now, starting, running)
    return starts


def test_replicas_that_start_and_run_are_timed_from_starting_to_running():
    starts = feed([(0, 0, 1), (10, 2, 1), (15, 1, 2), (16, 0, 3)])
    assert starts.transitions == [(10, 15), (10, 16)]
    # A node that joined while the replica waited: the start counts from the join.
    assert starts.net_of_joins([12.0]) == [3.0, 4.0]


def test_replicas_stopped_while_starting_leave_no_stamp_behind():
    # Ray's default scales 1 -> 4, then down to 1 before the three new replicas ran (Serve stops
    # replicas that are not RUNNING first), then 1 -> 2 much later: the one replica that ran started at
    # 200 s, and took 6 s. Pairing it with a stamp left by a stopped replica measured 196 s.
    starts = feed([(0, 0, 1), (10, 3, 1), (40, 0, 1), (200, 1, 1), (206, 0, 2)])
    assert starts.transitions == [(200, 206)]


def test_a_replaced_replica_is_timed_from_its_own_start():
    # A RUNNING replica stopped and a new one STARTING in the same sample: the count of both is unchanged.
    starts = feed([(0, 0, 2), (50, 1, 1), (57, 0, 2)])
    assert starts.transitions == [(50, 57)]
