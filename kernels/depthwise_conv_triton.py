"""Depthwise 3D convolution (stride 1, 'same' padding, odd kernel sizes) in Triton: forward and backward.

    y[b, c, d, h, w] = bias[c] + sum_{i, j, l} wt[c, 0, i, j, l] x[b, c, d + i - KD//2, h + j - KH//2, w + l - KW//2]

(x = 0 outside the map), i.e. ``F.conv3d(x, wt, bias, padding=(KD//2, KH//2, KW//2), groups=C)``; a 2D map
(b, C, H, W) with a (C, 1, KH, KW) kernel runs as D = 1, KD = 1. It replaces PyTorch's ``conv_depthwise3d`` CUDA
kernels, whose weight gradient alone takes ~4 ms for a (2, 32, 128^3) fp32 map and a 3x3x3 kernel on an H200.

Layout. x may have any strides (int64 offsets throughout); two layouts matter: channels-first contiguous
(b, C, D, H, W) and channels_last_3d (channel stride 1). y and the input gradient are allocated in x's layout
(channel stride 1 in, channels_last_3d out; otherwise contiguous). A program owns a tile of BH x BW voxels of one
(b, d) plane x BC channels, powers of two filled along the axes in memory order (``_plan``; a block that does not
cover its axis is, where possible, one that divides it): channels (at most 64), then W, then H for a channels-last
map (32 voxels of a row x 32 channels at C = 32); W (at most 128), then H, then channels for a channels-first one
(8 rows x 128 columns of one channel plane at W = 128; small planes take several channels per tile).

* **Forward** (one tile per program; grid: spatial tiles, depth slowest, x channel blocks x batch): a loop over the
  KD kernel planes, each unrolled over its KH KW taps: a load of the tile shifted by the tap's voxel offset (masked
  at the map's border) times the channels' weights. The shifted tiles overlap, so all but the first touch of each
  voxel come from cache (programs of neighbouring depths run close together).
* **Input gradient**: gx is the same convolution of gy with the kernel flipped in all three axes (correlation vs.
  convolution), without bias: the forward kernel with the flat tap index reversed.
* **Weight and bias gradients**: gw[c, t] = sum_v gy[v, c] x[v + tap t, c], gb[c] = sum_v gy[v, c]. A fixed number
  P of programs per channel block walk the (b, d, h block, w block) tiles (program p takes tiles p, p + P, ...).
  The taps are a tensor axis (BT = the tap count padded to a power of two; each tile's x is a gathered load of
  shape voxels x channels x taps), so the sums stay in fp32 registers across tiles. Each program writes its
  (BC, taps + 1) sums to a (P, C, taps + 1) buffer summed on the host: no atomics, bitwise repeatable.

Inputs may be fp32, bf16 or fp16; the arithmetic is fp32. Outputs and gx have x's dtype, gw / gb the weight's / the
bias's.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached_launch
from .tuning import sm_count

FWD_TILE = 1024  # voxels x channels per forward / input-gradient program (half that above 3x3 taps a kernel plane)
BWD_TILE = 8192  # voxels x channels x padded taps per weight-gradient program: its fp32 sums, 64 a thread
BWD_PROGRAMS_PER_SM = 16  # weight-gradient programs per SM, all channel blocks together
BWD_PROGRAMS_CPU = 4  # weight-gradient programs per channel block, for the interpreter on CPU


@triton.jit
def _tile(s, pid_c, C, H, W, n_h, n_w, BH: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """Spatial tile s of a (D, H, W) map (depth slowest, then blocks of BH rows, then blocks of BW columns): its depth
    d, the row h and column w of each of its BH * BW voxels (row-major), its channels rc and the (voxels, channels)
    mask of those inside the map."""
    d = s // (n_h * n_w)
    r = tl.arange(0, BH * BW)
    h = s // n_w % n_h * BH + r // BW
    w = s % n_w * BW + r % BW
    rc = pid_c * BC + tl.arange(0, BC)
    return d, h, w, rc, ((h < H) & (w < W))[:, None] & (rc < C)[None, :]


@triton.jit
def _offsets(b, d, h, w, rc, s_b, s_c, s_d, s_h, s_w):
    """int64 element offsets (voxels, channels) of a tile."""
    return (b.to(tl.int64) * s_b + d.to(tl.int64) * s_d + (h.to(tl.int64) * s_h + w.to(tl.int64) * s_w)[:, None]
            + (rc.to(tl.int64) * s_c)[None, :])


@triton.jit
def _tap(t, s_d, s_h, s_w, KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr):
    """Tap t (the flat index into the (KD, KH, KW) kernel): its voxel offsets (od, oh, ow) from the kernel's centre
    and the int64 element offset they make."""
    od = t // (KH * KW) - KD // 2
    oh = t // KW % KH - KH // 2
    ow = t % KW - KW // 2
    return od, oh, ow, tl.cast(od, tl.int64) * s_d + tl.cast(oh, tl.int64) * s_h + tl.cast(ow, tl.int64) * s_w


@triton.jit
def _inside(d, h, w, D, H, W):
    """Whether voxel (d, h, w) lies in the (D, H, W) map."""
    return (d >= 0) & (d < D) & (h >= 0) & (h < H) & (w >= 0) & (w < W)


@cached_launch
@triton.jit
def _dw_conv_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, C, D, H, W, n_h, n_w,
                    s_xb, s_xc, s_xd, s_xh, s_xw, s_yb, s_yc, s_yd, s_yh, s_yw,
                    KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BH: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr):
    """One tile of y = bias + sum_t w[t, c] x[v + tap t, c]; w is (KD KH KW, C) fp32 (a tap's channels contiguous).
    Grid: (spatial tiles, channel blocks, batch)."""
    b = tl.program_id(2)
    d, h, w, rc, m = _tile(tl.program_id(0), tl.program_id(1), C, H, W, n_h, n_w, BH, BW, BC)
    cm = rc < C
    x_tile = x_ptr + _offsets(b, d, h, w, rc, s_xb, s_xc, s_xd, s_xh, s_xw)
    acc = tl.zeros((BH * BW, BC), tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rc, mask=cm, other=0.0)[None, :]
    for i in range(KD):  # not a static unroll: bounds the loads in flight (registers) for large kernels
        for j in tl.static_range(KH * KW):
            t = i * (KH * KW) + j
            od, oh, ow, shift = _tap(t, s_xd, s_xh, s_xw, KD, KH, KW)
            mt = _inside(d + od, h + oh, w + ow, D, H, W)[:, None] & m
            xv = tl.load(x_tile + shift, mask=mt, other=0.0).to(tl.float32)
            acc += tl.load(w_ptr + t * C + rc, mask=cm, other=0.0)[None, :] * xv
    tl.store(y_ptr + _offsets(b, d, h, w, rc, s_yb, s_yc, s_yd, s_yh, s_yw), acc, mask=m)


@cached_launch
@triton.jit
def _dw_conv_wgrad_kernel(x_ptr, gy_ptr, part_ptr, C, D, H, W, n_h, n_w, n_tiles,
                          s_xb, s_xc, s_xd, s_xh, s_xw, s_gb, s_gc, s_gd, s_gh, s_gw,
                          KD: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr, DW: tl.constexpr,
                          BH: tl.constexpr, BW: tl.constexpr, BC: tl.constexpr, BT: tl.constexpr):
    """Program (p, channel block) sums gw[c, t] = sum_v gy[v, c] x[v + tap t, c] (when DW) and gb[c] = sum_v gy[v, c]
    over the tiles p, p + P, ... of all (b, d) planes into row p of part (P, C, KD KH KW + 1), gb last."""
    T: tl.constexpr = KD * KH * KW
    pid = tl.program_id(0)
    n_s = D * n_h * n_w  # spatial tiles per batch element
    t = tl.arange(0, BT)
    od, oh, ow, shift = _tap(t, s_xd, s_xh, s_xw, KD, KH, KW)
    gw = tl.zeros((BH * BW, BC, BT), tl.float32)
    gb = tl.zeros((BH * BW, BC), tl.float32)
    for u in range(pid, n_tiles, tl.num_programs(0)):
        b = u // n_s
        d, h, w, rc, m = _tile(u % n_s, tl.program_id(1), C, H, W, n_h, n_w, BH, BW, BC)
        gy = tl.load(gy_ptr + _offsets(b, d, h, w, rc, s_gb, s_gc, s_gd, s_gh, s_gw), mask=m, other=0.0)
        gy = gy.to(tl.float32)
        gb += gy
        if DW:
            mt = _inside(d + od[None, :], h[:, None] + oh[None, :], w[:, None] + ow[None, :], D, H, W)
            mt = mt & (t < T)[None, :]
            x_tile = x_ptr + _offsets(b, d, h, w, rc, s_xb, s_xc, s_xd, s_xh, s_xw)
            xv = tl.load(x_tile[:, :, None] + shift[None, None, :], mask=mt[:, None, :] & m[:, :, None], other=0.0)
            gw += gy[:, :, None] * xv.to(tl.float32)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    row = (pid * C + rc) * (T + 1)
    if DW:
        tl.store(part_ptr + row[:, None] + t[None, :], tl.sum(gw, axis=0), mask=(rc < C)[:, None] & (t < T)[None, :])
    tl.store(part_ptr + row + T, tl.sum(gb, axis=0), mask=rc < C)


# ------------------------------------------------------------------------------------------------------------------
# host side


def _channels_last(x):
    """Whether x (b, C, D, H, W) has its channels fastest: then tiles run along the channels and outputs are
    channels_last_3d."""
    return x.shape[1] > 1 and x.stride(1) == 1


def _block(n, cap):
    """A power-of-two block for an axis of length n: the whole axis (padded) if it fits in cap, else the largest of
    cap, cap / 2, cap / 4 that divides n and is at least 8 (no masked remainder), else cap."""
    if n <= cap:
        return triton.next_power_of_2(max(n, 1))
    return next((b for b in (cap, cap // 2, cap // 4) if b >= 8 and n % b == 0), cap)


def _plan(C, H, W, channels_last, elems):
    """Tile (BH, BW, BC) of at most `elems` voxels x channels, filled along the axes in memory order."""
    if channels_last:
        BC = _block(C, min(64, elems))
        BW = _block(W, elems // BC)
        BH = _block(H, elems // (BC * BW))
    else:
        BW = _block(W, min(128, elems))
        BH = _block(H, elems // BW)
        BC = _block(C, elems // (BH * BW))
    return BH, BW, BC


def _conv(x, w, ks, bias, channels_last, dtype):
    """The depthwise conv of x (b, C, D, H, W) with w (KD KH KW, C) fp32 and bias (C,) fp32 or None: a new tensor of
    this dtype, channels_last_3d or contiguous."""
    B, C, D, H, W = x.shape
    fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
    y = torch.empty(x.shape, device=x.device, dtype=dtype, memory_format=fmt)
    BH, BW, BC = _plan(C, H, W, channels_last, FWD_TILE if ks[1] * ks[2] <= 9 else FWD_TILE // 2)  # loads in flight
    n_h, n_w = triton.cdiv(H, BH), triton.cdiv(W, BW)
    if y.numel():
        _dw_conv_kernel[(D * n_h * n_w, triton.cdiv(C, BC), B)](
            x, w, bias if bias is not None else w, y, C, D, H, W, n_h, n_w, *x.stride(), *y.stride(),
            KD=ks[0], KH=ks[1], KW=ks[2], HAS_BIAS=bias is not None, BH=BH, BW=BW, BC=BC, num_warps=4)
    return y


def _weight_bias_grad(x, gy, ks, want_w):
    """(C, KD KH KW + 1) fp32: the weight gradient's taps (when want_w) and the bias gradient last."""
    B, C, D, H, W = x.shape
    T = ks[0] * ks[1] * ks[2]
    BT = triton.next_power_of_2(T)
    tile = BWD_TILE if BT <= 32 else BWD_TILE // 2  # more taps than a thread holds: per-element tap offsets, registers
    BH, BW, BC = _plan(C, H, W, _channels_last(x), max(1, tile // max(BT, 2)))  # at 1 tap, the bias sums count double
    n_h, n_w, n_c = triton.cdiv(H, BH), triton.cdiv(W, BW), triton.cdiv(C, BC)
    n_tiles = B * D * n_h * n_w
    dev = x.device
    P = BWD_PROGRAMS_PER_SM * sm_count(dev, 0) // n_c if dev.type == "cuda" else BWD_PROGRAMS_CPU
    P = max(1, min(n_tiles, P))
    part = (torch.empty if x.numel() else torch.zeros)(P, C, T + 1, device=dev, dtype=torch.float32)
    if x.numel():
        _dw_conv_wgrad_kernel[(P, n_c)](x, gy, part, C, D, H, W, n_h, n_w, n_tiles, *x.stride(), *gy.stride(),
                                        KD=ks[0], KH=ks[1], KW=ks[2], DW=want_w, BH=BH, BW=BW, BC=BC, BT=BT,
                                        num_warps=4)
    return part.sum(0)


class _DepthwiseConvFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias):
        C, ks = x.shape[1], tuple(weight.shape[2:])
        w = weight.reshape(C, -1).t().float().contiguous()  # (taps, C)
        bf = bias.float().contiguous() if bias is not None else None
        y = _conv(x, w, ks, bf, _channels_last(x), x.dtype)
        ctx.save_for_backward(x, w)
        ctx.meta = (ks, weight.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w = ctx.saved_tensors
        ks, w_dtype, b_dtype = ctx.meta
        want_x, want_w, want_b = ctx.needs_input_grad
        gx = gw = gb = None
        if want_x:  # reversing the flat tap index flips the kernel in all three axes
            gx = _conv(gy, w.flip(0), ks, None, _channels_last(x), x.dtype)
        if want_w or want_b:
            sums = _weight_bias_grad(x, gy, ks, want_w)
            T = w.shape[0]
            gw = sums[:, :T].reshape(x.shape[1], 1, *ks).to(w_dtype) if want_w else None
            gb = sums[:, T].to(b_dtype) if want_b else None
        return gx, gw, gb


def depthwise_conv_triton(x, weight, bias=None):
    """``F.conv3d(x, weight, bias, padding=k // 2, groups=C)`` for x (b, C, D, H, W) and weight (C, 1, kd, kh, kw),
    or ``F.conv2d`` likewise for x (b, C, H, W) and weight (C, 1, kh, kw); odd kernel sizes, bias (C,) or None. The
    output is a new tensor in x's dtype, channels-last when x's channel stride is 1, else contiguous."""
    C = x.shape[1] if x.dim() > 1 else -1
    if (x.dim() not in (4, 5) or weight.dim() != x.dim() or tuple(weight.shape[:2]) != (C, 1)
            or any(k % 2 == 0 for k in weight.shape[2:]) or bias is not None and tuple(bias.shape) != (C,)):
        raise ValueError(f"depthwise_conv_triton: x must be (b, C, [D,] H, W), weight (C, 1, [kd,] kh, kw) with odd "
                         f"sizes and bias (C,) or None; got {tuple(x.shape)}, {tuple(weight.shape)} and "
                         f"{None if bias is None else tuple(bias.shape)}")
    if x.dim() == 4:
        return _DepthwiseConvFn.apply(x.unsqueeze(2), weight.unsqueeze(2), bias).squeeze(2)
    return _DepthwiseConvFn.apply(x, weight, bias)
