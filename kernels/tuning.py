"""Launch-plan helpers shared by the kernel modules: the overrides benchmark sweeps and tests set (empty = each
module's defaults), and the GPU's SM count the plans scale with."""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device, cpu: int) -> int:
    """The streaming multiprocessors of a CUDA device (looked up once per device); ``cpu`` for the CPU tensors of
    Triton's interpreter."""
    if device.type != "cuda":
        return cpu
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _smem(index: int) -> int:
    return torch.cuda.get_device_properties(index).shared_memory_per_block_optin


def smem_bytes(device: torch.device, cpu: int = 1 << 30) -> int:
    """The shared memory one program may use on a CUDA device (looked up once per device); ``cpu`` for the CPU
    tensors of Triton's interpreter (no limit)."""
    if device.type != "cuda":
        return cpu
    return _smem(device.index if device.index is not None else torch.cuda.current_device())


def tuning_setter(overrides: dict, keys: Sequence[str]) -> Callable[..., None]:
    """A ``set_tuning(**kw)`` that replaces the contents of ``overrides`` with kw (None values dropped); unknown keys
    raise; no arguments resets to the defaults."""

    def set_tuning(**kw):
        bad = set(kw) - set(keys)
        if bad:
            raise ValueError(f"set_tuning: unknown keys {sorted(bad)}; known: {', '.join(keys)}")
        overrides.clear()
        overrides.update({k: v for k, v in kw.items() if v is not None})

    set_tuning.__doc__ = f"Override launch-plan choices (keys: {', '.join(keys)}); no arguments resets."
    return set_tuning
