"""Data-plane API keys on real Ray Serve, over HTTP."""

import pytest

from serving import AuthSpec, ModelDeployment, ModelSource, WarmupSpec
from tests.conftest import MINILM

KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def guarded_keys(tmp_path_factory):
    keys = tmp_path_factory.mktemp("secret") / "api-keys"
    keys.write_text(f"{KEY}\nsecond-key-0123456789abcdef\n")
    return keys


@pytest.fixture(scope="module")
def guarded(deploy, guarded_keys):
    keys = guarded_keys
    spec = ModelDeployment(
        name="guarded",
        task="embeddings",
        model=ModelSource(path=MINILM),
        replicas=1,
        auth=AuthSpec(api_keys_file=str(keys)),
        warmup=WarmupSpec(cover_max_input=False, min_rounds=1, max_rounds=1),
    )
    yield deploy(spec.build(), "guarded", "/guarded")
    from ray import serve

    serve.delete("guarded")


@pytest.mark.parametrize("header", [None, "Bearer wrong-key-0123456789abcdef", f"Basic {KEY}", "Bearer"])
def test_missing_or_wrong_key_is_401_without_detail(guarded, header):
    headers = {"Authorization": header} if header else {}
    r = guarded.post("/v1/embeddings", json={"input": "x"}, headers=headers)
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"] == {
        "message": "missing or invalid API key",
        "type": "invalid_request_error",
        "param": None,
        "code": "unauthorized",
    }
    assert guarded.get("/v1/models", headers=headers).status_code == 401


def test_bad_body_without_key_is_still_401(guarded):
    # Authentication comes first: an unauthenticated client learns nothing about the body rules.
    r = guarded.post("/v1/embeddings", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 401


def test_either_key_works(guarded):
    for key in (KEY, "second-key-0123456789abcdef"):
        r = guarded.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 384
    assert guarded.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]["id"] == "guarded"


def test_health_without_a_key_is_readiness_only_and_details_need_the_key(guarded):
    # Probes need no key, and learn ready or not: no node, device, memory or replica id.
    r = guarded.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ready"}
    assert "x-gpuserve-replica" not in r.headers
    assert guarded.get("/health", headers={"Authorization": "Bearer wrong-key-0123456789abcdef"}).json() == {"status": "ready"}
    details = guarded.get("/health", headers={"Authorization": f"Bearer {KEY}"})
    assert details.status_code == 200 and "node_id" in details.json() and "memory" in details.json()


@pytest.mark.parametrize("page", ["/docs", "/redoc", "/openapi.json"])
def test_the_api_docs_are_not_published_unless_the_spec_enables_them(guarded, page):
    for headers in ({}, {"Authorization": f"Bearer {KEY}"}):
        r = guarded.get(page, headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_a_rotated_key_file_works_without_a_restart(guarded, guarded_keys):
    """The Secret's file changes under the running replica: the new key works within seconds, the old
    one stops working, and the replica that answers is the same one (no restart, no dropped queue)."""
    import os
    import time

    before = guarded.get("/health", headers={"Authorization": f"Bearer {KEY}"}).json()["replica"]
    rotated = "rotated-key-0123456789abcdef"
    tmp = guarded_keys.with_name("api-keys.new")
    tmp.write_text(f"{rotated}\n")
    os.replace(tmp, guarded_keys)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = guarded.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": f"Bearer {rotated}"})
            if r.status_code == 200:
                break
            time.sleep(0.5)
        assert r.status_code == 200, r.text
        # Every gateway and the replica have it once they looked (once a second each).
        time.sleep(2.5)
        old = guarded.post("/v1/embeddings", json={"input": "x"}, headers={"Authorization": f"Bearer {KEY}"})
        assert old.status_code == 401
        after = guarded.get("/health", headers={"Authorization": f"Bearer {rotated}"}).json()["replica"]
        assert after == before
    finally:
        guarded_keys.write_text(f"{KEY}\nsecond-key-0123456789abcdef\n")
        time.sleep(2.5)


def test_the_api_docs_answer_when_the_spec_enables_them(deploy):
    from ray import serve

    spec = ModelDeployment(
        name="documented",
        task="embeddings",
        model=ModelSource(path=MINILM),
        replicas=1,
        api_docs=True,
        warmup=WarmupSpec(cover_max_input=False, min_rounds=1, max_rounds=1),
    )
    client = deploy(spec.build(), "documented", "/documented")
    try:
        schema = client.get("/openapi.json")
        assert schema.status_code == 200 and "/v1/embeddings" in schema.json()["paths"]
        assert "/docs" not in schema.json()["paths"]
        page = client.get("/docs")
        assert page.status_code == 200 and "/documented/openapi.json" in page.text
        assert client.get("/redoc").status_code == 200
    finally:
        serve.delete("documented")
