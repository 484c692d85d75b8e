"""Data-plane API keys: loading them on the replica and checking a request's bearer token."""

from __future__ import annotations

import hmac
import os
from typing import Mapping, Optional

from serving.errors import Unauthorized
from serving.spec import AuthSpec

# Shorter keys are guessable; refuse to start with one rather than serve weakly protected.
MIN_KEY_LENGTH = 16


def load_api_keys(spec: AuthSpec, environ: Mapping[str, str] = os.environ) -> tuple[bytes, ...]:
    """Read the keys the spec points at.

    Raises:
        ValueError: the source is missing, empty, or holds a key that is too short. The
            message names the source, never a key.
    """
    if spec.api_keys_env is not None:
        source = f"environment variable {spec.api_keys_env}"
        if spec.api_keys_env not in environ:
            raise ValueError(f"auth: {source} is not set on this replica; set it (e.g. from a Secret) or drop auth")
        raw = environ[spec.api_keys_env].split(",")
    else:
        source = f"file {spec.api_keys_file}"
        try:
            with open(spec.api_keys_file, encoding="utf-8") as f:  # type: ignore[arg-type]
                raw = f.read().splitlines()
        except OSError as e:
            raise ValueError(f"auth: cannot read {source}: {e.strerror}") from None
    keys = [k.strip() for k in raw if k.strip()]
    if not keys:
        raise ValueError(f"auth: {source} holds no API keys")
    if any(len(k) < MIN_KEY_LENGTH for k in keys):
        raise ValueError(f"auth: a key in {source} is shorter than {MIN_KEY_LENGTH} characters")
    return tuple(k.encode() for k in keys)


def authorized(header: Optional[str], keys: tuple[bytes, ...]) -> bool:
    """Whether an Authorization header carries one of the keys (constant time per key)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return False
    given = token.strip().encode()
    ok = False
    for key in keys:
        # Compare against every key: the time taken does not reveal which one matched.
        ok |= hmac.compare_digest(given, key)
    return ok


class KeyCheck:
    """The data-plane key check an ingress runs on each request; open when the spec has no ``auth``.

    Keys are loaded at construction: an ingress without its keys fails at start, never serves openly.
    """

    def __init__(self, spec: Optional[AuthSpec]):
        self.keys = load_api_keys(spec) if spec is not None else None

    def __call__(self, headers: Mapping[str, str]) -> None:
        """Raise ``Unauthorized`` unless the request's Authorization header carries a key."""
        if self.keys is not None and not authorized(headers.get("authorization"), self.keys):
            raise Unauthorized()
