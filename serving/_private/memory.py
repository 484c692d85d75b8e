"""Memory probes: the peak memory of a piece of work, behind one small interface.

On CUDA the allocator's own peak counter is exact for tensors. On the CPU the
kernel's resident-set high-water mark (VmHWM) is used, reset before each piece
of work through /proc/self/clear_refs where Linux allows it; elsewhere the
current RSS after the work is the best available figure (``exact`` says so).
"""

from __future__ import annotations

import os
from typing import Protocol

# The budget and cache freeing are public (tasks size their own caches with them); re-exported here for the
# replica's code.
from serving.gpu import free_cache_for, memory_budget_bytes  # noqa: F401


class MemoryProbe(Protocol):
    """Measures the peak memory of whatever runs between ``reset_peak`` and ``peak_bytes``."""

    kind: str
    exact: bool

    def reset_peak(self) -> None: ...

    def peak_bytes(self) -> int: ...


class CudaAllocatorProbe:
    """Peak bytes allocated by torch's CUDA caching allocator on one device."""

    kind = "cuda_allocator"
    exact = True

    def __init__(self, device: int = 0):
        self.device = device

    def reset_peak(self) -> None:
        import torch

        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int:
        import torch

        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device))


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class ProcessRssProbe:
    """Peak resident set size of this process (Linux), reset per measurement when allowed."""

    kind = "process_rss"

    def __init__(self) -> None:
        self.exact = self._can_reset()

    @staticmethod
    def _can_reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
            _status_kib("VmHWM")
            return True
        except (OSError, KeyError):
            return False

    def reset_peak(self) -> None:
        if self.exact:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_bytes(self) -> int:
        if self.exact:
            return _status_kib("VmHWM") * 1024
        import psutil

        return int(psutil.Process(os.getpid()).memory_info().rss)


def probe_for(device: str) -> MemoryProbe:
    """The probe that fits a task's device."""
    if device == "cuda":
        import torch

        return CudaAllocatorProbe(torch.cuda.current_device())
    return ProcessRssProbe()
