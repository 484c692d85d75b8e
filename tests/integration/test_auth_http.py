"""Data-plane API keys on real Ray Serve, over HTTP."""

import pytest

from serving import AuthSpec, ModelDeployment, ModelSource, WarmupSpec
from tests.conftest import MINILM

KEY = "test-key-0123456789abcdef"


@pytest.fixture(scope="module")
def guarded(deploy, tmp_path_factory):
    keys = tmp_path_factory.mktemp("secret") / "api-keys"
    keys.write_text(f"{KEY}\nsecond-key-0123456789abcdef\n")
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


def test_health_stays_open_for_probes(guarded):
    assert guarded.get("/health").status_code == 200
