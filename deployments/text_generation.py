"""Causal language models behind OpenAI's ``/v1/completions``.

Non-streaming requests are batched: requests with the same sampling settings
share one left-padded ``generate`` call. Streaming requests (``stream: true``)
run one at a time and yield text deltas; stop sequences are honoured in both,
and a streamed delta never shows text that a stop sequence later removes.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, field_validator

from deployments._base import Task, parse_body
from serving.errors import InvalidRequest

__all__ = ["CausalLM", "CompletionsRequest", "TextGenerationTask"]

MAX_STOP_SEQUENCES = 4
# New tokens per warm-up request: enough to run the decode loop, cheap on any model.
WARMUP_NEW_TOKENS = 4


class CompletionsRequest(BaseModel):
    """The body of ``POST /v1/completions`` (OpenAI's shape, the fields gpuserve honours)."""

    model_config = ConfigDict(extra="forbid")

    prompt: Union[StrictStr, list[StrictStr]] = Field(description="A prompt or a list of prompts.")
    model: Optional[StrictStr] = None
    max_tokens: int = Field(default=16, ge=1, le=32768, description="Most new tokens per prompt.")
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy decoding.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: Optional[Union[StrictStr, list[StrictStr]]] = Field(
        default=None, description=f"Up to {MAX_STOP_SEQUENCES} sequences that end the text (not included)."
    )
    stream: StrictBool = False
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


@dataclass
class CompletionItem:
    """One parsed prompt with its generation settings."""

    prompt: str
    prompt_tokens: int
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    stream: bool
    index: int = 0
    # Filled for multi-prompt requests: the items of one request are answered together.
    siblings: list["CompletionItem"] = field(default_factory=list)

    def sampling_key(self) -> tuple:
        """Items with equal keys can share one generate() call."""
        return (self.temperature, self.top_p)


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

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=True)["input_ids"])

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

    def generate(
        self, prompts: list[str], max_new_tokens: list[int], temperature: float, top_p: float
    ) -> list[tuple[list[int], bool]]:
        """Generate for prompts sharing sampling settings.

        Returns per prompt the new token ids (at most its own ``max_new_tokens``)
        and whether it ended on the end-of-sequence token.
        """
        import torch

        enc = self.tokenizer(prompts, return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            out = self.model.generate(**enc, **self._gen_kwargs(max(max_new_tokens), temperature, top_p))
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
        prompt: str,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        cancel: threading.Event,
        stats: dict[str, Any],
    ) -> Iterator[str]:
        """Yield decoded text pieces as they are generated.

        ``cancel`` stops generation early; ``stats`` receives ``new_tokens`` and
        ``ended_on_eos`` as generation proceeds.
        """
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        enc = self.tokenizer([prompt], return_tensors="pt").to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        eos = self.tokenizer.eos_token_id
        stats.update(new_tokens=0, ended_on_eos=False)

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):  # noqa: ARG002 - transformers' signature
                stats["new_tokens"] = input_ids.shape[1] - prompt_len
                stats["ended_on_eos"] = bool(input_ids[0, -1].item() == eos)
                return cancel.is_set()

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        kw = self._gen_kwargs(max_new_tokens, temperature, top_p)
        errors: list[BaseException] = []

        def _run() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(
                        **enc, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancelled()]), **kw
                    )
            except BaseException as e:  # re-raised in the consumer below
                errors.append(e)
                streamer.end()

        worker = threading.Thread(target=_run, name="gpuserve-generate", daemon=True)
        worker.start()
        try:
            for piece in streamer:
                if piece:
                    yield piece
        finally:
            cancel.set()
            worker.join()
        if errors:
            raise errors[0]


class TextGenerationTask(Task):
    """The ``text_generation`` task: OpenAI ``/v1/completions`` over a CausalLM."""

    endpoints = frozenset({"completions"})

    def load(self) -> None:
        self.lm = CausalLM(self.model_dir, self.device, self.dtype)
        self.model = self.lm.model
        self.max_positions = min(self.spec.model.max_input_tokens or self.lm.max_positions, self.lm.max_positions)

    def parse(self, endpoint: str, body: Any) -> CompletionItem:
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
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        items = []
        for i, p in enumerate(prompts):
            if not p:
                raise InvalidRequest(f"prompt[{i}] is empty", param=f"prompt[{i}]", code="empty_input")
            n = self.lm.count_tokens(p)
            if n + req.max_tokens > self.max_positions:
                raise InvalidRequest(
                    f"prompt[{i}] is {n} tokens and max_tokens is {req.max_tokens}: {n + req.max_tokens} is more "
                    f"than the model's context of {self.max_positions} tokens; shorten the prompt or lower max_tokens",
                    param="max_tokens" if n < self.max_positions else f"prompt[{i}]",
                    code="context_length_exceeded",
                )
            items.append(CompletionItem(p, n, req.max_tokens, req.temperature, req.top_p, stops, req.stream, i))
        head = items[0]
        head.siblings = items[1:]
        return head

    def wants_stream(self, item: CompletionItem) -> bool:
        return item.stream

    def _complete(self, items: list[CompletionItem]) -> list[tuple[str, str, int]]:
        """(text, finish_reason, completion_tokens) per item, grouping equal sampling settings."""
        results: list[Optional[tuple[str, str, int]]] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, it in enumerate(items):
            groups.setdefault(it.sampling_key(), []).append(i)
        for (temperature, top_p), idx in groups.items():
            outs = self.lm.generate(
                [items[i].prompt for i in idx], [items[i].max_tokens for i in idx], temperature, top_p
            )
            for i, (ids, ended) in zip(idx, outs):
                text = self.lm.tokenizer.decode(ids, skip_special_tokens=True)
                text, stopped = cut_at_stop(text, items[i].stop)
                reason = "stop" if (stopped or ended) else "length"
                results[i] = (text, reason, len(ids))
        return results  # type: ignore[return-value]

    def run_batch(self, items: list[CompletionItem]) -> list[dict[str, Any]]:
        flat = [x for it in items for x in [it, *it.siblings]]
        done = iter(self._complete(flat))
        out = []
        for it in items:
            choices, prompt_tokens, completion_tokens = [], 0, 0
            for member in [it, *it.siblings]:
                text, reason, n = next(done)
                choices.append({"text": text, "index": member.index, "finish_reason": reason, "logprobs": None})
                prompt_tokens += member.prompt_tokens
                completion_tokens += n
            out.append(
                {
                    "id": f"cmpl-{uuid.uuid4().hex}",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": self.spec.served_name,
                    "choices": choices,
                    "usage": {
                        "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens,
                    },
                }
            )
        return out

    def stream(self, item: CompletionItem, cancel: threading.Event) -> Iterator[dict[str, Any]]:
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(text: str, reason: Optional[str]) -> dict[str, Any]:
            return {
                "id": cid,
                "object": "text_completion",
                "created": created,
                "model": self.spec.served_name,
                "choices": [{"text": text, "index": 0, "finish_reason": reason, "logprobs": None}],
            }

        stats: dict[str, Any] = {}
        text, shown, reason = "", 0, "length"
        for piece in self.lm.stream(item.prompt, item.max_tokens, item.temperature, item.top_p, cancel, stats):
            text += piece
            cut, stopped = cut_at_stop(text, item.stop)
            if stopped:
                text, reason = cut, "stop"
                cancel.set()
                break
            safe = safe_prefix_len(text, item.stop)
            if safe > shown:
                yield chunk(text[shown:safe], None)
                shown = safe
        else:
            if stats.get("ended_on_eos"):
                reason = "stop"
        tail = text[shown:]
        yield chunk(tail, reason)

    def warmup_items(self, texts: list[str]) -> list[CompletionItem]:
        return [CompletionItem(t, self.lm.count_tokens(t), WARMUP_NEW_TOKENS, 0.0, 1.0, [], False) for t in texts]

    def count_tokens(self, text: str) -> int:
        return self.lm.count_tokens(text)

    def item_tokens(self, item: CompletionItem) -> int:
        return item.prompt_tokens

    def max_input_tokens_for_warmup(self) -> int:
        return self.max_positions - WARMUP_NEW_TOKENS

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "context_tokens": self.max_positions}
