"""The proxy middleware: a request the proxy ends without a response (its gateway died) is answered
503 with Retry-After and gpuserve's error body; anything that already answered passes untouched."""

import asyncio
import json

import pytest

from serving._private.proxy_guard import GatewayLostGuard, middlewares
from serving.protocol import GATEWAY_LOST_CODE, PROXY_ENV


def run(app, scope=None):
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(GatewayLostGuard(app)(scope or {"type": "http", "path": "/m/v1/embeddings"}, receive, send))
    return sent


def status_headers_body(sent):
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


async def ends_without_answer(scope, receive, send):
    # What Ray's proxy does on a RayActorError: nothing sent, the server would answer a bare 500.
    return None


async def raises_before_answer(scope, receive, send):
    raise RuntimeError("actor died")


async def answers(scope, receive, send):
    await send({"type": "http.response.start", "status": 429, "headers": [(b"retry-after", b"2")]})
    await send({"type": "http.response.body", "body": b"busy"})


@pytest.mark.parametrize("app", [ends_without_answer, raises_before_answer])
def test_a_request_left_without_an_answer_gets_503_with_retry_after(app):
    status, headers, body = status_headers_body(run(app))
    assert status == 503
    assert int(headers[b"retry-after"]) >= 1
    err = json.loads(body)["error"]
    assert err["code"] == GATEWAY_LOST_CODE and err["type"] == "service_unavailable"
    assert int(headers[b"content-length"]) == len(body)


def test_an_answer_that_started_passes_untouched():
    sent = run(answers)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert status_headers_body(sent)[0] == 429 and sent[1]["body"] == b"busy"


def test_a_failure_after_the_answer_started_is_not_masked():
    async def fails_mid_body(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("stream broke")

    with pytest.raises(RuntimeError):
        run(fails_mid_body)


def test_non_http_scopes_pass_through():
    seen = []

    async def lifespan(scope, receive, send):
        seen.append(scope["type"])

    assert run(lifespan, {"type": "lifespan"}) == []
    assert seen == ["lifespan"]


def test_ray_loads_the_middleware_from_the_import_path_gpuserve_sets():
    from ray.serve._private.http_util import validate_http_proxy_callback_return
    from ray.serve._private.utils import call_function_from_import_path

    (path,) = PROXY_ENV.values()
    got = validate_http_proxy_callback_return(call_function_from_import_path(path))
    assert [m.cls for m in got] == [m.cls for m in middlewares()] == [GatewayLostGuard]
