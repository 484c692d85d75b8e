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


def test_token_metrics_reach_prometheus_with_deployment_and_replica(generation_client, metrics_port):
    import time

    import httpx

    replica = generation_client.get("/health").headers["x-gpuserve-replica"]
    r = generation_client.post("/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200
    made = r.json()["usage"]["completion_tokens"]
    names = (
        "ray_gpuserve_time_to_first_token_seconds_bucket",
        "ray_gpuserve_inter_token_latency_seconds_count",
        "ray_gpuserve_generated_tokens_total",
        "ray_gpuserve_sequences",
        "ray_gpuserve_kv_cache_bytes",
        "ray_gpuserve_ttft_slo_seconds",
    )

    def rows(text, name):
        return [ln for ln in text.splitlines() if ln.startswith(name + "{") and f'replica="{replica}"' in ln]

    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        if all(rows(text, n) for n in names):
            break
        time.sleep(1)
    for n in names:
        assert rows(text, n), f"{n} for replica {replica} not exported"
        assert 'deployment="tiny-llm"' in rows(text, n)[0]
    tokens = sum(float(ln.rsplit(" ", 1)[1]) for ln in rows(text, "ray_gpuserve_generated_tokens_total"))
    assert tokens >= made
    assert {ln.split('state="')[1].split('"')[0] for ln in rows(text, "ray_gpuserve_sequences")} == {"running", "waiting"}
    assert float(rows(text, "ray_gpuserve_ttft_slo_seconds")[0].rsplit(" ", 1)[1]) == 1.0
