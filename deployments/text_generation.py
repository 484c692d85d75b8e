"""Causal language models behind OpenAI's ``/v1/completions`` and ``/v1/chat/completions``.

A chat request's ``messages`` are rendered with the tokenizer's chat template;
from then on both endpoints are one work item: token ids and sampling settings.
Non-streaming requests are batched: requests with the same sampling settings
share one left-padded ``generate`` call (a seeded sampled request runs alone, so
its seed alone decides its text). Streaming requests (``stream: true``) yield
text deltas; stop sequences are honoured in both, and a streamed delta never
shows text that a stop sequence later removes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator, model_validator

from serving.task import Task, parse_body
from deployments._scheduler import (
    Finished,
    GenerationScheduler,
    HeldBack,
    Sequence,
    cut_at_stop,
    kv_bytes_per_token,
    supports,
)
from serving.errors import InvalidRequest, is_oom
from serving.gpu import free_cache_for, memory_budget_bytes

logger = logging.getLogger("ray.serve")

__all__ = ["CausalLM", "ChatCompletionsRequest", "CompletionsRequest", "TextGenerationTask"]

MAX_STOP_SEQUENCES = 4
# New tokens per warm-up request: enough to run the decode loop, cheap on any model.
WARMUP_NEW_TOKENS = 4
# OpenAI's default for /v1/completions; chat's default is the rest of the context.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
# How long a static stream's consumer waits for the next piece before it checks that its generate still runs.
STREAM_POLL_S = 1.0


class StreamOptions(BaseModel):
    """``stream_options`` of a streamed request."""

    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = Field(
        default=False, description="End the stream with a chunk that carries the usage and no choices."
    )


class _GenerationFields(BaseModel):
    """The fields both endpoints share: the model, sampling, stop sequences and streaming."""

    model_config = ConfigDict(extra="forbid")

    model: Optional[StrictStr] = None
    max_tokens: Optional[int] = Field(default=None, ge=1, le=32768, description="Most new tokens.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    seed: Optional[int] = Field(
        default=None, ge=0, lt=2**63, description="Seeds sampling: the same seed, settings and prompt give the same text."
    )
    stop: Optional[Union[StrictStr, list[StrictStr]]] = Field(
        default=None, description=f"Up to {MAX_STOP_SEQUENCES} sequences that end the text (not included)."
    )
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = Field(default=None, description="Only with stream: true.")
    n: int = Field(default=1, ge=1, le=1, description="Only 1 is supported.")
    user: Optional[StrictStr] = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: Any) -> Any:
        stops = [v] if isinstance(v, str) else (v or [])
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        return v

    @model_validator(mode="after")
    def _stream_options_need_a_stream(self) -> "_GenerationFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream: true; drop it or set stream: true")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionsRequest(_GenerationFields):
    """The body of ``POST /v1/completions`` (OpenAI's shape, the fields gpuserve honours)."""

    prompt: Union[StrictStr, list[StrictStr]] = Field(description="A prompt or a list of prompts.")
    max_tokens: Optional[int] = Field(
        default=COMPLETIONS_DEFAULT_MAX_TOKENS, ge=1, le=32768, description="Most new tokens per prompt."
    )


class TextPart(BaseModel):
    """One part of a message's content: only text is served."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text"] = Field(description="'text' (images and audio are not served).")
    text: StrictStr


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: Union[StrictStr, list[TextPart]]
    name: Optional[StrictStr] = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionsRequest(_GenerationFields):
    """The body of ``POST /v1/chat/completions`` (OpenAI's shape, the fields gpuserve honours)."""

    messages: list[ChatMessage] = Field(min_length=1, description="The conversation so far.")
    max_tokens: Optional[int] = Field(
        default=None, ge=1, le=32768, description="Most new tokens (default: up to the model's context)."
    )
    max_completion_tokens: Optional[int] = Field(
        default=None, ge=1, le=32768, description="OpenAI's newer name for max_tokens."
    )

    @model_validator(mode="after")
    def _one_token_limit(self) -> "ChatCompletionsRequest":
        a, b = self.max_tokens, self.max_completion_tokens
        if a is not None and b is not None and a != b:
            raise ValueError(
                f"max_tokens ({a}) and max_completion_tokens ({b}) disagree; send one of them"
            )
        return self

    def token_limit(self) -> Optional[int]:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


@dataclass
class CompletionItem:
    """One prompt, as token ids, with its generation settings."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    index: int = 0
    seed: Optional[int] = None
    # The endpoint's answer shape, and whether a stream ends with a usage chunk.
    chat: bool = False
    include_usage: bool = False
    # Filled for multi-prompt requests: the items of one request are answered together.
    siblings: list["CompletionItem"] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    def sampling_key(self) -> tuple:
        """Items with equal keys can share one generate() call.

        A seeded sampled item gets a key of its own: in a batch, the other rows would draw from its
        random stream, and its text would depend on who it was batched with.
        """
        if self.seed is not None and self.temperature > 0.0:
            return (self.temperature, self.top_p, self.seed, id(self))
        return (self.temperature, self.top_p, None)


# What ``generation.scheduler: auto`` runs on each device: the faster in bench/generation.py
# (docs/benchmarks.md). Only measured devices are listed; others take the iteration scheduler.
AUTO_SCHEDULER = {"cpu": "iteration"}


# The prefill chunk (tokens) the iteration scheduler uses by default on each device: measured in
# bench/generation.py (docs/benchmarks.md). Devices not measured get DEFAULT_PREFILL_CHUNK.
AUTO_PREFILL_CHUNK = {"cpu": 128}
DEFAULT_PREFILL_CHUNK = 512


def resolve_prefill_chunk(requested: Optional[int], device: str) -> int:
    """The prefill chunk a replica uses: the requested one, or the one measured for its device."""
    if requested is not None:
        return requested
    return AUTO_PREFILL_CHUNK.get(device, DEFAULT_PREFILL_CHUNK)


def resolve_scheduler(requested: str, device: str) -> str:
    """The scheduler a replica runs: the requested one, or for 'auto' the one measured faster on its device."""
    if requested != "auto":
        return requested
    return AUTO_SCHEDULER.get(device, "iteration")


class CausalLM:
    """A transformers causal LM with batched and streaming generation (no Ray)."""

    def __init__(self, model_dir: Any, device: str = "cpu", dtype: Any = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        # Decoder-only batches pad on the left so every row's next token lines up.
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype or torch.float32)
        self.model.to(device).eval()
        cfg = self.model.config
        self.max_positions = int(
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
        )
        # Monotonic time of the last token generated on the static path (liveness by progress).
        self.last_token_s: Optional[float] = None
        # One generation on the device at a time: the model thread's batches and every stream take it, so
        # N streams are never N generations at once beside a batch (and outside its memory guard).
        self.device_lock = threading.Lock()

    def encode(self, text: str) -> list[int]:
        """Token ids of a prompt, special tokens included (a BOS where the model wants one)."""
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def count_tokens(self, text: str) -> int:
        return len(self.encode(text))

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation rendered with the tokenizer's chat template, ready for the reply.

        The template writes its own special tokens, so none are added on top. Raises ``ValueError``
        when the model has no template and the template's own error when it refuses the messages.
        """
        if not self.has_chat_template:
            raise ValueError("the model's tokenizer has no chat template")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _gen_kwargs(self, max_new_tokens: int, temperature: float, top_p: float) -> dict[str, Any]:
        kw: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
            "eos_token_id": self.tokenizer.eos_token_id,
        }
        if temperature == 0.0:
            kw["do_sample"] = False
        else:
            kw.update(do_sample=True, temperature=temperature, top_p=top_p)
        return kw

    def _progress_criteria(self) -> Any:
        """A stopping criterion that never stops: it stamps ``last_token_s`` at every generated token."""
        from transformers import StoppingCriteria, StoppingCriteriaList

        lm = self

        class _Progress(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ARG002 - transformers' signature
                import torch

                lm.last_token_s = time.monotonic()
                return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

        return StoppingCriteriaList([_Progress()])

    def _inputs(self, prompts: list[list[int]]) -> Any:
        """A left-padded batch (ids and attention mask) on the model's device."""
        return self.tokenizer.pad({"input_ids": prompts}, return_tensors="pt", padding=True).to(self.device)

    @staticmethod
    def _seed(seed: Optional[int]) -> None:
        # generate() draws from torch's global generator; the model thread is the one caller of a batch.
        if seed is not None:
            import torch

            torch.manual_seed(seed)

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: list[int],
        temperature: float,
        top_p: float,
        seed: Optional[int] = None,
    ) -> list[tuple[list[int], bool]]:
        """Generate for prompts (token ids) sharing sampling settings.

        Returns per prompt the new token ids (at most its own ``max_new_tokens``)
        and whether it ended on the end-of-sequence token.
        """
        import torch

        enc = self._inputs(prompts)
        with self.device_lock, torch.inference_mode():
            self._seed(seed)
            out = self.model.generate(
                **enc, stopping_criteria=self._progress_criteria(), **self._gen_kwargs(max(max_new_tokens), temperature, top_p)
            )
        new = out[:, enc["input_ids"].shape[1] :].tolist()
        eos = self.tokenizer.eos_token_id
        results = []
        for ids, limit in zip(new, max_new_tokens):
            ended = False
            if eos in ids[:limit]:
                ids = ids[: ids.index(eos)]
                ended = True
            results.append((ids[:limit], ended))
        return results

    def stream(
        self,
        prompt: list[int],
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        cancel: threading.Event,
        stats: dict[str, Any],
        seed: Optional[int] = None,
    ) -> Iterator[str]:
        """Yield decoded text pieces as they are generated for one prompt (token ids).

        ``cancel`` stops generation early; ``stats`` receives ``new_tokens`` and
        ``ended_on_eos`` as generation proceeds.
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        enc = self._inputs([prompt])
        prompt_len = enc["input_ids"].shape[1]
        eos = self.tokenizer.eos_token_id
        stats.update(new_tokens=0, ended_on_eos=False)

        lm = self

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ARG002 - transformers' signature
                lm.last_token_s = time.monotonic()
                stats["new_tokens"] = input_ids.shape[1] - prompt_len
                stats["ended_on_eos"] = bool(input_ids[0, -1].item() == eos)
                return cancel.is_set()

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=STREAM_POLL_S)
        kw = self._gen_kwargs(max_new_tokens, temperature, top_p)
        errors: list[BaseException] = []

        def _run() -> None:
            try:
                with self.device_lock, torch.inference_mode():
                    if cancel.is_set():  # the client left while it waited for the device: nothing to run
                        streamer.end()
                        return
                    self._seed(seed)
                    self.model.generate(
                        **enc, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled()]), **kw
                    )
            except BaseException as e:  # re-raised in the consumer below
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=_run, name="gpuserve-generate", daemon=True)
        worker.start()
        pieces = iter(streamer)
        try:
            while True:
                try:
                    piece = next(pieces)
                except StopIteration:
                    break
                except queue.Empty:
                    # Nothing for a while: the stream may wait for the device behind other generations, as
                    # long as they take; only a generate that is gone without a word ends it.
                    if worker.is_alive():
                        continue
                    break
                if piece:
                    yield piece
        finally:
            cancel.set()
            worker.join()
        if errors:
            raise errors[0]


class TextGenerationTask(Task[CompletionItem]):
    """The ``text_generation`` task: OpenAI ``/v1/completions`` and ``/v1/chat/completions`` over a CausalLM."""

    endpoints = frozenset({"completions", "chat/completions"})

    def load(self) -> None:
        self.lm = CausalLM(self.model_dir, self.device, self.dtype)
        self.model = self.lm.model
        self.max_positions = min(self.spec.model.max_input_tokens or self.lm.max_positions, self.lm.max_positions)
        self.scheduler: Optional[GenerationScheduler] = None
        self._free_cache = free_cache_for(self.device)
        self.scheduler_mode = resolve_scheduler(self.spec.generation.scheduler, self.device)
        if self.scheduler_mode == "iteration":
            why_not = supports(self.model)
            if why_not is not None:
                logger.warning("gpuserve: the iteration scheduler cannot run this model (%s); using static", why_not)
                self.scheduler_mode = "static"
            else:
                element = next(self.model.parameters()).element_size()
                self.scheduler = GenerationScheduler(
                    self.model,
                    self.lm.tokenizer,
                    self.spec.generation.max_running_sequences,
                    kv_bytes_per_token=kv_bytes_per_token(self.model.config, element),
                    kv_budget_bytes=self._kv_budget_bytes(),
                    free_memory=self._free_cache,
                    prefill_chunk_tokens=resolve_prefill_chunk(self.spec.generation.prefill_chunk_tokens, self.device),
                    oom_log=self.oom_log,
                )

    def _kv_budget_bytes(self) -> Optional[int]:
        """The configured KV-cache budget, else on CUDA 80 % of what the high-water mark leaves after loading."""
        if self.spec.generation.kv_cache_bytes is not None:
            return self.spec.generation.kv_cache_bytes
        if self.device != "cuda":
            return None
        import torch

        left = memory_budget_bytes("cuda", self.spec.memory.high_water_ratio) - torch.cuda.memory_allocated()
        # The rest is for activations (a prefill's logits and attention) and fragmentation.
        return max(0, int(0.8 * left))

    def set_observer(self, observer: Any) -> None:
        # Token-level metrics come from the iteration scheduler (the static path reports none).
        if self.scheduler is not None:
            self.scheduler.observer = observer

    @property
    def runs_concurrently(self) -> bool:
        """With the scheduler, requests are handed over one by one as they come: it batches them per step."""
        return self.scheduler is not None

    def progress_s(self) -> Optional[float]:
        """When the model last generated a token (a decode step), on either path."""
        marks = [x for x in (self.lm.last_token_s, self.scheduler.last_step_s if self.scheduler else None) if x]
        return max(marks, default=None)

    def _sequence(self, item: CompletionItem, incremental: bool) -> Sequence:
        return Sequence(
            item.prompt_ids, item.max_tokens, item.temperature, item.top_p, item.stop, item.seed, incremental
        )

    # -- parsing -------------------------------------------------------------

    def parse(self, endpoint: str, body: Any) -> CompletionItem:
        if endpoint == "chat/completions":
            return self._parse_chat(body)
        req = parse_body(CompletionsRequest, body)
        self.check_model(req.model)
        prompts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        if not prompts:
            raise InvalidRequest("prompt is an empty list; send at least one prompt", param="prompt", code="empty_input")
        limit = self.spec.queue.max_inputs_per_request
        if len(prompts) > limit:
            raise InvalidRequest(
                f"prompt has {len(prompts)} prompts, more than this deployment's limit of {limit}; split the request",
                param="prompt",
                code="too_many_inputs",
            )
        if req.stream and len(prompts) > 1:
            raise InvalidRequest(
                "stream: true takes a single prompt; send one prompt per streaming request",
                param="stream",
                code="unsupported_stream",
            )
        items = []
        for i, p in enumerate(prompts):
            if not p:
                raise InvalidRequest(f"prompt[{i}] is empty", param=f"prompt[{i}]", code="empty_input")
            items.append(self._item(req, self.lm.encode(p), req.max_tokens, f"prompt[{i}]", index=i))
        head = items[0]
        head.siblings = items[1:]
        return head

    def _parse_chat(self, body: Any) -> CompletionItem:
        req = parse_body(ChatCompletionsRequest, body)
        self.check_model(req.model)
        if not self.lm.has_chat_template:
            raise InvalidRequest(
                f"model {self.spec.served_name!r} has no chat template, so its messages cannot be rendered; "
                "send the text to /v1/completions, or serve the model with a tokenizer that has a chat_template",
                param="messages",
                code="chat_template_missing",
            )
        # Templates know system, user and assistant; OpenAI's newer 'developer' role is a system message.
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in req.messages]
        try:
            ids = self.lm.encode_chat(messages)
        except Exception as e:  # noqa: BLE001 - a template refusing the conversation (jinja's raise_exception)
            raise InvalidRequest(
                f"the model's chat template refused these messages: {e}; fix the order or roles of messages",
                param="messages",
                code="invalid_messages",
            ) from None
        return self._item(req, ids, req.token_limit(), "messages", chat=True)

    def _item(
        self, req: _GenerationFields, ids: list[int], max_tokens: Optional[int], what: str, index: int = 0, chat: bool = False
    ) -> CompletionItem:
        """The work item of one prompt, its length checked against the context."""
        n = len(ids)
        room = self.max_positions - n
        if max_tokens is None:
            # Chat's default: the rest of the context (as OpenAI's).
            if room < 1:
                raise InvalidRequest(
                    f"{what} is {n} tokens, which leaves no room for a reply in the model's context of "
                    f"{self.max_positions} tokens; shorten it",
                    param=what,
                    code="context_length_exceeded",
                )
            max_tokens = room
        elif max_tokens > room:
            raise InvalidRequest(
                f"{what} is {n} tokens and max_tokens is {max_tokens}: {n + max_tokens} is more than the model's "
                f"context of {self.max_positions} tokens; shorten the {'messages' if chat else 'prompt'} or lower "
                "max_tokens",
                param="max_tokens" if n < self.max_positions else what,
                code="context_length_exceeded",
            )
        if self.scheduler is not None:
            # Before any work, and before a stream's head is sent: 413 if it can never fit, 429 if not now.
            self.scheduler.check_fits(n + max_tokens)
        usage = req.stream_options.include_usage if req.stream_options else False
        return CompletionItem(
            ids, max_tokens, req.temperature, req.top_p, req.stops(), req.stream, index, req.seed, chat, usage
        )

    def wants_stream(self, item: CompletionItem) -> bool:
        return item.stream

    # -- answering -----------------------------------------------------------

    def _complete(self, items: list[CompletionItem]) -> list[tuple[str, str, int]]:
        """(text, finish_reason, completion_tokens) per item, grouping equal sampling settings."""
        if self.scheduler is not None:
            seqs = [self.scheduler.submit(self._sequence(it, incremental=bool(it.stop))) for it in items]
            done = [self.scheduler.result(q) for q in seqs]
            return [(text, end.reason, end.completion_tokens) for text, end in done]
        results: list[Optional[tuple[str, str, int]]] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.sampling_key(), []).append(i)
        for idx in groups.values():
            first = items[idx[0]]
            outs = self.lm.generate(
                [items[i].prompt_ids for i in idx],
                [items[i].max_tokens for i in idx],
                first.temperature,
                first.top_p,
                first.seed if first.temperature > 0.0 else None,
            )
            for i, (ids, ended) in zip(idx, outs):
                text = self.lm.tokenizer.decode(ids, skip_special_tokens=True)
                text, stopped = cut_at_stop(text, items[i].stop)
                reason = "stop" if (stopped or ended) else "length"
                results[i] = (text, reason, len(ids))
        return results  # type: ignore[return-value]

    def _envelope(self, item: CompletionItem, cid: str, created: int) -> dict[str, Any]:
        """The fields every answer and chunk of one request shares."""
        kind = ("chat.completion" if item.chat else "text_completion") + ("" if not item.stream or not item.chat else ".chunk")
        return {"id": cid, "object": kind, "created": created, "model": self.spec.served_name}

    @staticmethod
    def _new_id(item: CompletionItem) -> str:
        return ("chatcmpl-" if item.chat else "cmpl-") + uuid.uuid4().hex

    def run_batch(self, items: list[CompletionItem]) -> list[dict[str, Any]]:
        flat = [x for it in items for x in [it, *it.siblings]]
        done = iter(self._complete(flat))
        out = []
        for it in items:
            choices, prompt_tokens, completion_tokens = [], 0, 0
            for member in [it, *it.siblings]:
                text, reason, n = next(done)
                if it.chat:
                    message = {"role": "assistant", "content": text}
                    choices.append({"index": member.index, "message": message, "finish_reason": reason, "logprobs": None})
                else:
                    choices.append({"text": text, "index": member.index, "finish_reason": reason, "logprobs": None})
                prompt_tokens += member.prompt_tokens
                completion_tokens += n
            out.append(
                {
                    **self._envelope(it, self._new_id(it), int(time.time())),
                    "choices": choices,
                    "usage": _usage(prompt_tokens, completion_tokens),
                }
            )
        return out

    def _text_deltas(self, item: CompletionItem, cancel: threading.Event, stats: dict[str, Any]) -> Iterator[tuple[str, Optional[str]]]:
        """(text, finish_reason) deltas of a stream: reason None until the last, which may carry text."""
        if self.scheduler is not None:
            seq = self.scheduler.submit(self._sequence(item, incremental=True))
            try:
                while True:
                    # Coalesced: a stream that fell behind sends what it has in one chunk, not one per token.
                    ev = self.scheduler.next_event(seq, cancel, coalesce=True)
                    if isinstance(ev, BaseException):
                        raise ev
                    if isinstance(ev, Finished):
                        stats.update(new_tokens=ev.completion_tokens, ended_on_eos=False)
                        if ev.reason != "cancelled":  # else nobody is left to read a last chunk
                            yield "", ev.reason
                        return
                    yield ev, None
            finally:
                # The client left (the generator closed): the sequence leaves the batch at the next step.
                seq.cancel()
        # The static path: one generate for the stream, under the device lock. An out-of-memory error before
        # any text is shown is retried once on the freed cache; after that, or twice, it is classified in the
        # replica's OomLog like a batch's (413 too large, or the device's trouble), by the same measure the
        # static path's batches use (item_tokens: the prompt), so the two compare like with like.
        shown_any = False
        for attempt in (1, 2):
            try:
                for text, reason in self._static_deltas(item, _Attempt(cancel), stats):
                    shown_any = shown_any or bool(text)
                    yield text, reason
                self.oom_log.completed(self.item_tokens(item))
                return
            except Exception as e:
                if not is_oom(e):
                    raise
            # Freed outside the handler: a live exception's traceback pins the failed attempt's tensors.
            self._free_cache()
            if shown_any or attempt == 2:
                raise self.oom_log.lone_error(
                    self.item_tokens(item), "shorten the prompt or lower max_tokens", retried=attempt == 2
                )

    def _static_deltas(self, item: CompletionItem, cancel: Any, stats: dict[str, Any]) -> Iterator[tuple[str, Optional[str]]]:
        """One attempt at a stream on the static path, its stop sequences held back."""
        held, reason = HeldBack(item.stop), "length"
        for piece in self.lm.stream(item.prompt_ids, item.max_tokens, item.temperature, item.top_p, cancel, stats, item.seed):
            safe, stopped = held.add(piece)
            if stopped:
                reason = "stop"
                cancel.set()
                break
            if safe:
                yield safe, None
        else:
            if stats.get("ended_on_eos"):
                reason = "stop"
        yield held.rest(), reason

    def stream(self, item: CompletionItem, cancel: threading.Event) -> Iterator[dict[str, Any]]:
        head = self._envelope(item, self._new_id(item), int(time.time()))
        # With include_usage every chunk carries "usage": null and a last chunk the usage (OpenAI's shape).
        tail = {"usage": None} if item.include_usage else {}

        def chunk(text: Optional[str], reason: Optional[str], role: bool = False) -> dict[str, Any]:
            if item.chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
            else:
                choice = {"text": text or "", "index": 0, "finish_reason": reason, "logprobs": None}
            return {**head, "choices": [choice], **tail}

        if item.chat:
            yield chunk(None, None, role=True)
        stats: dict[str, Any] = {}
        for text, reason in self._text_deltas(item, cancel, stats):
            if item.chat and reason is not None and text:
                # Chat ends on a delta of its own: text first, then the reason with an empty delta.
                yield chunk(text, None)
                text = ""
            yield chunk(text, reason)
        if item.include_usage:
            # The end-of-sequence token is generated but not part of the text (as in run_batch).
            made = int(stats.get("new_tokens", 0)) - int(bool(stats.get("ended_on_eos")))
            yield {**head, "choices": [], "usage": _usage(item.prompt_tokens, made)}

    # -- warm-up and memory --------------------------------------------------

    def warmup_items(self, texts: list[str]) -> list[CompletionItem]:
        return [CompletionItem(self.lm.encode(t), WARMUP_NEW_TOKENS, 0.0, 1.0, [], False) for t in texts]

    def count_tokens(self, text: str) -> int:
        return self.lm.count_tokens(text)

    def item_tokens(self, item: CompletionItem) -> int:
        return item.prompt_tokens

    def max_input_tokens_for_warmup(self) -> int:
        longest = self.max_positions
        sched = self.scheduler
        if sched is not None and sched.kv_budget_bytes is not None and sched.kv_bytes_per_token:
            # Longer than the KV budget holds is refused (413): warm-up covers the longest request that fits.
            longest = min(longest, sched.kv_budget_bytes // sched.kv_bytes_per_token)
        return max(1, longest - WARMUP_NEW_TOKENS)

    def describe(self) -> dict[str, Any]:
        facts = {**super().describe(), "context_tokens": self.max_positions, "chat_template": self.lm.has_chat_template}
        sched = self.scheduler
        facts["generation"] = {"scheduler": self.scheduler_mode}
        if sched is not None:
            facts["generation"].update(
                running=sched.running,
                waiting=sched.waiting,
                kv_cache_bytes=sched.kv_cache_bytes(),
                kv_budget_bytes=sched.kv_budget_bytes,
                kv_bytes_per_token=sched.kv_bytes_per_token,
                ooms=dict(self.oom_log.counts),
            )
        return facts


class _Attempt:
    """The cancel flag of one attempt at a static stream: set when the attempt ends, or by the client."""

    def __init__(self, client: threading.Event):
        self.client, self.own = client, threading.Event()

    def is_set(self) -> bool:
        return self.own.is_set() or self.client.is_set()

    def set(self) -> None:
        self.own.set()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
