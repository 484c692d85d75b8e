"""A user task (loaded by import path) whose request path can be stalled on purpose."""

import threading

from deployments.embeddings import EmbeddingsTask

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


class SlowEmbeddingsTask(EmbeddingsTask):
    """Embeddings with a fixed service time; a text 'SLOW:<seconds>' holds the model that long."""

    def run_batch(self, items):
        import time

        hold = [float(t.split(":", 1)[1]) for it in items for t in it.texts if t.startswith("SLOW:")]
        time.sleep(max(hold, default=0.2))
        return super().run_batch(items)
