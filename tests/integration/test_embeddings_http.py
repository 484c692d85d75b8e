"""The quickstart embeddings app on real Ray Serve, over real HTTP."""

import concurrent.futures as cf
import json

import numpy as np
import pytest

MODEL = "all-minilm-l6-v2"


def vectors(resp):
    assert resp.status_code == 200, resp.text
    return np.array([d["embedding"] for d in resp.json()["data"]])


def test_paraphrase_ranks_first(embeddings_client):
    texts = ["A man is playing a guitar.", "Someone is playing the guitar.", "The stock market fell sharply today."]
    r = embeddings_client.post("/v1/embeddings", json={"model": MODEL, "input": texts, "encoding_format": "float"})
    v = vectors(r)
    assert v.shape == (3, 384)
    sims = v[1:] @ v[0]
    assert sims[0] > sims[1], f"paraphrase {sims[0]:.3f} should beat unrelated {sims[1]:.3f}"
    body = r.json()
    assert body["object"] == "list" and body["model"] == MODEL
    assert [d["index"] for d in body["data"]] == [0, 1, 2]


def test_single_string_input(embeddings_client):
    r = embeddings_client.post("/v1/embeddings", json={"input": "hello"})
    assert vectors(r).shape == (1, 384)
    # The replica says how long it worked on the request (through the gateway): latency less this is
    # the time the request waited.
    from serving.protocol import SERVICE_HEADER

    assert 0 <= float(r.headers[SERVICE_HEADER]) <= r.elapsed.total_seconds() * 1000 + 1


def test_concurrent_requests_are_each_answered_correctly(embeddings_client):
    texts = [f"sentence number {i} about topic {i % 3}" for i in range(24)]
    solo = {t: vectors(embeddings_client.post("/v1/embeddings", json={"input": t}))[0] for t in texts[:3]}
    with cf.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda t: embeddings_client.post("/v1/embeddings", json={"input": t}), texts))
    for t, r in zip(texts, results):
        v = vectors(r)[0]
        if t in solo:
            np.testing.assert_allclose(v, solo[t], atol=1e-5)


def test_models_and_health(embeddings_client):
    models = embeddings_client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [MODEL]
    health = embeddings_client.get("/health")
    assert health.status_code == 200
    h = health.json()
    assert h["status"] == "ready" and h["dimensions"] == 384 and h["load_s"] > 0
    assert h["warmup"]["seconds"] > 0 and h["warmup"]["rounds"] >= 2 and h["warmup"]["envelope"]
    assert h["time_to_ready_s"] >= h["load_s"] + h["warmup"]["seconds"] * 0.99


BAD = [
    pytest.param(b"{not json", 400, "invalid_json", id="malformed-json"),
    pytest.param(b'["a"]', 400, "invalid_body", id="not-an-object"),
    pytest.param(b'{"input": 42}', 400, "invalid_string_type", id="wrong-type"),
    pytest.param(b'{"input": ["a", 1]}', 400, "invalid_string_type", id="wrong-item-type"),
    pytest.param(b'{"input": []}', 400, "empty_input", id="empty-list"),
    pytest.param(b'{"input": ""}', 400, "empty_input", id="empty-string"),
    pytest.param(json.dumps({"input": ["x"] * 257}).encode(), 400, "too_many_inputs", id="too-many-inputs"),
    pytest.param(json.dumps({"input": "token " * 700}).encode(), 400, "input_too_long", id="too-long"),
    pytest.param(b'{"input": "a", "model": "gpt-4"}', 404, "model_not_found", id="wrong-model"),
    pytest.param(b'{"input": "a", "temperature": 1}', 400, "invalid_extra_forbidden", id="unknown-field"),
    pytest.param(b"", 400, "invalid_json", id="empty-body"),
    pytest.param(b"x" * (1_048_576 + 1), 413, "body_too_large", id="body-over-limit"),
]


@pytest.mark.parametrize("body,status,code", BAD)
def test_bad_input_gets_an_openai_4xx(embeddings_client, body, status, code):
    r = embeddings_client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["message"] and err["type"] == "invalid_request_error"


def test_unknown_route_and_wrong_endpoint(embeddings_client):
    r = embeddings_client.get("/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = embeddings_client.post("/v1/completions", json={"prompt": "x"})
    assert r.status_code == 404 and "/v1/embeddings" in r.json()["error"]["message"]
    r = embeddings_client.get("/v1/embeddings")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_replica_survives_bad_input(embeddings_client):
    from ray import serve

    before = serve.status().applications["quickstart"].deployments["minilm"]
    for body, _, _ in [p.values for p in BAD]:
        embeddings_client.post("/v1/embeddings", content=body, headers={"content-type": "application/json"})
    after = serve.status().applications["quickstart"].deployments["minilm"]
    assert after.status == "HEALTHY"
    assert after.replica_states == before.replica_states
    assert vectors(embeddings_client.post("/v1/embeddings", json={"input": "still here"})).shape == (1, 384)
