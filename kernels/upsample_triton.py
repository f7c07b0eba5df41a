"""Bilinear / trilinear upsampling by integer factors (align_corners=False) in Triton: forward and backward.

    y[b, c, i_d, i_h, i_w] = sum over the 2^nd corners of l_d l_h l_w x[b, c, s_d, s_h, s_w]

for x (B, C, *S), nd = 2 or 3, and an integer factor f_a >= 1 per axis (output size O_a = f_a S_a), i.e.
``F.interpolate(x, scale_factor=factors, mode="bilinear" / "trilinear", align_corners=False)``. Per axis, PyTorch's
convention (``area_pixel_compute_scale`` / ``area_pixel_compute_source_index`` in ATen's UpSample.h and
cuda/UpSample.cuh, ``recompute_scale_factor=None``: the scale is fp32(1 / f), not S / O): output index i reads

    src = max(scale (i + 0.5) - 0.5, 0),   i0 = int(src),   i1 = i0 + (i0 < S - 1),   l1 = src - i0,   l0 = 1 - l1

in fp32 (``_source``; src < S always, so i0 <= S - 1). For factors that are powers of two every step is exact. Use
case: LightM-UNet's decoder (``nn.Upsample(scale_factor=strides, mode="trilinear")``, factors 1 or 2 from the plan),
e.g. (2, 32, 64^3) -> 128^3 in fp32, where PyTorch's CUDA backward, ``upsample_trilinear3d_backward``, scatters every
output gradient into its 8 inputs with atomics: 1.88 ms on the H200 for a ~0.15 ms memory floor, and not bitwise
repeatable.

* **Forward** (``_upsample_kernel``): a program writes a tile of BH output rows x BW contiguous output columns (rows
  = the (b, c, i_d, i_h) lines of the output, flattened; a tile may span several lines). The depth / height sources
  are per row, the width sources per column; each output element gathers its 2^nd inputs (neighbouring columns read
  the same or adjacent inputs: the loads coalesce and mostly hit cache) and combines them with PyTorch's nesting,
  l_d (l_h (l_w x + l_w' x') + ...) + ..., in fp32. 2D maps run as depth 1 without the depth term.
* **Backward** (``_upsample_grad_kernel``) is a gather, not a scatter: a program computes a tile of the input
  gradient, and each input element j sums the output gradients of the outputs that read it, weighted by the weight
  they read it with. Per axis these outputs are few and fixed: input j is read by output i (as i0 or i1) with
  weight 1 - |src(i) - j| where that is positive, src(i) = (i + 0.5) / f - 0.5, i.e. by the outputs
  f (j - 1/2) - 1/2 < i < f (j + 3/2) - 1/2: T = 2 f of them from f j - f / 2 for even f (f = 2: 2j - 1 .. 2j + 2,
  weights 1/4, 3/4, 3/4, 1/4), T = 1 for f = 1 (``_window``; for odd f > 1, 2 f - 1 of them). The borders
  need nothing extra: outputs below src = 0 are clamped onto input 0 and lie in input 0's window, those whose i1 is
  clamped onto S - 1 in input S - 1's window, and window positions outside [0, O) are masked. Each candidate's
  weight is recomputed with the forward's own ``_source`` (w = l0 [i0 == j] + l1 [i1 == j]), so the backward is the
  exact adjoint of the forward's fp32 weights, clamps included. Factors that are not powers of two (fp32 rounding of
  1 / f can move src across an integer by an ulp) take one more window position on each side. Each gradient element
  is written once by one program: no atomics, no buffers, bitwise repeatable. The output gradient is read 2^nd
  times (once per input that reads it), from cache for all but the first.

Tiles: BW = the last axis padded to a power of two, at most ``MAX_BW``; BH = TILE / BW rows. Provisional sizes, not
yet tuned on a GPU. Offsets are int64 (maps can pass 2**31 elements); the number of rows must stay below 2**31.

Inputs are made contiguous (channels-first); y and the input gradient are new contiguous tensors in x's dtype
(fp32, bf16 or fp16; the arithmetic is fp32 either way), as PyTorch's upsampling keeps its input's dtype (also under
autocast).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import cached_launch

FWD_TILE = 2048  # output elements per forward program
BWD_TILE = 1024  # input-gradient elements per backward program (each sums T^nd output gradients, _window)
MAX_BW = 256  # at most this many columns of the last axis per tile


@triton.jit
def _source(i, S, F: tl.constexpr):
    """PyTorch's linear source of output index i on an axis of S inputs upsampled by F (align_corners=False): the
    lower and upper inputs i0, i1 and their weights l0, l1."""
    scale: tl.constexpr = 1.0 / F
    src = tl.maximum((i.to(tl.float32) + 0.5) * scale - 0.5, 0.0)
    i0 = src.to(tl.int32)  # src >= 0: truncation is the floor
    i1 = tl.where(i0 < S - 1, i0 + 1, i0)
    l1 = src - i0.to(tl.float32)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _read_weight(j, t, S, O, F: tl.constexpr, LO: tl.constexpr):
    """Candidate t of input j's window on one axis: the output index i = F j - LO + t, the weight with which output i
    reads input j (0 outside the output) and whether i lies in the output."""
    i = j * F - LO + t
    i0, i1, l0, l1 = _source(i, S, F)
    w = tl.where(i0 == j, l0, 0.0) + tl.where(i1 == j, l1, 0.0)
    ok = (i >= 0) & (i < O)
    return i, tl.where(ok, w, 0.0), ok


@cached_launch
@triton.jit
def _upsample_kernel(x_ptr, y_ptr, R, D, H, W, OD, OH, OW, ND: tl.constexpr, FD: tl.constexpr, FH: tl.constexpr,
                     FW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """One tile of y (R = B C OD OH rows of OW) from x (B C, D, H, W). Grid: (row blocks, column blocks)."""
    r = tl.program_id(0) * BH + tl.arange(0, BH)
    ow = tl.program_id(1) * BW + tl.arange(0, BW)
    rm = r < R
    oh = r % OH
    od = r // OH % OD
    bc = (r // (OH * OD)).to(tl.int64)
    w0, w1, lw0, lw1 = _source(ow, W, FW)
    h0, h1, lh0, lh1 = _source(oh, H, FH)
    m = rm[:, None] & (ow < OW)[None, :]
    w0, w1, lw0, lw1 = w0[None, :], w1[None, :], lw0[None, :], lw1[None, :]
    lh0, lh1 = lh0[:, None], lh1[:, None]
    d0, d1, ld0, ld1 = _source(od, D, FD)
    plane0 = x_ptr + (bc * D + d0) * H * W  # (BH,) pointers to the (b, c, d0) plane of each row
    r00 = (plane0 + h0.to(tl.int64) * W)[:, None]
    r01 = (plane0 + h1.to(tl.int64) * W)[:, None]
    v0 = lh0 * (lw0 * tl.load(r00 + w0, mask=m, other=0.0).to(tl.float32)
                + lw1 * tl.load(r00 + w1, mask=m, other=0.0).to(tl.float32)) + \
        lh1 * (lw0 * tl.load(r01 + w0, mask=m, other=0.0).to(tl.float32)
               + lw1 * tl.load(r01 + w1, mask=m, other=0.0).to(tl.float32))
    if ND == 3:
        plane1 = x_ptr + (bc * D + d1) * H * W
        r10 = (plane1 + h0.to(tl.int64) * W)[:, None]
        r11 = (plane1 + h1.to(tl.int64) * W)[:, None]
        v1 = lh0 * (lw0 * tl.load(r10 + w0, mask=m, other=0.0).to(tl.float32)
                    + lw1 * tl.load(r10 + w1, mask=m, other=0.0).to(tl.float32)) + \
            lh1 * (lw0 * tl.load(r11 + w0, mask=m, other=0.0).to(tl.float32)
                   + lw1 * tl.load(r11 + w1, mask=m, other=0.0).to(tl.float32))
        v0 = ld0[:, None] * v0 + ld1[:, None] * v1
    out = y_ptr + ((bc * OD + od) * OH + oh)[:, None] * OW + ow[None, :]
    tl.store(out, v0, mask=m)


@cached_launch
@triton.jit
def _upsample_grad_kernel(gy_ptr, gx_ptr, R, D, H, W, OD, OH, OW, FD: tl.constexpr, FH: tl.constexpr,
                          FW: tl.constexpr, LD: tl.constexpr, LH: tl.constexpr, LW: tl.constexpr,
                          TD: tl.constexpr, TH: tl.constexpr, TW: tl.constexpr, BH: tl.constexpr, BW: tl.constexpr):
    """One tile of gx (R = B C D H rows of W): gx[j] = sum over each axis' window (start F j - L, T candidates) of
    w_d (w_h (w_w gy[i])). Grid: (row blocks, column blocks)."""
    r = tl.program_id(0) * BH + tl.arange(0, BH)
    jw = tl.program_id(1) * BW + tl.arange(0, BW)
    rm = r < R
    cm = jw < W
    jh = r % H
    jd = r // H % D
    bc = (r // (H * D)).to(tl.int64)
    acc = tl.zeros((BH, BW), tl.float32)
    for td in range(TD):  # not unrolled: bounds the code size for larger factors
        i_d, wd, okd = _read_weight(jd, td, D, OD, FD, LD)
        plane = gy_ptr + (bc * OD + i_d) * OH * OW  # (BH,) pointers to the output plane of each row
        acc_h = tl.zeros((BH, BW), tl.float32)
        for th in tl.static_range(TH):
            i_h, wh, okh = _read_weight(jh, th, H, OH, FH, LH)
            row = (plane + i_h.to(tl.int64) * OW)[:, None]
            rmask = (rm & okd & okh)[:, None]
            acc_w = tl.zeros((BH, BW), tl.float32)
            for tw in tl.static_range(TW):
                i_w, ww, okw = _read_weight(jw, tw, W, OW, FW, LW)
                g = tl.load(row + i_w[None, :], mask=rmask & (okw & cm)[None, :], other=0.0).to(tl.float32)
                acc_w += ww[None, :] * g
            acc_h += wh[:, None] * acc_w
        acc += wd[:, None] * acc_h
    out = gx_ptr + ((bc * D + jd) * H + jh)[:, None] * W + jw[None, :]
    tl.store(out, acc, mask=rm[:, None] & cm[None, :])


# ------------------------------------------------------------------------------------------------------------------
# host side


def _window(f):
    """(start offset L, count T) of the outputs f j - L .. f j - L + T - 1 that can read input j on an axis upsampled
    by f (module docstring): exactly those for powers of two, one more on each side otherwise (fp32 rounding)."""
    if f == 1:
        return 0, 1
    if f & (f - 1) == 0:
        return f // 2, 2 * f
    return f // 2 + 1, 2 * f + 2


def _tile(rows, cols, elems):
    """(BH, BW): BW the columns padded to a power of two (at most MAX_BW), BH the rest of `elems` (at most the rows,
    padded)."""
    BW = min(triton.next_power_of_2(max(cols, 1)), MAX_BW)
    BH = max(1, min(elems // BW, triton.next_power_of_2(max(rows, 1))))
    return BH, BW


def _as_3d(shape, factors):
    """(B C, D, H, W) and (fD, fH, fW) of a (B, C, *S) map: a 2D map as depth 1, factor 1."""
    S, f = tuple(shape[2:]), tuple(factors)
    if len(S) == 2:
        S, f = (1,) + S, (1,) + f
    return math.prod(shape[:2]), S, f


def _forward(x, factors):
    """y (B, C, *[s f]) from a contiguous x (B, C, *S), in x's dtype."""
    nd = x.dim() - 2
    BC, (D, H, W), (fd, fh, fw) = _as_3d(x.shape, factors)
    OD, OH, OW = D * fd, H * fh, W * fw
    y = torch.empty((*x.shape[:2], *[s * f for s, f in zip(x.shape[2:], factors)]), device=x.device, dtype=x.dtype)
    R = BC * OD * OH
    if y.numel():
        BH, BW = _tile(R, OW, FWD_TILE)
        _upsample_kernel[(triton.cdiv(R, BH), triton.cdiv(OW, BW))](
            x, y, R, D, H, W, OD, OH, OW, ND=nd, FD=fd, FH=fh, FW=fw, BH=BH, BW=BW, num_warps=4)
    return y


def _backward(gy, shape, dtype, factors):
    """gx (shape, dtype) from a contiguous output gradient gy: the gather described in the module docstring."""
    BC, (D, H, W), (fd, fh, fw) = _as_3d(shape, factors)
    gx = torch.empty(shape, device=gy.device, dtype=dtype)
    R = BC * D * H
    if gx.numel():
        (LD, TD), (LH, TH), (LW, TW) = _window(fd), _window(fh), _window(fw)
        BH, BW = _tile(R, W, BWD_TILE)
        _upsample_grad_kernel[(triton.cdiv(R, BH), triton.cdiv(W, BW))](
            gy, gx, R, D, H, W, D * fd, H * fh, W * fw, FD=fd, FH=fh, FW=fw, LD=LD, LH=LH, LW=LW,
            TD=TD, TH=TH, TW=TW, BH=BH, BW=BW, num_warps=4)
    return gx


class _UpsampleLinearFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, factors):
        ctx.meta = (tuple(x.shape), x.dtype, factors)  # the backward needs no tensor: the op is linear
        return _forward(x.contiguous(), factors)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        shape, dtype, factors = ctx.meta
        return _backward(gy.contiguous(), shape, dtype, factors), None


def upsample_linear_triton(x, factors):
    """``F.interpolate(x, scale_factor=factors, mode="bilinear" / "trilinear", align_corners=False)`` for x
    (B, C, H, W) / (B, C, D, H, W) and one integer factor >= 1 per spatial axis (an int: the same for every axis).
    The output is a new contiguous tensor in x's dtype; the backward is deterministic (no atomics)."""
    nd = x.dim() - 2
    if isinstance(factors, int):
        factors = (factors,) * max(nd, 0)
    factors = tuple(factors)
    if nd not in (2, 3) or len(factors) != nd or not all(
            isinstance(f, int) and not isinstance(f, bool) and f >= 1 for f in factors):
        raise ValueError(f"upsample_linear_triton: x must be (B, C, H, W) or (B, C, D, H, W) with one integer factor "
                         f">= 1 per spatial axis; got {tuple(x.shape)} and {factors}")
    rows = math.prod(x.shape[:-1]) * math.prod(factors[:-1])
    if rows >= 2 ** 31:
        raise ValueError(f"upsample_linear_triton: {rows} output rows; at most 2**31 - 1")
    return _UpsampleLinearFn.apply(x, factors)
