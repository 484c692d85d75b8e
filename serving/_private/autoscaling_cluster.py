"""A local Ray cluster driven by Ray's own autoscaler (v2), with node pools that take time to provision.

The head is started as ``ray start --head --block`` in a session of its own, with an autoscaling
config written here: one node type per pool (its CPUs, whole fake GPUs, accelerator resource and
labels), launched by :class:`~serving._private.delayed_provider.DelayedFakeProvider` after the pool's
provisioning delay and released by Ray's autoscaler after ``idle_timeout_s``. Nothing else on the
machine is touched (no ``ray stop``): on exit every process of that session is ended, whatever state
the cluster is in.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from serving.protocol import PROXY_ENV
from serving.testing import free_port

if TYPE_CHECKING:
    from serving.pools import NodePool

FAKE_HEAD_NODE_ID = "fffffffffffffffffffffffffffffffffffffffffffffffffff00000"
PROVIDER = "serving._private.delayed_provider.DelayedFakeProvider"


def cluster_config(
    pools: list["NodePool"],
    provisioning_s: dict[str, float],
    idle_timeout_s: float,
    gcs_address: str,
    events_path: str,
    head_cpus: float,
) -> dict[str, Any]:
    """The autoscaler's cluster config (Ray's wheel ships no example for the fake provider)."""
    types: dict[str, Any] = {
        "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
    }
    for pool in pools:
        resources: dict[str, float] = {"CPU": pool.cpus_per_node, "GPU": pool.gpus_per_node}
        if pool.accelerator_type:
            resources[f"accelerator_type:{pool.accelerator_type}"] = 1.0
        types[pool.name] = {
            "resources": resources,
            "labels": dict(pool.ray_labels),
            "node_config": {},
            "min_workers": pool.min_nodes,
            "max_workers": pool.max_nodes,
        }
    return {
        "cluster_name": "gpuserve-local",
        "max_workers": sum(p.max_nodes for p in pools),
        "provider": {
            "type": "external",
            "module": PROVIDER,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "launch_multiple": True,
            "head_node_id": FAKE_HEAD_NODE_ID,
            "gcs_address": gcs_address,
            "provisioning_s": provisioning_s,
            "events_path": events_path,
        },
        "available_node_types": types,
        "head_node_type": "ray.head.default",
        "auth": {},
        # Ray's default (1.0) limits pending launches to the current size; a pool scaling from zero
        # would then launch one node at a time.
        "upscaling_speed": 100.0,
        "idle_timeout_minutes": idle_timeout_s / 60.0,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }


class AutoscalingCluster:
    """A running local cluster; see :func:`serving.testing.autoscaling_cluster`.

    Attributes:
        address: The GCS address to ``ray.init`` with.
        temp_dir: Ray's temporary directory for this cluster (logs under ``session_latest/logs``).
        events_path: The provider's JSON-lines log of launches, joins and terminations.
    """

    def __init__(
        self,
        pools: list["NodePool"],
        provisioning_s: Union[float, dict[str, float], None] = None,
        idle_timeout_s: float = 10.0,
        head_cpus: float = 0.0,
        env: Optional[dict[str, str]] = None,
    ):
        if isinstance(provisioning_s, dict):
            delays = {p.name: float(provisioning_s.get(p.name, p.provisioning_s)) for p in pools}
        else:
            delays = {p.name: float(p.provisioning_s if provisioning_s is None else provisioning_s) for p in pools}
        self.pools, self.delays = pools, delays
        self.idle_timeout_s, self.head_cpus = idle_timeout_s, head_cpus
        self.temp_dir = tempfile.mkdtemp(prefix="gpuserve-as-")
        self.events_path = os.path.join(self.temp_dir, "provider-events.jsonl")
        self.address = f"127.0.0.1:{free_port()}"
        self._env = dict(env or {})
        self._proc: Optional[subprocess.Popen] = None
        self.session_id: Optional[int] = None

    def start(self, timeout_s: float = 120.0) -> None:
        """Start the head (and with it Ray's autoscaler); returns once the GCS answers."""
        config = cluster_config(self.pools, self.delays, self.idle_timeout_s, self.address, self.events_path, self.head_cpus)
        config_path = os.path.join(self.temp_dir, "autoscaling.json")
        Path(config_path).write_text(json.dumps(config, indent=1))
        ray_cli = shutil.which("ray", path=os.path.dirname(sys.executable)) or shutil.which("ray") or "ray"
        env = os.environ.copy()
        env.update(
            {
                "RAY_FAKE_CLUSTER": "1",
                "RAY_enable_autoscaler_v2": "1",
                "RAY_CLOUD_INSTANCE_ID": FAKE_HEAD_NODE_ID,
                "RAY_OVERRIDE_NODE_ID_FOR_TESTING": FAKE_HEAD_NODE_ID,
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                "RAY_USAGE_STATS_ENABLED": "0",
                # `ray start` turns on token authentication when a token exists on the machine
                # (~/.ray/auth_token, left by any earlier Ray), while a driver connecting to an explicit
                # address does not: this local test cluster runs without it, whatever the machine has.
                "RAY_AUTH_MODE": "disabled",
            }
        )
        env.update(PROXY_ENV)
        env.update(self._env)
        port = self.address.rsplit(":", 1)[1]
        cmd = [
            ray_cli, "start", "--head", "--block",
            f"--port={port}",
            f"--num-cpus={self.head_cpus:g}",
            "--num-gpus=0",
            f"--autoscaling-config={config_path}",
            f"--temp-dir={self.temp_dir}",
            "--include-dashboard=false",
            f"--ray-client-server-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}",
            f"--metrics-export-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]  # fmt: skip
        # A session of its own: every process of this cluster (head, autoscaler, the nodes it starts,
        # their workers) carries its id, so stop() can end exactly these.
        with open(os.path.join(self.temp_dir, "head.log"), "ab") as log:
            self._proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.session_id = self._proc.pid
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"ray head exited ({self._proc.returncode}); see {self.temp_dir}/head.log")
            with socket.socket() as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", int(port))) == 0:
                    return
            time.sleep(0.5)
        raise TimeoutError(f"ray head did not answer on {self.address} within {timeout_s} s")

    def events(self) -> list[dict[str, Any]]:
        """The provider's events so far: launch (with delay_s), joined, cancelled, terminated, failed."""
        try:
            lines = Path(self.events_path).read_text().splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(x) for x in lines if x.strip()]

    def gpu_node_seconds(self, until_s: Optional[float] = None, since_s: float = 0.0) -> float:
        """GPU-seconds of launched nodes, from each launch to its termination (or ``until_s``), from ``since_s``.

        A node is paid for from the moment it is asked for, as a cloud bills it.
        """
        gpus = {p.name: p.gpus_per_node for p in self.pools}
        until = time.time() if until_s is None else until_s
        start: dict[str, tuple[float, str]] = {}
        total = 0.0
        for e in self.events():
            if e["kind"] == "launch":
                start[e["node_id"]] = (e["t"], e["node_type"])
            elif e["kind"] in ("terminated", "cancelled") and e["node_id"] in start:
                t0, kind = start.pop(e["node_id"])
                total += max(0.0, min(e["t"], until) - max(t0, since_s)) * gpus.get(kind, 0)
        for t0, kind in start.values():
            total += max(0.0, until - max(t0, since_s)) * gpus.get(kind, 0)
        return total

    def stop(self) -> None:
        """End every process of this cluster's session and remove its files. Safe to call twice."""
        proc, self._proc = self._proc, None
        if proc is None:  # never started, or stopped already
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            return
        sid = proc.pid
        for sig, wait_s in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            pids = _session_pids(sid)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + wait_s
            while _session_pids(sid) and time.monotonic() < deadline:
                time.sleep(0.2)
            if not _session_pids(sid):
                break
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def alive_pids(self) -> list[int]:
        """Processes of this cluster's session still running (none after :meth:`stop`)."""
        return [] if self.session_id is None else _session_pids(self.session_id)


def _session_pids(sid: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        try:
            if os.getsid(pid) == sid and pid != os.getpid():
                # Zombies are already gone; only their parent's wait is missing.
                with open(f"/proc/{pid}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        continue
                out.append(pid)
        except (ProcessLookupError, PermissionError, FileNotFoundError, OSError):
            continue
    return out
