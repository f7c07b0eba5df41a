"""Max pooling with kernel = stride (no padding) on contiguous channels-first (B, C, *S) maps, 2D and 3D, in Triton.

    y[o] = max over o's window of x        idx[o] = the window position of that maximum (int8, raster order)
    gx[i] = g[o] where i is o's maximum, else 0

LightM-UNet's down-sampling layers max-pool the Mamba layer's output at the higher resolution (2 x 64 x 128^3 at full
resolution). PyTorch's ``max_pool3d_with_indices`` stores int64 flat indices (8 bytes per output element) and its
backward zero-fills the input-sized gradient before scattering into it: 0.57 ms forward, 0.23 ms fill and 0.61 ms
backward at that size (H200, session 16 profile), against ~0.25 ms for one read and one write of the map. Here the
forward stores the maximum's position inside its window in one byte, and the backward writes every element of the
input gradient once (g at the maximum, 0 elsewhere): no fill, no scatter.

A program takes BLOCK output elements (flat, raster order) and walks the window positions in raster order (the
window is a constexpr shape); the first maximum wins and a NaN wins over numbers, as PyTorch's kernels choose, so
values, indices and gradients are PyTorch's exactly. int64 offsets: maps can pass 2**31 elements.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached_launch
from .layout import as_3d

BLOCK = 1024


@triton.jit
def _window_base(o, OD, OH, OW, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr):
    """The input offset of output element o's window corner (maps (n, OD * KD, OH * KH, OW * KW), n = b * C + c)."""
    ow = o % OW
    r = o // OW
    oh = r % OH
    r = r // OH
    od = r % OD
    n = r // OD
    H, W = OH * KH, OW * KW
    return ((n * (OD * KD) + od * KD) * H + oh * KH) * W + ow * KW, H, W


@cached_launch
@triton.jit
def _pool_fwd_kernel(x_ptr, y_ptr, idx_ptr, n_out, OD, OH, OW, KD: tl.constexpr, KH: tl.constexpr,
                     KW: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_out
    base, H, W = _window_base(o, OD, OH, OW, KD, KH, KW)
    best = tl.load(x_ptr + base, mask=m, other=0.0).to(tl.float32)  # exact for fp16/bf16 values
    arg = tl.zeros((BLOCK,), tl.int32)
    for i in tl.static_range(KD):
        for j in tl.static_range(KH):
            for k in tl.static_range(KW):
                if i + j + k > 0:
                    v = tl.load(x_ptr + base + (i * H + j) * W + k, mask=m, other=0.0).to(tl.float32)
                    take = (v > best) | (v != v)  # the first maximum; a NaN wins (PyTorch's rule)
                    best = tl.where(take, v, best)
                    arg = tl.where(take, (i * KH + j) * KW + k, arg)
    tl.store(y_ptr + o, best.to(y_ptr.dtype.element_ty), mask=m)
    tl.store(idx_ptr + o, arg.to(tl.int8), mask=m)


@cached_launch
@triton.jit
def _pool_bwd_kernel(g_ptr, idx_ptr, gx_ptr, n_out, OD, OH, OW, KD: tl.constexpr, KH: tl.constexpr,
                     KW: tl.constexpr, BLOCK: tl.constexpr):
    o = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = o < n_out
    base, H, W = _window_base(o, OD, OH, OW, KD, KH, KW)
    g = tl.load(g_ptr + o, mask=m, other=0.0).to(tl.float32)
    arg = tl.load(idx_ptr + o, mask=m, other=0).to(tl.int32)
    for i in tl.static_range(KD):
        for j in tl.static_range(KH):
            for k in tl.static_range(KW):
                tl.store(gx_ptr + base + (i * H + j) * W + k,
                         tl.where(arg == (i * KH + j) * KW + k, g, 0.0).to(gx_ptr.dtype.element_ty), mask=m)


def max_pool_forward(x: torch.Tensor, kernel: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """(y, idx) for a contiguous (B, C, *S) map whose spatial sizes are multiples of ``kernel`` (= the stride)."""
    out = tuple(s // k for s, k in zip(x.shape[2:], kernel))
    (OD, OH, OW), (KD, KH, KW) = as_3d(out, kernel)
    y = x.new_empty(*x.shape[:2], *out)
    idx = torch.empty(y.shape, device=x.device, dtype=torch.int8)
    n = y.numel()
    if n:
        _pool_fwd_kernel[(triton.cdiv(n, BLOCK),)](x, y, idx, n, OD, OH, OW, KD=KD, KH=KH, KW=KW, BLOCK=BLOCK,
                                                   num_warps=4)
    return y, idx


def max_pool_backward(g: torch.Tensor, idx: torch.Tensor, in_shape, kernel: tuple[int, ...]) -> torch.Tensor:
    """The input gradient (dense, every element written) of ``max_pool_forward`` for the output gradient g."""
    g = g.contiguous()
    gx = g.new_empty(in_shape)
    (OD, OH, OW), (KD, KH, KW) = as_3d(g.shape[2:], kernel)
    n = g.numel()
    if n:
        _pool_bwd_kernel[(triton.cdiv(n, BLOCK),)](g, idx, gx, n, OD, OH, OW, KD=KD, KH=KH, KW=KW, BLOCK=BLOCK,
                                                   num_warps=4)
    return gx
