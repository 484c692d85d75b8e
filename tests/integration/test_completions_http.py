"""Text generation with a tiny random model on real Ray Serve: completions and SSE streaming."""

import json

import pytest


def sse_events(resp):
    events = []
    for line in resp.iter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: ") :])
    return events


def test_completion(generation_client):
    r = generation_client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == "tiny"
    choice = body["choices"][0]
    assert choice["finish_reason"] in ("stop", "length")
    assert 1 <= body["usage"]["completion_tokens"] <= 8


def test_streaming_matches_non_streaming(generation_client):
    req = {"prompt": "Once upon a time", "max_tokens": 10, "temperature": 0}
    full = generation_client.post("/v1/completions", json=req).json()["choices"][0]
    with generation_client.stream("POST", "/v1/completions", json={**req, "stream": True}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == full["finish_reason"]


def test_stop_sequence(generation_client):
    req = {"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0}
    full = generation_client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    stop = full[2:4]
    out = generation_client.post("/v1/completions", json={**req, "stop": stop}).json()["choices"][0]
    assert out["text"] == full[: full.find(stop)] and out["finish_reason"] == "stop"


def test_sampling_with_temperature(generation_client):
    r = generation_client.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 4, "temperature": 0.9})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2


@pytest.mark.parametrize(
    "body,status,code",
    [
        ({"prompt": "a", "max_tokens": 1000}, 400, "context_length_exceeded"),
        ({"prompt": "a", "max_tokens": "many"}, 400, "invalid_int_parsing"),
        ({"prompt": ["a", "b"], "stream": True}, 400, "unsupported_stream"),
        ({"prompt": ""}, 400, "empty_input"),
        ({"prompt": "a", "model": "other"}, 404, "model_not_found"),
        ({"prompt": "x" * 5000}, 413, "body_too_large"),
    ],
)
def test_bad_input(generation_client, body, status, code):
    r = generation_client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code


def test_embeddings_route_is_not_served_here(generation_client):
    r = generation_client.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
