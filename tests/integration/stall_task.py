"""A user task (loaded by import path) whose request path can be stalled on purpose."""

import os
import tempfile
import threading
import time

from deployments.embeddings import EmbeddingsTask
from deployments.text_generation import TextGenerationTask

STALL_TEXT = "STALL-THE-MODEL-THREAD"


class StallingEmbeddingsTask(EmbeddingsTask):
    """Embeddings, except a request containing STALL_TEXT blocks the model thread (a hung kernel)."""

    def run_batch(self, items):
        if any(STALL_TEXT in t for it in items for t in it.texts):
            threading.Event().wait(600)
        return super().run_batch(items)


class FailingWarmupTask(EmbeddingsTask):
    """Embeddings whose largest batch fails, as a batch that does not fit on the device would."""

    def run_batch(self, items):
        if len(items) > 1:
            raise MemoryError("simulated: batch does not fit")
        return super().run_batch(items)


def hold_model(items, default_s=0.2):
    """Block the model thread for the longest 'SLOW:<seconds>' text in the batch (default_s without one)."""

    hold = [float(t.split(":", 1)[1]) for it in items for t in it.texts if t.startswith("SLOW:")]
    time.sleep(max(hold, default=default_s))


class SlowEmbeddingsTask(EmbeddingsTask):
    """Embeddings with a fixed service time; a text 'SLOW:<seconds>' holds the model that long."""

    def run_batch(self, items):
        hold_model(items)
        return super().run_batch(items)


class OomInjectingTask(EmbeddingsTask):
    """Embeddings that run out of memory the way a GPU does, through torch's own exception type:
    a batch of more than one item holding 'OOM-BATCH' fails (load-induced), and an input
    'OOM-ALWAYS' or 'OOM-DEVICE' fails even alone (a request too large for the device when it is
    larger than the requests that completed, a device in trouble when it is not)."""

    def run_batch(self, items):
        texts = [t for it in items for t in it.texts]
        alone = ("OOM-ALWAYS", "OOM-DEVICE")
        if any(m in t for t in texts for m in alone) or (len(items) > 1 and any("OOM-BATCH" in t for t in texts)):
            import torch

            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (injected by the test task)")
        return super().run_batch(items)


# Every text starting with "SEEN:" that reaches the model is appended here, so a test can prove a
# request never reached the model (shed, expired).
SEEN_LOG = os.path.join(tempfile.gettempdir(), "gpuserve-test-seen.log")


class RecordingSlowTask(SlowEmbeddingsTask):
    """SlowEmbeddingsTask that logs the 'SEEN:' texts it runs, in the order it runs them."""

    def run_batch(self, items):
        out = super().run_batch(items)
        seen = [t for it in items for t in it.texts if t.startswith("SEEN:")]
        if seen:
            with open(SEEN_LOG, "a", encoding="utf-8") as f:
                f.writelines(t + "\n" for t in seen)
        return out


def seen_texts() -> list[str]:
    """The 'SEEN:' texts the model ran, oldest first."""
    try:
        with open(SEEN_LOG, encoding="utf-8") as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


class FixedServiceTask(EmbeddingsTask):
    """A model with a fixed service time and no compute: 'SLOW:<seconds>' holds the model thread that
    long and the answer is a zero vector. Parsing (tokenizer, limits) is the real task's. For
    benchmarks, where the model's own CPU work would compete with what is measured."""

    def run_batch(self, items):
        hold_model(items)
        return [
            {"data": [{"object": "embedding", "index": j, "embedding": [0.0] * 4} for j in range(len(it.texts))]}
            for it in items
        ]


HANG_STEP_TEXT = "HANG-THE-DECODE-STEP"


class SlowStepsTextGenerationTask(TextGenerationTask):
    """Text generation on a deliberately slow model: a prompt holding 'STEP-S:<seconds>' makes every
    forward pass (a decode step) take that long from then on, and one holding HANG_STEP_TEXT blocks
    the next forward pass (a hung kernel). The end-of-sequence token is never chosen, so a generation
    runs to its max_tokens and its length in seconds is known."""

    def load(self):
        super().load()
        import functools

        self.step_s, self.hang = 0.0, threading.Event()
        forward = self.model.forward
        eos = self.lm.tokenizer.eos_token_id

        @functools.wraps(forward)
        def slow_forward(*args, **kw):
            if self.hang.is_set():
                threading.Event().wait(600)
            time.sleep(self.step_s)
            out = forward(*args, **kw)
            out.logits[..., eos] = float("-inf")
            return out

        self.model.forward = slow_forward

    def parse(self, endpoint, body):
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if isinstance(prompt, str):
            if "STEP-S:" in prompt:
                self.step_s = float(prompt.split("STEP-S:", 1)[1].split()[0])
            if HANG_STEP_TEXT in prompt:
                self.hang.set()
        return super().parse(endpoint, body)
