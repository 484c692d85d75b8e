"""Data-plane API keys: loading them on the replica, reloading a key file when it changes, and checking a
request's bearer token."""

from __future__ import annotations

import hmac
import logging
import os
import time
from typing import Callable, Mapping, Optional

from serving.errors import Unauthorized
from serving.spec import AuthSpec

logger = logging.getLogger("ray.serve")

# Shorter keys are guessable; refuse to start with one rather than serve weakly protected.
MIN_KEY_LENGTH = 16
# How often a key file is looked at (one stat call) for a change: a rotated key works within this long.
RELOAD_CHECK_S = 1.0


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


def _file_version(path: str) -> Optional[tuple[int, int, int]]:
    """What changes when a key file is rewritten or swapped (a Kubernetes Secret update swaps a symlink)."""
    try:
        st = os.stat(path)  # follows the symlink: the data file behind it
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class KeyCheck:
    """The data-plane key check an ingress runs on each request; open when the spec has no ``auth``.

    Keys are loaded at construction: an ingress without its keys fails at start, never serves openly.
    Keys from a file are reloaded when the file changes (checked at most every ``RELOAD_CHECK_S``), so a
    rotated Secret takes effect without a restart; a change that cannot be loaded (the file missing, empty
    or holding a short key) keeps the keys in force and is logged, never opening the deployment.
    """

    def __init__(self, spec: Optional[AuthSpec], clock: Callable[[], float] = time.monotonic):
        self.spec = spec
        self._clock = clock
        self._path = spec.api_keys_file if spec is not None else None
        self._version = _file_version(self._path) if self._path else None
        self.keys = load_api_keys(spec) if spec is not None else None
        self._checked_s = clock()

    def _maybe_reload(self) -> None:
        if self._path is None:
            return
        now = self._clock()
        if now - self._checked_s < RELOAD_CHECK_S:
            return
        self._checked_s = now
        version = _file_version(self._path)
        if version == self._version:
            return
        try:
            self.keys = load_api_keys(self.spec)  # type: ignore[arg-type]
        except ValueError as e:
            # Keep the version unchanged, so the next look tries again (a Secret update may be mid-swap).
            logger.error("gpuserve: API keys not reloaded, the current ones stay in force: %s", e)
            return
        self._version = version
        logger.info("gpuserve: API keys reloaded from %s (%d key(s))", self._path, len(self.keys))

    def allows(self, headers: Mapping[str, str]) -> bool:
        """Whether the request may pass: no ``auth``, or its Authorization header carries a key."""
        if self.keys is None:
            return True
        self._maybe_reload()
        return authorized(headers.get("authorization"), self.keys)

    def __call__(self, headers: Mapping[str, str]) -> None:
        """Raise ``Unauthorized`` unless the request's Authorization header carries a key."""
        if not self.allows(headers):
            raise Unauthorized()
