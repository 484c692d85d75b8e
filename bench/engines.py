"""Which step loop runs text generation: gpuserve's iteration scheduler against transformers' continuous batching.

Issue 15 allows either transformers' own continuous batching (``ContinuousBatchingManager``, transformers >= 5)
or an own step loop, the default on each device decided by a measurement. This is that measurement, in
process (no Ray, no HTTP), on one random-weight Llama-style model (``serving.testing.make_random_llama``, the
same as ``bench/generation.py``):

* ``iteration``: :class:`deployments._scheduler.GenerationScheduler` with the device's prefill chunk;
* ``transformers_cb``: one ``ContinuousBatchingManager`` (``model.init_continuous_batching``), started and
  warmed before the arrivals, as a replica would hold it; one thread routes its results to the requests.

Each engine is offered the same open-loop Poisson arrivals per rate (``bench/generation.py``'s mix: 80 % short
requests of 16 new tokens, 20 % long ones of 256, half streamed, all greedy). Per engine and rate: the short
requests' time to first token (p50/p99; a non-streamed request's is its whole answer), the streamed ones'
alone, output tokens/s, and how many greedy texts equal the iteration scheduler's. ``chosen``: the engine with
the lowest TTFT p99 of short requests summed over the rates among those within 5 % of the best tokens/s (the
rule ``bench/prefill_chunk.py`` uses). Prints one JSON document::

    OMP_NUM_THREADS=1 PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/engines.py           # 30 s a phase
    OMP_NUM_THREADS=1 PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/engines.py --quick   # 10 s a phase

(``OMP_NUM_THREADS=1``: what Ray gives a replica with one CPU.) ``bench/gpu_check.py`` runs the same
comparison on a card.
"""

import argparse
import json
import sys
import tempfile
import threading
import time

from bench.generation import workload
from bench.prefill_chunk import choose, run_phase, summarize

ENGINES = ("iteration", "transformers_cb")


def run_phase_cb(manager, tokenizer, arrivals):
    """Offer ``arrivals`` to a started ContinuousBatchingManager; the per-request records and the wall time."""
    records, lock = {}, threading.Lock()
    t0 = time.monotonic()
    stop = threading.Event()
    give_up = {"s": float("inf")}

    def route():
        # One reader of the manager's output queue: a result per generated token for a streamed request, one
        # at the end for the others; it gives up on what is not done 300 s after the last arrival.
        while (not stop.is_set() or any(not r["done"] for r in list(records.values()))) and time.monotonic() < give_up["s"]:
            out = manager.get_result(timeout=0.1)
            if out is None:
                continue
            now = time.monotonic()
            with lock:
                rec = records.get(out.request_id)
            if rec is None:
                continue
            if rec["first_s"] is None and out.generated_tokens:
                rec["first_s"] = now
            if out.is_finished():
                rec.update(done=True, finished_s=now, tokens=len(out.generated_tokens), error=out.error,
                           text=tokenizer.decode(out.generated_tokens, skip_special_tokens=True))

    router = threading.Thread(target=route, daemon=True)
    router.start()
    for send_s, body, short in arrivals:
        delay = t0 + send_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        ids = tokenizer(body["prompt"])["input_ids"]
        rec = {"short": short, "stream": body["stream"], "prompt": body["prompt"], "submitted_s": time.monotonic(),
               "first_s": None, "done": False, "tokens": 0, "text": "", "error": None}
        rid = f"r{len(records)}"
        with lock:
            records[rid] = rec
        if manager.add_request(ids, request_id=rid, max_new_tokens=body["max_tokens"], streaming=body["stream"]) is None:
            rec.update(done=True, error="refused by the manager")
    give_up["s"] = time.monotonic() + 300
    stop.set()
    router.join(timeout=600)
    done = []
    for rec in records.values():
        finished = rec.get("finished_s") or time.monotonic()
        first = rec["first_s"] if rec["stream"] else finished
        done.append({"short": rec["short"], "stream": rec["stream"], "ttft_s": (first or finished) - rec["submitted_s"],
                     "tokens": rec["tokens"], "text": rec["text"], "prompt": rec["prompt"],
                     "ok": rec["done"] and rec["error"] is None})
    return done, time.monotonic() - t0


def compare_engines(model, tokenizer, device, rates, duration_s, slots=32, seed=0) -> dict:
    """Both engines against the same arrivals, on a loaded model (any device); the JSON document."""
    from transformers import GenerationConfig

    from deployments._scheduler import GenerationScheduler, Sequence
    from deployments.text_generation import resolve_prefill_chunk

    phases = {rate: workload(rate, duration_s, seed + i, 0.2, 0.5, 16, 256) for i, rate in enumerate(rates)}
    rows, texts, setup_s = [], {}, {}
    for engine in ENGINES:
        for rate, arrivals in phases.items():
            t = time.monotonic()
            if engine == "iteration":
                sched = GenerationScheduler(model, tokenizer, slots, prefill_chunk_tokens=resolve_prefill_chunk(None, device))
                try:
                    sched.result(sched.submit(Sequence(tokenizer("warm up")["input_ids"], 4, 0.0, 1.0, [], incremental=False)))
                    setup_s.setdefault(engine, round(time.monotonic() - t, 2))
                    done, wall_s = run_phase(sched, tokenizer, arrivals)
                finally:
                    sched.close()
            else:
                config = GenerationConfig(max_new_tokens=256, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                          pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
                manager = model.init_continuous_batching(generation_config=config)
                manager.start()
                try:
                    manager.add_request(tokenizer("warm up")["input_ids"], request_id="warm", max_new_tokens=4)
                    while (out := manager.get_result(request_id="warm", timeout=600)) is None or not out.is_finished():
                        pass
                    setup_s.setdefault(engine, round(time.monotonic() - t, 2))
                    done, wall_s = run_phase_cb(manager, tokenizer, arrivals)
                finally:
                    manager.stop(block=True)
            texts[(engine, rate)] = {d["prompt"]: d["text"] for d in done}
            rows.append({"engine": engine, "rate": rate, **summarize(done, wall_s)})
            print(rows[-1], file=sys.stderr)
    same = {e: sum(texts[(e, r)].get(k) == v for r in rates for k, v in texts[("iteration", r)].items()) for e in ENGINES}
    total = sum(len(texts[("iteration", r)]) for r in rates)
    chosen = choose({e: [r for r in rows if r["engine"] == e] for e in ENGINES})
    return {
        "device": device,
        "duration_s": duration_s,
        "setup_s": setup_s,
        "rows": rows,
        "greedy_identical_to_iteration": {e: f"{n}/{total}" for e, n in same.items()},
        "chosen": chosen,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--quick", action="store_true", help="10 s a phase")
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.duration_s = 10.0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.testing import make_random_llama

    model_dir = make_random_llama(tempfile.mkdtemp(prefix="gpuserve-bench-llama-"))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = compare_engines(model, tokenizer, "cpu", args.rates, args.duration_s, args.slots, args.seed)
    out = {"model": {"params": sum(p.numel() for p in model.parameters())}, "torch_threads": torch.get_num_threads(), **out}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
