"""ASGI middleware for Ray Serve's HTTP proxy: a platform fault never reaches the client as a 500.

When the gateway replica handling a request dies before it answers (SIGKILL, OOM kill, node loss),
Ray's proxy maps the ``RayActorError`` to 500 and sends nothing itself; the HTTP server then answers
a bare 500. The request was the platform's to lose, not the client's fault, so this middleware
answers such a request 503 with Retry-After (code ``gateway_lost``) from gpuserve's one error table.
A response that had already started is left alone: its status is on the wire.

Loaded by the proxy through ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (see
:data:`serving.protocol.PROXY_ENV`).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Awaitable, Callable

from starlette.middleware import Middleware

from serving.errors import ModelNotReady, error_body, http_headers_for, http_status_for
from serving.protocol import GATEWAY_LOST_CODE

logger = logging.getLogger("ray.serve")

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]

# Long enough for Ray to route the retry to the surviving gateway, or to restart this one.
RETRY_AFTER_S = 1.0


class GatewayLostGuard:
    """Answers 503 + Retry-After for an HTTP request the proxy ended without a response."""

    def __init__(self, app: Callable[..., Awaitable[None]], retry_after_s: float = RETRY_AFTER_S):
        self.app = app
        self.retry_after_s = retry_after_s

    async def __call__(self, scope: Message, receive: Callable[[], Awaitable[Message]], send: Send) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            if message.get("type") == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            if started:
                raise
            logger.warning("gpuserve: request to %s failed before any response; answered 503", scope.get("path"), exc_info=True)
        if not started:
            await self._unavailable(send)

    async def _unavailable(self, send: Send) -> None:
        exc = ModelNotReady(
            "the gateway holding this request went away before it answered; retry after the Retry-After delay",
            code=GATEWAY_LOST_CODE,
            retry_after_s=self.retry_after_s,
        )
        body = json.dumps(error_body(exc)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode(), v.encode()) for k, v in http_headers_for(exc).items()]
        try:
            await send({"type": "http.response.start", "status": http_status_for(exc), "headers": headers})
            await send({"type": "http.response.body", "body": body})
        except Exception:  # noqa: BLE001 - the client is gone (it disconnected): nobody to answer
            pass


def middlewares() -> list[Middleware]:
    """Ray Serve's HTTP proxy callback: the middleware list it wraps its ASGI app in."""
    return [Middleware(GatewayLostGuard)]
