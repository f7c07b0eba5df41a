"""FLOPs of one forward pass: convolutions and matrix products counted by PyTorch, the selective scan analytically.

* ``count_flops`` runs the module under ``torch.utils.flop_counter.FlopCounterMode``, which counts convolutions
  (transposed and grouped included), ``mm``/``addmm``/``bmm``/``baddbmm`` (``nn.Linear``, ``einsum``) and
  attention at 2 FLOPs per multiply-add. Norms, activations, element-wise ops and interpolation are not counted.
* Every selective scan that runs through the op boundary (``nnunet_mamba.ops``) is left out of that count, whatever
  its backend does inside (the PyTorch backend's ``einsum`` would otherwise be counted, the CUDA/Triton kernels
  would not), and counted analytically instead: ``scan_flops`` = 9·b·d·L·N per scan, plus b·d·L for the skip term
  ``D`` and b·d·L for the gate ``z`` - the convention of mamba-ssm's ``flops_selective_scan_ref`` used by VMamba
  (state-spaces/mamba issue 110). Forward only.

* The ops with Triton kernels (``nnunet_mamba.ops.token_ops``: the Mamba layers' causal conv and LayerNorm, the
  depthwise convs and GroupNorms of the maps) run on their PyTorch backend while counting, so the convs are counted
  as the convolutions they are on every device (a Triton kernel would not be seen).

The two numbers are reported side by side and never summed silently.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..ops import scan as scan_ops
from ..ops import token_ops


def scan_flops(call: scan_ops.ScanCall) -> int:
    """Analytic forward FLOPs of one recorded selective scan (see the module docstring)."""
    bdl = call.batch * call.channels * call.length
    return 9 * bdl * call.state + bdl * int(call.with_D) + bdl * int(call.with_z)


@dataclass
class FlopCount:
    conv_matmul: int  # counted by FlopCounterMode, scans excluded
    scan: int  # analytic, forward
    scan_calls: list = field(default_factory=list)  # ScanCall per selective scan

    @property
    def backends(self) -> list[str]:
        return sorted({c.backend for c in self.scan_calls})


@contextmanager
def _scans_hidden_from(counter: FlopCounterMode, excluded: list):
    """Run every scan backend with the counter's total read before and after; the difference goes to ``excluded``.

    Wraps the registered backends (``fn`` and the fused ``cross_fn``) for the duration of the block.
    """
    saved = []

    def wrap(fn):
        def counted_apart(*args, **kwargs):
            before = counter.get_total_flops()
            try:
                return fn(*args, **kwargs)
            finally:
                excluded.append(counter.get_total_flops() - before)
        return counted_apart

    for be in scan_ops._BACKENDS.values():
        saved.append((be, be.fn, be.cross_fn))
        be.fn = wrap(be.fn)
        if be.cross_fn is not None:
            be.cross_fn = wrap(be.cross_fn)
    try:
        yield
    finally:
        for be, fn, cross_fn in saved:
            be.fn, be.cross_fn = fn, cross_fn


def count_flops(module: torch.nn.Module, *inputs) -> FlopCount:
    """FLOPs of ``module(*inputs)`` (no gradients): conv/matmul counted, selective scans analytic and apart."""
    counter = FlopCounterMode(display=False)
    excluded: list[int] = []
    token_ops_on_torch = mock.patch.dict(os.environ, {token_ops.ENV_BACKEND: "torch"})
    with torch.no_grad(), token_ops_on_torch, scan_ops.record_scans() as calls, counter, \
            _scans_hidden_from(counter, excluded):
        module(*inputs)
    return FlopCount(counter.get_total_flops() - sum(excluded), sum(scan_flops(c) for c in calls), list(calls))
