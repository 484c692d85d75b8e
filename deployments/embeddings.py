"""Sentence embeddings behind OpenAI's ``/v1/embeddings``.

Mean pooling over the attention mask, then L2 normalisation: the recipe the
sentence-transformers models (all-MiniLM-L6-v2 among them) were trained with,
so cosine similarity is a dot product of the returned vectors.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from serving.task import Task, parse_body
from serving.errors import InvalidRequest

__all__ = ["EmbeddingsRequest", "EmbeddingsTask", "SentenceEncoder"]


class EmbeddingsRequest(BaseModel):
    """The body of ``POST /v1/embeddings`` (OpenAI's shape)."""

    model_config = ConfigDict(extra="forbid")

    input: Union[StrictStr, list[StrictStr]] = Field(description="A text or a list of texts.")
    model: Optional[StrictStr] = Field(default=None, description="Must name this deployment's model.")
    encoding_format: Literal["float", "base64"] = Field(
        default="float", description="'float': JSON numbers; 'base64': little-endian float32 bytes."
    )
    dimensions: Optional[int] = Field(default=None, ge=1, description="Must equal the model's size.")
    user: Optional[StrictStr] = Field(default=None, description="Accepted for compatibility; unused.")


@dataclass
class EmbeddingsItem:
    """One parsed request: its texts and their token counts."""

    texts: list[str]
    token_ids: list[list[int]]
    encoding_format: str

    @property
    def token_count(self) -> int:
        return sum(len(ids) for ids in self.token_ids)


class SentenceEncoder:
    """A transformers encoder with mean pooling and normalisation (no Ray).

    Args:
        model_dir: Directory saved with ``save_pretrained``.
        device: ``'cpu'`` or ``'cuda'``.
        dtype: torch dtype for the weights.
    """

    def __init__(self, model_dir: Any, device: str = "cpu", dtype: Any = None):
        import torch
        from transformers import AutoModel, AutoTokenizer

        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        self.model = AutoModel.from_pretrained(str(model_dir), dtype=dtype or torch.float32)
        self.model.to(device).eval()
        self.dim = int(self.model.config.hidden_size)
        # The usable length is the smaller of the tokenizer's and the position table's.
        limits = [getattr(self.model.config, "max_position_embeddings", None)]
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        if tok_max is not None and tok_max < 1_000_000:
            limits.append(tok_max)
        self.max_tokens = min(int(x) for x in limits if x)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids including special tokens, untruncated (callers check the length)."""
        return self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]

    def encode(self, texts: list[str], max_batch: int = 64) -> Any:
        """Return a float32 numpy array (len(texts), dim) of unit vectors."""
        ids = [x[: self.max_tokens] for x in self.tokenize(texts)]
        return self.encode_ids(ids, max_batch)

    def encode_ids(self, token_ids: list[list[int]], max_batch: int = 64) -> Any:
        """Like ``encode`` for already tokenized inputs (each at most ``max_tokens`` long)."""
        import numpy as np
        import torch

        out = np.empty((len(token_ids), self.dim), dtype=np.float32)
        # Sort by length so each forward pass pads as little as possible.
        order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
        with torch.inference_mode():
            for start in range(0, len(order), max_batch):
                idx = order[start : start + max_batch]
                enc = self.tokenizer.pad(
                    {"input_ids": [token_ids[i] for i in idx]}, padding=True, return_tensors="pt"
                ).to(self.device)
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled.float(), p=2, dim=1)
                out[idx] = pooled.cpu().numpy()
        return out


class EmbeddingsTask(Task[EmbeddingsItem]):
    """The ``embeddings`` task: OpenAI ``/v1/embeddings`` over a SentenceEncoder."""

    endpoints = frozenset({"embeddings"})

    def load(self) -> None:
        self.encoder = SentenceEncoder(self.model_dir, self.device, self.dtype)
        self.model = self.encoder.model
        self.max_tokens = min(self.spec.model.max_input_tokens or self.encoder.max_tokens, self.encoder.max_tokens)

    def parse(self, endpoint: str, body: Any) -> EmbeddingsItem:
        req = parse_body(EmbeddingsRequest, body)
        self.check_model(req.model)
        texts = [req.input] if isinstance(req.input, str) else list(req.input)
        limit = self.spec.queue.max_inputs_per_request
        if not texts:
            raise InvalidRequest("input is an empty list; send at least one text", param="input", code="empty_input")
        if len(texts) > limit:
            raise InvalidRequest(
                f"input has {len(texts)} texts, more than this deployment's limit of {limit} "
                "(queue.max_inputs_per_request); split the request",
                param="input",
                code="too_many_inputs",
            )
        for i, t in enumerate(texts):
            if not t.strip():
                raise InvalidRequest(
                    f"input[{i}] is empty or whitespace; every text must have content",
                    param=f"input[{i}]",
                    code="empty_input",
                )
        if req.dimensions is not None and req.dimensions != self.encoder.dim:
            raise InvalidRequest(
                f"dimensions ({req.dimensions}) is not supported; this model returns {self.encoder.dim}-d "
                "vectors: omit dimensions or send that value",
                param="dimensions",
                code="unsupported_dimensions",
            )
        token_ids = self.encoder.tokenize(texts)
        for i, n in enumerate(map(len, token_ids)):
            if n > self.max_tokens:
                raise InvalidRequest(
                    f"input[{i}] is {n} tokens, more than the model accepts ({self.max_tokens}); "
                    "shorten or split the text",
                    param=f"input[{i}]",
                    code="input_too_long",
                )
        return EmbeddingsItem(texts=texts, token_ids=token_ids, encoding_format=req.encoding_format)

    def run_batch(self, items: list[EmbeddingsItem]) -> list[dict[str, Any]]:
        # One forward pass (or a few, sorted by length) for all requests' texts.
        flat = [ids for it in items for ids in it.token_ids]
        vectors = self.encoder.encode_ids(flat, max_batch=max(1, self.spec.batching.max_batch_size * 8))
        out, pos = [], 0
        for it in items:
            n = len(it.texts)
            data = []
            for j, vec in enumerate(vectors[pos : pos + n]):
                emb: Any = (
                    base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
                    if it.encoding_format == "base64"
                    else vec.tolist()
                )
                data.append({"object": "embedding", "index": j, "embedding": emb})
            pos += n
            tokens = it.token_count
            out.append(
                {
                    "object": "list",
                    "data": data,
                    "model": self.spec.served_name,
                    "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                }
            )
        return out

    def warmup_items(self, texts: list[str]) -> list[EmbeddingsItem]:
        return [EmbeddingsItem([t], [x[: self.max_tokens] for x in self.encoder.tokenize([t])], "float") for t in texts]

    def count_tokens(self, text: str) -> int:
        return len(self.encoder.tokenize([text])[0])

    def item_tokens(self, item: EmbeddingsItem) -> int:
        return max(len(ids) for ids in item.token_ids)

    def max_input_tokens_for_warmup(self) -> int:
        return self.max_tokens

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "dimensions": self.encoder.dim, "max_input_tokens": self.max_tokens}
