"""Data-plane API keys: loading, checking, and the 401 shape."""

import pytest
from pydantic import ValidationError

from serving import AuthSpec, ModelDeployment, ModelSource
from serving._private.auth import MIN_KEY_LENGTH, KeyCheck, authorized, load_api_keys
from serving.errors import Unauthorized, error_body, http_headers_for, http_status_for

KEY_A = "a" * 20
KEY_B = "b-secret-key-0123456789"


def test_exactly_one_source():
    with pytest.raises(ValidationError, match="exactly one of api_keys_env and api_keys_file"):
        AuthSpec()
    with pytest.raises(ValidationError, match="exactly one"):
        AuthSpec(api_keys_env="KEYS", api_keys_file="/k")
    with pytest.raises(ValidationError, match="api_keys_env"):
        AuthSpec(api_keys_env="lower-case")
    spec = ModelDeployment(name="m", task="embeddings", model=ModelSource(path="/x"), auth=AuthSpec(api_keys_env="K"))
    assert spec.auth.api_keys_env == "K"


def test_keys_from_env_and_file(tmp_path):
    assert load_api_keys(AuthSpec(api_keys_env="K"), {"K": f" {KEY_A}, {KEY_B} ,"}) == (KEY_A.encode(), KEY_B.encode())
    f = tmp_path / "keys"
    f.write_text(f"{KEY_A}\n\n{KEY_B}\n")
    assert load_api_keys(AuthSpec(api_keys_file=str(f))) == (KEY_A.encode(), KEY_B.encode())


@pytest.mark.parametrize(
    "environ,fragment",
    [({}, "is not set"), ({"K": " , "}, "holds no API keys"), ({"K": "short"}, f"shorter than {MIN_KEY_LENGTH}")],
)
def test_bad_env_sources(environ, fragment):
    with pytest.raises(ValueError, match=fragment) as ei:
        load_api_keys(AuthSpec(api_keys_env="K"), environ)
    assert "short" not in str(ei.value).split("shorter")[0], "the message never echoes a key"


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read file"):
        load_api_keys(AuthSpec(api_keys_file=str(tmp_path / "nope")))


def test_authorized():
    keys = (KEY_A.encode(), KEY_B.encode())
    assert authorized(f"Bearer {KEY_A}", keys)
    assert authorized(f"bearer {KEY_B}", keys)
    for header in (None, "", "Bearer", "Bearer ", f"Basic {KEY_A}", f"Bearer {KEY_A}x", KEY_A):
        assert not authorized(header, keys), header


def test_401_says_nothing_specific():
    e = Unauthorized()
    assert http_status_for(e) == 401
    assert http_headers_for(e) == {"WWW-Authenticate": "Bearer"}
    assert error_body(e)["error"]["message"] == "missing or invalid API key"


def test_key_check_is_open_without_auth_and_refuses_a_wrong_key_with_it(monkeypatch):
    KeyCheck(None)({})  # no auth configured: every request passes
    monkeypatch.setenv("GPUSERVE_TEST_KEYS", "k" * 16)
    check = KeyCheck(AuthSpec(api_keys_env="GPUSERVE_TEST_KEYS"))
    check({"authorization": "Bearer " + "k" * 16})
    for headers in ({"authorization": "Bearer " + "x" * 16}, {}):
        with pytest.raises(Unauthorized):
            check(headers)


def test_a_rotated_key_file_takes_effect_without_a_restart_and_a_bad_rotation_keeps_the_old_keys(tmp_path, caplog):
    """A Kubernetes Secret update: the mounted file's data is swapped behind a symlink."""
    import logging
    import os

    now = [0.0]
    data = tmp_path / "..data-1"
    data.write_text(KEY_A + "\n")
    link = tmp_path / "api-keys"
    link.symlink_to(data)
    check = KeyCheck(AuthSpec(api_keys_file=str(link)), clock=lambda: now[0])
    assert check.allows({"authorization": f"Bearer {KEY_A}"})

    def swap(text, n):
        new = tmp_path / f"..data-{n}"
        new.write_text(text)
        tmp = tmp_path / "tmp-link"
        tmp.symlink_to(new)
        os.replace(tmp, link)  # atomic, as the kubelet does it

    swap(KEY_B + "\n", 2)
    # Within the check interval the old key still works (one stat a second, not one per request) ...
    assert check.allows({"authorization": f"Bearer {KEY_A}"})
    now[0] += 1.5
    # ... then the new key works and the old one no longer does.
    assert check.allows({"authorization": f"Bearer {KEY_B}"})
    assert not check.allows({"authorization": f"Bearer {KEY_A}"})
    # A rotation that cannot be loaded never opens the deployment nor locks out the current key.
    with caplog.at_level(logging.ERROR, logger="ray.serve"):
        for n, text in ((3, ""), (4, "short\n")):
            swap(text, n)
            now[0] += 1.5
            assert check.allows({"authorization": f"Bearer {KEY_B}"})
            assert not check.allows({})
    assert "API keys not reloaded" in caplog.text and KEY_B not in caplog.text
    # Fixed: picked up at the next look.
    swap(f"{KEY_A}\n{KEY_B}\n", 5)
    now[0] += 1.5
    assert check.allows({"authorization": f"Bearer {KEY_A}"}) and check.allows({"authorization": f"Bearer {KEY_B}"})
