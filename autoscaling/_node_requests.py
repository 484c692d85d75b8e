"""Cluster-wide node pre-provisioning through Ray's ``request_resources``.

``request_resources`` replaces the whole outstanding request on every call, so the requests of all
deployments that pre-provision are kept here (one process: the Serve controller, where every
autoscaling policy runs) and sent together, and only when they change.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Optional

logger = logging.getLogger("ray.serve")

_lock = threading.Lock()
_wanted: dict[str, tuple[int, dict[str, float], dict[str, str]]] = {}
_sent: Optional[list[Any]] = None


def _ray_request(bundles: list[dict[str, float]], selectors: list[dict[str, str]]) -> None:
    from ray.autoscaler.sdk import request_resources

    if any(selectors):
        request_resources(bundles=bundles, bundle_label_selectors=selectors)
    else:
        request_resources(bundles=bundles)


def update(
    key: str,
    nodes: int,
    bundle: dict[str, float],
    selector: Optional[dict[str, str]] = None,
    send: Optional[Callable[[list[dict[str, float]], list[dict[str, str]]], None]] = None,
) -> bool:
    """Hold ``nodes`` bundles for ``key`` (0 releases them); returns True when a new request was sent."""
    global _sent
    with _lock:
        if nodes > 0:
            _wanted[key] = (nodes, dict(bundle), dict(selector or {}))
        else:
            _wanted.pop(key, None)
        bundles: list[dict[str, float]] = []
        selectors: list[dict[str, str]] = []
        for k in sorted(_wanted):
            n, b, s = _wanted[k]
            bundles += [b] * n
            selectors += [s] * n
        if [bundles, selectors] == _sent:
            return False
        try:
            (send or _ray_request)(bundles, selectors)
        except Exception as e:  # noqa: BLE001 - a failed hint must not stop autoscaling
            logger.warning("gpuserve: request_resources failed: %s", e)
            return False
        _sent = [bundles, selectors]
        return True


def outstanding() -> list[Any]:
    """What was last sent: [bundles, selectors] (for tests and status)."""
    with _lock:
        return list(_sent or [[], []])
