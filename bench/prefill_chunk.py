"""The iteration scheduler's prefill chunk: how long short requests wait behind long prompts, per chunk size.

In process, no Ray and no HTTP: one random-weight Llama-style model (``serving.testing.make_random_llama``,
the same as ``bench/generation.py``) and one :class:`GenerationScheduler` per chunk size, each offered the
same open-loop Poisson arrivals (``bench/generation.py``'s workload: 80 % short requests of 16 new tokens,
20 % long ones with 256 new tokens, half streamed, all greedy; the long prompt is its 265-token paragraph
``--long-repeat`` times over, 6 by default: about 1,600 tokens). Chunk 0 reads every
prompt whole (the scheduler before chunking). Per chunk and rate: the short requests' time to first token
(p50/p99; a non-streamed request's is its whole answer), the streamed ones' alone, the gaps between tokens
(p99) and output tokens/s; and whether every text equals chunk 0's. ``chosen`` is the chunk with the lowest
TTFT p99 of short requests summed over the rates, among those within 5 % of the best tokens/s: the
default ``generation.prefill_chunk_tokens`` for the device it ran on. Prints one JSON document:

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/prefill_chunk.py   # 30 s per rate and chunk

(``OMP_NUM_THREADS=1``: what Ray gives a replica with one CPU.)
    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/prefill_chunk.py --quick  # 12 s
"""

import argparse
import json
import sys
import tempfile
import threading
import time

import bench.generation as generation
from bench.generation import pct, workload


def run_phase(scheduler, tokenizer, arrivals):
    from deployments._scheduler import Finished, Sequence

    done, threads = [], []
    t0 = time.monotonic()

    def consume(seq, body, short):
        while True:
            ev = scheduler.next_event(seq)
            if isinstance(ev, (Finished, BaseException)):
                break
        finished = time.monotonic()
        first = seq.first_token_s if body["stream"] else finished
        done.append({"short": short, "stream": body["stream"], "ttft_s": (first or finished) - seq.submitted_s,
                     "tokens": ev.completion_tokens if isinstance(ev, Finished) else 0, "text": seq.text,
                     "prompt": body["prompt"], "ok": isinstance(ev, Finished)})


    for send_s, body, short in arrivals:
        delay = t0 + send_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        seq = Sequence(tokenizer(body["prompt"])["input_ids"], body["max_tokens"], 0.0, 1.0, [],
                       incremental=body["stream"])
        scheduler.submit(seq)
        t = threading.Thread(target=consume, args=(seq, body, short), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join()
    return done, time.monotonic() - t0


def summarize(done, wall_s) -> dict:
    """One phase's figures: requests, completions, the short requests' TTFT (p50/p99, and p99 of the streamed
    ones) and output tokens/s."""
    short = [d for d in done if d["short"]]
    return {
        "requests": len(done), "ok": sum(d["ok"] for d in done),
        "ttft_p50_s": pct([d["ttft_s"] for d in short], 0.5), "ttft_p99_s": pct([d["ttft_s"] for d in short], 0.99),
        "streamed_ttft_p99_s": pct([d["ttft_s"] for d in short if d["stream"]], 0.99),
        "tokens_per_s": round(sum(d["tokens"] for d in done) / wall_s, 2),
    }


def choose(rows_by_setup: dict) -> object:
    """The setup with the lowest TTFT p99 of short requests summed over the rates, among those within 5 % of
    the best output tokens/s (summed likewise)."""
    tps = {k: sum(r["tokens_per_s"] for r in rows) for k, rows in rows_by_setup.items()}
    eligible = [k for k in rows_by_setup if tps[k] >= 0.95 * max(tps.values())]
    return min(eligible, key=lambda k: sum(r["ttft_p99_s"] or 0 for r in rows_by_setup[k]))


def compare(model, tokenizer, chunks, rates, duration_s, slots=32, seed=0, long_repeat=6) -> dict:
    """Every chunk size against the same arrivals, on a loaded model (any device); the JSON document."""
    from deployments._scheduler import GenerationScheduler, Sequence

    # Long prompts long enough that reading one whole costs many decode steps (as 1-8k-token prompts do on
    # a GPU); with generation.py's own 265 tokens a whole prefill costs about one step on this CPU.
    long_prompt = " ".join([generation.LONG_PROMPT] * long_repeat)
    saved, generation.LONG_PROMPT = generation.LONG_PROMPT, long_prompt
    try:
        phases = {rate: workload(rate, duration_s, seed + i, 0.2, 0.5, 16, 256) for i, rate in enumerate(rates)}
    finally:
        generation.LONG_PROMPT = saved
    rows, texts = [], {}
    for chunk in chunks:
        for rate, arrivals in phases.items():
            scheduler = GenerationScheduler(model, tokenizer, slots, prefill_chunk_tokens=chunk)
            try:
                scheduler.result(scheduler.submit(Sequence(tokenizer("warm up")["input_ids"], 4, 0.0, 1.0, [], incremental=False)))
                done, wall_s = run_phase(scheduler, tokenizer, arrivals)
            finally:
                scheduler.close()
            texts[(chunk, rate)] = {d["prompt"]: d["text"] for d in done}
            rows.append({"chunk": chunk, "rate": rate, **summarize(done, wall_s)})
            print(rows[-1], file=sys.stderr)
    same = {
        c: sum(texts[(c, r)][k] == v for r in rates for k, v in texts[(chunks[0], r)].items())
        for c in chunks
    }
    chosen = choose({c: [r for r in rows if r["chunk"] == c] for c in chunks})
    return {
        "long_prompt_tokens": len(tokenizer(long_prompt)["input_ids"]),
        "duration_s": duration_s,
        "rows": rows,
        "greedy_identical_to_chunk_0": {str(c): f"{n}/{sum(len(texts[(chunks[0], r)]) for r in rates)}" for c, n in same.items()},
        "chosen": chosen,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 64, 128, 256])
    p.add_argument("--rates", type=float, nargs="+", default=[1.0, 1.5])
    p.add_argument("--duration-s", type=float, default=30.0)
    p.add_argument("--quick", action="store_true", help="12 s per rate and chunk")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=640)
    p.add_argument("--slots", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--long-repeat", type=int, default=6, help="the long prompt is generation.py's this many times "
                   "over (6: about 1,600 tokens; 1: its 265)")
    args = p.parse_args(argv)
    if args.quick:
        args.duration_s = 12.0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.testing import make_random_llama

    model_dir = make_random_llama(tempfile.mkdtemp(prefix="gpuserve-bench-llama-"), hidden_size=args.hidden,
                                  layers=args.layers, intermediate_size=args.hidden * 14 // 5)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = compare(model, tokenizer, args.chunks, args.rates, args.duration_s, args.slots, args.seed, args.long_repeat)
    out = {"model": {"layers": args.layers, "hidden": args.hidden, "params": sum(p.numel() for p in model.parameters())},
           "device": "cpu", "torch_threads": torch.get_num_threads(), **out}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
