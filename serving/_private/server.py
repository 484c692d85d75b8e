"""The Ray Serve deployment that serves any task over OpenAI-compatible HTTP.

Lifecycle: the constructor loads the model and runs warm-up until latency is
stable; Ray Serve routes a replica no traffic until its constructor returns, so
a replica joins the replica set only when it is loaded and warm. After that,
``check_health`` (liveness) fails when the model is gone or the request path
stalls, and Serve replaces the replica.
"""

import asyncio
import json
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Optional

from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from serving._private.auth import KeyCheck
from serving._private.http import read_json
from serving._private.ledger import WRITE_PERIOD_S, CallsByGateway, Ledger
from serving._private.memory import free_cache_for, memory_budget_bytes, probe_for
from serving._private.oom import BatchRunner, MemoryModel, Outcome
from serving._private.metrics import GenerationMetrics, record_lifecycle, record_oom, start_gpu_metrics
from serving._private.registry import resolve_task
from serving._private.signals import MEMORY_HEADROOM, LoadSignals
from serving._private.surface import OpenAIRoutes, Reply, make_api, respond, to_response
from serving._private.warmup import WarmupReport, derive_stall_after_s, plan_shapes, run_warmup
from serving._private.watchdog import StallWatchdog
from serving.errors import ModelNotReady, NotFound, error_body
from serving.gpu import GpuTelemetry
from serving.spec import ModelDeployment

# Serve writes the "ray.serve" logger into each replica's own log file, with the replica id.
logger = logging.getLogger("ray.serve")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica (direct construction in tools)
        return f"local-{os.getpid()}"


def _app_name() -> str:
    try:
        return serve.get_replica_context().app_name
    except Exception:  # noqa: BLE001 - outside a Serve replica
        return "local"


def _node_id() -> "str | None":
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - outside Ray
        return None


class ModelServer(OpenAIRoutes):
    """One replica: a loaded, warmed task. Behind the gateway it is a handle target that answers in
    plain data (:meth:`reply`, :meth:`reply_stream`, :meth:`info`); with ``queue.gateway`` off it is
    also the HTTP ingress, through the same surface (``serving._private.surface``).

    Args:
        spec: The ModelDeployment as a JSON-able dict (it crosses process boundaries).
    """

    def __init__(self, spec: dict[str, Any]):
        t_start = time.monotonic()
        self.spec = ModelDeployment.model_validate(spec)
        self.replica_id = _replica_id()
        self._app = _app_name()
        # Calls running by the gateway that sent them, written to the ledger the gateways read.
        self.calls = CallsByGateway()
        self._ledger_writer: "Optional[asyncio.Task]" = None
        # Read before the model loads: a replica without its keys must fail fast, not serve openly.
        self._check_key = KeyCheck(self.spec.auth)
        # One model thread: a device runs one forward pass at a time anyway, and a
        # single thread keeps the event loop free for health checks and parsing.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpuserve-model")
        self.task = resolve_task(self.spec.task)(self.spec)
        # Threads that wait on a task's own scheduler or pull a stream's chunks (one per request the replica
        # may hold).
        self._waiters = ThreadPoolExecutor(
            max_workers=self.spec.queue.max_ongoing_requests, thread_name_prefix="gpuserve-wait"
        )
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
        self.warmup: "WarmupReport | None" = None
        if self.spec.warmup.enabled:
            plans = plan_shapes(self.task, self.spec)
            # Warm up on the model thread that will serve: thread-local state (OpenMP
            # thread teams, CUDA streams and handles) is what warm-up must create.
            self.warmup = self._executor.submit(
                run_warmup, self.task.run_batch, plans, self.spec, probe_for(self.task.device)
            ).result()
        self.watchdog = StallWatchdog(derive_stall_after_s(self.spec, self.warmup, self.task.load_s))
        mem = self.spec.memory
        self.runner = BatchRunner(
            self.task.run_batch,
            self.task.item_tokens,
            MemoryModel.from_envelope(self.warmup.envelope()) if (self.warmup and mem.admission) else None,
            memory_budget_bytes(self.task.device, mem.high_water_ratio, self.spec.resources.memory_bytes),
            free_cache_for(self.task.device),
            time.monotonic,
            oom_log=self.task.oom_log,
        )
        self.task.oom_log.on_oom = lambda kind: record_oom(self.spec.name, self.replica_id, kind)
        if self.task.runs_concurrently:
            # A task with its own step scheduler generates tokens: time them.
            self.task.set_observer(GenerationMetrics(self.spec.name, self.replica_id, self.spec.generation.ttft_slo_s))
        self.gpu = GpuTelemetry()
        if self.task.device == "cuda":
            start_gpu_metrics(self.spec.name, self.replica_id, self.gpu)
        self.time_to_ready_s = time.monotonic() - t_start
        self.ready_at_s = time.time()
        self.signals = LoadSignals(time.monotonic(), self.time_to_ready_s)
        warmup_s = self.warmup.seconds if self.warmup else 0.0
        record_lifecycle(
            self.spec.name,
            self.replica_id,
            self.task.load_s,
            warmup_s,
            self.time_to_ready_s,
            self.warmup.rounds if self.warmup else 0,
            self.warmup.envelope()[0]["peak_bytes"] if self.warmup else 0,
        )
        # One line per replica that tests and operators can find in the replica's log.
        logger.info(
            "gpuserve: replica ready %s",
            json.dumps(
                {
                    "deployment": self.spec.name,
                    "replica": self.replica_id,
                    "ready_at_s": self.ready_at_s,
                    "load_s": round(self.task.load_s, 3),
                    "warmup_s": round(warmup_s, 3),
                    "time_to_ready_s": round(self.time_to_ready_s, 3),
                    "stall_after_s": round(self.watchdog.stall_after_s, 3),
                    "warmup": self.warmup.to_dict() if self.warmup else None,
                }
            ),
        )

    # -- model execution -----------------------------------------------------

    def _run_isolated(self, items: list[Any]) -> list[Outcome]:
        # Admission by predicted peak, OOM split-and-retry, and per-item errors: see serving/_private/oom.py.
        return self.runner.run(items)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[Any]) -> list[Outcome]:
        loop = asyncio.get_running_loop()
        self._model_idle.clear()
        try:
            return await loop.run_in_executor(self._executor, self._run_isolated, items)
        finally:
            self._model_idle.set()

    async def _run(self, item: Any) -> Any:
        self.watchdog.started(time.monotonic())
        try:
            if self.task.runs_concurrently:
                # The task's own scheduler batches per decode step: hand each request over at once, from a
                # thread of its own, instead of holding it for a batch behind the running one.
                loop = asyncio.get_running_loop()
                return (await loop.run_in_executor(self._waiters, self._run_isolated, [item]))[0].unwrap()
            if self.spec.batching.enabled:
                await self._model_idle.wait()
                return (await self._batched(item)).unwrap()
            loop = asyncio.get_running_loop()
            return (await loop.run_in_executor(self._executor, self._run_isolated, [item]))[0].unwrap()
        finally:
            self.watchdog.finished(time.monotonic())

    async def _chunks(self, item: Any, t0: float) -> AsyncIterator[Any]:
        """A streamed request's JSON chunks; an error once streaming has begun is the last chunk."""
        cancel = threading.Event()
        gen = self.task.stream(item, cancel)
        done = object()
        self.watchdog.started(time.monotonic())
        try:
            while True:
                # A thread of the replica's own pool (one per request it may hold): asyncio's default pool
                # has cpu_count + 4 threads, so more concurrent streams would wait for each other's tokens.
                chunk = await asyncio.get_running_loop().run_in_executor(self._waiters, next, gen, done)
                if chunk is done:
                    break
                # A streamed chunk is progress: a long stream is not a stall.
                self.watchdog.finished(time.monotonic())
                self.watchdog.started(time.monotonic())
                yield chunk
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band
            logger.error("gpuserve: stream failed", exc_info=e)
            yield error_body(e)
        finally:
            # Client gone or stream over: stop generating either way.
            cancel.set()
            self.watchdog.finished(time.monotonic())
            self.signals.served(time.monotonic(), time.monotonic() - t0)

    def _check_auth(self, request: Request) -> None:
        self._check_key(request.headers)

    async def _start(self, endpoint: str, body: Any, arrivals: int) -> tuple[Any, float]:
        """Parse a request body for this task and count its arrival; (item, start time)."""
        if endpoint not in self.task.endpoints:
            raise NotFound(
                f"/v1/{endpoint} is not served by this deployment (task {self.spec.task!r} serves "
                f"{', '.join('/v1/' + e for e in sorted(self.task.endpoints))})",
                code="not_found",
            )
        item = self.task.parse(endpoint, body)
        t0 = time.monotonic()
        self.signals.arrival(t0, arrivals)
        return item, t0

    async def _finish(self, item: Any, t0: float) -> Reply:
        try:
            result = await self._run(item)
        except Exception as e:  # noqa: BLE001 - every error leaves as an OpenAI error body
            return Reply.failure(e, self.replica_id)
        done = time.monotonic()
        self.signals.served(done, done - t0)
        return Reply(result, replica=self.replica_id, service_ms=round((done - t0) * 1000.0))

    # -- the gateway's calls (DeploymentHandle, not HTTP): plain data -------------

    def _sent_by(self, gateway: Optional[str], queued: int) -> None:
        """Count a call as running for ``gateway`` (in the ledger the gateways read) until it ends, and
        note the gateway's queue length for the autoscaler."""
        if gateway is None:
            return
        self.calls.started(gateway)
        self.signals.gateway_queue(time.monotonic(), gateway, queued)
        if self._ledger_writer is None or self._ledger_writer.done():
            self._ledger_writer = asyncio.get_running_loop().create_task(self._write_ledger_forever())

    async def _write_ledger_forever(self) -> None:
        # One write a period at most, off the event loop; it ends once nothing runs and that is written.
        ledger = Ledger(self._app, self.spec.name)
        while True:
            await asyncio.sleep(WRITE_PERIOD_S)
            load = self.calls.due()
            if load is None:
                return
            try:
                await asyncio.to_thread(ledger.replica_load, self.replica_id, load)
            except Exception as e:  # noqa: BLE001 - the ledger is advice to the gateways; serving goes on
                logger.warning("gpuserve: replica could not write its calls to the ledger: %s", e)

    async def reply(
        self, endpoint: str, body: Any, arrivals: int = 1, gateway: Optional[str] = None, queued: int = 0
    ) -> Reply:
        """Serve a parsed request body (not streamed).

        Args:
            endpoint: The OpenAI endpoint (``embeddings``, ``chat/completions``, ...).
            body: The parsed JSON body.
            arrivals: How many requests it stands for (the load signal).
            gateway: The gateway that sent it: counted in the ledger while it runs.
            queued: The requests still waiting in that gateway (a load signal for the autoscaler).
        """
        self._sent_by(gateway, queued)
        try:
            try:
                item, t0 = await self._start(endpoint, body, arrivals)
            except Exception as e:  # noqa: BLE001 - every error leaves as an OpenAI error body
                return Reply.failure(e, self.replica_id)
            return await self._finish(item, t0)
        finally:
            self.calls.ended(gateway)

    async def reply_stream(
        self, endpoint: str, body: Any, arrivals: int = 1, gateway: Optional[str] = None, queued: int = 0
    ) -> AsyncIterator[Any]:
        """Serve a request that may stream: a :class:`Reply` first (``stream`` set when chunks follow),
        then its JSON chunks. Arguments as for :meth:`reply`."""
        self._sent_by(gateway, queued)
        try:
            try:
                item, t0 = await self._start(endpoint, body, arrivals)
            except Exception as e:  # noqa: BLE001 - every error leaves as an OpenAI error body
                yield Reply.failure(e, self.replica_id)
                return
            if not self.task.wants_stream(item):
                yield await self._finish(item, t0)
                return
            yield Reply(None, replica=self.replica_id, stream=True)
            async for chunk in self._chunks(item, t0):
                yield chunk
        finally:
            self.calls.ended(gateway)

    async def info(self, route: str) -> Reply:
        """``health`` (readiness, with load and warm-up facts) or ``models`` (the model served)."""
        if route == "models":
            model = {"id": self.spec.served_name, "object": "model", "created": int(self.ready_at_s), "owned_by": "gpuserve"}
            return Reply({"object": "list", "data": [model]}, replica=self.replica_id)
        try:
            self.check_health()
        except Exception as e:  # noqa: BLE001
            return Reply.failure(ModelNotReady(f"model is not ready: {e}", code="model_not_ready"), self.replica_id)
        return Reply(
            {
                "status": "ready",
                "replica": self.replica_id,
                **self.task.describe(),
                # Where Ray placed this replica and which devices it was given.
                "node_id": _node_id(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "time_to_ready_s": round(self.time_to_ready_s, 3),
                "stall_after_s": round(self.watchdog.stall_after_s, 3),
                "warmup": self.warmup.to_dict() if self.warmup else None,
                "memory": {
                    "budget_bytes": self.runner.budget_bytes,
                    "model": None if self.runner.model is None else vars(self.runner.model),
                    "oom_total": self.runner.oom_total,
                    "gpu": self.gpu.snapshot() if self.task.device == "cuda" else None,
                },
            },
            replica=self.replica_id,
        )

    # -- direct HTTP (queue.gateway off: this replica is the ingress) -------------

    async def _endpoint(self, endpoint: str, request: Request) -> Response:
        try:
            # Before the body is read: an unauthenticated client costs no parsing.
            self._check_auth(request)
            body = await read_json(request, self.spec.queue.max_request_body_bytes)
        except Exception as e:  # noqa: BLE001
            return to_response(Reply.failure(e, self.replica_id))
        return await respond(self.reply_stream(endpoint, body))

    async def _get(self, route: str, request: Request) -> Response:
        if route == "health" and not self._check_key.allows(request.headers):
            # Readiness only for a caller without a key: the details name nodes and devices.
            reply = await self.info(route)
            if reply.ok:
                return to_response(Reply({"status": "ready"}))
            return to_response(Reply.failure(ModelNotReady("the model is not ready", code="model_not_ready")))
        if route != "health":
            try:
                self._check_auth(request)
            except Exception as e:  # noqa: BLE001
                return to_response(Reply.failure(e, self.replica_id))
        return to_response(await self.info(route))

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Ray Serve calls this on every metrics push; the values reach the policy as custom metrics."""
        stats = self.signals.snapshot(time.monotonic())
        if self.task.device == "cuda":
            headroom = self.gpu.headroom_ratio(self.spec.memory.high_water_ratio)
            if headroom is not None:
                stats[MEMORY_HEADROOM] = headroom
        return stats

    def check_health(self) -> None:
        """Serve's liveness probe: raising marks the replica unhealthy and Serve replaces it.

        Cheap but real: the model must be loaded, the device must answer, and the
        request path must be making progress.
        """
        try:
            # The model, the device, and the persistent out-of-memory errors (the replica's OomLog).
            self.task.health()
        except Exception as e:
            logger.error("gpuserve: replica %s unhealthy: %s", self.replica_id, e)
            raise
        # Liveness by progress: a generated token is progress, however long its request runs.
        progress_s = self.task.progress_s()
        if progress_s is not None:
            self.watchdog.progress(progress_s)
        reason = self.watchdog.check(time.monotonic())
        if reason is not None:
            logger.error("gpuserve: replica %s unhealthy: %s", self.replica_id, reason)
            raise RuntimeError(reason)


# The replica as the application's own HTTP ingress (queue.gateway off). Behind the gateway the
# plain class serves: an application has one FastAPI ingress, and the gateway is it.
HttpModelServer = serve.ingress(make_api(ModelServer, "OpenAI-compatible model serving on Ray Serve."))(ModelServer)
