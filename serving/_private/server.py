"""The Ray Serve deployment that serves any task over OpenAI-compatible HTTP.

Lifecycle: the constructor loads the model and runs warm-up inferences; Ray
Serve routes a replica no traffic until its constructor returns, so a replica
joins the replica set only when it is loaded and warm.
"""


import asyncio
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator

from fastapi import FastAPI
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serving._private.http import error_response, read_json
from serving._private.registry import resolve_task
from serving.errors import GpuserveError, InvalidRequest, ModelNotReady, NotFound, error_body
from serving.spec import ModelDeployment

logger = logging.getLogger("gpuserve")

api = FastAPI(title="gpuserve", description="OpenAI-compatible model serving on Ray Serve.")


@api.exception_handler(StarletteHTTPException)
async def _http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Unknown paths and wrong methods get OpenAI's error shape, like every other error.
    if exc.status_code == 405:
        err: GpuserveError = InvalidRequest(
            f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed"
        )
        resp = error_response(err)
        resp.status_code = 405
        return resp
    return error_response(
        NotFound(f"no route {request.method} {request.url.path}; see /v1/models", code="not_found")
    )


class _Outcome:
    """A batch member's result or error: one failing item must not fail its batch-mates."""

    __slots__ = ("value", "error")

    def __init__(self, value: Any = None, error: "BaseException | None" = None):
        self.value, self.error = value, error

    def unwrap(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.value


@serve.ingress(api)
class ModelServer:
    """One replica: a loaded, warmed task behind ``/v1/*``.

    Args:
        spec: The ModelDeployment as a JSON-able dict (it crosses process boundaries).
    """

    def __init__(self, spec: dict[str, Any]):
        self.spec = ModelDeployment.model_validate(spec)
        # One model thread: a device runs one forward pass at a time anyway, and a
        # single thread keeps the event loop free for health checks and parsing.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpuserve-model")
        self.task = resolve_task(self.spec.task)(self.spec)
        # Set while the model thread is free. @serve.batch forms a batch as soon as
        # its wait timeout passes and only then queues it behind the running one,
        # so while the model is busy it would cut the backlog into many tiny
        # batches. Holding requests here until the model frees lets them enter
        # the batch queue together and form full batches.
        self._model_idle = asyncio.Event()
        self._model_idle.set()
        b = self.spec.batching
        self._batched.set_max_batch_size(b.max_batch_size)
        self._batched.set_batch_wait_timeout_s(b.batch_wait_timeout_s)
        self.warmup_s = self._warm_up()
        self.ready_at_s = time.time()
        logger.info(
            "gpuserve: replica of %s ready (load %.2fs, warm-up %.2fs)", self.spec.name, self.task.load_s, self.warmup_s
        )

    def _warm_up(self) -> float:
        w = self.spec.warmup
        if not w.enabled:
            return 0.0
        t0 = time.perf_counter()
        items = self.task.warmup_items(w.inputs)
        largest = max(1, min(self.spec.batching.max_batch_size, len(items) * 4))
        batch = (items * largest)[:largest]
        for _ in range(w.rounds):
            self.task.run_batch(items[:1])
            self.task.run_batch(batch)
        return time.perf_counter() - t0

    # -- model execution -----------------------------------------------------

    def _run_isolated(self, items: list[Any]) -> list[_Outcome]:
        try:
            return [_Outcome(v) for v in self.task.run_batch(items)]
        except Exception as e:  # noqa: BLE001 - re-raised per item below
            if len(items) == 1:
                return [_Outcome(error=e)]
            # Retry one by one so only the item that fails gets the error.
            return [self._run_isolated([it])[0] for it in items]

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[Any]) -> list[_Outcome]:
        loop = asyncio.get_running_loop()
        self._model_idle.clear()
        try:
            return await loop.run_in_executor(self._executor, self._run_isolated, items)
        finally:
            self._model_idle.set()

    async def _run(self, item: Any) -> Any:
        if self.spec.batching.enabled:
            await self._model_idle.wait()
            return (await self._batched(item)).unwrap()
        loop = asyncio.get_running_loop()
        return (await loop.run_in_executor(self._executor, self._run_isolated, [item]))[0].unwrap()

    async def _sse(self, item: Any) -> AsyncIterator[bytes]:
        cancel = threading.Event()
        gen = self.task.stream(item, cancel)
        done = object()
        try:
            while True:
                chunk = await asyncio.to_thread(next, gen, done)
                if chunk is done:
                    break
                yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band
            logger.error("gpuserve: stream failed", exc_info=e)
            yield b"data: " + json.dumps(error_body(e)).encode() + b"\n\n"
        finally:
            # Client gone or stream over: stop generating either way.
            cancel.set()
        yield b"data: [DONE]\n\n"

    async def _serve_endpoint(self, endpoint: str, request: Request) -> Response:
        try:
            if endpoint not in self.task.endpoints:
                raise NotFound(
                    f"/v1/{endpoint} is not served by this deployment (task {self.spec.task!r} serves "
                    f"{', '.join('/v1/' + e for e in sorted(self.task.endpoints))})",
                    code="not_found",
                )
            body = await read_json(request, self.spec.queue.max_request_body_bytes)
            item = self.task.parse(endpoint, body)
            if self.task.wants_stream(item):
                return StreamingResponse(self._sse(item), media_type="text/event-stream")
            return JSONResponse(await self._run(item))
        except Exception as e:  # noqa: BLE001 - every error leaves as an OpenAI error body
            return error_response(e)

    # -- routes ----------------------------------------------------------------

    @api.post("/v1/embeddings")
    async def embeddings(self, request: Request) -> Response:
        """OpenAI embeddings."""
        return await self._serve_endpoint("embeddings", request)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        """OpenAI completions (``stream: true`` for server-sent events)."""
        return await self._serve_endpoint("completions", request)

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        """The one model this deployment serves."""
        return {
            "object": "list",
            "data": [
                {
                    "id": self.spec.served_name,
                    "object": "model",
                    "created": int(self.ready_at_s),
                    "owned_by": "gpuserve",
                }
            ],
        }

    @api.get("/health")
    async def health(self) -> Response:
        """Readiness: 200 with load facts while the model serves, 503 otherwise."""
        try:
            self.task.health()
        except Exception as e:  # noqa: BLE001
            return error_response(ModelNotReady(f"model is not ready: {e}", code="model_not_ready"))
        return JSONResponse(
            {"status": "ready", **self.task.describe(), "warmup_s": round(self.warmup_s, 3)}
        )

    def check_health(self) -> None:
        """Serve's liveness probe: raising marks the replica unhealthy and replaces it."""
        self.task.health()

