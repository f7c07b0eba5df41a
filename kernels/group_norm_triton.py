"""GroupNorm over channels-first maps in Triton, for large maps with few (sample, group) pairs: forward and backward.

    y[n, c, s] = (x[n, c, s] - mean[n, g]) * rstd[n, g] * w[c] + b[c],     g = c // (C / G),
    rstd = 1 / sqrt(var + eps), mean and biased var over the C / G channels x S positions of group g

which is ``F.group_norm(x, G, w, b, eps)`` for x (N, C, *spatial), the spatial axes flattened to S (with ``relu=True``:
``F.relu`` of it, fused, see below). Use case:
nnU-Net-sized maps such as (2, 32, 128^3) with 8 groups, where each (sample, group) holds millions of elements.
PyTorch's CUDA kernels give each (sample, group) (forward statistics) or each (sample, channel) (backward sums,
``ComputeInternalGradientsCUDAKernel``) one thread block: 16 or 64 blocks, most of the GPU idle. Here each (n, c)
row of S contiguous elements is split into P chunks, one reduction program per chunk, P chosen for about
``PROGRAMS_PER_SM`` programs per SM in all (so the partial-sum buffers stay small); a program walks its chunk in
BLOCK-sized steps and writes one set of partial sums, reduced on the host (tiny (N, C, P) tensors; no atomics:
bitwise repeatable for a given device and shape). Normalising and the input gradient are then one elementwise pass
each, one program per BLOCK of a row.

* **Forward**. Pass 1 (``_stats_kernel``): each lane keeps a running mean and M2 (sum of squared deviations from
  that mean, Welford's update) of x - k over its steps, k = the chunk's first element; the program merges its lanes
  into the chunk's mean and M2. The host merges the chunks of a group's channels in fp64 with Chan's parallel
  formula, mean = sum(n_i mean_i) / n and M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2), the counts n_i following
  from the plan (the kernel stores none). Pass 2 (``_affine_kernel``): y = (x - mean) * scale + shift with
  per-(n, c) scale = rstd w and shift = b. Saved for backward: x, mean (fp64, (N, G)), rstd (not y; with ``relu``
  also the bias, a reference).
* **Backward**. With xhat = (x - mean) rstd and g = gy w: pass 1 (``_grad_sums_kernel``) gives per-(n, c) sums
  Sg = sum gy and Sx = sum gy (x - mean). On the host: dw[c] = sum_n rstd Sx, db[c] = sum_n Sg and, over group g of
  M = S C / G elements, m1 = mean(g) = sum_c w Sg / M and m2 = mean(g xhat) = sum_c w rstd Sx / M; then
  dx = rstd (g - m1 - xhat m2) = a gy + b' (x - mean) + c' with a = rstd w, b' = -rstd^2 m2, c' = -rstd m1 per
  (n, c): pass 2 is the same elementwise kernel with the gy term.
* **Fused ReLU** (``relu=True``; LightM-UNet's ``act(norm(x))``): the forward's pass 2 stores max(y, 0). The
  backward masks gy to gy [y_pre > 0] (relu'(0) = 0, as ``threshold_backward``) and then runs the GroupNorm backward
  above on it, with y_pre = (x - mean) scale + shift recomputed from x and the saved statistics inside both backward
  passes (the sums pass and the elementwise pass): no output or mask is saved and there is no extra pass over the
  map. Both kernels compute y_pre as the same ``fma`` of the same fp32 operands, so the backward's mask is exactly
  the forward's sign of y_pre.

Precision: no ``E[x^2] - E[x]^2`` anywhere, and x is always centred before it is scaled or multiplied by gy (not
``x * scale + (b - mean * scale)`` or ``sum gy x - mean sum gy``, whose terms cancel for offset inputs). The mean
reaches the kernels as an unevaluated sum hi + lo of two fp32 numbers and is subtracted as (x - hi) - lo (x - hi is
exact for x within a factor 2 of the mean): an input such as 1000 + randn keeps fp32 accuracy relative to its
spread, where a mean rounded to fp32 alone would cost ulp(1000) / 2 / std ~ 3e-5 (PyTorch's fp32 group norm shows
such errors).

Inputs are made contiguous (channels-first, the layout that matters); x may be fp32, bf16 or fp16, the arithmetic
is fp32, y and dx have x's dtype, dweight / dbias their parameter's. Offsets are int64 (maps can pass 2**31
elements).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import cached_launch
from .tuning import sm_count

BLOCK = 4096  # elements a program handles per step (the next power of 2 >= S when rows are shorter)
PROGRAMS_PER_SM = 4  # reduction programs in all (= partial sums per pass), per SM
PROGRAMS_CPU = 8  # the same in all, for the interpreter on CPU


@triton.jit
def _chunk(S, chunk, P):
    """This reduction program's id, its row (n, c), and the int64 offset and length of its chunk of that row."""
    pid = tl.program_id(0)
    row = pid // P
    start = (pid % P).to(tl.int64) * chunk
    return pid, row, row.to(tl.int64) * S + start, tl.minimum(S - start, chunk)


@cached_launch
@triton.jit
def _stats_kernel(x_ptr, part_ptr, S, chunk, P, BLOCK: tl.constexpr):
    """part[pid] = (k, mean(x) - k, M2) of this program's chunk, k = its first element."""
    pid, _, off, n = _chunk(S, chunk, P)
    k = tl.load(x_ptr + off).to(tl.float32)
    lanes = tl.arange(0, BLOCK)
    mean = tl.zeros((BLOCK,), tl.float32)  # of x - k
    m2 = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, tl.cdiv(n, BLOCK)):
        j = i * BLOCK + lanes
        x = tl.load(x_ptr + off + j, mask=j < n, other=0.0).to(tl.float32) - k
        d = tl.where(j < n, x - mean, 0.0)
        mean += d * (1.0 / (i + 1.0))  # lanes fall off the end only at the last step: a lane in range is at step i
        m2 += d * (x - mean)
    cnt = ((n - lanes + BLOCK - 1) // BLOCK).to(tl.float32)  # steps each lane took
    mean_c = tl.sum(cnt * mean, axis=0) / tl.sum(cnt, axis=0)
    dev = mean - mean_c
    tl.store(part_ptr + 3 * pid, k)
    tl.store(part_ptr + 3 * pid + 1, mean_c)
    tl.store(part_ptr + 3 * pid + 2, tl.sum(m2 + cnt * dev * dev, axis=0))


@cached_launch
@triton.jit
def _grad_sums_kernel(gy_ptr, x_ptr, hi_ptr, lo_ptr, s_ptr, t_ptr, part_ptr, S, chunk, P, RELU: tl.constexpr,
                      BLOCK: tl.constexpr):
    """part[pid] = (sum gy, sum gy (x - mean)) over this program's chunk, mean = hi + lo per (n, c) row; with RELU gy
    is first masked to 0 where the forward's pre-activation (x - mean) s + t (per-row s, t) is <= 0."""
    pid, row, off, n = _chunk(S, chunk, P)
    hi = tl.load(hi_ptr + row)
    lo = tl.load(lo_ptr + row)
    if RELU:
        s = tl.load(s_ptr + row)
        t = tl.load(t_ptr + row)
    lanes = tl.arange(0, BLOCK)
    sg = tl.zeros((BLOCK,), tl.float32)
    sx = tl.zeros((BLOCK,), tl.float32)
    for i in range(0, tl.cdiv(n, BLOCK)):
        j = i * BLOCK + lanes
        gy = tl.load(gy_ptr + off + j, mask=j < n, other=0.0).to(tl.float32)
        x = tl.load(x_ptr + off + j, mask=j < n, other=0.0).to(tl.float32)
        xc = (x - hi) - lo
        if RELU:
            gy = tl.where(tl.fma(xc, s, t) <= 0.0, 0.0, gy)  # relu'(0) = 0; out-of-range lanes have gy = 0 already
        sg += gy
        sx += gy * xc
    tl.store(part_ptr + 2 * pid, tl.sum(sg, axis=0))
    tl.store(part_ptr + 2 * pid + 1, tl.sum(sx, axis=0))


@cached_launch
@triton.jit
def _affine_kernel(x_ptr, gy_ptr, hi_ptr, lo_ptr, s_ptr, t_ptr, a_ptr, ms_ptr, mt_ptr, out_ptr, S, n_blocks,
                   HAS_GY: tl.constexpr, RELU: tl.constexpr, BLOCK: tl.constexpr):
    """out = (x - mean) * s + t [+ a * gy] over one BLOCK of a row, with per-row mean = hi + lo, s, t, a. RELU without
    gy: out = max(out, 0) (NaN stays NaN); with gy: gy is first masked to 0 where the forward's pre-activation
    (x - mean) * ms + mt (per-row ms, mt) is <= 0."""
    pid = tl.program_id(0)
    row = pid // n_blocks
    j = (pid % n_blocks).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    off = row.to(tl.int64) * S + j
    x = tl.load(x_ptr + off, mask=j < S, other=0.0).to(tl.float32)
    xc = (x - tl.load(hi_ptr + row)) - tl.load(lo_ptr + row)
    out = tl.fma(xc, tl.load(s_ptr + row), tl.load(t_ptr + row))
    if HAS_GY:
        gy = tl.load(gy_ptr + off, mask=j < S, other=0.0).to(tl.float32)
        if RELU:
            gy = tl.where(tl.fma(xc, tl.load(ms_ptr + row), tl.load(mt_ptr + row)) <= 0.0, 0.0, gy)
        out += tl.load(a_ptr + row) * gy
    elif RELU:
        out = tl.where(out < 0.0, 0.0, out)
    tl.store(out_ptr + off, out, mask=j < S)


# ------------------------------------------------------------------------------------------------------------------
# host side


def _block(S):
    block = min(BLOCK, triton.next_power_of_2(S))
    return block, max(1, min(8, block // 512))  # and num_warps: 16 elements a thread from 512 on


def _plan(R, S, dev):
    """Reduction plan for R rows of S elements: block, num_warps, chunk length (a multiple of the block) and chunks
    per row P, for about ``PROGRAMS_PER_SM`` programs per SM in all (at least one per row)."""
    block, warps = _block(S)
    n_sm = sm_count(dev, 0)
    per_row = triton.cdiv(PROGRAMS_PER_SM * n_sm if n_sm else PROGRAMS_CPU, R)
    chunk = triton.cdiv(triton.cdiv(S, per_row), block) * block
    return block, warps, chunk, triton.cdiv(S, chunk)


def _rows(t, shape):
    """A per-(n, c) coefficient as a dense fp32 (N C,) vector."""
    return t.float().expand(shape).reshape(-1).contiguous()


def _per_channel(t, cpg):
    """(N, G) per-group values repeated over each group's channels: (N, C)."""
    return t.repeat_interleave(cpg, dim=1)


def _mean_hi_lo(mean, cpg):
    """The (N, G) fp64 group means per channel as an unevaluated sum hi + lo of two fp32 (N, C) tensors."""
    mean = _per_channel(mean, cpg)
    hi = mean.float()
    return hi, (mean - hi.double()).float()


def _affine(x, gy, out, hi, lo, s, t, a=None, relu=False, mask=None):
    """out = (x - (hi + lo)) s + t [+ a gy] with per-(n, c) coefficients (broadcastable to (N, C)); a with gy.
    Forward (no gy): ``relu`` clamps out at 0. Backward: ``mask`` = (ms, mt) zeroes gy where the pre-activation
    (x - (hi + lo)) ms + mt is <= 0."""
    N, C = x.shape[:2]
    S = x.numel() // (N * C)
    block, warps = _block(S)
    n_blocks = triton.cdiv(S, block)
    hi, lo, s, t = (_rows(v, (N, C)) for v in (hi, lo, s, t))
    has_gy = gy is not None
    ms, mt = (_rows(v, (N, C)) for v in mask) if mask is not None else (s, t)
    _affine_kernel[(N * C * n_blocks,)](x, gy if has_gy else x, hi, lo, s, t, _rows(a, (N, C)) if has_gy else s, ms, mt,
                                        out, S, n_blocks, HAS_GY=has_gy, RELU=bool(relu or mask is not None),
                                        BLOCK=block, num_warps=warps)


def _pre_coefficients(x, weight, bias, rstd, cpg):
    """Per-(n, c) scale rstd w and shift b of the pre-activation (x - mean) scale + shift, as the forward's affine
    pass gets them (the backward recomputes the same fp32 values for its ReLU mask)."""
    scale = _per_channel(rstd, cpg)
    return (scale * weight.float() if weight is not None else scale,
            bias if bias is not None else torch.zeros((), device=x.device))


class _GroupNormFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, G, eps, relu):
        x = x.contiguous()
        N, C = x.shape[:2]
        S, cpg = math.prod(x.shape[2:]), C // G
        block, warps, chunk, P = _plan(N * C, S, x.device)
        part = torch.empty(N * C * P, 3, device=x.device, dtype=torch.float32)
        _stats_kernel[(N * C * P,)](x, part, S, chunk, P, BLOCK=block, num_warps=warps)
        # Chan's merge, in fp64, of the (channel, chunk) pieces of each group; the piece counts follow from the plan
        k, dmean, m2 = part.double().view(N, G, cpg * P, 3).unbind(-1)
        cnt = (S - torch.arange(P, device=x.device, dtype=torch.float64) * chunk).clamp(max=chunk).repeat(cpg)
        mean_p = k + dmean
        mean = (cnt * mean_p).sum(-1) / (cpg * S)
        var = (m2.sum(-1) + (cnt * (mean_p - mean[..., None]).square()).sum(-1)) / (cpg * S)
        rstd = (var + eps).rsqrt().float()
        y = torch.empty_like(x)
        _affine(x, None, y, *_mean_hi_lo(mean, cpg), *_pre_coefficients(x, weight, bias, rstd, cpg), relu=relu)
        ctx.save_for_backward(x, weight, bias if relu else None, mean, rstd)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        gy = gy.contiguous()
        N, C = x.shape[:2]
        S, cpg = math.prod(x.shape[2:]), C // mean.shape[1]
        block, warps, chunk, P = _plan(N * C, S, x.device)
        hi, lo = _mean_hi_lo(mean, cpg)
        # with relu: gy masked where the forward's pre-activation was <= 0, in both passes (the same fp32 scale and
        # shift as the forward's)
        mask = _pre_coefficients(x, weight, bias, rstd, cpg) if ctx.relu else None
        hi_r, lo_r = _rows(hi, (N, C)), _rows(lo, (N, C))
        ms, mt = (_rows(v, (N, C)) for v in mask) if mask is not None else (hi_r, lo_r)
        part = torch.empty(N * C, P, 2, device=x.device, dtype=torch.float32)
        _grad_sums_kernel[(N * C * P,)](gy, x, hi_r, lo_r, ms, mt, part, S, chunk, P, RELU=ctx.relu, BLOCK=block,
                                        num_warps=warps)
        sg, sx = part.sum(1).view(N, C, 2).unbind(-1)  # sum gy, sum gy (x - mean) per (n, c), gy masked
        r = _per_channel(rstd, cpg)
        gx = None
        if need_x:
            w = weight.float() if weight is not None else torch.ones(C, device=x.device)
            m1 = (w * sg).view(N, -1, cpg).sum(-1) / (cpg * S)  # group mean of g = gy w
            m2 = (w * r * sx).view(N, -1, cpg).sum(-1) / (cpg * S)  # group mean of g xhat
            gx = torch.empty_like(x)
            _affine(x, gy, gx, hi, lo, -r * r * _per_channel(m2, cpg), -r * _per_channel(m1, cpg), r * w, mask=mask)
        return (gx, (r * sx).sum(0).to(weight.dtype) if need_w else None,
                sg.sum(0).to(ctx.bias_dtype) if need_b else None, None, None, None)


def group_norm_triton(x, weight, bias, num_groups, eps=1e-5, relu=False):
    """``F.group_norm(x, num_groups, weight, bias, eps)`` for x (N, C, *spatial), weight / bias (C,) or None
    (module docstring); ``relu=True``: ``F.relu`` of it, fused (no extra pass or saved tensor)."""
    if x.dim() < 3 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm_triton: x must be (N, C, *spatial) with C divisible by num_groups; got "
                         f"{tuple(x.shape)} and {num_groups} groups")
    for p in (weight, bias):
        if p is not None and p.shape != x.shape[1:2]:
            raise ValueError(f"group_norm_triton: weight / bias must have shape ({x.shape[1]},)")
    return _GroupNormFn.apply(x, weight, bias, int(num_groups), float(eps), bool(relu))
