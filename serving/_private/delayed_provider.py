"""A node provider for Ray's autoscaler that launches local fake nodes after a provisioning delay.

Ray's ``FakeMultiNodeProvider`` starts a node (a raylet on this machine, with whatever resources and
labels its node type declares) the moment the autoscaler asks for it. A GPU node in a cloud takes
minutes. This provider keeps Ray's fake node start-up and adds the delay: a launched node is known
to the autoscaler at once (as a cloud instance that is allocated but whose Ray node has not joined),
and its raylet is started ``provisioning_s`` later, per node type (``provider.provisioning_s``:
``{node_type: seconds}``, or one number for all). Termination before the node is up cancels it.

It is loaded by Ray's autoscaler (v2) inside the head's monitor process as an external provider::

    provider:
      type: external
      module: serving._private.delayed_provider.DelayedFakeProvider
      provisioning_s: {gpu: 30}

Each launch and each join is appended to ``provider.events_path`` (JSON lines) when set, so tests and
benchmarks can see what the autoscaler launched, when, and when the node joined.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any, Optional

from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider
from ray.autoscaler.tags import TAG_RAY_USER_NODE_TYPE

logger = logging.getLogger(__name__)


class DelayedFakeProvider(FakeMultiNodeProvider):
    """Ray's fake multi-node provider with a per-node-type provisioning delay."""

    def __init__(self, provider_config: dict[str, Any], cluster_name: str):
        super().__init__(provider_config, cluster_name)
        delay = provider_config.get("provisioning_s", 0.0)
        self._delay_by_type: dict[str, float] = delay if isinstance(delay, dict) else {}
        self._delay_default = 0.0 if isinstance(delay, dict) else float(delay)
        self._events_path: Optional[str] = provider_config.get("events_path")
        self._timers: dict[str, threading.Timer] = {}

    def _event(self, **fields: Any) -> None:
        if not self._events_path:
            return
        fields["t"] = time.time()
        with self.lock, open(self._events_path, "a") as f:
            f.write(json.dumps(fields) + "\n")

    def create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        if self._creation_error:
            raise self._creation_error
        # Ray's autoscaler v2 asks for ``count`` nodes of one type per call (launch_multiple).
        for _ in range(count if self._launch_multiple else 1):
            self._launch_later(node_config, tags, resources, labels)

    def _launch_later(self, node_config, tags, resources, labels) -> None:
        node_type = tags[TAG_RAY_USER_NODE_TYPE]
        delay = float(self._delay_by_type.get(node_type, self._delay_default))
        with self.lock:
            # Reserve the id the node will start with, so the autoscaler sees the instance at once.
            node_id = self._next_hex_node_id()
            placeholder_tags = dict(tags)
            placeholder_tags.update({"ray-node-name": node_id, "ray-node-kind": "worker"})
            self._nodes[node_id] = {"tags": placeholder_tags, "node": None}
            timer = threading.Timer(delay, self._start, args=(node_id, node_config, tags, resources, labels))
            timer.daemon = True
            self._timers[node_id] = timer
        self._event(kind="launch", node_id=node_id, node_type=node_type, delay_s=delay)
        timer.start()

    def _start(self, node_id: str, node_config, tags, resources, labels) -> None:
        with self.lock:
            if self._timers.pop(node_id, None) is None or node_id not in self._nodes:
                return  # terminated while provisioning
            del self._nodes[node_id]
            # Ray's provider numbers nodes from its counter: start this one under its reserved id.
            saved = self._next_node_id
            self._next_node_id = int(node_id[-5:]) - 1
            try:
                self._create_node_with_resources_and_labels(node_config, tags, 1, resources, labels)
            except Exception as e:  # noqa: BLE001 - a failed start is reported, the autoscaler retries
                logger.warning("gpuserve delayed provider: node %s failed to start: %s", node_id, e)
                self._event(kind="failed", node_id=node_id, error=str(e))
                return
            finally:
                self._next_node_id = max(saved, self._next_node_id)
        self._event(kind="joined", node_id=node_id, node_type=tags[TAG_RAY_USER_NODE_TYPE])

    def terminate_node(self, node_id):
        with self.lock:
            timer = self._timers.pop(node_id, None)
            if timer is not None:
                timer.cancel()
                self._nodes.pop(node_id, None)
                self._event(kind="cancelled", node_id=node_id)
                return
            node = self._nodes.get(node_id)
        super().terminate_node(node_id)
        if node is not None:
            self._event(kind="terminated", node_id=node_id)
