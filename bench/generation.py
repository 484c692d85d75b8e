"""Text generation: today's static path against the iteration scheduler, on the same model, through HTTP.

One randomly initialised Llama-style model (``serving.testing.make_random_llama``, about 38M parameters by
default: big enough that a decode step is matrix work, as on a real model) is served on a local Ray Serve
twice in turn, with ``generation.scheduler: static`` (batches of whole generations through
``@serve.batch``; each stream its own ``generate``) and ``iteration`` (one scheduler on the model thread).
Each is offered the same open-loop Poisson arrivals at several rates: short requests (a sentence, 16 new
tokens) interleaved with long ones (a paragraph, 256 new tokens), half of them streamed, all greedy.

Per setup and rate it measures output tokens/s, the time to first token of the short requests (the first
streamed text, or the whole answer for a non-streamed one), the gaps between streamed chunks, and whether
every request got a 200. ``max_rate_within_slo`` is the highest rate whose short requests' TTFT p99 is
at most ``--slo-s`` (1 s) with every request answered. Greedy answers of the two setups are compared
request by request. Then (unless ``--skip-overload``) the scheduler, with a KV-cache budget that binds, is
offered streams at 3x its ``max_rate_within_slo``: every answer must be 200, 413 or 429, with no
out-of-memory error. Prints one JSON document:

    PYTHONPATH=. .venv/bin/python bench/generation.py            # 30 s per rate
    PYTHONPATH=. .venv/bin/python bench/generation.py --quick    # 12 s per rate
"""

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time

SHORT_PROMPT = "The quick brown fox jumps over the lazy dog."
LONG_PROMPT = " ".join(
    [
        "GPU nodes take minutes to provision; scale before the spike arrives.",
        "A replica joins only once its model is loaded and warm.",
        "Bounded queues answer fast with 429 and Retry-After instead of hanging.",
    ]
    * 3
)


def pct(values, q):
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))], 4)


def workload(rate_per_s, duration_s, seed, long_fraction, stream_fraction, short_tokens, long_tokens):
    """The arrivals of one phase: (send time, request body, is_short), the same for every setup."""
    rng = random.Random(seed)
    t, out = 0.0, []
    while True:
        t += rng.expovariate(rate_per_s)
        if t >= duration_s:
            return out
        long = rng.random() < long_fraction
        # A per-request suffix keeps prompts distinct (no two answers are the same by construction).
        prompt = (LONG_PROMPT if long else SHORT_PROMPT) + f" Request {len(out)}."
        body = {
            "prompt": prompt,
            "max_tokens": long_tokens if long else short_tokens,
            "temperature": 0,
            "stream": rng.random() < stream_fraction,
        }
        out.append((t, body, not long))


async def one(session, url, t0, send_s, body, timeout_s):
    """Send one request at ``t0 + send_s``; (status, ttft_s, chunk gaps, completion tokens, text, latency)."""
    import aiohttp  # here, not at the top: bench/prefill_chunk.py imports this module where aiohttp is absent

    await asyncio.sleep(max(0.0, t0 + send_s - time.monotonic()))
    start = time.monotonic()
    gaps, first, text, tokens = [], None, "", 0
    try:
        async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
            if r.status != 200:
                await r.read()
                return r.status, None, [], 0, None, time.monotonic() - start
            if not body["stream"]:
                data = await r.json()
                done = time.monotonic()
                return 200, done - start, [], data["usage"]["completion_tokens"], data["choices"][0]["text"], done - start
            last = None
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return 500, None, [], 0, None, time.monotonic() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                piece = chunk["choices"][0]["text"] if chunk.get("choices") else ""
                if piece:
                    now = time.monotonic()
                    if first is None:
                        first = now - start
                    elif last is not None:
                        gaps.append(now - last)
                    last = now
                    text += piece
            done = time.monotonic()
            return 200, first if first is not None else done - start, gaps, tokens, text, done - start
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return 0, None, [], 0, None, time.monotonic() - start


async def phase(url, arrivals, timeout_s):
    import aiohttp

    t0 = time.monotonic() + 0.5
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as session:
        results = await asyncio.gather(
            *(
                one(session, url, t0, s, {**b, "stream_options": {"include_usage": True}} if b["stream"] else b, timeout_s)
                for s, b, _ in arrivals
            )
        )
    return results, time.monotonic() - t0


def summarise(rate, arrivals, results, wall_s, slo_s):
    short_ttft = [r[1] for (_, _, short), r in zip(arrivals, results) if short and r[0] == 200]
    # A non-streamed answer's first token arrives with the whole answer: its TTFT is its latency.
    streamed = [r[1] for (_, b, short), r in zip(arrivals, results) if short and r[0] == 200 and b["stream"]]
    gaps = [g for r in results for g in r[2]]
    tokens = sum(r[3] for r in results)
    ok = sum(r[0] == 200 for r in results)
    p99 = pct(short_ttft, 0.99)
    return {
        "rate_per_s": rate,
        "requests": len(results),
        "answered_200": ok,
        "statuses": sorted({r[0] for r in results}),
        "tokens_per_s": round(tokens / wall_s, 1),
        "ttft_p50_s": pct(short_ttft, 0.5),
        "ttft_p99_s": p99,
        "ttft_p99_streamed_s": pct(streamed, 0.99),
        "itl_p50_s": pct(gaps, 0.5),
        "itl_p99_s": pct(gaps, 0.99),
        "latency_p99_s": pct([r[5] for r in results if r[0] == 200], 0.99),
        "within_slo": bool(p99 is not None and p99 <= slo_s and ok == len(results)),
    }


def overload(port, model_dir, args, rate, seed):
    """Streams only, at ``rate``, against the scheduler with a KV budget that binds (``--overload-sequences``
    long sequences); 5 % ask for more tokens than the budget holds. Every answer must be 200, 413 or 429."""
    from transformers import AutoConfig, AutoTokenizer

    from deployments._scheduler import kv_bytes_per_token

    per_token = kv_bytes_per_token(AutoConfig.from_pretrained(model_dir), 4)
    prompt_tokens = len(AutoTokenizer.from_pretrained(model_dir)(LONG_PROMPT + " Request 1000.")["input_ids"])
    long_peak = prompt_tokens + args.long_tokens
    budget = args.overload_sequences * long_peak * per_token
    name = "gen-overload"
    deploy(name, model_dir, "iteration", args, kv_cache_bytes=budget)
    arrivals = workload(rate, args.duration_s, seed, args.long_fraction, 1.0, args.short_tokens, args.long_tokens)
    rng = random.Random(seed)
    for _, body, _ in arrivals:
        if rng.random() < 0.05:
            body["max_tokens"] = 1900  # over the budget alone: 413
    url = f"http://127.0.0.1:{port}/{name}/v1/completions"
    results, wall_s = asyncio.run(phase(url, arrivals, args.duration_s + 300))
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/{name}/health", timeout=10) as r:
        health = json.loads(r.read())
    from ray import serve

    serve.delete(name)
    statuses: dict = {}
    for r in results:
        statuses[str(r[0])] = statuses.get(str(r[0]), 0) + 1
    return {
        "rate_per_s": rate,
        "kv_budget_bytes": budget,
        "requests": len(results),
        "statuses": statuses,
        "only_200_413_429": set(statuses) <= {"200", "413", "429"},
        "ooms": health.get("generation", {}).get("ooms"),
        "tokens_per_s": round(sum(r[3] for r in results) / wall_s, 1),
    }


def deploy(name, model_dir, scheduler, args, kv_cache_bytes=None):
    from ray import serve

    from serving import BatchingSpec, GenerationSpec, ModelDeployment, ModelSource, QueueSpec, WarmupSpec

    spec = ModelDeployment(
        name=name,
        task="text_generation",
        model=ModelSource(path=str(model_dir), served_name="bench"),
        replicas=1,
        queue=QueueSpec(max_ongoing_requests=args.slots, max_queued_requests=1024, max_request_body_bytes=65536),
        batching=BatchingSpec(max_batch_size=args.max_batch),
        generation=GenerationSpec(scheduler=scheduler, max_running_sequences=args.slots, kv_cache_bytes=kv_cache_bytes),
        warmup=WarmupSpec(cover_max_input=False, min_rounds=1, max_rounds=2),
    )
    serve.run(spec.build(), name=name, route_prefix=f"/{name}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 1.5, 2.0, 2.5, 3.0], help="offered requests/s")
    p.add_argument("--duration-s", type=float, default=30.0, help="arrivals per rate")
    p.add_argument("--quick", action="store_true", help="12 s per rate")
    p.add_argument("--slo-s", type=float, default=1.0, help="TTFT p99 target of the short requests")
    p.add_argument("--long-fraction", type=float, default=0.2)
    p.add_argument("--stream-fraction", type=float, default=0.5)
    p.add_argument("--short-tokens", type=int, default=16)
    p.add_argument("--long-tokens", type=int, default=256)
    p.add_argument("--slots", type=int, default=32, help="max_ongoing_requests and max_running_sequences")
    p.add_argument("--max-batch", type=int, default=8, help="the static path's @serve.batch size")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overload-sequences", type=int, default=4, help="long sequences the overload phase's KV budget holds")
    p.add_argument("--skip-overload", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.duration_s = 12.0

    import ray
    from ray import serve

    from serving.testing import free_port, json_stdout, make_random_llama

    model_dir = make_random_llama(
        tempfile.mkdtemp(prefix="gpuserve-bench-llama-"),
        hidden_size=args.hidden,
        layers=args.layers,
        intermediate_size=args.hidden * 14 // 5,
    )
    phases = {
        rate: workload(rate, args.duration_s, args.seed + i, args.long_fraction, args.stream_fraction, args.short_tokens, args.long_tokens)
        for i, rate in enumerate(args.rates)
    }
    timeout_s = args.duration_s + 300
    out = {"benchmark": "generation", "config": {**vars(args), "model_dir": None}, "static": {}, "scheduler": {}}
    texts = {}
    stdout = json_stdout()
    ray.init(num_cpus=8, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for setup, mode in (("static", "static"), ("scheduler", "iteration")):
            name = f"gen-{setup}"
            deploy(name, model_dir, mode, args)
            url = f"http://127.0.0.1:{port}/{name}/v1/completions"
            rows = []
            for rate, arrivals in phases.items():
                results, wall_s = asyncio.run(phase(url, arrivals, timeout_s))
                rows.append(summarise(rate, arrivals, results, wall_s, args.slo_s))
                texts[(setup, rate)] = [r[4] for r in results]
                print(json.dumps({setup: rows[-1]}), file=sys.stderr)
            serve.delete(name)
            within = [r["rate_per_s"] for r in rows if r["within_slo"]]
            top = rows[-1]
            out[setup] = {
                "max_rate_within_slo": max(within, default=0.0),
                "tokens_per_s": max(r["tokens_per_s"] for r in rows),
                "ttft_p99_s": top["ttft_p99_s"],
                "itl_p99_s": top["itl_p99_s"],
                "at_top_rate": top["rate_per_s"],
                "rates": rows,
            }
        if not args.skip_overload:
            top = out["scheduler"]["max_rate_within_slo"] or args.rates[0]
            out["overload"] = overload(port, str(model_dir), args, 3 * top, args.seed + 100)
            print(json.dumps({"overload": out["overload"]}), file=sys.stderr)
    finally:
        serve.shutdown()
        ray.shutdown()
    pairs = [
        (a, b)
        for rate in args.rates
        for a, b in zip(texts[("static", rate)], texts[("scheduler", rate)])
        if a is not None and b is not None
    ]
    s, c = out["static"], out["scheduler"]
    out["comparison"] = {
        "greedy_outputs_identical": sum(a == b for a, b in pairs),
        "greedy_outputs_compared": len(pairs),
        "max_rate_within_slo_ratio": round(c["max_rate_within_slo"] / s["max_rate_within_slo"], 3)
        if s["max_rate_within_slo"]
        else None,
        "ttft_p99_ratio_static_over_scheduler": round(s["ttft_p99_s"] / c["ttft_p99_s"], 3)
        if s["ttft_p99_s"] and c["ttft_p99_s"]
        else None,
        "tokens_per_s_ratio": round(c["tokens_per_s"] / s["tokens_per_s"], 3) if s["tokens_per_s"] else None,
        # Short requests behind long ones, rate by rate (static's TTFT p99 over the scheduler's).
        "ttft_p99_ratio_by_rate": {
            str(a["rate_per_s"]): round(a["ttft_p99_s"] / b["ttft_p99_s"], 3) if a["ttft_p99_s"] and b["ttft_p99_s"] else None
            for a, b in zip(s["rates"], c["rates"])
        },
    }
    print(json.dumps(out, indent=2), file=stdout)
    stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
