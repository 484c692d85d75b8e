"""Fuzzing the HTTP API (through the admission gateway) with hypothesis: no input gets a 5xx.

Bodies are arbitrary JSON, OpenAI-shaped objects with wrong-typed or out-of-range fields, and raw
bytes; headers include the admission ones. Every answer must be a 2xx or a 4xx in OpenAI's error
shape: bad input is the client's error, never a 500 or a hang.
"""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_scalars = st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=False) | st.text(max_size=40)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12
)
FIELDS = [
    "input", "prompt", "model", "encoding_format", "dimensions", "user", "stream", "max_tokens", "temperature",
    "top_p", "n", "stop", "seed", "echo", "logprobs", "suffix", "messages", "max_completion_tokens", "stream_options",
]
shaped = st.dictionaries(
    st.sampled_from(FIELDS),
    json_values | st.lists(st.text(max_size=30), max_size=6) | st.integers(-5, 100_000),
    max_size=6,
)
# Chat bodies: messages close to valid (roles, text or parts, odd orders) with the other fields fuzzed.
messages = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "user", "assistant", "developer", "tool", "", 3])},
        optional={
            "content": st.text(max_size=40)
            | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": st.text(max_size=10)}), max_size=3)
            | json_values,
            "name": json_scalars,
        },
    ),
    max_size=4,
)
chat_shaped = st.builds(lambda m, rest: {"messages": m, **rest}, messages, shaped)
headers = st.fixed_dictionaries(
    {},
    optional={
        "x-gpuserve-priority": st.sampled_from(["interactive", "batch", "BATCH", "", "urgent", "0"]),
        "x-gpuserve-timeout-s": st.sampled_from(["0.001", "5", "0", "-3", "1e9", "inf", "nan", "x", ""]),
        "content-type": st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded"]),
        "authorization": st.sampled_from(["Bearer x", "Basic abc", ""]),
    },
)
bodies = (
    shaped.map(lambda d: json.dumps(d).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
)


def check(resp):
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert isinstance(err["message"], str) and err["type"] and err["code"]


FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.mark.parametrize("endpoint", ["/v1/embeddings", "/v1/completions"])
def test_fuzz_embeddings_deployment(embeddings_client, endpoint):
    @FUZZ
    @given(body=bodies, hdrs=headers)
    def run(body, hdrs):
        check(embeddings_client.post(endpoint, content=body, headers=hdrs))

    run()


def test_fuzz_completions_deployment(generation_client):
    @FUZZ
    @given(body=bodies, hdrs=headers)
    def run(body, hdrs):
        check(generation_client.post("/v1/completions", content=body, headers=hdrs))

    run()


def test_fuzz_chat_completions(generation_client):
    @FUZZ
    @given(body=chat_shaped.map(lambda d: json.dumps(d).encode()) | bodies, hdrs=headers)
    def run(body, hdrs):
        check(generation_client.post("/v1/chat/completions", content=body, headers=hdrs))

    run()


@given(path=st.sampled_from(["/v1/models", "/health", "/admission", "/v1/nothing", "/", "/v1/embeddings"]),
       method=st.sampled_from(["GET", "PUT", "DELETE", "PATCH"]))
@FUZZ
def test_fuzz_routes_and_methods(embeddings_client, path, method):
    check(embeddings_client.request(method, path))
