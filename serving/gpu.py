"""GPU telemetry for a replica: NVML per visible GPU, torch's allocator per process, and a start-up check.

Everything that touches the hardware goes through two small adapters, so tests pass fakes at that
boundary and the real path runs on a CUDA machine (``tests/gpu/``, ``bench/gpu_check.py``):

* ``nvml``: the ``pynvml`` module (``nvidia-ml-py``) or an object with the same functions;
* ``cuda``: ``torch.cuda`` or an object with ``is_available``, ``device_count``, ``mem_get_info``,
  ``memory_stats`` and ``get_device_properties``.

Without a GPU the telemetry says so once (a log line) and reports nothing: no zero gauges that
would read as "idle GPU".
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter, deque
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from serving.errors import ModelNotReady, RequestTooLargeForDevice

__all__ = [
    "free_cache_for",
    "OomLog",
    "memory_budget_bytes",
    "AllocatorSample",
    "DeviceMemoryError",
    "GpuSample",
    "GpuTelemetry",
    "check_free_memory",
]

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class GpuSample:
    """One visible GPU, as NVML sees it (None where the GPU does not support a reading)."""

    index: int  # CUDA index inside this process (what torch calls cuda:N)
    uuid: str
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_ratio: Optional[float]
    temperature_c: Optional[float]
    power_w: Optional[float]
    ecc_uncorrected_errors: Optional[int]

    @property
    def memory_free_ratio(self) -> float:
        return 1.0 - self.memory_used_bytes / self.memory_total_bytes if self.memory_total_bytes else 0.0


@dataclass(frozen=True)
class AllocatorSample:
    """torch's caching allocator on one device, for this process."""

    index: int
    allocated_bytes: int
    reserved_bytes: int
    peak_allocated_bytes: int
    oom_count: int


class DeviceMemoryError(RuntimeError):
    """The device does not have the memory a replica needs at start-up (another process holds it)."""


def _visible_indices(nvml: Any, env: Optional[str]) -> list[int]:
    """NVML indices of the GPUs this process sees, in CUDA order (CUDA_VISIBLE_DEVICES: indices or UUIDs)."""
    count = nvml.nvmlDeviceGetCount()
    if env is None or env.strip() == "":
        return list(range(count)) if env is None else []
    by_uuid = {}
    for i in range(count):
        uuid = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
        by_uuid[uuid.decode() if isinstance(uuid, bytes) else uuid] = i
    out = []
    for part in env.split(","):
        part = part.strip()
        if part.isdigit() and int(part) < count:
            out.append(int(part))
        elif part in by_uuid:
            out.append(by_uuid[part])
        elif part.startswith("GPU-"):
            match = [i for u, i in by_uuid.items() if u.startswith(part)]
            out += match[:1]
    return out


def _maybe(fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except Exception:  # noqa: BLE001 - NVMLError_NotSupported and kin: the reading does not exist here
        return None


class GpuTelemetry:
    """Reads the GPUs visible to this process and torch's allocator on them.

    Args:
        nvml: The NVML module; None imports ``pynvml`` lazily.
        cuda: ``torch.cuda``-like; None imports torch lazily.
        visible_devices: ``CUDA_VISIBLE_DEVICES`` as this process has it; None reads the environment.
    """

    def __init__(self, nvml: Any = None, cuda: Any = None, visible_devices: Optional[str] = "env"):
        self._nvml = nvml
        self._cuda = cuda
        self._visible = os.environ.get("CUDA_VISIBLE_DEVICES") if visible_devices == "env" else visible_devices
        self._indices: Optional[list[int]] = None
        self._reason: Optional[str] = None
        self._said = False

    def _init(self) -> None:
        if self._indices is not None or self._reason is not None:
            return
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._indices = _visible_indices(self._nvml, self._visible)
            if not self._indices:
                self._reason = "no GPU is visible to this process"
        except Exception as e:  # noqa: BLE001 - no driver, no library, no device: all mean "no GPU"
            self._reason = f"NVML unavailable ({type(e).__name__}: {e})"
        if self._reason and not self._said:
            self._said = True
            logger.info("gpuserve: GPU telemetry off: %s", self._reason)

    @property
    def available(self) -> bool:
        """True when NVML answers and at least one GPU is visible."""
        self._init()
        return self._reason is None

    @property
    def reason(self) -> Optional[str]:
        """Why telemetry is off (None when it is on)."""
        self._init()
        return self._reason

    def gpus(self) -> list[GpuSample]:
        """One sample per visible GPU (empty without a GPU)."""
        if not self.available:
            return []
        n = self._nvml
        out = []
        assert self._indices is not None
        for cuda_index, i in enumerate(self._indices):
            h = n.nvmlDeviceGetHandleByIndex(i)
            mem = n.nvmlDeviceGetMemoryInfo(h)
            util = _maybe(n.nvmlDeviceGetUtilizationRates, h)
            temp = _maybe(n.nvmlDeviceGetTemperature, h, getattr(n, "NVML_TEMPERATURE_GPU", 0))
            power_mw = _maybe(n.nvmlDeviceGetPowerUsage, h)
            ecc = _maybe(
                n.nvmlDeviceGetTotalEccErrors,
                h,
                getattr(n, "NVML_MEMORY_ERROR_TYPE_UNCORRECTED", 1),
                getattr(n, "NVML_VOLATILE_ECC", 0),
            )
            uuid = n.nvmlDeviceGetUUID(h)
            name = n.nvmlDeviceGetName(h)
            out.append(
                GpuSample(
                    index=cuda_index,
                    uuid=uuid.decode() if isinstance(uuid, bytes) else str(uuid),
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    memory_used_bytes=int(mem.used),
                    memory_total_bytes=int(mem.total),
                    utilization_ratio=None if util is None else util.gpu / 100.0,
                    temperature_c=None if temp is None else float(temp),
                    power_w=None if power_mw is None else power_mw / 1000.0,
                    ecc_uncorrected_errors=None if ecc is None else int(ecc),
                )
            )
        return out

    def allocator(self) -> list[AllocatorSample]:
        """torch's allocator statistics per visible device (empty without CUDA)."""
        cuda = self._cuda
        if cuda is None:
            try:
                import torch

                cuda = torch.cuda
            except ImportError:
                return []
        if not cuda.is_available():
            return []
        out = []
        for i in range(cuda.device_count()):
            s = cuda.memory_stats(i)
            out.append(
                AllocatorSample(
                    index=i,
                    allocated_bytes=int(s.get("allocated_bytes.all.current", 0)),
                    reserved_bytes=int(s.get("reserved_bytes.all.current", 0)),
                    peak_allocated_bytes=int(s.get("allocated_bytes.all.peak", 0)),
                    oom_count=int(s.get("num_ooms", 0)),
                )
            )
        return out

    def snapshot(self) -> dict[str, Any]:
        """Everything at once, JSON-able (for /health and the GPU check)."""
        return {
            "available": self.available,
            "reason": self.reason,
            "gpus": [asdict(g) for g in self.gpus()],
            "allocator": [asdict(a) for a in self.allocator()],
        }

    def headroom_ratio(self, high_water_ratio: float) -> Optional[float]:
        """Smallest headroom below the high-water mark over the visible GPUs, as a fraction of memory.

        1.0 - used/total - (1 - high_water): 0 means at the mark, negative above it. None without a GPU.
        """
        gpus = self.gpus()
        if not gpus:
            return None
        return min(high_water_ratio - g.memory_used_bytes / g.memory_total_bytes for g in gpus)


def check_free_memory(cuda: Any, device: int, needed_bytes: int, what: str) -> None:
    """Fail fast when ``device`` has less free memory than ``needed_bytes`` before a model loads.

    Raises:
        DeviceMemoryError: naming the device, free and total bytes, what is needed and the likely cause.
    """
    free, total = cuda.mem_get_info(device)
    if free < needed_bytes:
        raise DeviceMemoryError(
            f"cuda:{device} has {free / 2**30:.2f} GiB free of {total / 2**30:.2f} GiB, but {what} needs "
            f"about {needed_bytes / 2**30:.2f} GiB: another process holds the GPU's memory (check nvidia-smi "
            "on the node); the replica fails now instead of loading into an out-of-memory loop"
        )


def _cgroup_limit_bytes() -> Optional[int]:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            raw = open(path).read().strip()
        except OSError:
            continue
        if raw.isdigit() and int(raw) < 1 << 60:
            return int(raw)
    return None


def _mem_total_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget_bytes(device: str, high_water_ratio: float, memory_bytes: Optional[int] = None) -> Optional[float]:
    """Bytes this replica's peak may reach: the high-water mark less what others hold.

    On CUDA: ``high_water x total`` minus memory used on the device by anything but this process's
    allocator. On the CPU: ``high_water x`` the replica's memory limit (``resources.memory_bytes``, else
    the cgroup limit, else the machine's memory); the probe there measures the whole process.
    """
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        others = max(0, (total - free) - torch.cuda.memory_reserved())
        return high_water_ratio * total - others
    limit = memory_bytes or _cgroup_limit_bytes() or _mem_total_bytes()
    return None if limit is None else high_water_ratio * limit


def free_cache_for(device: str):
    """What frees cached memory after an out-of-memory error on ``device``."""
    import gc

    if device == "cuda":
        import torch

        def free() -> None:
            gc.collect()
            torch.cuda.empty_cache()

        return free
    return gc.collect


class OomLog:
    """A replica's record of its out-of-memory errors, shared by every path that runs its model.

    Two facts decide what an out-of-memory error means. The largest request that completed here is the
    evidence of what the device holds: a request that runs out of memory alone (twice: once more after the
    cache was freed) and is larger than that is too large (413, never held against the replica); one no
    larger is the device's trouble (``persistent``). More persistent errors than ``max_ooms`` within
    ``window_s`` mark the replica unhealthy, so Serve replaces it. Errors of a batch (``split``, ``preempted``)
    are load, recovered by running less at once, and are only counted.

    Args:
        clock: Monotonic seconds.
        window_s: The window for counting persistent errors (``memory.oom_window_s``).
        max_ooms: More persistent errors than this in the window mark the replica unhealthy
            (``memory.max_ooms_in_window``).
        on_oom: Told the kind of every error (metrics); settable later.
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.monotonic,
        window_s: float = 300.0,
        max_ooms: int = 5,
        on_oom: Optional[Callable[[str], None]] = None,
    ):
        self.clock, self.window_s, self.max_ooms, self.on_oom = clock, window_s, max_ooms, on_oom
        self.counts: Counter[str] = Counter()
        self.largest_ok_tokens = 0
        self._persistent: deque[float] = deque()

    def completed(self, tokens: int) -> None:
        """A request of this many tokens (at its peak) completed: the device holds that much."""
        self.largest_ok_tokens = max(self.largest_ok_tokens, tokens)

    def note(self, kind: str) -> None:
        """Count an error of ``kind`` and tell ``on_oom``."""
        self.counts[kind] += 1
        if self.on_oom is not None:
            try:
                self.on_oom(kind)
            except Exception as e:  # noqa: BLE001 - metrics must never break recovery
                logger.warning("gpuserve: the out-of-memory observer failed: %s", e)

    def lone_error(self, tokens: int, fix: str, param: Optional[str] = None, retried: bool = True) -> Exception:
        """The error for a request of ``tokens`` (at its peak) that ran out of memory alone, twice (or once,
        ``retried`` False, where a retry was impossible: a stream that had shown text).

        Returns a 413 (``too_large``) when it is larger than any request that completed here, else a 503
        (``persistent``, counted toward the replica's health). ``fix`` tells the client what to change.
        """
        if tokens > self.largest_ok_tokens:
            self.note("too_large")
            return RequestTooLargeForDevice(
                f"the request ran out of device memory alone{', twice,' if retried else ''} at a peak of {tokens} "
                f"tokens (the largest that completed here: {self.largest_ok_tokens}); {fix}",
                param=param,
                code="request_too_large_for_device",
            )
        self.note("persistent")
        now = self.clock()
        self._persistent.append(now)
        logger.warning("gpuserve: out of memory on a request that fits (%d in the last %.0f s)", self.recent(), self.window_s)
        return ModelNotReady(
            f"the device ran out of memory on a request of {tokens} tokens, no larger than ones that completed "
            "here; retry, another replica may take it",
            code="device_out_of_memory",
        )

    def recent(self) -> int:
        """Persistent errors within the window."""
        now = self.clock()
        while self._persistent and self._persistent[0] < now - self.window_s:
            self._persistent.popleft()
        return len(self._persistent)

    def unhealthy_reason(self) -> Optional[str]:
        """Why the replica should be replaced, or None."""
        n = self.recent()
        if n > self.max_ooms:
            return (
                f"{n} out-of-memory errors in the last {self.window_s:.0f} s (limit {self.max_ooms}) on "
                "requests no larger than ones that completed here: the device, not the requests "
                "(memory.max_ooms_in_window); replace the replica"
            )
        return None
