"""Launching the project's Triton kernels with less host work per call.

``kernel[grid](*args, **meta)`` runs Triton 3.x's Python on every call before the compiled kernel's launcher: it
specialises every argument, builds a cache key from the specialisation and a string of the options and looks the
compiled kernel up. For the scan kernels' ~65 arguments that is ~15 us of the ~66 us a launch costs the H200
machine's host (kernels/bench_host.py); the launcher itself, ~0.8 us per argument, is the rest. A short scan's
forward + backward (six launches) is bound by host time, not GPU work (kernels/BENCHMARK.md, "Session 9", "Session
10").

``@cached_launch`` (above ``@triton.jit``) keeps that call syntax. The first call of a specialisation goes through
Triton as before; its compiled kernel is kept under a key that determines Triton's own specialisation (the dtype
and 16-byte alignment residue of every tensor, every other argument's exact value, the keyword arguments, the
device), and later calls with that key go straight to the compiled kernel's launcher, as
``CompiledKernel[grid](...)`` (Triton's launch hooks still fire there). Under ``TRITON_INTERPRET=1`` or with
``NNUNET_MAMBA_CACHED_LAUNCH=0`` every call takes Triton's own path. Grids are tuples (no grid callables).
"""
from __future__ import annotations

import os

import torch
from triton.runtime.jit import JITFunction

ENABLED = os.environ.get("NNUNET_MAMBA_CACHED_LAUNCH", "1") != "0"  # read on every launch (benchmarks toggle it)


def _key(args):
    return tuple((a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor) else a for a in args)


class CachedLaunch:
    """A ``@triton.jit`` kernel whose launches skip Triton's per-call specialisation once a key has compiled."""

    def __init__(self, fn):
        self.jit = fn
        self.cache: dict = {}
        self.fast = isinstance(fn, JITFunction)  # not under TRITON_INTERPRET=1

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def __getattr__(self, name):  # fn, params, do_not_specialize, ...: the JITFunction's
        return getattr(self.jit, name)

    def launch(self, grid, args, meta):
        if not (ENABLED and self.fast):
            return self.jit[grid](*args, **meta)
        key = (torch.cuda.current_device(), _key(args), tuple(meta.items()))
        hit = self.cache.get(key)
        if hit is None:
            kernel = self.jit[grid](*args, **meta)
            # CompiledKernel[grid] takes every parameter in order, constexprs included (as JITFunction.run passes them)
            rest = tuple(meta[p.name] if p.name in meta else p.default for p in self.jit.params[len(args):])
            self.cache[key] = (kernel, rest)
            return kernel
        kernel, rest = hit
        kernel[tuple(grid) + (1,) * (3 - len(grid))](*args, *rest)
        return kernel


def cached_launch(fn) -> CachedLaunch:
    """Decorator (outermost, above ``@triton.jit``): see the module docstring."""
    return CachedLaunch(fn)
