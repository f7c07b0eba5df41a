"""Linear up-sampling by a factor of 1 or 2 per axis (bilinear / trilinear, ``align_corners=False``), with an
optional map added in the same pass, on contiguous channels-first (B, C, *S) maps, 2D and 3D, in Triton.

    y[o] = sum over o's source neighbours i (2 per doubled axis) of w(o, i) x[i]   (+ skip[o])
    gx[i] = sum over the outputs o that read i of w(o, i) g[o]                      (gskip = g)

LightM-UNet's decoder up-samples a map and adds the encoder's skip connection. PyTorch's trilinear backward scatters
into a zero-filled input gradient with atomics (1.88 ms at 2 x 32 x 128^3 on the H200, session 19 profile, against
~0.15 ms for one read of g and one write of gx), its forward takes 0.90 ms, and the skip is added in another pass
(0.37 ms). Here a program takes a tile of one depth slice of one (b, c) plane: BH rows (output rows in the
forward, input rows in the backward) by BW input columns; the backward gathers (no atomics, no fill, the same sum on
every run). Depths and rows take PyTorch's source positions (below) per program and per row; along the last axis,
doubled, the program reads three contiguous tiles per source row - columns j - 1, j, j + 1 in the forward (outputs
2j and 2j + 1 interleaved from them), the output pairs of j - 1, j, j + 1 in the backward - so every load and store
is coalesced (clamped column indices would hide that contiguity from Triton, which then lays the lanes along the
rows: 2.7x slower at 128^3).

Source positions as PyTorch computes them for a scale factor f (align_corners=False): s = (o + 0.5) / f - 0.5,
clamped at 0; i0 = floor(s), i1 = min(i0 + 1, n - 1); weights 1 - (s - i0) and s - i0 (f = 1: i = o). Doubled,
that is y[2j] = x[j - 1] / 4 + 3 x[j] / 4 and y[2j + 1] = 3 x[j] / 4 + x[j + 1] / 4 with the neighbour indices
clamped into the axis. Arithmetic in fp32 (half maps are read and written in their dtype). int64 plane offsets: maps
can pass 2**31 elements (one (b, c) plane may not).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached_launch
from .layout import as_3d


@triton.jit
def _taps(o, n, F: tl.constexpr):
    """Output index o's source indices along an axis of n inputs up-sampled by F, and their weights (tuples)."""
    if F == 1:
        res = (o,), (tl.full((1,), 1.0, tl.float32),)
    else:
        s = tl.maximum((o.to(tl.float32) + 0.5) * 0.5 - 0.5, 0.0)
        i0 = s.to(tl.int32)  # floor: s >= 0
        l1 = s - i0.to(tl.float32)
        res = (i0, tl.minimum(i0 + 1, n - 1)), (1.0 - l1, l1)
    return res


@triton.jit
def _adjoint_taps(i, n, F: tl.constexpr):
    """The outputs that can read input i along an axis of n inputs up-sampled by F (clamped into range) and the
    weight each gives i (0 for those out of range), as tuples of 1 (F = 1) or 4."""
    if F == 1:
        res = (i,), (tl.full((1,), 1.0, tl.float32),)
    else:
        outs = ()
        weights = ()
        for k in tl.static_range(4):
            o = 2 * i - 1 + k
            oc = tl.minimum(tl.maximum(o, 0), 2 * n - 1)
            src, w = _taps(oc, n, 2)
            wi = tl.where(src[0] == i, w[0], 0.0) + tl.where(src[1] == i, w[1], 0.0)
            outs = outs + (oc,)
            weights = weights + (tl.where((o >= 0) & (o < 2 * n), wi, 0.0),)
        res = outs, weights
    return res


@triton.jit
def _interleave(even, odd):
    """(BH, BW) tiles of outputs 2j and 2j + 1 -> one (BH, 2 BW) tile in column order."""
    return tl.reshape(tl.join(even, odd), (even.shape[0], 2 * even.shape[1]))


@triton.jit
def _pairs(row, oc, shift: tl.constexpr, mask):
    """The outputs 2j + shift and 2j + 1 + shift of a tile's columns j, from one contiguous load of the (BH, 2 BW)
    output columns oc + shift, as two (BH, BW) fp32 tiles."""
    v = tl.load(row + (oc + shift), mask=mask, other=0.0).to(tl.float32)
    return tl.split(tl.reshape(v, (v.shape[0], v.shape[1] // 2, 2)))


@cached_launch
@triton.jit
def _up_fwd_kernel(x_ptr, skip_ptr, y_ptr, D, H, W, n_w_tiles, FD: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
                   HAS_SKIP: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """Program (tile, od, plane): output rows oh (BH of them) of slice od, at the outputs of input columns j (BW of
    them: 2 BW outputs when the last axis is doubled)."""
    th = tl.program_id(0) // n_w_tiles
    j = (tl.program_id(0) % n_w_tiles) * BW + tl.arange(0, BW)[None, :]
    od = tl.program_id(1)
    p = tl.program_id(2).to(tl.int64)
    OH, OW = H * FH, W * FW
    oh = th * BH + tl.arange(0, BH)[:, None]
    m = (oh < OH) & (j < W)
    di, dw = _taps(od, D, FD)
    hi, hw = _taps(oh, H, FH)
    x_plane = x_ptr + p * D * H * W
    ye = tl.zeros((BH, BW), tl.float32)  # outputs 2j (or j)
    yo = tl.zeros((BH, BW), tl.float32)  # outputs 2j + 1
    for a in tl.static_range(FD):  # nested as PyTorch's kernel nests its sums: w, then h, then d
        se = tl.zeros((BH, BW), tl.float32)  # their sums over the rows' sources
        so = tl.zeros((BH, BW), tl.float32)
        for b in tl.static_range(FH):
            row = x_plane + (di[a] * H + hi[b]) * W
            xc = tl.load(row + j, mask=m, other=0.0).to(tl.float32)
            if FW == 2:  # neighbours past the ends are x[j] itself (masked loads: the offsets stay visibly
                # contiguous, so Triton coalesces the loads along the columns)
                xl = tl.load(row + (j - 1), mask=m & (j >= 1), other=0.0).to(tl.float32)
                xr = tl.load(row + (j + 1), mask=m & (j + 1 < W), other=0.0).to(tl.float32)
                xl = tl.where(j >= 1, xl, xc)
                xr = tl.where(j + 1 < W, xr, xc)
                se += hw[b] * (0.25 * xl + 0.75 * xc)
                so += hw[b] * (0.75 * xc + 0.25 * xr)
            else:
                se += hw[b] * xc
        ye += dw[a] * se
        yo += dw[a] * so
    y_row = (p * (D * FD) + od) * OH * OW + oh * OW
    if FW == 2:
        ow = 2 * (tl.program_id(0) % n_w_tiles) * BW + tl.arange(0, 2 * BW)[None, :]
        mo = (oh < OH) & (ow < OW)
        y = _interleave(ye, yo)
    else:
        ow = j
        mo = m
        y = ye
    if HAS_SKIP:
        y += tl.load(skip_ptr + y_row + ow, mask=mo, other=0.0).to(tl.float32)
    tl.store(y_ptr + y_row + ow, y.to(y_ptr.dtype.element_ty), mask=mo)


@cached_launch
@triton.jit
def _up_bwd_kernel(g_ptr, gx_ptr, D, H, W, n_w_tiles, FD: tl.constexpr, FH: tl.constexpr, FW: tl.constexpr,
                   BH: tl.constexpr, BW: tl.constexpr):
    """Program (tile, d, plane): the input gradient of rows h (BH of them) of slice d at columns j (BW of them)."""
    th = tl.program_id(0) // n_w_tiles
    j = (tl.program_id(0) % n_w_tiles) * BW + tl.arange(0, BW)[None, :]
    d = tl.program_id(1)
    p = tl.program_id(2).to(tl.int64)
    h = th * BH + tl.arange(0, BH)[:, None]
    m = (h < H) & (j < W)
    do, dw = _adjoint_taps(d, D, FD)
    ho, hw = _adjoint_taps(h, H, FH)
    OH, OW = H * FH, W * FW
    oc = 2 * (tl.program_id(0) % n_w_tiles) * BW + tl.arange(0, 2 * BW)[None, :]  # the columns' output pairs
    mo = (h < H) & (oc < OW)
    g_plane = g_ptr + p * (D * FD) * OH * OW
    gx = tl.zeros((BH, BW), tl.float32)
    for a in tl.static_range(3 * FD - 2):  # 4 outputs per doubled axis, else 1
        gh = tl.zeros((BH, BW), tl.float32)
        for b in tl.static_range(3 * FH - 2):
            row = g_plane + (do[a] * OH + ho[b]) * OW
            if FW == 2:
                # the output pairs (2j, 2j + 1) of columns j - 1, j, j + 1: contiguous (BH, 2 BW) loads, split
                ge, go = _pairs(row, oc, 0, mo)
                _, lo = _pairs(row, oc, -2, mo & (oc >= 2))
                re, _ = _pairs(row, oc, 2, mo & (oc + 2 < OW))
                # x[j] feeds y[2j - 1] (1/4), y[2j], y[2j + 1] (3/4 each) and y[2j + 2] (1/4); at the ends the
                # clamped neighbour is x[j] itself, so y[0] and y[2W - 1] give it their whole value
                lo = tl.where(j >= 1, lo, ge)
                re = tl.where(j <= W - 2, re, go)
                gw = 0.25 * lo + 0.75 * ge + 0.75 * go + 0.25 * re
            else:
                gw = tl.load(row + j, mask=m, other=0.0).to(tl.float32)
            gh += hw[b] * gw
        gx += dw[a] * gh
    tl.store(gx_ptr + (p * D + d) * H * W + h * W + j, gx.to(gx_ptr.dtype.element_ty), mask=m)


def _tiles(H: int, W: int) -> tuple[int, int, int]:
    """(BH, BW, tiles along W) of a program's (rows, input columns) tile: up to 64 columns, ~1024 elements."""
    BW = min(64, triton.next_power_of_2(W))
    BH = min(triton.next_power_of_2(H), max(1, 1024 // BW))
    return BH, BW, triton.cdiv(W, BW)


def upsample_forward(x: torch.Tensor, factors: tuple[int, ...], skip: torch.Tensor | None = None) -> torch.Tensor:
    """The up-sampled contiguous (B, C, *S) map x (factors 1 or 2 per spatial axis), plus ``skip`` (contiguous, of
    the output's shape) if given, as a new contiguous map of x's dtype."""
    y = x.new_empty(*x.shape[:2], *(s * f for s, f in zip(x.shape[2:], factors)))
    (D, H, W), (FD, FH, FW) = as_3d(x.shape[2:], factors)
    if y.numel():
        BH, BW, nw = _tiles(H * FH, W)
        grid = (triton.cdiv(H * FH, BH) * nw, D * FD, x.shape[0] * x.shape[1])
        _up_fwd_kernel[grid](x, skip if skip is not None else y, y, D, H, W, nw, FD=FD, FH=FH, FW=FW,
                             HAS_SKIP=skip is not None, BH=BH, BW=BW, num_warps=4)
    return y


def upsample_backward(g: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """The gradient of the up-sampled map's input for the output gradient g (every element written once)."""
    g = g.contiguous()
    gx = g.new_empty(*g.shape[:2], *(s // f for s, f in zip(g.shape[2:], factors)))
    (D, H, W), (FD, FH, FW) = as_3d(gx.shape[2:], factors)
    if gx.numel():
        BH, BW, nw = _tiles(H, W)
        _up_bwd_kernel[(triton.cdiv(H, BH) * nw, D, g.shape[0] * g.shape[1])](g, gx, D, H, W, nw, FD=FD, FH=FH,
                                                                              FW=FW, BH=BH, BW=BW, num_warps=4)
    return gx
