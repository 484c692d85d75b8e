"""HTTP edge helpers: bounded body reading, JSON parsing, error responses.

Starlette only (no Ray): every bad request turns into a ``GpuserveError`` here
or in the task's parser, and ``error_response`` renders it through the one
status table in ``serving.errors``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse

from serving.errors import (
    GpuserveError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    error_body,
    http_headers_for,
    http_status_for,
)

# Serve writes the "ray.serve" logger into each replica's own log file, with the replica id.
logger = logging.getLogger("ray.serve")


async def read_json(request: Request, max_bytes: int) -> Any:
    """Read and parse a JSON body of at most ``max_bytes``.

    The declared Content-Length is checked before reading, and the stream is
    counted while reading, so a lying or chunked client cannot push more.
    """
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            n = int(declared)
        except ValueError:
            raise InvalidRequest(f"Content-Length ({declared!r}) is not an integer", code="invalid_header") from None
        if n > max_bytes:
            raise PayloadTooLarge(
                f"request body is {n} bytes, over this deployment's limit of {max_bytes} bytes "
                "(queue.max_request_body_bytes); send fewer or shorter inputs",
                code="body_too_large",
            )
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLarge(
                f"request body is over this deployment's limit of {max_bytes} bytes "
                "(queue.max_request_body_bytes); send fewer or shorter inputs",
                code="body_too_large",
            )
    if not body:
        raise InvalidRequest("request body is empty; send a JSON object", code="invalid_json")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as e:
        # ValueError covers JSONDecodeError and UnicodeDecodeError.
        raise InvalidRequest(f"request body is not valid JSON: {e}", code="invalid_json") from None


def log_internal(exc: BaseException) -> None:
    """Log an exception that answers 5xx (a fault of the platform), with its traceback."""
    if http_status_for(exc) >= 500:
        logger.error("gpuserve: internal error while serving a request", exc_info=exc)


def error_response(exc: BaseException) -> JSONResponse:
    """Render any exception as an OpenAI-shaped JSON error response."""
    log_internal(exc)
    return JSONResponse(error_body(exc), status_code=http_status_for(exc), headers=http_headers_for(exc))


def not_found_response(request: Request, exc: Any) -> JSONResponse:
    """Starlette's own 404/405 (unknown path, wrong method) in OpenAI's error shape, like every other error."""
    err: GpuserveError
    if getattr(exc, "status_code", 404) == 405:
        err = MethodNotAllowed(f"method {request.method} is not allowed on {request.url.path}", code="method_not_allowed")
    else:
        err = NotFound(f"no route {request.method} {request.url.path}; see /v1/models", code="not_found")
    return error_response(err)
