"""One scheduler on the model thread: iteration-level batching of text generation.

Every generation request, streamed or not, becomes a sequence in one bounded set of running sequences.
The scheduler's thread runs one decode step at a time for all of them (one forward pass); between steps
it drops the sequences that finished or whose client left, and prefills the waiting ones, which join at
the next step. A short request that arrives while a long generation runs therefore waits one step, not
the whole generation.

**Chunked prefill.** A prompt longer than ``prefill_chunk_tokens`` is prefilled a chunk per iteration, into
a cache of its own, and joins the batch when its last chunk is done; shorter prompts are prefilled whole,
first. So a short request that arrives while a long prompt is being read waits for one chunk, not the
whole prompt, and the running sequences are never held up by more than a chunk's work per step.

The batch's KV cache is transformers' ``DynamicCache``: rows are left-padded to a common length, an
attention mask hides the padding, and each row's positions count its own tokens only, so a row's
logits are those of the same prompt alone (up to float rounding). Its layers grow in place, into room
kept at the head of their buffers (:func:`_roomy_layer`), not by a copy of the whole cache per step.
Models whose cache is not made of plain dynamic layers (sliding windows, quantised or static caches)
are refused at start (:func:`supports`), and the task falls back to its static path.

**Memory.** Each sequence may grow to its prompt plus ``max_tokens``; the padded batch to its row count
times its longest such row. With a KV budget, a waiting sequence joins only while that bound stays
within it (first come, first served: a long request is not overtaken forever), :meth:`check_fits`
refuses at parse time what can never fit (413) and what cannot fit now (429, with the time until the
first running sequence ends). An out-of-memory error in a step frees the device's cache and preempts the
batch: every sequence goes back to the head of the queue with the tokens it generated, to be prefilled
again (its client sees nothing but a pause), and the running set is halved for a while. A sequence that
runs out of memory alone twice is too large (413) when it is larger than any that ran before, else the
device is in trouble (``persistent``: counted, for the replica's health).

Pure of Ray and of HTTP: it takes a model and a tokenizer, and runs on a GPU machine without Ray.
"""

from __future__ import annotations

import functools
import gc
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

from serving.errors import Overloaded, RequestTooLargeForDevice, is_oom
from serving.gpu import OomLog

logger = logging.getLogger("ray.serve")

__all__ = [
    "Finished",
    "GenerationScheduler",
    "HeldBack",
    "Sequence",
    "StepObserver",
    "cut_at_stop",
    "kv_bytes_per_token",
    "safe_prefix_len",
    "supports",
]

# How often a consumer waiting for events checks that the scheduler still runs and the client stays.
POLL_S = 0.25
# Steps without an out-of-memory error after which a halved running set doubles back.
CAP_RECOVERY_STEPS = 32


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """Cut ``text`` at the earliest stop sequence; return (text, whether one was found)."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def safe_prefix_len(text: str, stops: list[str]) -> int:
    """Length of ``text`` that can be shown without risking a partial stop sequence."""
    hold = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return len(text) - hold


class HeldBack:
    """Text shown as it is made, holding back a tail that may be the start of a stop sequence; the text ends
    at the first stop sequence, which is never shown. Both generation paths show their streams through it."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.shown = stops, "", 0

    def add(self, piece: str) -> tuple[str, bool]:
        """Append generated text: (what is now safe to show, whether a stop sequence ended the text)."""
        self.text += piece
        cut, stopped = cut_at_stop(self.text, self.stops)
        if stopped:
            self.text = cut
            return "", True
        safe = safe_prefix_len(self.text, self.stops)
        out, self.shown = self.text[self.shown : safe], max(self.shown, safe)
        return out, False

    def rest(self) -> str:
        """What is left to show once the text is over."""
        out, self.shown = self.text[self.shown :], len(self.text)
        return out


@dataclass
class Finished:
    """The last event of a sequence: why it ended and how many tokens it generated (the EOS excluded)."""

    reason: str  # "stop" (end-of-sequence or a stop sequence), "length", or "cancelled" (the client left)
    completion_tokens: int


@dataclass
class Sequence:
    """One request's generation, as the scheduler runs it.

    ``events`` receives text deltas (str) that are safe to show (no partial stop sequence, no partial
    UTF-8 character), then one :class:`Finished`, or an exception. Set ``cancelled`` (via
    :meth:`cancel`) and the scheduler drops the sequence at its next step.
    """

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: Optional[int] = None
    # Decode text every step (streams and stop sequences); else once at the end.
    incremental: bool = True
    events: "queue.SimpleQueue[Any]" = field(default_factory=queue.SimpleQueue)
    ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    # Incremental detokenisation: text is decoded over ids[_prefix:], with ids[_prefix:_read] already shown.
    _prefix: int = 0
    _read: int = 0
    _generator: Any = None
    submitted_s: float = 0.0
    first_token_s: Optional[float] = None
    last_token_s: Optional[float] = None
    # Out-of-memory errors it was part of, and alone.
    preempted: int = 0
    ooms_alone: int = 0
    # An event taken from ``events`` while coalescing text, to be returned next.
    _pending: Any = None

    def __post_init__(self) -> None:
        self.held = HeldBack(self.stop)

    @property
    def text(self) -> str:
        """The text so far (cut at a stop sequence)."""
        return self.held.text

    @property
    def peak_tokens(self) -> int:
        """The most tokens its KV cache may hold: prompt plus max_tokens."""
        return len(self.prompt_ids) + self.max_tokens

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Prefill:
    """A long prompt being prefilled a chunk at a time, into a cache of its own."""

    seq: Sequence
    inputs: list[int]
    done: int = 0
    cache: Any = None


def _cache_arg(model: Any) -> str:
    """The forward() argument that takes the KV cache: ``cache`` since transformers 5.x, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(out: Any) -> Any:
    return out.get("cache", None) or out.get("past_key_values", None)


class StepObserver(Protocol):
    """What the scheduler reports, on its thread, once per step (token-level metrics)."""

    def first_tokens(self, ttfts_s: list[float]) -> None:
        """Times to first token of the sequences that got their first token in this step."""

    def step(self, running: int, waiting: int, kv_cache_bytes: int, token_gaps_s: list[float]) -> None:
        """After a step: the sequences running and waiting, the batch's KV-cache bytes, and for each
        sequence that got a further token, the time since its previous one."""


def kv_bytes_per_token(config: Any, element_bytes: int) -> int:
    """Bytes of KV cache one token takes, from a transformers model config: keys and values, every
    layer, every key/value head."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return 2 * layers * kv_heads * head_dim * element_bytes


@functools.lru_cache(maxsize=None)
def _roomy_layer() -> type:
    """A transformers ``DynamicLayer`` whose keys and values sit at the head of buffers with room to grow.

    ``DynamicLayer.update`` concatenates: every decode step copies every layer's whole cache to add one token
    (a step 1.04x to 2.6x slower than in place on the CPU, growing with rows x tokens: ``bench/kv_cache.py``).
    Here a step writes its token into the room
    left, and a copy happens only when the room runs out (the buffer then grows by half, at least 32 tokens)
    or when the scheduler replaced the tensors (rows joined or left). The room never reaches past
    ``limit_tokens``, the width the batch reaches if every row runs to its ``max_tokens``, so the buffers hold
    no more than the plain cache would have held by then.
    """
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        limit_tokens = 0
        _kb: Any = None
        _vb: Any = None

        def update(self, key_states: Any, value_states: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
            keys, values = self.keys, self.values
            if not self.is_initialized or keys is None or keys.numel() == 0:
                return super().update(key_states, value_states, *args, **kwargs)
            length, n = keys.shape[-2], key_states.shape[-2]
            kb, vb = self._kb, self._vb
            in_place = (
                kb is not None
                and keys.data_ptr() == kb.data_ptr()
                and values.data_ptr() == vb.data_ptr()
                and keys.shape[0] == kb.shape[0]
                and length + n <= kb.shape[-2]
            )
            if not in_place:
                room = length + max(32, length // 2)
                cap = max(length + n, min(room, self.limit_tokens) if self.limit_tokens else room)
                kb = keys.new_empty((*keys.shape[:2], cap, keys.shape[-1]))
                vb = values.new_empty((*values.shape[:2], cap, values.shape[-1]))
                kb[:, :, :length] = keys
                vb[:, :, :length] = values
                self._kb, self._vb = kb, vb
            kb[:, :, length : length + n] = key_states
            vb[:, :, length : length + n] = value_states
            self.keys, self.values = kb[:, :, : length + n], vb[:, :, : length + n]
            return self.keys, self.values

    return RoomyLayer


def _make_roomy(cache: Any) -> None:
    """Turn a plain ``DynamicCache``'s layers into :func:`_roomy_layer`'s, keeping their state."""
    roomy = _roomy_layer()
    for i, layer in enumerate(cache.layers):
        if type(layer) is not roomy:
            new = roomy.__new__(roomy)
            new.__dict__.update(layer.__dict__)
            cache.layers[i] = new


def supports(model: Any) -> Optional[str]:
    """None when the scheduler can run ``model``; else why not (the task then runs its static path)."""
    import torch
    from transformers.cache_utils import DynamicCache, DynamicLayer

    try:
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[0, 0]], device=model.device), use_cache=True)
    except Exception as e:  # noqa: BLE001 - any failure means: not for this model
        return f"a probe forward pass with a cache failed: {e}"
    cache = _cache_of(out)
    if not isinstance(cache, DynamicCache):
        return f"the model's cache is {type(cache).__name__}, not a DynamicCache"
    kinds = {type(layer).__name__ for layer in cache.layers if type(layer) is not DynamicLayer}
    if kinds:
        return f"the model's cache has layers of kind {', '.join(sorted(kinds))} (sliding or special caches)"
    return None


class GenerationScheduler:
    """Runs every sequence of a model, one decode step at a time, on one thread.

    Args:
        model: A transformers causal LM (eval mode, on its device).
        tokenizer: Its tokenizer (decoding, end-of-sequence ids).
        max_running: Most sequences in the running batch; more wait, first come first served.
        clock: Monotonic seconds (progress, time to first token, gaps between tokens).
        observer: Told about every step (metrics; must be quick); settable later.
        kv_bytes_per_token: KV-cache bytes of one token (:func:`kv_bytes_per_token`).
        kv_budget_bytes: Most bytes the batch's KV cache may reach; None: no bound.
        free_memory: Frees the device's cached memory after an out-of-memory error.
        prefill_chunk_tokens: Prompts longer than this are prefilled this many tokens an iteration;
            None or 0: every prompt whole.
        oom_log: The replica's record of out-of-memory errors (:class:`serving.gpu.OomLog`), by cause:
            ``preempted`` (a batch, recomputed), ``too_large`` (one sequence, 413) or ``persistent`` (one
            sequence that should fit, counted toward the replica's health); None: a log of its own.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        max_running: int,
        clock: Callable[[], float] = time.monotonic,
        observer: Optional[StepObserver] = None,
        kv_bytes_per_token: int = 0,
        kv_budget_bytes: Optional[int] = None,
        free_memory: Callable[[], None] = gc.collect,
        prefill_chunk_tokens: Optional[int] = None,
        oom_log: Optional[OomLog] = None,
    ):
        if max_running < 1:
            raise ValueError(f"max_running ({max_running}) must be >= 1")
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 0:
            raise ValueError(f"prefill_chunk_tokens ({prefill_chunk_tokens}) must be >= 0")
        self.prefill_chunk_tokens = prefill_chunk_tokens or 0
        # Long prompts part-way through their prefill (first in, first done); they count as running.
        self._prefilling: list[_Prefill] = []
        self.model, self.tokenizer, self.max_running = model, tokenizer, max_running
        self.clock, self.observer = clock, observer
        self.kv_bytes_per_token, self.kv_budget_bytes, self.free_memory = kv_bytes_per_token, kv_budget_bytes, free_memory
        # After an out-of-memory error the running set is capped at half of what failed, and doubles back
        # after every CAP_RECOVERY_STEPS steps without one.
        self._cap = max_running
        self._steps_since_oom = 0
        self.oom_log = oom_log if oom_log is not None else OomLog(clock)
        self._step_s = 0.0
        self._firsts: list[float] = []
        self._gaps: list[float] = []
        self._cache_arg = _cache_arg(model)
        eos = tokenizer.eos_token_id
        gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        self.eos_ids = {x for v in (eos, gen_eos) for x in ([v] if isinstance(v, int) else (v or []))}
        self._cv = threading.Condition()
        self._waiting: list[Sequence] = []
        self._running: list[Sequence] = []
        self._stopped = False
        # The running batch: its cache, attention mask (rows x cached length) and the token each row feeds next.
        self._cache: Any = None
        self._mask: Any = None
        self._next: Any = None
        # Progress: the end of the last decode step (liveness watches this, not request completions).
        self.last_step_s: Optional[float] = None
        self.steps = 0
        self._thread = threading.Thread(target=self._loop, name="gpuserve-model-steps", daemon=True)
        self._thread.start()

    # -- the consumers' side (any thread) ------------------------------------

    def reservation_bytes(self, peak_tokens: list[int]) -> int:
        """The most KV bytes a padded batch of sequences with these peaks may reach."""
        return len(peak_tokens) * max(peak_tokens, default=0) * self.kv_bytes_per_token

    def check_fits(self, peak_tokens: int) -> None:
        """Refuse a sequence that can never fit the KV budget (413) or cannot fit now (429)."""
        budget = self.kv_budget_bytes
        if budget is None:
            return
        need = self.reservation_bytes([peak_tokens])
        if need > budget:
            raise RequestTooLargeForDevice(
                f"prompt plus max_tokens is {peak_tokens} tokens: {need / 2**20:.1f} MiB of KV cache, more than "
                f"this replica's KV-cache budget of {budget / 2**20:.1f} MiB (generation.kv_cache_bytes, or what the "
                "device has free); lower max_tokens or shorten the prompt",
                param="max_tokens",
                code="request_too_large_for_device",
            )
        queued = [s.peak_tokens for s in self._holding() + list(self._waiting)]
        if self.reservation_bytes(queued + [peak_tokens]) > budget:
            raise Overloaded(
                f"the KV cache is full: the running and waiting sequences hold {len(queued)} places; retry when "
                "the first of them ends",
                retry_after_s=max(1.0, self._first_end_s()),
                code="kv_cache_full",
            )

    def _first_end_s(self) -> float:
        """About when the first running sequence ends (its remaining tokens at the recent step time)."""
        left = [s.max_tokens - len(s.ids or ()) for s in list(self._running)]
        return min(left, default=0) * self._step_s

    def submit(self, seq: Sequence) -> Sequence:
        """Queue a sequence; it joins the running batch at the next step with room."""
        if self.kv_budget_bytes is not None and self.reservation_bytes([seq.peak_tokens]) > self.kv_budget_bytes:
            self.check_fits(seq.peak_tokens)  # raises the 413
        seq.submitted_s = self.clock()
        with self._cv:
            if self._stopped:
                raise RuntimeError("the generation scheduler is stopped")
            self._waiting.append(seq)
            self._cv.notify()
        return seq

    def next_event(self, seq: Sequence, cancel: Optional[threading.Event] = None, coalesce: bool = False) -> Any:
        """The sequence's next event, blocking.

        Once ``cancel`` is set the sequence is cancelled (it leaves the batch at the next step) and the
        answer is ``Finished("cancelled")`` at once: the consumer has gone, the events still queued are not
        worth reading. A dead scheduler thread is an error, never an endless wait.

        With ``coalesce``, a text event comes with the text events already queued behind it, as one: a
        consumer that fell behind (a loaded replica) catches up in one message instead of one per token,
        and one that keeps up sees every token as soon as it is made.
        """
        ev = self._next_event(seq, cancel)
        if coalesce and isinstance(ev, str):
            while True:
                try:
                    more = seq.events.get_nowait()
                except queue.Empty:
                    break
                if not isinstance(more, str):
                    seq._pending = more
                    break
                ev += more
        return ev

    def _next_event(self, seq: Sequence, cancel: Optional[threading.Event]) -> Any:
        if seq._pending is not None:
            ev, seq._pending = seq._pending, None
            return ev
        while True:
            if cancel is not None and cancel.is_set():
                seq.cancel()
                return Finished("cancelled", len(seq.ids or ()))
            try:
                return seq.events.get(timeout=POLL_S)
            except queue.Empty:
                if not self._thread.is_alive():
                    return RuntimeError("the generation scheduler's thread has stopped")

    def result(self, seq: Sequence) -> tuple[str, Finished]:
        """Wait for a sequence to finish: (its text, how it ended). Raises its error."""
        while True:
            ev = self.next_event(seq)
            if isinstance(ev, BaseException):
                raise ev
            if isinstance(ev, Finished):
                return seq.text, ev

    def _holding(self) -> list[Sequence]:
        """The sequences that hold (or are building) KV cache: the batch's and those being prefilled."""
        return list(self._running) + [p.seq for p in list(self._prefilling)]

    @property
    def running(self) -> int:
        return len(self._running) + len(self._prefilling)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=5)

    # -- the model thread ----------------------------------------------------

    def _loop(self) -> None:
        import torch

        while True:
            with self._cv:
                while not self._stopped and not self._waiting and not self._running and not self._prefilling:
                    self._cv.wait()
                if self._stopped:
                    for s in self._waiting + self._holding():
                        s.events.put(RuntimeError("the generation scheduler stopped"))
                    return
                joining = self._admit()
            started = self.clock()
            failed: Optional[BaseException] = None
            oom_message: Optional[str] = None
            try:
                with torch.inference_mode():
                    self._drop(lambda s: s.cancelled)
                    self._drop_prefills()
                    joining = [s for s in joining if not s.cancelled]
                    chunk = self.prefill_chunk_tokens
                    whole = [s for s in joining if not chunk or len(s.prompt_ids) + len(s.ids) <= chunk]
                    self._prefilling += [_Prefill(s, s.prompt_ids + s.ids) for s in joining if s not in whole]
                    # Short prompts first, whole; then one chunk of the oldest long one.
                    if whole:
                        self._join(whole)
                    if self._prefilling:
                        self._prefill_chunk()
                    # The sequences already running do not pause for a prefill: every iteration steps.
                    if self._running:
                        self._step()
            except Exception as e:  # noqa: BLE001 - fail (or on OOM, preempt) the batch, keep the thread
                if is_oom(e):
                    # Keep only the message: the exception's traceback pins the failed step's tensors, which
                    # the recovery must free (it runs once this handler has ended).
                    oom_message = str(e)
                else:
                    failed = e
                    logger.error("gpuserve: generation step failed", exc_info=e)
            if failed is not None or oom_message is not None:
                involved = self._running + [p.seq for p in self._prefilling if p.seq not in self._running]
                involved += [s for s in joining if s not in involved]
                self._running, self._cache, self._mask, self._next = [], None, None, None
                self._prefilling = []
                if oom_message is not None:
                    self._recover_from_oom(involved, oom_message)
                else:
                    for s in involved:
                        s.events.put(failed)
                failed = None
            else:
                self._steps_since_oom += 1
                if self._cap < self.max_running and self._steps_since_oom >= CAP_RECOVERY_STEPS:
                    self._cap, self._steps_since_oom = min(self.max_running, 2 * self._cap), 0
                # A smoothed step time, for Retry-After.
                self._step_s += 0.2 * ((self.clock() - started) - self._step_s)
            self.last_step_s = self.clock()
            self.steps += 1
            self._report()

    def _admit(self) -> list[Sequence]:
        """Take the waiting sequences that join now (under the lock): in order, while the running set has
        room and the padded batch's bound stays within the KV budget."""
        joining: list[Sequence] = []
        holding = self._holding()
        while self._waiting and len(holding) + len(joining) < self._cap:
            s = self._waiting[0]
            if self.kv_budget_bytes is not None and (holding or joining):
                peaks = [x.peak_tokens for x in holding + joining + [s]]
                if self.reservation_bytes(peaks) > self.kv_budget_bytes:
                    break
            joining.append(self._waiting.pop(0))
        return joining

    def _recover_from_oom(self, involved: list[Sequence], error: str) -> None:
        """Free the device's cache; preempt a batch, retry a lone sequence once, then classify it."""
        self.free_memory()
        self._steps_since_oom = 0
        live = [s for s in involved if not s.cancelled]
        if len(involved) > 1:
            # Load-induced: every sequence goes back first in line, to be prefilled again with what it has.
            self._cap = max(1, len(involved) // 2)
            self.oom_log.note("preempted")
            for s in live:
                s.preempted += 1
            with self._cv:
                self._waiting = live + self._waiting
            logger.warning("gpuserve: out of memory with %d sequences; preempted them, running at most %d", len(involved), self._cap)
            return
        for s in live:
            s.ooms_alone += 1
            if s.ooms_alone < 2:
                with self._cv:  # once more, after the cache was freed
                    self._waiting.insert(0, s)
                continue
            logger.warning("gpuserve: a sequence ran out of memory alone, twice: %s", error)
            s.events.put(self.oom_log.lone_error(s.peak_tokens, "lower max_tokens or shorten the prompt", "max_tokens"))

    def _report(self) -> None:
        firsts, gaps, self._firsts, self._gaps = self._firsts, self._gaps, [], []
        if self.observer is None:
            return
        try:
            if firsts:
                self.observer.first_tokens(firsts)
            self.observer.step(len(self._running), len(self._waiting), self.kv_cache_bytes(), gaps)
        except Exception as e:  # noqa: BLE001 - metrics must never stop generation
            logger.warning("gpuserve: the scheduler's observer failed: %s", e)

    def kv_cache_bytes(self) -> int:
        """Bytes the running batch's KV cache holds (padding included: it is allocated), and the caches of
        the prompts being prefilled."""
        caches = [self._cache, *(p.cache for p in list(self._prefilling))]
        return sum(
            t.nbytes for cache in caches if cache is not None for layer in cache.layers for t in (layer.keys, layer.values) if t is not None
        )

    def _forward(self, input_ids: Any, mask: Any, cache: Any) -> tuple[Any, Any]:
        # Each row's positions count its own tokens: padding takes no position.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
        out = self.model(
            input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_arg: cache}
        )
        return out.logits[:, -1, :].float(), _cache_of(out) if cache is None else cache

    def _seed(self, s: Sequence) -> None:
        import torch

        if s.seed is not None and s.temperature > 0.0 and s._generator is None:
            s._generator = torch.Generator(device=self.model.device).manual_seed(s.seed)

    def _join(self, joining: list[Sequence]) -> None:
        """Prefill the joining sequences together and add them to the running batch."""
        import torch

        device = self.model.device
        # A preempted sequence is prefilled with what it generated so far: it goes on where it stopped.
        inputs = [s.prompt_ids + s.ids for s in joining]
        width = max(len(x) for x in inputs)
        ids = torch.full((len(joining), width), self.tokenizer.pad_token_id or 0, dtype=torch.long, device=device)
        mask = torch.zeros((len(joining), width), dtype=torch.long, device=device)
        for i, (s, x) in enumerate(zip(joining, inputs)):
            ids[i, width - len(x) :] = torch.tensor(x, device=device)
            mask[i, width - len(x) :] = 1
            self._seed(s)
        logits, cache = self._forward(ids, mask, None)
        self._add_rows(cache, mask, self._sample(logits, joining), joining)

    def _prefill_chunk(self) -> None:
        """Prefill the next chunk of the oldest long prompt; once it is whole, it joins the batch."""
        import torch

        p = self._prefilling[0]
        device = self.model.device
        n = min(self.prefill_chunk_tokens, len(p.inputs) - p.done)
        ids = torch.tensor([p.inputs[p.done : p.done + n]], dtype=torch.long, device=device)
        mask = torch.ones((1, p.done + n), dtype=torch.long, device=device)
        logits, p.cache = self._forward(ids, mask, p.cache)
        p.done += n
        if p.done < len(p.inputs):
            return
        self._prefilling.pop(0)
        self._seed(p.seq)
        self._add_rows(p.cache, mask, self._sample(logits, [p.seq]), [p.seq])

    def _drop_prefills(self) -> None:
        """Forget the prompts being prefilled whose client left (their caches go with them)."""
        for p in [p for p in self._prefilling if p.seq.cancelled]:
            p.seq.events.put(Finished("cancelled", len(p.seq.ids)))
        self._prefilling = [p for p in self._prefilling if not p.seq.cancelled]

    def _add_rows(self, cache: Any, mask: Any, tokens: Any, seqs: list[Sequence]) -> None:
        """Add freshly prefilled rows (their cache, mask and first sampled tokens) to the running batch."""
        if self._cache is None:
            _make_roomy(cache)
            self._cache, self._mask, self._next = cache, mask, tokens
            self._running = list(seqs)
        else:
            self._merge(cache, mask, tokens)
            self._running += seqs
        self._advance(tokens, seqs)

    def _merge(self, cache: Any, mask: Any, tokens: Any) -> None:
        """Append the rows of a freshly prefilled cache to the running batch's (left-padding the shorter)."""
        import torch
        import torch.nn.functional as F

        old_len, new_len = self._mask.shape[1], mask.shape[1]
        width = max(old_len, new_len)
        for mine, theirs in zip(self._cache.layers, cache.layers):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                a = F.pad(a, (0, 0, width - old_len, 0))
                b = F.pad(b, (0, 0, width - new_len, 0))
                setattr(mine, name, torch.cat([a, b], dim=0))
        self._mask = torch.cat([F.pad(self._mask, (width - old_len, 0)), F.pad(mask, (width - new_len, 0))], dim=0)
        self._next = torch.cat([self._next, tokens], dim=0)

    def _step(self) -> None:
        """One decode step for every running sequence."""
        import torch

        ones = torch.ones((self._mask.shape[0], 1), dtype=self._mask.dtype, device=self._mask.device)
        self._mask = torch.cat([self._mask, ones], dim=1)
        # The widest the batch gets if every row runs to its max_tokens: the cache's room stops there.
        limit = self._mask.shape[1] + max(s.max_tokens - len(s.ids) for s in self._running)
        for layer in self._cache.layers:
            layer.limit_tokens = limit
        logits, _ = self._forward(self._next[:, None], self._mask, self._cache)
        self._next = self._sample(logits, self._running)
        self._advance(self._next, list(self._running))

    def _sample(self, logits: Any, seqs: list[Sequence]) -> Any:
        """The next token of each row: argmax for greedy rows, else temperature and nucleus sampling."""
        import torch

        tokens = logits.argmax(dim=-1)
        for i, s in enumerate(seqs):
            if s.temperature == 0.0:
                continue
            probs = torch.softmax(logits[i] / s.temperature, dim=-1)
            if s.top_p < 1.0:
                sorted_p, order = probs.sort(descending=True)
                # Keep the smallest head of the distribution whose mass reaches top_p (at least one token).
                outside = sorted_p.cumsum(-1) - sorted_p >= s.top_p
                sorted_p[outside] = 0.0
                probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
            tokens[i] = torch.multinomial(probs, 1, generator=s._generator)[0]
        return tokens

    def _advance(self, tokens: Any, seqs: list[Sequence]) -> None:
        """Record each row's new token; finish the rows that ended and drop them from the batch."""
        now = self.clock()
        for s, tok in zip(seqs, tokens.tolist()):
            if tok in self.eos_ids:
                self._finish(s, "stop")
                continue
            # An output token (the end-of-sequence token is none): time it.
            if s.last_token_s is None:
                s.first_token_s = now
                self._firsts.append(now - s.submitted_s)
            else:
                self._gaps.append(now - s.last_token_s)
            s.last_token_s = now
            s.ids.append(tok)
            if s.incremental and self._emit(s):
                continue  # a stop sequence ended it
            if len(s.ids) >= s.max_tokens:
                self._finish(s, "length")
        self._drop(lambda s: s.ids is None)

    def _emit(self, s: Sequence, final: bool = False) -> bool:
        """Decode the new text of ``s`` and send what is safe to show; True when a stop sequence ended it."""
        window = self.tokenizer.decode(s.ids[s._prefix :], skip_special_tokens=True)
        if window.endswith("\ufffd") and not final:
            return False  # the last token ends inside a character: wait for the rest of it
        shown_before = self.tokenizer.decode(s.ids[s._prefix : s._read], skip_special_tokens=True)
        s._prefix, s._read = s._read, len(s.ids)
        safe, stopped = s.held.add(window[len(shown_before) :])
        if stopped:
            self._finish(s, "stop")
            return True
        if safe:
            s.events.put(safe)
        return False

    def _finish(self, s: Sequence, reason: str) -> None:
        if not s.incremental:
            safe, _ = s.held.add(self.tokenizer.decode(s.ids, skip_special_tokens=True))
            if safe:
                s.events.put(safe)
        elif s._read < len(s.ids) and self._emit(s, final=True):
            return  # the held-back tail held a stop sequence: _emit finished it
        rest = s.held.rest()
        if rest:
            s.events.put(rest)
        s.events.put(Finished(reason, len(s.ids)))
        self.oom_log.completed(len(s.prompt_ids) + len(s.ids))
        s.ids = None  # type: ignore[assignment] - marks it for removal from the batch

    def _drop(self, gone: Callable[[Sequence], bool]) -> None:
        """Remove the rows of finished or cancelled sequences, and the padding no row needs any more."""
        keep = [i for i, s in enumerate(self._running) if not gone(s)]
        if len(keep) == len(self._running):
            return
        for i, s in enumerate(self._running):
            if s.cancelled and s.ids is not None:
                s.events.put(Finished("cancelled", len(s.ids)))
        self._running = [self._running[i] for i in keep]
        if not keep:
            self._cache, self._mask, self._next = None, None, None
            return
        import torch

        index = torch.tensor(keep, device=self._mask.device)
        self._mask, self._next = self._mask[index], self._next[index]
        # Columns that are padding in every remaining row are dropped from the left.
        start = int((self._mask.cumsum(-1) == 0).all(dim=0).sum().item())
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:, :]
            layer.values = layer.values[index, :, start:, :]
