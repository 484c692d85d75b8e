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
