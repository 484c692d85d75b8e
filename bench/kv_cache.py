"""The iteration scheduler's KV cache: a decode step with transformers' concatenating cache against the in-place one.

``transformers``' ``DynamicLayer`` adds each step's keys and values by concatenation, a copy of every layer's whole
cache per token; the scheduler's layers (``deployments._scheduler._roomy_layer``) write into room kept at the
head of their buffers. In process, on one random-weight Llama-style model (``serving.testing.make_random_llama``,
the one ``bench/generation.py`` serves), for a grid of batch shapes (rows x cached tokens), the same decode
steps run on each cache kind in turn, side by side: milliseconds a step and the ratio, concatenating over in
place. The caches hold random keys and values (a step's cost does not depend on them, and a real prefill of 16
rows of 1,536 tokens would take minutes here); one real prefill checks that both kinds give the same greedy
tokens. Prints one JSON document::

    OMP_NUM_THREADS=1 PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/kv_cache.py           # 20 steps a shape
    OMP_NUM_THREADS=1 PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/kv_cache.py --quick   # 5 steps, 3 shapes

(``OMP_NUM_THREADS=1``: what Ray gives a replica with one CPU.)
"""

import argparse
import json
import statistics
import sys
import tempfile
import time

WARM_STEPS = 3


def _cache(model, rows, width, roomy, keys=None):
    """A DynamicCache of ``rows`` x ``width`` tokens (random, or the given per-layer (keys, values))."""
    import torch
    from transformers.cache_utils import DynamicCache

    from deployments._scheduler import _make_roomy

    cfg = model.config
    kv_heads = cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    cache = DynamicCache()
    for i in range(cfg.num_hidden_layers):
        k, v = keys[i] if keys else (torch.randn(rows, kv_heads, width, head_dim), torch.randn(rows, kv_heads, width, head_dim))
        cache.update(k.clone(), v.clone(), i)
    if roomy:
        _make_roomy(cache)
    return cache


def _decode(model, cache, first, width, steps, roomy):
    """Greedy decode ``steps`` tokens after ``first`` on ``cache`` (``width`` tokens cached); (ms a step, tokens)."""
    import torch

    rows = first.shape[0]
    mask = torch.ones((rows, width), dtype=torch.long)
    nxt, out, times = first, [], []
    with torch.inference_mode():
        for k in range(WARM_STEPS + steps):
            mask = torch.cat([mask, torch.ones((rows, 1), dtype=torch.long)], dim=1)
            if roomy:  # as the scheduler sets it: the width this batch can reach
                for layer in cache.layers:
                    layer.limit_tokens = width + WARM_STEPS + steps + 1
            t = time.perf_counter()
            logits = model(input_ids=nxt, attention_mask=mask, position_ids=(mask.sum(-1, keepdim=True) - 1),
                           past_key_values=cache, use_cache=True).logits[:, -1]
            nxt = logits.argmax(-1, keepdim=True)
            if k >= WARM_STEPS:
                times.append(time.perf_counter() - t)
            out.append(nxt[:, 0].tolist())
    return 1000 * statistics.median(times), out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--widths", type=int, nargs="+", default=[128, 512, 1536])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="5 steps; rows 1 and 16 at 512, and 4 at 128")
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    from serving.testing import make_random_llama

    model_dir = make_random_llama(tempfile.mkdtemp(prefix="gpuserve-bench-llama-"))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    torch.manual_seed(0)
    shapes = [(1, 512), (16, 512), (4, 128)] if args.quick else [(r, w) for r in args.rows for w in args.widths]
    steps = 5 if args.quick else args.steps
    rows_out = []
    for rows, width in shapes:
        first = torch.randint(0, model.config.vocab_size, (rows, 1))
        row = {"rows": rows, "cached_tokens": width}
        for kind, roomy in (("concatenating", False), ("in_place", True)):
            row[f"{kind}_ms"] = round(_decode(model, _cache(model, rows, width, roomy), first, width, steps, roomy)[0], 2)
        row["ratio"] = round(row["concatenating_ms"] / row["in_place_ms"], 3)
        rows_out.append(row)
        print(row, file=sys.stderr)
    # Same greedy tokens from a real prefill, either kind.
    prompt = torch.randint(0, model.config.vocab_size, (4, 64))
    with torch.inference_mode():
        pre = model(input_ids=prompt, use_cache=True)
    kv = [(layer.keys, layer.values) for layer in pre.past_key_values.layers]
    first = pre.logits[:, -1].argmax(-1, keepdim=True)
    tokens = {roomy: _decode(model, _cache(model, 4, 64, roomy, kv), first, 64, 32, roomy)[1] for roomy in (False, True)}
    ratios = [r["ratio"] for r in rows_out]
    out = {
        "model": {"params": sum(x.numel() for x in model.parameters())},
        "torch_threads": torch.get_num_threads(),
        "steps_per_shape": steps,
        "rows": rows_out,
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "ratio_max": max(ratios),
        "greedy_tokens_identical": tokens[False] == tokens[True],
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
