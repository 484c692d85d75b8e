"""The one OpenAI-shaped HTTP surface: its routes, and how a model's plain answer becomes a response.

A model replica answers in plain data (:class:`Reply`, stream chunks as dicts); only this module turns
them into HTTP. Both ingresses use it: the admission gateway (the default) and the model replica
itself when ``queue.gateway`` is off. The routes are declared once (:data:`ROUTES`); each ingress
class implements the hooks of :class:`OpenAIRoutes` and gets its own FastAPI app from
:func:`make_api` (Ray Serve binds an app's routes to one class).
"""

# No ``from __future__ import annotations`` here: Ray Serve rewrites each route's signature, and FastAPI
# must then still see ``Request`` as a type, not a string, or it asks for a query parameter named request.
import json
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Optional

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from serving._private.http import log_internal, not_found_response
from serving.errors import error_body, http_headers_for, http_status_for
from serving.protocol import REPLICA_HEADER, SERVICE_HEADER

# Server-sent events end with this line (OpenAI's stream terminator).
SSE_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Reply:
    """A model replica's answer to one request, as plain data (it crosses the Ray handle).

    Attributes:
        body: The OpenAI-shaped JSON body: the result, or ``{"error": {...}}``.
        status: 200, or the error's status from the one table in ``serving.errors``.
        headers: Extra headers the error carries (Retry-After, WWW-Authenticate).
        replica: The replica that answered.
        service_ms: Milliseconds the replica worked on it (non-stream successes).
        stream: JSON chunks follow this reply (a stream's head; ``body`` is then None).
    """

    body: Any
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    replica: str = ""
    service_ms: Optional[int] = None
    stream: bool = False

    @classmethod
    def failure(cls, exc: BaseException, replica: str = "") -> "Reply":
        """The answer for an exception, through the one exception -> HTTP table."""
        log_internal(exc)
        return cls(error_body(exc), http_status_for(exc), http_headers_for(exc), replica)

    @property
    def ok(self) -> bool:
        return self.status < 400


def to_response(reply: Reply) -> Response:
    """The HTTP response for a plain answer."""
    headers = dict(reply.headers)
    if reply.replica:
        headers[REPLICA_HEADER] = reply.replica
    if reply.service_ms is not None:
        headers[SERVICE_HEADER] = str(reply.service_ms)
    return JSONResponse(reply.body, status_code=reply.status, headers=headers)


def sse(chunk: Any) -> bytes:
    """One server-sent event carrying a JSON chunk."""
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def sse_stream(chunks: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    """Frame a stream of JSON chunks as server-sent events, ending with ``[DONE]``."""
    async for chunk in chunks:
        yield sse(chunk)
    yield SSE_DONE


def stream_response(head: Reply, chunks: AsyncIterator[Any]) -> Response:
    """The response for a streamed answer: its head, then its JSON chunks as server-sent events."""
    headers = {REPLICA_HEADER: head.replica} if head.replica else {}
    return StreamingResponse(sse_stream(chunks), media_type="text/event-stream", headers=headers)


async def respond(answers: AsyncIterator[Any]) -> Response:
    """The response for a model's answer as it streams in: a :class:`Reply`, then chunks if it streams."""
    head = await answers.__anext__()
    if not head.stream:
        await answers.aclose()
        return to_response(head)
    return stream_response(head, answers)


class OpenAIRoutes:
    """The hooks an ingress class implements; :func:`make_api` routes the OpenAI surface to them."""

    async def _endpoint(self, endpoint: str, request: Request) -> Response:
        """Serve ``POST /v1/<endpoint>``."""
        raise NotImplementedError

    async def _get(self, route: str, request: Request) -> Response:
        """Serve ``GET /v1/models`` (``models``) or ``GET /health`` (``health``)."""
        raise NotImplementedError

    def _api_docs_enabled(self) -> bool:
        """Whether the spec publishes the API docs (``api_docs``)."""
        return bool(getattr(getattr(self, "spec", None), "api_docs", False))


# The surface, declared once: (method, path, hook, its argument, summary).
ROUTES: tuple[tuple[str, str, str, str, str], ...] = (
    ("POST", "/v1/embeddings", "_endpoint", "embeddings", "OpenAI embeddings."),
    ("POST", "/v1/completions", "_endpoint", "completions", "OpenAI completions (stream: true for server-sent events)."),
    ("POST", "/v1/chat/completions", "_endpoint", "chat/completions", "OpenAI chat completions (messages rendered with the model's chat template)."),
    ("GET", "/v1/models", "_get", "models", "The one model this deployment serves."),
    ("GET", "/health", "_get", "health", "Readiness of a model replica."),
)


def _route(cls: type, hook: str, arg: Optional[str], name: str, doc: str) -> Any:
    async def endpoint(self: Any, request: Request) -> Response:
        method = getattr(self, hook)
        return await (method(request) if arg is None else method(arg, request))

    # Ray Serve binds an app's routes to the class whose name prefixes the endpoint's qualified name,
    # and marks the function object as that class's: each ingress class gets functions of its own.
    endpoint.__name__ = name
    endpoint.__qualname__ = f"{cls.__qualname__}.{name}"
    endpoint.__doc__ = doc
    return endpoint


async def _not_found(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    return not_found_response(request, exc)


# FastAPI's own docs pages, off unless the spec turns them on (``api_docs``).
DOC_PAGES = ("/openapi.json", "/docs", "/redoc")


def _docs_route(cls: type, api: FastAPI, page: str) -> Any:
    async def endpoint(self: Any, request: Request) -> Response:
        if not self._api_docs_enabled():
            # As any unknown path: the surface is not advertised.
            return not_found_response(request, StarletteHTTPException(404))
        if page == "/openapi.json":
            return JSONResponse(api.openapi())
        # Behind Ray Serve the app lives under its route prefix: the pages fetch the schema from there.
        schema_url = request.scope.get("root_path", "").rstrip("/") + "/openapi.json"
        if page == "/docs":
            return get_swagger_ui_html(openapi_url=schema_url, title="gpuserve API")
        return get_redoc_html(openapi_url=schema_url, title="gpuserve API")

    name = "api_docs_" + page.strip("/").replace(".", "_")
    endpoint.__name__ = name
    endpoint.__qualname__ = f"{cls.__qualname__}.{name}"
    return endpoint


def make_api(cls: type, description: str, extra_get: Optional[dict[str, str]] = None) -> FastAPI:
    """The FastAPI app of ingress class ``cls``: the :data:`ROUTES`, plus ``extra_get`` (path -> method
    name of ``cls``), unknown paths and methods answered in OpenAI's error shape. The docs pages
    (:data:`DOC_PAGES`) answer only where the spec enables them."""
    api = FastAPI(title="gpuserve", description=description, docs_url=None, redoc_url=None, openapi_url=None)
    api.add_exception_handler(StarletteHTTPException, _not_found)
    for page in DOC_PAGES:
        api.add_api_route(page, _docs_route(cls, api, page), methods=["GET"], include_in_schema=False)
    for method, path, hook, arg, doc in ROUTES:
        api.add_api_route(path, _route(cls, hook, arg, arg.replace("/", "_"), doc), methods=[method])
    for path, name in (extra_get or {}).items():
        api.add_api_route(path, _route(cls, name, None, name, getattr(cls, name).__doc__ or ""), methods=["GET"])
    return api
