"""Wall-clock time and peak memory of a repeated piece of work, on CUDA or the CPU.

Time: ``warmup`` untimed calls, then ``repeats`` timed ones (CUDA synchronised before and after each);
the median and the minimum are reported.

Peak memory:
* CUDA: ``torch.cuda.max_memory_allocated`` over the phase, after resetting the peak at its start. It includes
  everything allocated at that moment (parameters, optimiser state, activations, workspace), not the
  caching allocator's reserve.
* CPU: the process's peak resident set size (``VmHWM``) during the phase minus the resident size at its start,
  after returning freed memory to the OS (glibc ``malloc_trim``) and resetting the peak through
  ``/proc/self/clear_refs`` (Linux). Memory still held at the start (parameters, caches the allocator keeps) is
  not counted, so this is a lower bound of what the phase needs; ``None`` (shown as n/a) where the kernel does
  not offer the reset.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
import re
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

MEMORY_KIND = {
    "cuda": "CUDA max_memory_allocated",
    "cpu": "CPU peak RSS increase (lower bound)",
}


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    repeats: int


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> Timing:
    """Median and minimum wall time of ``fn()`` in milliseconds."""
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {repeats}")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(statistics.median(times), min(times), repeats)


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


def _release_freed_memory():
    """Give memory freed by earlier phases back to the OS (glibc ``malloc_trim``), so a phase's RSS grows again."""
    gc.collect()
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory(device) as pm: ...`` then ``pm.mb`` - peak memory of the block in MiB (or None)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mb: Optional[float] = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._start_kib = None
            _release_freed_memory()
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # reset VmHWM to the current RSS
                self._start_kib = _proc_status_kib("VmRSS")
            except OSError:
                pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._start_kib is not None:
            peak = _proc_status_kib("VmHWM")
            self.mb = None if peak is None else max(0, peak - self._start_kib) / 1024
        return False
