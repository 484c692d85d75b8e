"""gpuserve's request errors and the one table that maps them to HTTP.

Handlers raise these exceptions; the HTTP layer turns each into a status code
and an OpenAI-shaped JSON body::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "input", "code": "empty_input"}}

Anything not in the table is an internal error: it is logged with its traceback
and answered with a 500 whose body leaks no internals.
"""

from __future__ import annotations

from typing import Any, Optional

__all__ = [
    "is_oom",
    "RequestExpired",
    "GpuserveError",
    "InvalidRequest",
    "MethodNotAllowed",
    "ModelNotFound",
    "ModelNotReady",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Quarantined",
    "RequestTooLargeForDevice",
    "Unauthorized",
    "error_body",
    "http_status_for",
]


class GpuserveError(Exception):
    """Base of every error a client is meant to see.

    Args:
        message: What was wrong and how to fix it, in one sentence.
        param: The request field at fault (OpenAI's ``param``), if any.
        code: A stable machine-readable code, e.g. ``"input_too_long"``.
    """

    error_type = "server_error"

    def __init__(self, message: str, *, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class InvalidRequest(GpuserveError):
    """The request is malformed or breaks a documented limit."""

    error_type = "invalid_request_error"


class PayloadTooLarge(InvalidRequest):
    """The request body is over the deployment's byte limit."""


class RequestTooLargeForDevice(InvalidRequest):
    """The request alone needs more device memory than the replica can give it."""


class NotFound(InvalidRequest):
    """No such route on this deployment."""


class MethodNotAllowed(InvalidRequest):
    """The route exists but not for this HTTP method."""


class ModelNotFound(NotFound):
    """The request names a model this deployment does not serve."""


class Unauthorized(GpuserveError):
    """No or a wrong API key. The message says nothing about which, or why."""

    error_type = "invalid_request_error"

    def __init__(self) -> None:
        super().__init__("missing or invalid API key", code="unauthorized")


class ModelNotReady(GpuserveError):
    """The model is not loaded (yet, or any more), or its replica went away: retry after ``retry_after_s``.

    Every 503 the platform sends carries a Retry-After, so a client never has to guess.
    """

    error_type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class Quarantined(InvalidRequest):
    """This exact request was running when replicas died, more than once; it is refused so it cannot kill more."""


class Overloaded(GpuserveError):
    """Capacity is full; the client should retry after ``retry_after_s``."""

    error_type = "rate_limit_exceeded"

    def __init__(self, message: str, *, retry_after_s: float, **kw: Any):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class RequestExpired(GpuserveError):
    """The request's deadline passed while it waited; it never reached the model."""

    error_type = "timeout_error"


# The single exception -> HTTP status table. Most specific class first: the
# first isinstance match wins.
_STATUS_TABLE: tuple[tuple[type[GpuserveError], int], ...] = (
    (Quarantined, 422),
    (PayloadTooLarge, 413),
    (RequestTooLargeForDevice, 413),
    (MethodNotAllowed, 405),
    (ModelNotFound, 404),
    (NotFound, 404),
    (InvalidRequest, 400),
    (Unauthorized, 401),
    (Overloaded, 429),
    (ModelNotReady, 503),
    (RequestExpired, 504),
    (GpuserveError, 500),
)


def http_status_for(exc: BaseException) -> int:
    """Return the HTTP status for an exception (500 for anything unknown)."""
    for cls, status in _STATUS_TABLE:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: BaseException) -> dict[str, Any]:
    """Return the OpenAI-shaped error body for an exception.

    Unknown exceptions get a generic message: their text may hold internals.
    """
    if isinstance(exc, GpuserveError):
        return {
            "error": {
                "message": exc.message,
                "type": exc.error_type,
                "param": exc.param,
                "code": exc.code,
            }
        }
    return {
        "error": {
            "message": "internal error; see the replica's logs",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }


def http_headers_for(exc: BaseException) -> dict[str, str]:
    """Extra headers an error response carries (Retry-After for overload)."""
    if isinstance(exc, Unauthorized):
        return {"WWW-Authenticate": "Bearer"}
    if isinstance(exc, (Overloaded, ModelNotReady)):
        # Retry-After takes whole seconds; round up so clients never come back early. The
        # millisecond form (as OpenAI-style APIs send it) keeps the estimate's precision.
        return {
            "Retry-After": str(max(1, int(-(-exc.retry_after_s // 1)))),
            "retry-after-ms": str(max(1, round(exc.retry_after_s * 1000))),
        }
    return {}


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error from torch (CUDA or CPU) or Python."""
    if isinstance(exc, MemoryError):
        return True
    if type(exc).__name__ == "OutOfMemoryError":  # torch.OutOfMemoryError, without importing torch
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
