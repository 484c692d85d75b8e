"""Running a batch under a memory budget: admission by predicted peak, classified out-of-memory recovery.

Pure of Ray and of CUDA: the device's pieces (free the cache, the budget, the clock) are passed in, so
every branch is tested with injected OOMs on the CPU and the same code runs on a GPU.

* **Admission**: a request's peak memory is predicted from its shape with a line fitted to the warm-up
  envelope (peak = base + per-token bytes x batch x tokens). A batch whose prediction exceeds the budget
  (the high-water mark minus what others hold) is cut into sub-batches that fit and run in turn; a request
  that alone exceeds it is answered 413 ``request_too_large_for_device``, naming the limit.
* **OOM, load-induced**: a batch that runs out of memory anyway is halved and retried after the cache is
  freed, down to single requests; every request still gets its answer.
* **OOM, one request**: a single request that runs out of memory alone is retried once after the cache
  is freed. If it fails again and is larger (in tokens) than any request that completed here, it is too
  large for the device: 413 with the limit, not a retry loop, and it does not count against the replica.
* **OOM, persistent**: a single request no larger than ones that completed here that fails alone twice:
  the device, not the request (503, retried elsewhere). Only these count: more than ``max_ooms`` in
  ``window_s`` and the replica reports unhealthy, so Serve replaces it. Load-induced OOMs (split) and
  too-large requests never do. The record is the replica's :class:`serving.gpu.OomLog`, which the task's
  own paths (its streams, its generation scheduler) share.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from serving.errors import RequestTooLargeForDevice, is_oom
from serving.gpu import OomLog

logger = logging.getLogger("ray.serve")


class Outcome:
    """One item's result or error, so one bad item does not fail its batch."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: "BaseException | None" = None):
        self.value, self.error = value, error

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of a batch as ``base_bytes + per_token_bytes * batch * tokens``."""

    base_bytes: float
    per_token_bytes: float

    @classmethod
    def from_envelope(cls, envelope: Sequence[dict]) -> Optional["MemoryModel"]:
        """Fit the warm-up envelope (``batch_size``, ``input_tokens``, ``peak_bytes`` per shape).

        A least-squares line over batch x tokens; with one distinct size, everything above the smallest
        peak is charged to that size (conservative). None when there is no envelope.
        """
        pts = [(e["batch_size"] * e["input_tokens"], float(e["peak_bytes"])) for e in envelope if e.get("peak_bytes")]
        if not pts:
            return None
        xs = [x for x, _ in pts]
        if len(set(xs)) < 2:
            x, y = max(pts)
            base = min(p for _, p in pts)
            return cls(base, max(0.0, (y - base) / x) if x else 0.0)
        n = len(pts)
        mx, my = sum(xs) / n, sum(y for _, y in pts) / n
        sxx = sum((x - mx) ** 2 for x in xs)
        slope = max(0.0, sum((x - mx) * (y - my) for x, y in pts) / sxx)
        # Lift the line so no measured point lies above it: a prediction must not be optimistic.
        base = max(y - slope * x for x, y in pts)
        return cls(base, slope)

    def predict(self, batch: int, tokens: int) -> float:
        return self.base_bytes + self.per_token_bytes * batch * tokens


class BatchRunner:
    """Runs batches for one replica's model thread with admission and OOM recovery.

    Args:
        run_batch: The task's ``run_batch(items) -> results``.
        tokens_of: An item's token count (its length for the memory model).
        model: The fitted memory model, or None (no admission by prediction).
        budget_bytes: Bytes a batch's peak may reach, or None (no budget known).
        free_cache: Frees cached device memory after an OOM (``torch.cuda.empty_cache`` on CUDA).
        clock: Monotonic seconds (for a log of its own).
        window_s: The window for counting OOMs (for a log of its own).
        max_ooms: More OOMs than this in the window mark the replica unhealthy (for a log of its own).
        on_oom: Called with the OOM's kind (``split``, ``too_large`` or ``persistent``) for metrics (for a
            log of its own).
        oom_log: The replica's :class:`serving.gpu.OomLog`, shared with the task's own paths (its streams,
            its scheduler); None: a log of its own from the four arguments above.
    """

    def __init__(
        self,
        run_batch: Callable[[list[Any]], list[Any]],
        tokens_of: Callable[[Any], int],
        model: Optional[MemoryModel],
        budget_bytes: Optional[float],
        free_cache: Callable[[], None],
        clock: Callable[[], float],
        window_s: float = 300.0,
        max_ooms: int = 5,
        on_oom: Optional[Callable[[str], None]] = None,
        oom_log: Optional[OomLog] = None,
    ):
        self.run_batch, self.tokens_of = run_batch, tokens_of
        self.model, self.budget_bytes = model, budget_bytes
        self.free_cache = free_cache
        self.oom_log = oom_log if oom_log is not None else OomLog(clock, window_s, max_ooms, on_oom)
        self.oom_total = 0

    # -- admission -------------------------------------------------------------------------

    def _fits(self, batch: int, tokens: int) -> bool:
        if self.model is None or self.budget_bytes is None:
            return True
        return self.model.predict(batch, tokens) <= self.budget_bytes

    def _too_large(self, tokens: int) -> RequestTooLargeForDevice:
        assert self.model is not None and self.budget_bytes is not None
        need = self.model.predict(1, tokens)
        return RequestTooLargeForDevice(
            f"this request ({tokens} tokens) needs about {need / 2**20:.0f} MiB of device memory at its peak; "
            f"the replica's limit is {self.budget_bytes / 2**20:.0f} MiB (the high-water mark less what is "
            "already held); send a shorter input or fewer inputs per request",
            code="request_too_large_for_device",
        )

    def plan(self, items: list[Any]) -> tuple[list[list[int]], dict[int, BaseException]]:
        """Cut ``items`` into runs whose predicted peak fits; items that cannot fit alone are refused."""
        refused: dict[int, BaseException] = {}
        runs: list[list[int]] = []
        cur: list[int] = []
        cur_tokens = 0
        for i, it in enumerate(items):
            t = self.tokens_of(it)
            if not self._fits(1, t):
                refused[i] = self._too_large(t)
                continue
            if cur and not self._fits(len(cur) + 1, max(cur_tokens, t)):
                runs.append(cur)
                cur, cur_tokens = [], 0
            cur.append(i)
            cur_tokens = max(cur_tokens, t)
        if cur:
            runs.append(cur)
        return runs, refused

    # -- running -----------------------------------------------------------------------------

    def run(self, items: list[Any]) -> list[Outcome]:
        """Every item gets an Outcome: its result, its own error, or a 413 when it cannot fit."""
        out: list[Optional[Outcome]] = [None] * len(items)
        runs, refused = self.plan(items)
        for i, e in refused.items():
            out[i] = Outcome(error=e)
        for run in runs:
            for i, o in zip(run, self._run([items[i] for i in run])):
                out[i] = o
        return [o if o is not None else Outcome(error=RuntimeError("no outcome")) for o in out]

    def _run(self, items: list[Any], retry_alone: bool = True) -> list[Outcome]:
        oom = False
        try:
            values = self.run_batch(items)
            self.oom_log.completed(max(map(self.tokens_of, items), default=0))
            return [Outcome(v) for v in values]
        except Exception as e:  # noqa: BLE001 - classified here, reported per item
            if not is_oom(e) and len(items) == 1:
                return [Outcome(error=e)]
            oom = is_oom(e)
        # Go on outside the handler: a live exception's traceback pins the failed attempt's tensors, so
        # nothing could be freed inside it (measured on an H200: every retry from inside failed).
        if oom:
            self.oom_total += 1
            self.free_cache()
            if len(items) == 1:
                if retry_alone:  # once more, on the freed cache
                    return self._run(items, retry_alone=False)
                return [Outcome(error=self._lone_oom(self.tokens_of(items[0])))]
            self.oom_log.note("split")
            mid = len(items) // 2
            return self._run(items[:mid]) + self._run(items[mid:])
        # A non-memory failure of a batch: one by one, so only the item at fault gets the error.
        return [self._run([it])[0] for it in items]

    def _lone_oom(self, tokens: int) -> BaseException:
        """A request that ran out of memory alone, twice: too large (413), or the device's trouble (503)."""
        limit = f"{self.budget_bytes / 2**20:.0f} MiB" if self.budget_bytes else "the device's memory"
        return self.oom_log.lone_error(
            tokens, f"this replica's limit is {limit}; send a shorter input, fewer inputs or a smaller max_tokens"
        )

    def unhealthy_reason(self) -> Optional[str]:
        """Why the replica should be replaced, or None: too many OOMs within the window."""
        return self.oom_log.unhealthy_reason()
