"""The task contract: what a model deployment's code implements, and the helpers tasks share.

A task owns a loaded model and nothing else: it parses a request body into a work item (raising
``InvalidRequest`` for anything wrong), runs a batch of work items, and optionally streams one. It imports
neither Ray nor FastAPI, so it is tested and benchmarked on its own, and runs on a GPU machine without Ray.
The built-in tasks (``deployments.embeddings``, ``deployments.text_generation``) implement it; a user task
subclasses :class:`Task` and is named in a spec by import path (``task="my_module:MyTask"``).
See docs/tasks.md.
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Generic, Iterator, Optional, TypeVar

from pydantic import BaseModel, ValidationError

from serving.errors import InvalidRequest, ModelNotFound
from serving.gpu import OomLog
from serving.spec import ModelDeployment
from serving.weights import resolve_model_path

__all__ = ["Task", "parse_body", "pick_device", "pick_dtype"]

# A task's work item: whatever its parse returns and its run_batch and stream take.
ItemT = TypeVar("ItemT")


def pick_device(requested: str) -> str:
    """Choose 'cuda' or 'cpu'. 'auto' means CUDA when this process sees a GPU."""
    import torch

    if requested == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                "model.device is 'cuda' but this replica sees no CUDA device; check resources.gpus "
                "and the node's drivers, or use device 'auto'"
            )
        return "cuda"
    if requested == "cpu":
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def pick_dtype(requested: str, device: str) -> Any:
    """Map the spec's dtype name to a torch dtype ('auto': fp16 on CUDA, fp32 on CPU)."""
    import torch

    if requested == "auto":
        return torch.float16 if device == "cuda" else torch.float32
    return getattr(torch, requested)


def _field_names(model_cls: type[BaseModel]) -> set[str]:
    """The field names of a request model and of the models nested in it."""
    names: set[str] = set()
    seen: set[type] = set()
    todo: list[Any] = [model_cls]
    while todo:
        t = todo.pop()
        if isinstance(t, type) and issubclass(t, BaseModel):
            if t not in seen:
                seen.add(t)
                names.update(t.model_fields)
                todo.extend(f.annotation for f in t.model_fields.values())
        else:
            todo.extend(getattr(t, "__args__", ()))
    return names


def parse_body(model_cls: type[BaseModel], body: Any) -> Any:
    """Validate a JSON body against a request model, as an ``InvalidRequest``.

    The first pydantic error becomes the message, with the offending field as
    OpenAI's ``param``: clients fix one thing at a time anyway.
    """
    if not isinstance(body, dict):
        raise InvalidRequest(
            f"request body must be a JSON object, got {type(body).__name__}", code="invalid_body"
        )
    try:
        return model_cls.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        if not errors[0]["loc"]:
            # A rule across fields (a model validator): its message names the fields and the fix.
            msg = errors[0]["msg"].removeprefix("Value error, ")
            first_word = msg.split(" ", 1)[0]
            raise InvalidRequest(
                msg, param=first_word if first_word in model_cls.model_fields else None, code="invalid_" + errors[0]["type"]
            ) from None
        # Of the first field's errors, the deepest is the most precise (input[3], not input).
        first = [x for x in errors if x["loc"][:1] == errors[0]["loc"][:1]]
        err = max(first, key=lambda x: len(x["loc"]))
        # Keep field names (of nested models too) and list indices; drop pydantic's union-branch tags
        # ('str', 'list[str]', ...) which mean nothing to a client.
        names = _field_names(model_cls)
        path = [
            p
            for i, p in enumerate(err["loc"])
            if isinstance(p, int) or p in names or i == 0
            # The unknown key itself, for a field that is not allowed.
            or (err["type"] == "extra_forbidden" and i == len(err["loc"]) - 1)
        ]
        loc = "".join(f"[{p}]" if isinstance(p, int) else ("." if i else "") + str(p) for i, p in enumerate(path))
        given = err.get("input")
        shown = repr(given) if len(repr(given)) <= 80 else repr(given)[:77] + "..."
        if err["type"] == "extra_forbidden":
            accepted = f" (accepted fields: {', '.join(model_cls.model_fields)})" if len(path) == 1 else ""
            msg = f"unknown field {loc!r}; remove it{accepted}"
        elif err["type"] == "missing":
            msg = f"field {loc!r} is required"
        else:
            reasons = " or ".join(dict.fromkeys(x["msg"] for x in first if len(x["loc"]) == len(err["loc"])))
            msg = f"field {loc!r} ({shown}) is invalid: {reasons}"
        raise InvalidRequest(msg, param=loc, code="invalid_" + err["type"]) from None


class Task(ABC, Generic[ItemT]):
    """A loaded model behind one or more OpenAI endpoints.

    Subclasses set ``endpoints`` (names from the OpenAI surface: ``embeddings``, ``completions``,
    ``chat/completions``) and implement the abstract methods; ``ItemT`` is their work item. The
    serving layer builds the task once per replica (``__init__`` resolves the weights, picks the
    device and dtype, then calls ``load``), warms it up with ``warmup_items``, calls ``parse`` on
    the event loop (it must be quick: validation and tokenisation only) and ``run_batch`` /
    ``stream`` on the replica's model thread.

    Example:
        >>> class Upper(Task[str]):  # doctest: +SKIP
        ...     endpoints = frozenset({"completions"})
        ...     def load(self): self.model = str.upper
        ...     def parse(self, endpoint, body): return parse_body(MyRequest, body).prompt
        ...     def run_batch(self, items): return [{"choices": [{"text": self.model(p)}]} for p in items]
        ...     # warmup_items, count_tokens, item_tokens, max_input_tokens_for_warmup likewise
    """

    endpoints: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: ModelDeployment):
        self.spec = spec
        t0 = time.perf_counter()
        if spec.model.cache_dir:
            from serving.protocol import WEIGHT_DIGEST_DIR_ENV
            from serving.weights import ensure_cached

            digests = os.environ.get(WEIGHT_DIGEST_DIR_ENV) or None
            self.model_dir = ensure_cached(spec.model.path, spec.model.cache_dir, spec.model.verify, digests)
        else:
            self.model_dir = resolve_model_path(spec.model.path)
        self.device = pick_device(spec.model.device)
        self.dtype = pick_dtype(spec.model.dtype, self.device)
        # The replica's one record of out-of-memory errors: the serving layer's batches and the task's own
        # paths (streams, a scheduler) classify theirs into it, and health() reads it.
        self.oom_log = OomLog(window_s=spec.memory.oom_window_s, max_ooms=spec.memory.max_ooms_in_window)
        if self.device == "cuda":
            self._check_device_memory()
        self.load()
        self.load_s = time.perf_counter() - t0

    def _check_device_memory(self) -> None:
        """Fail before loading when the GPU's memory is held by someone else (no OOM-restart loop)."""
        import torch

        from serving.gpu import check_free_memory
        from serving.weights import weights_bytes

        need = self.spec.memory.min_free_bytes_at_start
        if need is None:
            need = weights_bytes(self.model_dir) // 2
        check_free_memory(torch.cuda, torch.cuda.current_device(), need, f"model {self.spec.model.path!r}")

    @abstractmethod
    def load(self) -> None:
        """Load weights and tokenizer from ``self.model_dir`` onto ``self.device``."""

    @abstractmethod
    def parse(self, endpoint: str, body: Any) -> ItemT:
        """Validate a request body for ``endpoint`` and return a work item.

        Raises:
            InvalidRequest: (or a subclass) for anything wrong with the body; it becomes a 4xx naming the field.
        """

    @abstractmethod
    def run_batch(self, items: list[ItemT]) -> list[dict[str, Any]]:
        """Answer a batch of work items, one OpenAI-shaped response body each, in order.

        An exception fails the batch; the serving layer then runs its items one by one so only the
        item at fault gets the error. Out-of-memory errors are classified (docs/gpu-memory.md).
        """

    @abstractmethod
    def warmup_items(self, texts: list[str]) -> list[ItemT]:
        """Work items built from the spec's warm-up texts."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens the model sees for ``text``, special tokens included."""

    @abstractmethod
    def item_tokens(self, item: ItemT) -> int:
        """The longest input of a work item, in tokens (warm-up shapes, memory envelope)."""

    @abstractmethod
    def max_input_tokens_for_warmup(self) -> int:
        """The longest input a request may carry, in tokens."""

    def synthetic_input(self, n_tokens: int) -> str:
        """A generated text of at most ``n_tokens`` tokens, as close to it as the tokenizer allows."""
        words = max(1, n_tokens)
        text = " ".join(["warm"] * words)
        while words > 1:
            count = self.count_tokens(text)
            if count <= n_tokens:
                break
            # Shrink in proportion, by a word at least: a word may be several tokens (cutting one word per
            # token over would overshoot to a single word).
            words = max(1, min(words - 1, words * n_tokens // count))
            text = " ".join(["warm"] * words)
        return text

    def wants_stream(self, item: ItemT) -> bool:
        """Whether this work item is answered as a server-sent-event stream."""
        return False

    def stream(self, item: ItemT, cancel: threading.Event) -> Iterator[dict[str, Any]]:
        """Yield the response chunks of a streaming work item; stop soon after ``cancel`` is set."""
        raise NotImplementedError

    #: A task with a scheduler of its own (one that batches per step) sets this: the replica then hands
    #: it each request as it comes, from a thread of its own, instead of batching with ``@serve.batch``.
    runs_concurrently: bool = False

    def set_observer(self, observer: Any) -> None:
        """Receive the replica's token-level metrics (a ``deployments._scheduler.StepObserver``); tasks that
        do not generate tokens ignore it."""

    def progress_s(self) -> Optional[float]:
        """Monotonic time of the model's last sign of progress inside a request (a generated token),
        or None when the task reports none (liveness then counts completions only)."""
        return None

    def check_model(self, requested: Optional[str]) -> None:
        """Refuse requests that name another model than this deployment serves."""
        if requested is not None and requested != self.spec.served_name:
            raise ModelNotFound(
                f"model {requested!r} is not served here; this deployment serves {self.spec.served_name!r}",
                param="model",
                code="model_not_found",
            )

    def health(self) -> None:
        """Raise if the model can no longer serve (cheap; called by Serve's health check). An override
        calls ``super().health()``: it checks the device and the persistent out-of-memory errors."""
        if getattr(self, "model", None) is None:
            raise RuntimeError("model is not loaded")
        reason = self.oom_log.unhealthy_reason()
        if reason is not None:
            raise RuntimeError(reason)
        if self.device == "cuda":
            import torch

            # A lost or faulted device raises here; a free-memory query costs microseconds.
            torch.cuda.mem_get_info()

    def describe(self) -> dict[str, Any]:
        """Facts for the readiness endpoint."""
        return {
            "model": self.spec.served_name,
            "task": self.spec.task,
            "device": self.device,
            "dtype": str(self.dtype).replace("torch.", ""),
            "load_s": round(self.load_s, 3),
        }
