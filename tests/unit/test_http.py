"""Bounded body reading and JSON parsing at the HTTP edge (Starlette, no Ray)."""

import asyncio
import json

import pytest
from starlette.requests import Request

from serving._private.http import error_response, read_json
from serving.errors import InvalidRequest, PayloadTooLarge


def request(chunks, headers=()):
    scope = {"type": "http", "method": "POST", "path": "/", "headers": [(k.encode(), v.encode()) for k, v in headers]}
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    messages = messages or [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive():
        return messages.pop(0)

    return Request(scope, receive)


def run(coro):
    return asyncio.run(coro)


def test_reads_json_object():
    assert run(read_json(request([b'{"a": 1}']), 100)) == {"a": 1}


def test_declared_length_over_limit_is_refused_before_reading():
    with pytest.raises(PayloadTooLarge, match="1000 bytes, over this deployment's limit of 100"):
        run(read_json(request([b"{}"], [("content-length", "1000")]), 100))


def test_chunked_body_over_limit_is_refused_while_reading():
    with pytest.raises(PayloadTooLarge, match="limit of 100 bytes"):
        run(read_json(request([b"x" * 60, b"x" * 60]), 100))


@pytest.mark.parametrize("body,fragment", [(b"", "empty"), (b"{bad", "not valid JSON"), (b"\xff\xfe", "not valid JSON")])
def test_bad_bodies(body, fragment):
    with pytest.raises(InvalidRequest, match=fragment):
        run(read_json(request([body]), 100))


def test_deeply_nested_json_is_a_400_not_a_crash():
    body = b"[" * 100_000 + b"]" * 100_000
    with pytest.raises(InvalidRequest, match="not valid JSON"):
        run(read_json(request([body]), 1 << 20))


def test_bad_content_length_header():
    with pytest.raises(InvalidRequest, match="Content-Length"):
        run(read_json(request([b"{}"], [("content-length", "ten")]), 100))


def test_error_response_renders_status_and_body():
    resp = error_response(PayloadTooLarge("too big", code="body_too_large"))
    assert resp.status_code == 413
    assert json.loads(resp.body)["error"]["code"] == "body_too_large"
