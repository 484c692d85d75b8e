"""The one HTTP surface: a model's plain answer rendered once, the routes declared once and bound per ingress class."""

import asyncio
import json

from serving._private.surface import ROUTES, OpenAIRoutes, Reply, make_api, respond, to_response
from serving.errors import Overloaded
from serving.protocol import REPLICA_HEADER, SERVICE_HEADER


def test_a_reply_renders_as_json_with_the_replica_and_service_headers():
    r = to_response(Reply({"object": "list"}, replica="r1", service_ms=12))
    assert r.status_code == 200 and json.loads(r.body) == {"object": "list"}
    assert r.headers[REPLICA_HEADER] == "r1" and r.headers[SERVICE_HEADER] == "12"


def test_a_failure_goes_through_the_one_error_table():
    reply = Reply.failure(Overloaded("full", retry_after_s=2.5, code="queue_full"), "r1")
    assert not reply.ok and reply.status == 429 and reply.body["error"]["code"] == "queue_full"
    r = to_response(reply)
    assert r.status_code == 429 and r.headers["retry-after"] == "3" and r.headers[REPLICA_HEADER] == "r1"


def test_respond_streams_chunks_as_server_sent_events_and_ends_with_done():
    async def answers():
        yield Reply(None, replica="r2", stream=True)
        yield {"choices": [{"text": "a"}]}
        yield {"choices": [{"text": "b"}]}

    async def main():
        r = await respond(answers())
        return r, b"".join([c async for c in r.body_iterator])

    r, raw = asyncio.run(main())
    assert r.media_type == "text/event-stream" and r.headers[REPLICA_HEADER] == "r2"
    events = raw.decode().strip().split("\n\n")
    assert [json.loads(e[len("data: "):])["choices"][0]["text"] for e in events[:-1]] == ["a", "b"]
    assert events[-1] == "data: [DONE]"


def test_respond_answers_a_non_streamed_reply_whole():
    async def answers():
        yield Reply({"ok": True}, replica="r3")

    async def main():
        return await respond(answers())

    r = asyncio.run(main())
    assert r.status_code == 200 and json.loads(r.body) == {"ok": True}


def test_each_ingress_class_gets_its_own_route_functions_over_the_one_table():
    class A(OpenAIRoutes):
        async def extra(self, request):
            """An extra GET."""

    class B(OpenAIRoutes):
        pass

    a, b = make_api(A, "a", {"/extra": "extra"}), make_api(B, "b")
    routes = lambda api: {r.path: r.endpoint for r in api.routes if hasattr(r, "endpoint") and r.path.startswith(("/v1", "/health", "/extra"))}  # noqa: E731
    ra, rb = routes(a), routes(b)
    assert set(rb) == {path for _, path, *_ in ROUTES} and set(ra) == set(rb) | {"/extra"}
    # Ray Serve binds a route to the class its qualified name starts with, and marks the function object:
    # shared function objects would let the second class take the first's routes away.
    for path in rb:
        assert ra[path] is not rb[path]
        assert ra[path].__qualname__.startswith(A.__qualname__ + ".") and rb[path].__qualname__.startswith(B.__qualname__ + ".")
