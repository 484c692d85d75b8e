"""The tasks on a real GPU, without Ray: device 'auto' picks CUDA, fp16 agrees with fp32 CPU."""

import threading

import numpy as np
import pytest

from deployments.embeddings import EmbeddingsTask
from deployments.text_generation import TextGenerationTask
from serving import ModelDeployment, ModelSource, Resources
from tests.conftest import MINILM

pytestmark = pytest.mark.gpu


def spec(task, path, **model):
    return ModelDeployment(
        name="g", task=task, model=ModelSource(path=path, **model), resources=Resources(gpus=1)
    )


def test_embeddings_auto_device_is_cuda_fp16_and_matches_cpu():
    gpu = EmbeddingsTask(spec("embeddings", MINILM))
    assert gpu.device == "cuda" and gpu.describe()["dtype"] == "float16"
    cpu = EmbeddingsTask(ModelDeployment(name="c", task="embeddings", model=ModelSource(path=MINILM, device="cpu")))
    texts = ["A man is playing a guitar.", "GPU memory is a first-class metric."]
    a = np.array([d["embedding"] for d in gpu.run_batch([gpu.parse("embeddings", {"input": texts})])[0]["data"]])
    b = np.array([d["embedding"] for d in cpu.run_batch([cpu.parse("embeddings", {"input": texts})])[0]["data"]])
    assert (a * b).sum(axis=1).min() > 0.999


def test_generation_on_cuda_batched_and_streamed(tiny_lm_dir):
    task = TextGenerationTask(spec("text_generation", str(tiny_lm_dir), dtype="float32"))
    assert task.device == "cuda"
    item = task.parse("completions", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0})
    full = task.run_batch([item])[0]["choices"][0]["text"]
    s = task.parse("completions", {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "stream": True})
    assert "".join(c["choices"][0]["text"] for c in task.stream(s, threading.Event())) == full


def test_warmup_envelope_on_cuda_grows_with_the_shape():
    from serving._private.memory import probe_for
    from serving._private.warmup import plan_shapes, run_warmup

    task = EmbeddingsTask(spec("embeddings", MINILM))
    probe = probe_for(task.device)
    assert probe.kind == "cuda_allocator"
    report = run_warmup(task.run_batch, plan_shapes(task, task.spec), task.spec, probe)
    env = {(r["batch_size"], r["input_tokens"]): r["peak_bytes"] for r in report.envelope()}
    largest = max(env, key=lambda k: k[0] * k[1])
    smallest = min(env, key=lambda k: k[0] * k[1])
    assert env[largest] > env[smallest] > 0


def test_nvml_telemetry_sees_this_gpu_and_agrees_with_torch_on_its_size():
    import torch

    from serving.gpu import GpuTelemetry

    tel = GpuTelemetry()
    assert tel.available, tel.reason
    [g] = tel.gpus()[:1]
    free, total = torch.cuda.mem_get_info()
    # NVML and the CUDA runtime count the same device; NVML's total includes a reserved sliver.
    assert abs(g.memory_total_bytes - total) / total < 0.02
    assert g.memory_used_bytes >= total - free - 2**30
    [a] = tel.allocator()[:1]
    assert a.reserved_bytes >= a.allocated_bytes >= 0


def test_batch_runner_recovers_a_real_cuda_oom_by_splitting():
    import torch

    from serving._private.memory import free_cache_for
    from serving._private.oom import BatchRunner

    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved()
    chunk = 64 * 2**20  # each item needs 64 MiB at once

    def run(items):
        t = torch.empty(len(items) * chunk, dtype=torch.uint8, device="cuda")
        t.fill_(1)
        return [int(t[i * chunk]) for i in range(len(items))]

    torch.cuda.set_per_process_memory_fraction((base + 8 * chunk) / torch.cuda.mem_get_info()[1])
    try:
        runner = BatchRunner(run, lambda it: 1, None, None, free_cache_for("cuda"), lambda: 0.0, max_ooms=1000)
        out = runner.run(list(range(32)))
        assert [o.value for o in out] == [1] * 32
        assert runner.oom_total >= 1
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
