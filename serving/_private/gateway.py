"""The admission gateway: one per deployment, the application's HTTP ingress.

Every request for the deployment passes through this one replica, so its queue
bound holds deployment-wide whatever the number of proxies and handles. It
checks the API key, reads the priority class and deadline, and admits or
rejects at once (429 with a computed Retry-After). Admitted requests wait here,
highest class first, and go to the model replicas through a DeploymentHandle
only when a replica slot is free, so a queued request whose deadline passes is
answered 504 without ever reaching the model. The queue logic is pure
(``serving/_private/admission.py``); this module is its Ray and HTTP glue.
"""


import contextlib
import asyncio
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from typing import Any, AsyncIterator, Callable, Optional

from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from serving._private.admission import (
    EXPIRED,
    FAILED,
    REJECTED,
    SERVED,
    AdmissionQueue,
    DrainModel,
    Rejection,
    StartupTracker,
    Ticket,
    orphaned_calls,
)
from serving._private.auth import KeyCheck
from serving._private.http import error_response, read_json
from serving._private.ledger import GATEWAY_STALE_S, REPLICA_STALE_S, Ledger
from serving._private.metrics import AdmissionMetrics
from serving._private.surface import OpenAIRoutes, Reply, make_api, stream_response, to_response
from serving.protocol import PRIORITY_HEADER, QUARANTINED_CODE, REPLICA_DIED_CODE, TIMEOUT_HEADER
from serving.errors import (
    InvalidRequest,
    ModelNotReady,
    Overloaded,
    Quarantined,
    RequestExpired,
    Unauthorized,
    error_body,
    http_status_for,
)
from serving.spec import ModelDeployment

logger = logging.getLogger("ray.serve")

# How often the gateway reads the deployment's replica counts from the Serve controller:
# fast enough that a new replica gets work within a second of becoming ready.
POLL_PERIOD_S = 0.5
# A poll that has not answered by then is given up for this period (the controller may be hung or
# restarting): the gateway keeps its last counts and never waits for the controller to admit.
POLL_TIMEOUT_S = 2.0
# A request Ray could not deliver to a replica (it was going away) is tried again this many times.
MAX_HAND_BACKS = 3
# GET /health and /v1/models wait at most this long for a replica to answer.
FORWARD_TIMEOUT_S = 3.0

# A request body running when this many replicas died is refused from then on: once may be the
# node's fault (a lost machine, an OOM kill of a neighbour); twice is most likely the input.
KILLS_TO_QUARANTINE = 2
# Bodies remembered (least recently seen dropped first): bounded memory whatever the inputs.
QUARANTINE_ENTRIES = 4096

_GO = "go"
_EXPIRED = "expired"



def _states(dep: Any) -> dict[str, int]:
    return {str(getattr(k, "value", k)): v for k, v in dep.replica_states.items()}


def _replica_states(app: str, deployment: str, gateway: str) -> tuple[int, int, int]:
    """(running, starting) replicas of ``deployment`` and running replicas of ``gateway``, from the Serve
    controller (blocking)."""
    deps = serve.status().applications[app].deployments
    model = _states(deps[deployment])
    return model.get("RUNNING", 0), model.get("STARTING", 0), _states(deps[gateway]).get("RUNNING", 0)


def _rank(ctx: Any) -> Optional[int]:
    rank = getattr(ctx, "rank", None)
    rank = getattr(rank, "rank", rank)  # a ReplicaRank (Ray 2.5x+) or a plain int
    return rank if isinstance(rank, int) else None


class Gateway(OpenAIRoutes):
    """The deployment-wide admission queue in front of a model deployment, and its HTTP surface.

    Args:
        spec: The ModelDeployment as a JSON-able dict.
        model: Handle to the model deployment (``ModelServer``).
    """

    def __init__(self, spec: dict[str, Any], model: Any):
        ctx = serve.get_replica_context()
        app, me = ctx.app_name, ctx.deployment
        self._setup(
            spec,
            model,
            lambda: _replica_states(app, self.spec.name, me),
            rank=_rank(ctx),
            ledger=Ledger(app, ModelDeployment.model_validate(spec).name),
            gateway_id=ctx.replica_id.unique_id,
        )

    def _setup(
        self,
        spec: dict[str, Any],
        model: Any,
        replica_states: Callable[[], tuple[int, int, int]],
        metrics: Optional[Any] = None,
        rank: Optional[int] = None,
        ledger: Optional[Ledger] = None,
        gateway_id: Optional[str] = None,
    ) -> None:
        # Split from __init__ so the glue runs in tests with a stand-in handle, replica counts and metrics.
        self._replica_states = replica_states
        self._rank = rank
        # Where the replicas say which gateway's calls they run: the calls of a gone gateway hold slots.
        self._ledger = ledger
        self._gateway_id = gateway_id
        self._shrinking_since_s: Optional[float] = None
        self.spec = ModelDeployment.model_validate(spec)
        q = self.spec.queue
        self._model = model
        self._check_key = KeyCheck(self.spec.auth)
        self.drain = DrainModel(q.max_ongoing_requests, q.retry_after_s)
        self.queue = AdmissionQueue(q.max_queued_requests, tuple(q.priorities), self.drain)
        self._default_class = q.priorities.index(q.default_priority or q.priorities[0])
        self._startup = StartupTracker()
        self._arrivals_since_dispatch = 0
        self._metrics = metrics if metrics is not None else AdmissionMetrics(self.spec.name)
        # The replicas (actor ids) that died running each request body (by digest), for the quarantine.
        self._kills: "OrderedDict[str, set[str]]" = OrderedDict()
        self._deaths = 0
        # Dispatched requests not yet settled: check_health holds in_flight to this count.
        self._dispatched: set[Ticket] = set()
        self._poller: "Optional[asyncio.Task]" = None
        # Until the controller first answers, assume one running replica and every configured gateway:
        # the least a deployment that receives traffic has, so admission never waits for the
        # controller and never over-commits.
        self.queue.members(self.spec.queue.gateway_replicas, rank)
        self.drain.replicas(1, 0, 0.0)
        # Readiness is never told on that assumption: only once the controller has counted.
        self._counted = asyncio.Event()
        # A probe that would answer "not ready" wakes the poller and waits for its next count.
        self._wake = asyncio.Event()
        self._next_count = asyncio.Event()

    # -- replica counts ---------------------------------------------------------

    def _ensure_poller(self) -> None:
        """Start the replica-count poller, or start it again if it stopped. Never waits for it."""
        if self._poller is not None and not self._poller.done():
            return
        if self._poller is not None and not self._poller.cancelled() and self._poller.exception() is not None:
            logger.error("gpuserve: the gateway's poller stopped; starting it again", exc_info=self._poller.exception())
        self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        pending: "Optional[asyncio.Future]" = None
        while True:
            try:
                # A call still hung from an earlier period is waited on again, not stacked: a hung
                # controller costs one thread, not one per period.
                if pending is None:
                    pending = asyncio.ensure_future(asyncio.to_thread(self._replica_states))
                # asyncio.wait, not wait_for: on Python 3.11 wait_for swallows a cancellation that
                # arrives as the call completes, and the poller would then outlive its replica.
                done, _ = await asyncio.wait({pending}, timeout=POLL_TIMEOUT_S)
                if not done:
                    logger.warning("gpuserve: the Serve controller did not answer within %.1f s; keeping the "
                                   "last replica counts", POLL_TIMEOUT_S)
                else:
                    running, starting, gateways = pending.result()
                    pending = None
                    # Shares follow membership: a gateway that died gives its share to the others once
                    # the controller stops counting it (a gateway always counts itself).
                    self.queue.members(self._members(max(1, gateways), time.monotonic()), self._rank)
                    remaining = self._startup.observe(time.monotonic(), running, starting)
                    self.drain.replicas(running, starting, remaining)
                    self._counted.set()
                    self._next_count.set()
                    self._next_count = asyncio.Event()
                    self._pump()
            except Exception as e:  # noqa: BLE001 - keep the last counts; the controller may be restarting
                pending = None
                logger.warning("gpuserve: gateway could not read replica counts: %s", e)
            await self._read_ledger()
            try:
                self._metrics.gauges(self.queue.queued_by_class(), self.queue.in_flight, self.drain.capacity)
            except Exception as e:  # noqa: BLE001 - a metrics hiccup must not stop the counts
                logger.warning("gpuserve: gateway could not export its gauges: %s", e)
            # Every period, or at once when a probe asks for a fresh count.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), POLL_PERIOD_S)
            self._wake.clear()

    def _members(self, counted: int, now_s: float) -> int:
        """The membership to take shares by: the controller's count, except that a shrink waits until
        the ledger can tell the gone gateway's calls (its heartbeat stale, then one poll), so a
        survivor never takes the larger share while those calls still hold slots unseen."""
        if self._ledger is None or counted >= self.drain.members:
            self._shrinking_since_s = None
            return counted
        if self._shrinking_since_s is None:
            self._shrinking_since_s = now_s
        if now_s - self._shrinking_since_s < GATEWAY_STALE_S + POLL_PERIOD_S:
            return self.drain.members
        self._shrinking_since_s = None
        return counted

    async def _read_ledger(self) -> None:
        """Write this gateway's heartbeat and take the calls of gone gateways out of its slots."""
        if self._ledger is None or self._gateway_id is None:
            return
        ledger, me = self._ledger, self._gateway_id

        def exchange() -> tuple[float, list, dict]:
            ledger.heartbeat(me)
            return ledger.read()

        try:
            # Bounded like the controller poll: a store that does not answer keeps the last count.
            now_s, replicas, gateways = await asyncio.wait_for(asyncio.to_thread(exchange), POLL_TIMEOUT_S)
        except Exception as e:  # noqa: BLE001 - the ledger is advice; admission goes on without it
            logger.warning("gpuserve: gateway could not read the ledger: %s", e)
            return
        orphaned = orphaned_calls(now_s, replicas, gateways, me, REPLICA_STALE_S, GATEWAY_STALE_S)
        if orphaned != self.drain.orphaned:
            logger.info("gpuserve: calls left running on the replicas by gone gateways: %d", orphaned)
            self.drain.orphaned = orphaned
            self._pump()

    async def check_health(self) -> None:
        """Serve's health check: the poller runs (restarted if it stopped) and the slot count adds up.

        Raises:
            RuntimeError: ``in_flight`` differs from the dispatched requests not yet settled: slots
                leaked or were freed twice, and admission can no longer be trusted.
        """
        self._ensure_poller()
        if self.queue.in_flight != len(self._dispatched):
            raise RuntimeError(
                f"gateway invariant broken: in_flight={self.queue.in_flight} but {len(self._dispatched)} "
                "dispatched requests are unsettled"
            )

    # -- admission ----------------------------------------------------------------

    def _answered(self, outcome: str, reason: str) -> None:
        self.queue.record(outcome, reason)
        self._metrics.answered(outcome, reason)

    @staticmethod
    def _resolve(ticket: Ticket, verdict: Any) -> bool:
        """Tell a waiting request its verdict; False if its client already left (its future is cancelled).

        A client's cancellation cancels the future at once but runs its handler a turn later, so
        in between the ticket still looks queued: the future, not the ticket, says who is waiting.
        """
        fut = ticket.handle
        if fut.done():  # type: ignore[union-attr]
            return False
        fut.set_result(verdict)  # type: ignore[union-attr]
        return True

    def _pump(self) -> None:
        """Dispatch queued requests while replica slots are free."""
        while (t := self.queue.next_to_run()) is not None:
            if self._resolve(t, _GO):
                self._dispatched.add(t)
            else:
                # Its client left in this very turn: the slot goes back at once (its own
                # handler counts the outcome) and the next request takes it.
                self.queue.finished(None)

    def _expire(self, ticket: Ticket) -> None:
        if self.queue.remove(ticket):
            self._resolve(ticket, _EXPIRED)

    def _class_and_deadline(self, request: Request, now_s: float) -> tuple[int, Optional[float]]:
        q = self.spec.queue
        name = request.headers.get(PRIORITY_HEADER)
        if name is None:
            priority = self._default_class
        elif name.strip().lower() in q.priorities:
            priority = q.priorities.index(name.strip().lower())
        else:
            raise InvalidRequest(
                f"header {PRIORITY_HEADER} ({name[:64]!r}) must be one of this deployment's classes "
                f"({', '.join(q.priorities)}); send one of them or leave the header out",
                param=PRIORITY_HEADER,
                code="invalid_priority",
            )
        raw = request.headers.get(TIMEOUT_HEADER)
        if raw is None:
            timeout_s = q.default_timeout_s
        else:
            try:
                timeout_s = float(raw)
            except ValueError:
                timeout_s = float("nan")
            if not (0 < timeout_s <= 86_400):  # also refuses nan and inf
                raise InvalidRequest(
                    f"header {TIMEOUT_HEADER} ({raw[:64]!r}) must be seconds, a number > 0 and <= 86400; "
                    "e.g. 2.5",
                    param=TIMEOUT_HEADER,
                    code="invalid_timeout",
                )
        return priority, (None if timeout_s is None else now_s + timeout_s)

    @staticmethod
    def _digest(endpoint: str, body: Any) -> str:
        # Canonical JSON: the same request spaced or ordered differently is the same request.
        raw = json.dumps([endpoint, body], sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(raw.encode()).hexdigest()

    def _killed(self, digest: str, error: RayActorError) -> int:
        """Note a replica death under this body; returns how many distinct replicas it was running on.

        Distinct, because a retry routed to a replica that was already dead (Ray's router has not
        noticed yet) fails with the same replica's error, and that death was not this body's doing.
        A node lost under the replica (preempted) is not counted at all.
        """
        ids = self._kills.pop(digest, set())
        if not getattr(error, "preempted", False):
            self._deaths += 1
            ids.add(getattr(error, "actor_id", None) or f"unknown-{self._deaths}")
        self._kills[digest] = ids
        while len(self._kills) > QUARANTINE_ENTRIES:
            self._kills.popitem(last=False)
        return len(ids)

    def _quarantined(self, kills: int) -> Quarantined:
        return Quarantined(
            f"this exact request was running when {kills} replicas died; it is refused so that it cannot take "
            "down more. Change the input (or split it), or ask the operator to check the replica logs",
            code=QUARANTINED_CODE,
        )

    def _check_auth(self, request: Request) -> None:
        self._check_key(request.headers)

    async def _admit_and_forward(self, endpoint: str, request: Request) -> Response:
        now = time.monotonic()
        self.queue.arrived()
        self._metrics.arrived()
        try:
            # From the headers alone: an unauthenticated or refused client costs no body read and no parsing.
            self._check_auth(request)
            priority, deadline_s = self._class_and_deadline(request, now)
            self._ensure_poller()
        except Exception as e:  # noqa: BLE001 - every error leaves as an OpenAI error body
            self._answered(REJECTED, getattr(e, "code", None) or f"http_{http_status_for(e)}")
            return error_response(e)
        self._arrivals_since_dispatch += 1
        admission = self.queue.offer(time.monotonic(), priority, deadline_s)
        for victim, why in admission.shed:
            self._resolve(victim, why)
        if admission.rejection is not None:
            return self._reject(admission.rejection)
        ticket = admission.ticket
        assert ticket is not None
        ticket.handle = asyncio.get_running_loop().create_future()
        # Dispatch at once if a slot is free: the queue holds only requests that wait, which is what
        # the bound counts, while this one's body is read.
        self._pump()
        # Admitted: only now is the body read, so under overload memory holds the bodies of admitted
        # requests only (queue bound + slots, each at most max_request_body_bytes), whatever arrives.
        try:
            body = await read_json(request, self.spec.queue.max_request_body_bytes)
            if self._kills and len(self._kills.get(d := self._digest(endpoint, body), ())) >= KILLS_TO_QUARANTINE:
                raise self._quarantined(len(self._kills[d]))
        except asyncio.CancelledError:
            self._withdraw(ticket, FAILED, "client_disconnected")
            raise
        except Exception as e:  # noqa: BLE001 - a bad body gives its place back and leaves as an error body
            self._withdraw(ticket, REJECTED, getattr(e, "code", None) or f"http_{http_status_for(e)}")
            return error_response(e)
        return await self._wait_and_forward(ticket, endpoint, body)

    def _withdraw(self, ticket: Ticket, outcome: str, reason: str) -> None:
        """Take an admitted request out, wherever it stands (queued, or dispatched and holding a slot), and
        count its one outcome."""
        fut = ticket.handle
        dispatched = fut.done() and not fut.cancelled() and fut.result() == _GO  # type: ignore[union-attr]
        if not self.queue.remove(ticket) and dispatched:
            self._settle(ticket, outcome, reason)
        else:
            self._answered(outcome, reason)

    def _reject(self, why: Rejection) -> Response:
        self._answered(REJECTED, why.reason)
        return error_response(Overloaded(why.message, retry_after_s=why.retry_after_s, code=why.reason))

    async def _wait_and_forward(self, ticket: Ticket, endpoint: str, body: Any) -> Response:
        loop = asyncio.get_running_loop()
        timer = None
        try:
            for attempt in range(MAX_HAND_BACKS + 1):
                if attempt:  # the first wait uses the future made at admission (it may be resolved already)
                    ticket.handle = loop.create_future()
                if ticket.deadline_s is not None:
                    # Armed for every wait, a hand-back's included: a timer that fired while the request
                    # ran does nothing, and the request would otherwise wait again without a deadline.
                    if timer is not None:
                        timer.cancel()
                    timer = loop.call_later(max(0.0, ticket.deadline_s - time.monotonic()), self._expire, ticket)
                self._pump()
                try:
                    verdict = await ticket.handle
                except asyncio.CancelledError:
                    # The client went away while its request waited: take it out, or give its slot back.
                    self._withdraw(ticket, FAILED, "client_disconnected")
                    raise
                if isinstance(verdict, Rejection):
                    return self._reject(verdict)
                if verdict == _EXPIRED:
                    self._answered(EXPIRED, "deadline")
                    return error_response(
                        RequestExpired(
                            "the request's deadline passed while it waited in the queue; it was not run. "
                            "Retry with a longer X-Gpuserve-Timeout-S or when the deployment is less busy",
                            code="deadline_expired",
                        )
                    )
                resp = await self._forward(ticket, endpoint, body)
                if resp is not None:
                    return resp
            # Handed back once too often: it is queued again, take it out before answering.
            self.queue.remove(ticket)
            self._answered(FAILED, "replicas_gone")
            return error_response(
                ModelNotReady("the replicas running this request went away repeatedly; retry", code="replicas_gone")
            )
        finally:
            if timer is not None:
                timer.cancel()

    def _run_until_s(self, ticket: Ticket, started_s: float) -> float:
        """When a dispatched request is cut off: its own deadline, else the server timeout from dispatch."""
        if ticket.deadline_s is not None:
            return ticket.deadline_s
        return started_s + self.spec.queue.server_timeout_s

    async def _bounded(self, awaitable: Any, until_s: float) -> tuple[bool, Any]:
        """Await a replica call until ``until_s``: (True, result), or (False, None) once it is cancelled there."""
        task = asyncio.ensure_future(awaitable)
        # asyncio.wait, not wait_for: wait_for on Python 3.11 can swallow the caller's own cancellation.
        done, _ = await asyncio.wait({task}, timeout=max(0.0, until_s - time.monotonic()))
        if done:
            return True, task.result()
        task.cancel()
        return False, None

    def _timed_out(self, ticket: Ticket) -> Response:
        self._settle(ticket, EXPIRED, "deadline_running")
        if ticket.deadline_s is not None:
            why = "the request's deadline passed while it ran on a replica; it was cancelled there"
        else:
            why = (
                f"the request ran longer than the server allows ({self.spec.queue.server_timeout_s:g} s, "
                "queue.server_timeout_s) and was cancelled; send a longer X-Gpuserve-Timeout-S or ask for less work"
            )
        return error_response(RequestExpired(why, code="deadline_exceeded"))

    async def _forward(self, ticket: Ticket, endpoint: str, body: Any) -> Optional[Response]:
        """Run a dispatched request on a replica. None: the replica went away first, the ticket is queued again.

        The call is bounded by the request's deadline (or the server timeout) and cancelled on the
        replica when it passes: a request never holds a slot longer than its client waits for it.
        """
        arrivals, self._arrivals_since_dispatch = max(1, self._arrivals_since_dispatch), 0
        started = time.monotonic()
        until_s = self._run_until_s(ticket, started)
        stream = isinstance(body, dict) and body.get("stream") is True
        try:
            if stream:
                gen = self._model.options(stream=True).reply_stream.remote(endpoint, body, arrivals, self._gateway_id, len(self.queue))
                ok, head = await self._bounded(gen.__anext__(), until_s)
                if not ok:
                    gen.cancel()
                    return self._timed_out(ticket)
                if not head.stream:
                    return self._done(ticket, started, head)
                relay = self._relay(gen, ticket, started, until_s)
                # Started here, so its finally (which frees the slot and counts the outcome) runs however
                # the stream ends: iterated to the end, closed, or dropped unsent when the client leaves
                # (asyncio closes a started async generator when it is collected).
                try:
                    first = await relay.__anext__()
                except StopAsyncIteration:
                    first = None

                async def chunks() -> AsyncIterator[Any]:
                    if first is not None:
                        yield first
                        async for chunk in relay:
                            yield chunk

                return stream_response(head, chunks())
            call = self._model.reply.remote(endpoint, body, arrivals, self._gateway_id, len(self.queue))
            ok, reply = await self._bounded(call, until_s)
            if not ok:
                call.cancel()
                return self._timed_out(ticket)
            return self._done(ticket, started, reply)
        except (ActorUnavailableError, BackPressureError) as e:
            # Ray could not deliver it (the replica is going away or momentarily unreachable): the
            # request never ran, so it is handed back to the head of its class, not failed.
            logger.warning("gpuserve: request handed back to the queue (%s)", type(e).__name__)
            self._dispatched.discard(ticket)
            self.queue.requeue(ticket)
            return None
        except RayActorError as e:
            # The replica died while running it. The request may be what killed it (a poison input), so
            # the gateway does not run it again: it answers 503 with Retry-After (the client decides;
            # serving.client does not retry this code), and refuses the body once it has killed twice.
            self._settle(ticket, FAILED, REPLICA_DIED_CODE)
            kills = self._killed(self._digest(endpoint, body), e)
            if kills >= KILLS_TO_QUARANTINE:
                logger.error("gpuserve: a request body was running when %d replicas died; quarantined", kills)
                return error_response(self._quarantined(kills))
            return error_response(
                ModelNotReady(
                    "the replica running this request died before answering; it was not run again in case the "
                    "request caused it. Retry if it was not",
                    code=REPLICA_DIED_CODE,
                    retry_after_s=self.spec.queue.retry_after_s,
                )
            )
        except asyncio.CancelledError:
            self._settle(ticket, FAILED, "client_disconnected")
            raise
        except Exception as e:  # noqa: BLE001
            self._settle(ticket, FAILED, f"http_{http_status_for(e)}")
            return error_response(e)

    def _settle(self, ticket: Ticket, outcome: str, reason: str, service_s: Optional[float] = None) -> None:
        """Free a dispatched request's slot and count its outcome, once, whichever path gets there first."""
        if ticket.settled:
            return
        ticket.settled = True
        self._dispatched.discard(ticket)
        self.queue.finished(service_s)
        self._pump()
        self._answered(outcome, reason)

    def _done(self, ticket: Ticket, started_s: float, reply: Reply) -> Response:
        if reply.ok:
            self._settle(ticket, SERVED, "ok", time.monotonic() - started_s)
        else:
            # The model refused the request (e.g. input too long for the model): answered, not served.
            self._settle(ticket, FAILED, f"http_{reply.status}", time.monotonic() - started_s)
        return to_response(reply)

    async def _relay(self, gen: Any, ticket: Ticket, started_s: float, until_s: float) -> AsyncIterator[Any]:
        ok = expired = False
        try:
            while True:
                got, chunk = await self._bounded(gen.__anext__(), until_s)
                if not got:
                    expired = True
                    raise RequestExpired(
                        "the stream ran past the request's deadline (or queue.server_timeout_s) and was cancelled",
                        code="deadline_exceeded",
                    )
                yield chunk
        except StopAsyncIteration:
            ok = True
        except Exception as e:  # noqa: BLE001 - the status line is sent; report in-band, as the replica does
            if not expired:
                logger.error("gpuserve: stream from the replica failed", exc_info=e)
            yield error_body(e)
        finally:
            # The slot is busy for the whole stream; a client that leaves mid-stream stops it.
            if not ok:
                gen.cancel()
                if expired:
                    self._settle(ticket, EXPIRED, "deadline_running")
                else:
                    self._settle(ticket, FAILED, "stream_interrupted")
            else:
                self._settle(ticket, SERVED, "ok", time.monotonic() - started_s)

    # -- routes (the surface's hooks; ROUTES in serving._private.surface) ----------

    async def _endpoint(self, endpoint: str, request: Request) -> Response:
        return await self._admit_and_forward(endpoint, request)

    async def _get(self, route: str, request: Request) -> Response:
        """``GET /v1/models``, answered by a model replica; ``GET /health``: readiness from this gateway's
        own state for anyone (probes), a replica's details only with a key (they name nodes and devices)."""
        if route == "health" and not self._check_key.allows(request.headers):
            return await self._readiness()
        try:
            if route != "health":
                self._check_auth(request)
            reply = await asyncio.wait_for(self._model.info.remote(route), timeout=FORWARD_TIMEOUT_S)
        except (asyncio.TimeoutError, RayActorError):
            return error_response(ModelNotReady("no replica answered; the model is not ready", code="model_not_ready"))
        except Unauthorized as e:
            return error_response(e)
        return to_response(reply)

    async def _readiness(self) -> Response:
        """Ready when the controller last counted a running replica (a probe before its first count waits
        for it, a poll's timeout at most), else when its next count does; never forwarded past admission, so an
        unauthenticated caller costs a replica nothing and learns nothing but ready or not."""
        self._ensure_poller()
        if self._counted.is_set() and self.drain.running >= 1:
            return JSONResponse({"status": "ready"})
        # "Not ready" only on the poller's next count: its last may be a period old, and a deployment whose
        # replica has just turned RUNNING (serve.run has returned) was refused for that long.
        next_count = self._next_count
        self._wake.set()
        try:
            await asyncio.wait_for(next_count.wait(), POLL_TIMEOUT_S)
        except asyncio.TimeoutError:
            return error_response(
                ModelNotReady("the gateway has not yet heard the replica count from the Serve controller", code="model_not_ready")
            )
        if self.drain.running >= 1:
            return JSONResponse({"status": "ready"})
        return error_response(ModelNotReady("no replica is running yet", code="model_not_ready"))

    async def admission(self, request: Request) -> Response:
        """The queue, its counters and the drain estimate (JSON)."""
        try:
            self._check_auth(request)
        except Unauthorized as e:
            return error_response(e)
        self._ensure_poller()
        d = self.drain
        return JSONResponse(
            {
                "deployment": self.spec.name,
                "max_queued_requests": self.queue.max_queued,
                "queued": self.queue.queued_by_class(),
                "in_flight": self.queue.in_flight,
                "capacity": d.capacity,
                "orphaned": d.orphaned,
                "replicas": {"running": d.running, "starting": d.starting, "startup_remaining_s": d.startup_remaining_s},
                "mean_service_s": d.mean_service_s,
                "drain_rate_per_s": d.drain_rate_per_s(),
                "gateway": {"rank": d.rank, "members": d.members, "id": self._gateway_id, "pid": os.getpid()},
                "counts": self.queue.counts(),
                "outcomes": [
                    {"outcome": o, "reason": r, "count": n} for (o, r), n in sorted(self.queue.outcomes.items())
                ],
            }
        )



# The gateway as the application's HTTP ingress: the OpenAI surface, and /admission.
HttpGateway = serve.ingress(
    make_api(Gateway, "OpenAI-compatible model serving with admission control.", {"/admission": "admission"})
)(Gateway)
