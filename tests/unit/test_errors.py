"""The exception -> HTTP table and OpenAI error bodies."""

import pytest

from serving.errors import (
    GpuserveError,
    InvalidRequest,
    ModelNotFound,
    ModelNotReady,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    RequestExpired,
    error_body,
    http_headers_for,
    http_status_for,
)


@pytest.mark.parametrize(
    "exc,status",
    [
        (InvalidRequest("x"), 400),
        (PayloadTooLarge("x"), 413),
        (NotFound("x"), 404),
        (ModelNotFound("x"), 404),
        (Overloaded("x", retry_after_s=1), 429),
        (ModelNotReady("x"), 503),
        (RequestExpired("x"), 504),
        (GpuserveError("x"), 500),
        (RuntimeError("boom"), 500),
    ],
)
def test_status_table(exc, status):
    assert http_status_for(exc) == status


def test_openai_error_shape():
    body = error_body(InvalidRequest("input is empty", param="input", code="empty_input"))
    assert body == {
        "error": {"message": "input is empty", "type": "invalid_request_error", "param": "input", "code": "empty_input"}
    }


def test_unknown_errors_leak_nothing():
    body = error_body(RuntimeError("secret path /etc/token"))
    assert "secret" not in body["error"]["message"]
    assert body["error"]["type"] == "server_error"


@pytest.mark.parametrize(
    "retry_after_s,header,ms", [(0.2, "1", "200"), (1.0, "1", "1000"), (1.01, "2", "1010"), (7.5, "8", "7500")]
)
def test_retry_after_rounds_up_to_whole_seconds(retry_after_s, header, ms):
    headers = http_headers_for(Overloaded("full", retry_after_s=retry_after_s))
    assert headers == {"Retry-After": header, "retry-after-ms": ms}
    assert http_headers_for(InvalidRequest("x")) == {}
