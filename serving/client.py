"""A small client for gpuserve endpoints that backs off the way the server asks.

When a deployment is full it answers 429 (or 503 while it has no replica) with
``Retry-After``. ``Client`` and ``AsyncClient`` wait at least that long, plus a
random spread so that rejected clients do not all return at the same instant,
and give up once the caller's overall deadline would pass. Without a
Retry-After they use exponential backoff with full jitter. Other errors (4xx)
are not retried: they raise ``RequestFailed`` with the server's OpenAI-shaped
error.

Example:
    >>> with Client("http://127.0.0.1:8000", deadline_s=30) as c:   # doctest: +SKIP
    ...     vectors = c.embeddings(["hello", "world"])["data"]
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Optional

import httpx

from serving.protocol import NOT_RETRIED_CODES, PRIORITY_HEADER, TIMEOUT_HEADER

__all__ = [
    "PRIORITY_HEADER",
    "TIMEOUT_HEADER",
    "AsyncClient",
    "Client",
    "DeadlineExceeded",
    "RequestFailed",
    "RetryPolicy",
    "retry_after_s",
]

RETRYABLE_STATUS = frozenset({429, 503})


class RequestFailed(Exception):
    """The server refused the request for a reason retrying will not fix (or retries ran out)."""

    def __init__(self, status: int, body: Any, attempts: int):
        message = body.get("error", {}).get("message") if isinstance(body, dict) else None
        super().__init__(f"HTTP {status} after {attempts} attempt(s): {message or body!r}")
        self.status, self.body, self.attempts = status, body, attempts


class DeadlineExceeded(TimeoutError):
    """Waiting as the server asked would pass the caller's deadline."""

    def __init__(self, deadline_s: float, attempts: int, last_status: Optional[int], wait_s: float):
        super().__init__(
            f"deadline of {deadline_s:g}s would pass: {attempts} attempt(s), last status {last_status}, "
            f"next try in {wait_s:.2f}s"
        )
        self.attempts, self.last_status = attempts, last_status




def _error_code(body: Any) -> Optional[str]:
    err = body.get("error") if isinstance(body, dict) else None
    return err.get("code") if isinstance(err, dict) else None


def _retry_after(headers: Any) -> Optional[float]:
    # The millisecond form is the server's estimate unrounded; Retry-After is its whole-second ceiling.
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
            if 0 <= value < 86_400:
                return value
        except ValueError:
            pass
    return retry_after_s(headers.get("retry-after"))


def retry_after_s(value: Optional[str], now_s: Optional[float] = None) -> Optional[float]:
    """Parse a Retry-After header: delta-seconds or an HTTP date. None if absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(0.0, when - (time.time() if now_s is None else now_s))


@dataclass(frozen=True)
class RetryPolicy:
    """How long to wait before the next attempt.

    Attributes:
        max_attempts: Attempts in all, the first included.
        base_s: First backoff step when the server gave no Retry-After.
        cap_s: Longest single wait.
        spread: With a Retry-After, wait ``retry_after * (1 + U(0, spread))``: never earlier than asked.
    """

    max_attempts: int = 8
    base_s: float = 0.1
    cap_s: float = 10.0
    spread: float = 0.25
    rng: random.Random = field(default_factory=random.Random, compare=False)

    def delay_s(self, attempt: int, retry_after: Optional[float]) -> float:
        """Wait before attempt ``attempt + 1`` (``attempt`` counts from 1)."""
        if retry_after is not None:
            return min(self.cap_s, retry_after * (1.0 + self.rng.uniform(0.0, self.spread)))
        # Full jitter: uniform in [0, base * 2^(attempt-1)], capped.
        return self.rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (attempt - 1)))


def _body(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return resp.text


class _Base:
    def __init__(
        self,
        base_url: str,
        *,
        api_key: Optional[str] = None,
        deadline_s: float = 60.0,
        priority: Optional[str] = None,
        policy: Optional[RetryPolicy] = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.base_url = base_url.rstrip("/")
        self.deadline_s = deadline_s
        self.policy = policy or RetryPolicy()
        self.clock = clock
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        if priority is not None:
            self.headers[PRIORITY_HEADER] = priority
        self.attempts_log: list[int] = []  # status of every attempt of the last request, for callers and tests

    def _next_wait(self, resp: httpx.Response, attempt: int, started: float) -> float:
        """The wait before the next attempt, or raise if there must be none."""
        body = _body(resp)
        if (
            resp.status_code not in RETRYABLE_STATUS
            or _error_code(body) in NOT_RETRIED_CODES
            or attempt >= self.policy.max_attempts
        ):
            raise RequestFailed(resp.status_code, body, attempt)
        wait = self.policy.delay_s(attempt, _retry_after(resp.headers))
        if self.clock() + wait - started > self.deadline_s:
            raise DeadlineExceeded(self.deadline_s, attempt, resp.status_code, wait)
        return wait

    def _on_transport_error(self, exc: httpx.TransportError, attempt: int, started: float) -> float:
        """The wait after a transport failure, or raise.

        A timeout means the deadline ran out while waiting for an answer. A refused
        connection never reached the server, so it is safe to retry; anything else
        might have been processed and is raised as is.
        """
        if isinstance(exc, httpx.TimeoutException):
            raise DeadlineExceeded(self.deadline_s, attempt, None, 0.0) from exc
        if not isinstance(exc, httpx.ConnectError) or attempt >= self.policy.max_attempts:
            raise exc
        wait = self.policy.delay_s(attempt, None)
        if self.clock() + wait - started > self.deadline_s:
            raise DeadlineExceeded(self.deadline_s, attempt, None, wait) from exc
        return wait

    def _timeout(self, started: float) -> float:
        # Each attempt gets what is left of the overall deadline, never more.
        return max(0.001, self.deadline_s - (self.clock() - started))

    def _attempt_headers(self, started: float) -> dict[str, str]:
        # The server learns the deadline too: it refuses at once what cannot finish in time and
        # never runs a request the client has given up on.
        return {**self.headers, TIMEOUT_HEADER: f"{self._timeout(started):.3f}"}


class Client(_Base):
    """Synchronous client (httpx). Use as a context manager or call ``close()``."""

    def __init__(self, base_url: str, **kw: Any):
        self._sleep = kw.pop("sleep", time.sleep)
        super().__init__(base_url, **kw)
        self._http = httpx.Client()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON, retrying 429/503 as the server asks, within the deadline."""
        started, attempt = self.clock(), 0
        self.attempts_log = []
        while True:
            attempt += 1
            try:
                resp = self._http.post(
                    self.base_url + path, json=body, headers=self._attempt_headers(started), timeout=self._timeout(started)
                )
            except httpx.TransportError as e:
                self._sleep(self._on_transport_error(e, attempt, started))
                continue
            self.attempts_log.append(resp.status_code)
            if resp.status_code == 200:
                return resp.json()
            self._sleep(self._next_wait(resp, attempt, started))

    def embeddings(self, input: Any, model: Optional[str] = None) -> dict[str, Any]:
        return self.post("/v1/embeddings", {"input": input, **({"model": model} if model else {})})

    def completions(self, prompt: Any, **kw: Any) -> dict[str, Any]:
        return self.post("/v1/completions", {"prompt": prompt, **kw})

    def chat(self, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions`` (not streamed)."""
        return self.post("/v1/chat/completions", {"messages": messages, **kw})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncClient(_Base):
    """Asynchronous client (httpx). Use as an async context manager or await ``aclose()``."""

    def __init__(self, base_url: str, **kw: Any):
        self._sleep = kw.pop("sleep", asyncio.sleep)
        super().__init__(base_url, **kw)
        self._http = httpx.AsyncClient()

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST JSON, retrying 429/503 as the server asks, within the deadline."""
        started, attempt = self.clock(), 0
        self.attempts_log = []
        while True:
            attempt += 1
            try:
                resp = await self._http.post(
                    self.base_url + path, json=body, headers=self._attempt_headers(started), timeout=self._timeout(started)
                )
            except httpx.TransportError as e:
                await self._sleep(self._on_transport_error(e, attempt, started))
                continue
            self.attempts_log.append(resp.status_code)
            if resp.status_code == 200:
                return resp.json()
            await self._sleep(self._next_wait(resp, attempt, started))

    async def embeddings(self, input: Any, model: Optional[str] = None) -> dict[str, Any]:
        return await self.post("/v1/embeddings", {"input": input, **({"model": model} if model else {})})

    async def completions(self, prompt: Any, **kw: Any) -> dict[str, Any]:
        return await self.post("/v1/completions", {"prompt": prompt, **kw})

    async def chat(self, messages: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
        """``POST /v1/chat/completions`` (not streamed)."""
        return await self.post("/v1/chat/completions", {"messages": messages, **kw})

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()
