"""Who is running what on a deployment's replicas, kept in Ray's cluster key-value store (GCS).

A gateway counts only the calls it dispatched itself. When one dies, its calls still run on the
replicas, and the gateway Serve starts in its place begins at zero. This ledger lets every gateway
see those calls: each model replica writes the calls it is running by the gateway that sent them,
and each gateway writes a heartbeat. A gateway reads both at its poll and keeps its part of the
calls of gone gateways out of its slots (``admission.orphaned_calls``).

The store is Ray's own (the GCS, which Serve also keeps its state in; it survives any worker's
death). It is reached through ``ray.experimental.internal_kv``, the one module that touches it.
Entries carry the writer's wall clock; a reader ignores old ones, so a process that dies without
cleaning up leaves nothing that counts for long.
"""

from __future__ import annotations

import json
import time
from typing import Optional

# How often a replica with calls running for a gateway writes them (a gateway writes its heartbeat
# at each poll, every 0.5 s).
WRITE_PERIOD_S = 1.0
# A replica's report older than this is ignored: its replica died, and its calls with it.
REPLICA_STALE_S = 5.0
# A gateway whose heartbeat is older than this is taken for gone and its calls for orphaned. Short,
# because until then a survivor cannot count them: a live gateway late by this much (a stalled poll)
# only makes the others hold back its calls' slots for a moment.
GATEWAY_STALE_S = 2.0
# An entry this old is deleted by whoever reads it: its writer is long gone (a process killed
# cannot remove its own entry), and the store should not grow with every restart.
FORGET_AFTER_S = 60.0
_NAMESPACE = "gpuserve"


def _kv():
    from ray.experimental import internal_kv

    return internal_kv


class Ledger:
    """One deployment's entries in the store.

    Args:
        app: The Serve application.
        deployment: The model deployment (its gateways and replicas share the ledger).
    """

    def __init__(self, app: str, deployment: str):
        self._prefix = f"{app}/{deployment}/"

    def _put(self, key: str, value: dict) -> None:
        _kv()._internal_kv_put(self._prefix + key, json.dumps(value), True, namespace=_NAMESPACE)

    def replica_load(self, replica: str, load: dict[str, int]) -> None:
        """A replica's calls running, by the gateway that sent them; none: its entry is removed."""
        if load:
            self._put("replica/" + replica, {"at_s": time.time(), "load": load})
        else:
            _kv()._internal_kv_del(self._prefix + "replica/" + replica, namespace=_NAMESPACE)

    def heartbeat(self, gateway: str) -> None:
        self._put("gateway/" + gateway, {"at_s": time.time()})

    def read(self) -> tuple[float, list[tuple[float, dict[str, int]]], dict[str, float]]:
        """(now, the replicas' reports, the gateways' heartbeats). Entries long stale are deleted."""
        kv = _kv()
        now_s = time.time()
        replicas: list[tuple[float, dict[str, int]]] = []
        gateways: dict[str, float] = {}
        for key in kv._internal_kv_list(self._prefix, namespace=_NAMESPACE):
            raw = kv._internal_kv_get(key, namespace=_NAMESPACE)
            if raw is None:  # removed since it was listed
                continue
            entry = json.loads(raw)
            at_s = float(entry["at_s"])
            if now_s - at_s > FORGET_AFTER_S:
                kv._internal_kv_del(key, namespace=_NAMESPACE)
                continue
            kind, _, name = key.decode()[len(self._prefix) :].partition("/")
            if kind == "replica":
                replicas.append((at_s, {str(k): int(v) for k, v in entry["load"].items()}))
            elif kind == "gateway":
                gateways[name] = at_s
        return now_s, replicas, gateways


class CallsByGateway:
    """A replica's running calls by the gateway that sent them (pure bookkeeping).

    The replica writes :meth:`due` to the ledger every ``WRITE_PERIOD_S``: at most one write a period
    whatever the request rate.
    """

    def __init__(self) -> None:
        self.load: dict[str, int] = {}
        self._written: dict[str, int] = {}

    def started(self, gateway: Optional[str]) -> None:
        if gateway:
            self.load[gateway] = self.load.get(gateway, 0) + 1

    def ended(self, gateway: Optional[str]) -> None:
        if gateway and gateway in self.load:
            self.load[gateway] -= 1
            if self.load[gateway] <= 0:
                del self.load[gateway]

    def due(self) -> Optional[dict[str, int]]:
        """What to write this period: the calls running (rewritten each period, so the entry stays
        fresh), an empty map once they are all done (the entry is removed), or None: nothing to say."""
        if not self.load and not self._written:
            return None
        self._written = dict(self.load)
        return self._written
