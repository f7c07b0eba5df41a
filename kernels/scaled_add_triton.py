"""The gradients of a scaled residual, y + s * t with s a 1-element parameter, from one pass over the map.

    out = y + s * t                     y, t of one shape, s 1 element (LightM-UNet's ``skip_scale``)
    gt = g * s,  gs = sum(g * t)        g the output gradient: t's and s's gradients (y's is g itself)

LightM-UNet computes ``torch.addcmul(y, skip_scale, t)`` in every Mamba layer and ResUpBlock, on maps of up to
(2, 32, 128^3) = 67 M fp32 elements. The forward is one pass already; PyTorch's backward of it is three: ``g * s``,
``g * t`` and the sum of that (0.38 + 0.37 + 0.28 ms at full resolution on an H200). Here one kernel reads g and t
once, writes gt and a per-program partial sum of g * t: each program takes one BLOCK of elements (int64 offsets:
maps can pass 2**31 elements), and the partials, one per program, are summed afterwards by ``torch.sum`` in a fixed
order (no atomics: bitwise repeatable for a given device and shape). s is read on the device (no host sync; CUDA
graphs capture the backward as is).

Layouts: g and t are walked as flat runs of memory, in place when both are dense (no gaps or overlaps, in any order
of the axes: contiguous, channels-last, ...) with the same memory order; otherwise (a strided view of a larger map,
the zero-stride gradient of ``y.sum()``, two different orders) both are first copied to contiguous tensors
(``.contiguous()``, a no-op for the one that is already). gt has g's strides (the memory order walked). Any float
dtypes in; fp32 arithmetic; gt stored in ``dtype`` (fp32 by default), gs fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached_launch

BLOCK = 4096  # elements per program (16 per thread at 8 warps); partial sums: one fp32 per 4096 elements
NUM_WARPS = 8


@cached_launch
@triton.jit
def _scaled_add_kernel(g_ptr, s_ptr, t_ptr, gt_ptr, part_ptr, n, NEED_GT: tl.constexpr, NEED_GS: tl.constexpr,
                       BLOCK: tl.constexpr):
    """gt = g * s and part[pid] = sum(g * t) over this program's BLOCK of the flat runs (each only if needed)."""
    pid = tl.program_id(0)
    j = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = j < n
    g = tl.load(g_ptr + j, mask=m, other=0.0).to(tl.float32)
    if NEED_GT:
        s = tl.load(s_ptr).to(tl.float32)
        tl.store(gt_ptr + j, (g * s).to(gt_ptr.dtype.element_ty), mask=m)
    if NEED_GS:
        t = tl.load(t_ptr + j, mask=m, other=0.0).to(tl.float32)  # masked lanes: g = 0 as well
        tl.store(part_ptr + pid, tl.sum(g * t, axis=0))


def _dense(x: torch.Tensor) -> bool:
    """Whether x's elements fill a run of memory exactly once, in some order of its axes (size-1 axes ignored)."""
    expected = 1
    for d in sorted((d for d in range(x.dim()) if x.shape[d] != 1), key=x.stride):
        if x.stride(d) != expected:
            return False
        expected *= x.shape[d]
    return True


def _same_order(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether a and b (one shape) have the same strides on every axis longer than 1."""
    return all(a.stride(d) == b.stride(d) for d in range(a.dim()) if a.shape[d] != 1)


def scaled_add_grads(g: torch.Tensor, s: torch.Tensor, t: torch.Tensor | None = None, need_gt: bool = True,
                     need_gs: bool = True, dtype: torch.dtype = torch.float32
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(g * s, sum(g * t))`` for the output gradient g of ``y + s * t``, from one read of g (and t): gt in
    ``dtype`` with g's shape (None unless ``need_gt``), gs a 0-dim fp32 tensor (None unless ``need_gs``; t is needed
    only for it). s: 1 element, on g's device."""
    if s.numel() != 1:
        raise ValueError(f"scaled_add_grads: s must have 1 element, got shape {tuple(s.shape)}")
    if need_gs and (t is None or t.shape != g.shape):
        raise ValueError(f"scaled_add_grads: t of g's shape {tuple(g.shape)} needed for gs, got "
                         f"{None if t is None else tuple(t.shape)}")
    if not need_gs:
        t = None
    if not (_dense(g) and (t is None or (_dense(t) and _same_order(g, t)))):
        g = g.contiguous()
        t = None if t is None else t.contiguous()
    n = g.numel()
    programs = triton.cdiv(n, BLOCK)
    gt = torch.empty_strided(g.shape, g.stride(), device=g.device, dtype=dtype) if need_gt else None
    part = torch.empty(programs, device=g.device, dtype=torch.float32) if need_gs else None
    if programs and (need_gt or need_gs):
        _scaled_add_kernel[(programs,)](g, s, g if t is None else t, g if gt is None else gt,
                                        g if part is None else part, n, NEED_GT=need_gt, NEED_GS=need_gs, BLOCK=BLOCK,
                                        num_warps=NUM_WARPS)
    return gt, None if part is None else part.sum()
