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
BLOCK-sized steps and writes one set of partial sums (tiny (N, C, P) buffers; no atomics: bitwise repeatable for a
given device and shape), which a small kernel reduces into the per-row coefficients of the elementwise pass that
follows (normalising, or the input gradient), one program per BLOCK of a row. The host only allocates buffers and
launches (three kernels a pass, forward or backward, four with the input gradient): each small PyTorch op would cost
it 5-12 us, and the network calls this op dozens of times a step.

* **Forward**. Pass 1 (``_stats_kernel``): each lane keeps a running mean and M2 (sum of squared deviations from
  that mean, Welford's update) of x - k over its steps, k = the chunk's first element; the program merges its lanes
  into the chunk's mean and M2. ``_coef_kernel`` (one program per (n, g)) merges the chunks of a group's channels
  in fp64 with Chan's parallel formula, mean = sum(n_i mean_i) / n and M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2),
  the counts n_i following from the plan (the stats kernel stores none), rstd = fp32(1 / sqrt(var + eps)) from
  fp64, and writes per (n, c) row the mean as hi + lo (below), scale = rstd w and shift = b. Pass 2
  (``_affine_kernel``): y = (x - mean) * scale + shift. Saved for backward: x, mean (fp64, (N, G)), rstd (fp32;
  not y; with ``relu`` also the bias, a reference).
* **Backward**. With xhat = (x - mean) rstd and g = gy w: pass 1 (``_grad_sums_kernel``) gives per-(n, c) sums
  Sg = sum gy and Sx = sum gy (x - mean), with the mean's hi + lo per row from ``_coef_kernel`` again (reading the
  saved statistics). ``_grad_coef_kernel`` (one program per group, over the samples): dw[c] = sum_n rstd Sx,
  db[c] = sum_n Sg and, over group g of M = S C / G elements, m1 = mean(g) = sum_c w Sg / M and
  m2 = mean(g xhat) = sum_c w rstd Sx / M; then dx = rstd (g - m1 - xhat m2) = a gy + b' (x - mean) + c' with
  a = rstd w, b' = -rstd^2 m2, c' = -rstd m1 per (n, c): pass 2 is the same elementwise kernel with the gy term.
* **Fused ReLU** (``relu=True``; LightM-UNet's ``act(norm(x))``): the forward's pass 2 stores max(y, 0). The
  backward masks gy to gy [y_pre > 0] (relu'(0) = 0, as ``threshold_backward``) and then runs the GroupNorm backward
  above on it, with y_pre = (x - mean) scale + shift recomputed from x and the saved statistics inside both backward
  passes (the sums pass and the elementwise pass): no output or mask is saved and there is no extra pass over the
  map. ``_coef_kernel`` gives the backward the same fp32 scale and shift as the forward's, and both kernels compute
  y_pre as the same ``fma`` of the same fp32 operands, so the backward's mask is exactly the forward's sign of y_pre.

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
import struct

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


@cached_launch
@triton.jit
def _coef_kernel(part_ptr, mean_ptr, rstd_ptr, w_ptr, b_ptr, hi_ptr, lo_ptr, s_ptr, t_ptr, C, cpg, S, chunk, P,
                 eps_bits, MERGE: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr, BLOCK_L: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """One program per (n, g) (pid = n G + g). MERGE: the group's statistics from the partial triples
    part[pid cpg P + j] = (k, mean - k, M2) of its cpg P (channel, chunk) pieces j, by Chan's merge in fp64 (the
    piece counts from the plan), stored as mean[pid] (fp64) and rstd[pid] (fp32, rounded from the fp64 1 / sqrt(var +
    eps), eps given by its fp64 bits); else both loaded from there. Then per row n C + c of the group's channels c
    (dense fp32 (N C,) vectors): the mean as hi + lo (hi = fp32(mean), lo = fp32(mean - hi)), s = rstd w[c] and
    t = b[c] (rstd and 0 without w, b)."""
    pid = tl.program_id(0)
    if MERGE:
        j = tl.arange(0, BLOCK_L)
        inside = j < cpg * P
        piece = part_ptr + 3 * (pid * cpg * P + j)
        mean_p = (tl.load(piece, mask=inside, other=0.0).to(tl.float64)
                  + tl.load(piece + 1, mask=inside, other=0.0).to(tl.float64))
        m2 = tl.load(piece + 2, mask=inside, other=0.0).to(tl.float64)
        cnt = tl.where(inside, tl.minimum(S - (j % P).to(tl.int64) * chunk, chunk), 0).to(tl.float64)
        n = tl.sum(cnt, axis=0)  # cpg S, exactly
        mean = tl.sum(cnt * mean_p, axis=0) / n
        dev = mean_p - mean
        var = (tl.sum(m2, axis=0) + tl.sum(cnt * (dev * dev), axis=0)) / n
        rstd = (1.0 / tl.sqrt(var + eps_bits.to(tl.int64).to(tl.float64, bitcast=True))).to(tl.float32)
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
    else:
        mean = tl.load(mean_ptr + pid)
        rstd = tl.load(rstd_ptr + pid)
    i = tl.arange(0, BLOCK_C)
    inside_c = i < cpg
    row = pid * cpg + i
    hi = mean.to(tl.float32)
    tl.store(hi_ptr + row, hi, mask=inside_c)
    tl.store(lo_ptr + row, (mean - hi.to(tl.float64)).to(tl.float32), mask=inside_c)
    if HAS_W:
        tl.store(s_ptr + row, rstd * tl.load(w_ptr + row % C, mask=inside_c, other=0.0).to(tl.float32), mask=inside_c)
    else:
        tl.store(s_ptr + row, rstd, mask=inside_c)
    if HAS_B:
        tl.store(t_ptr + row, tl.load(b_ptr + row % C, mask=inside_c, other=0.0).to(tl.float32), mask=inside_c)
    else:
        tl.store(t_ptr + row, 0.0, mask=inside_c)


@cached_launch
@triton.jit
def _grad_coef_kernel(part_ptr, rstd_ptr, w_ptr, a_ptr, s_ptr, t_ptr, dw_ptr, db_ptr, N, C, G, cpg, M, P,
                      HAS_W: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr, NEED_B: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """One program per group g, over the samples n in turn. From the sums pass's partials part[(n C + c) P + p] =
    (Sg, Sx): per (n, c) Sg and Sx summed over the P chunks; NEED_W / NEED_B: dw[c] = sum_n rstd Sx and
    db[c] = sum_n Sg (stored in their buffers' dtypes); NEED_X: the input gradient's per-row coefficients a = rstd w,
    s = -rstd^2 m2 and t = -rstd m1, m1 = sum_c w Sg / M and m2 = sum_c w rstd Sx / M over the group's M = cpg S
    elements (w = 1 without HAS_W)."""
    g = tl.program_id(0)
    i = tl.arange(0, BLOCK_C)
    inside = i < cpg
    c = g * cpg + i
    p = tl.arange(0, BLOCK_P)
    both = inside[:, None] & (p < P)[None, :]
    if HAS_W:
        w = tl.load(w_ptr + c, mask=inside, other=0.0).to(tl.float32)
    else:
        w = tl.where(inside, 1.0, 0.0)
    dw = tl.zeros((BLOCK_C,), tl.float32)
    db = tl.zeros((BLOCK_C,), tl.float32)
    for n in range(N):
        row = n * C + c
        r = tl.load(rstd_ptr + n * G + g)
        piece = part_ptr + 2 * (row[:, None] * P + p[None, :])
        sg = tl.sum(tl.load(piece, mask=both, other=0.0), axis=1)
        sx = tl.sum(tl.load(piece + 1, mask=both, other=0.0), axis=1)
        dw += r * sx
        db += sg
        if NEED_X:
            m1 = tl.sum(w * sg, axis=0) / M  # group mean of gy w
            m2 = tl.sum(w * r * sx, axis=0) / M  # group mean of gy w xhat
            tl.store(a_ptr + row, r * w, mask=inside)
            tl.store(s_ptr + row, -r * r * m2, mask=inside)
            tl.store(t_ptr + row, -r * m1, mask=inside)
    if NEED_W:
        tl.store(dw_ptr + c, dw, mask=inside)
    if NEED_B:
        tl.store(db_ptr + c, db, mask=inside)


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


def _coefficients(part, mean, rstd, weight, bias, hi, lo, s, t, S=1, chunk=1, P=1, eps=0.0):
    """``_coef_kernel``: with ``part`` the statistics merged from it into ``mean`` / ``rstd`` first (forward), else
    read from them (backward). Writes the dense fp32 (N C,) rows hi, lo, s, t."""
    N, G = mean.shape
    cpg = hi.numel() // (N * G)
    _coef_kernel[(N * G,)](mean if part is None else part, mean, rstd, rstd if weight is None else weight,
                           rstd if bias is None else bias, hi, lo, s, t, G * cpg, cpg, S, chunk, P,
                           struct.unpack("<q", struct.pack("<d", eps))[0], MERGE=part is not None,
                           HAS_W=weight is not None, HAS_B=bias is not None,
                           BLOCK_L=triton.next_power_of_2(cpg * P) if part is not None else 1,
                           BLOCK_C=triton.next_power_of_2(cpg), enable_fp_fusion=False)


def _affine(x, gy, out, hi, lo, s, t, a=None, relu=False, mask=None):
    """out = (x - (hi + lo)) s + t [+ a gy] with per-(n, c) coefficients as dense fp32 (N C,) rows; a with gy.
    Forward (no gy): ``relu`` clamps out at 0. Backward: ``mask`` = (ms, mt) zeroes gy where the pre-activation
    (x - (hi + lo)) ms + mt is <= 0."""
    N, C = x.shape[:2]
    S = x.numel() // (N * C)
    block, warps = _block(S)
    n_blocks = triton.cdiv(S, block)
    has_gy = gy is not None
    ms, mt = mask if mask is not None else (s, t)
    _affine_kernel[(N * C * n_blocks,)](x, gy if has_gy else x, hi, lo, s, t, a if has_gy else s, ms, mt, out, S,
                                        n_blocks, HAS_GY=has_gy, RELU=bool(relu or mask is not None), BLOCK=block,
                                        num_warps=warps)


class _GroupNormFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, G, eps, relu):
        x = x.contiguous()
        weight = weight.contiguous() if weight is not None else None
        bias = bias.contiguous() if bias is not None else None
        N, C = x.shape[:2]
        S = math.prod(x.shape[2:])
        block, warps, chunk, P = _plan(N * C, S, x.device)
        part = torch.empty(N * C * P, 3, device=x.device, dtype=torch.float32)
        _stats_kernel[(N * C * P,)](x, part, S, chunk, P, BLOCK=block, num_warps=warps)
        mean = torch.empty(N, G, device=x.device, dtype=torch.float64)
        rstd = torch.empty(N, G, device=x.device, dtype=torch.float32)
        hi, lo, s, t = torch.empty(4, N * C, device=x.device, dtype=torch.float32)
        _coefficients(part, mean, rstd, weight, bias, hi, lo, s, t, S, chunk, P, eps)
        y = torch.empty_like(x)
        _affine(x, None, y, hi, lo, s, t, relu=relu)
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
        G = mean.shape[1]
        S, cpg = math.prod(x.shape[2:]), C // G
        block, warps, chunk, P = _plan(N * C, S, x.device)
        # per row: the mean as hi + lo, the forward's scale and shift (ms, mt: the same fp32 values, for the relu
        # mask in both passes) and the input gradient's coefficients a, s, t
        hi, lo, ms, mt, a, s, t = torch.empty(7, N * C, device=x.device, dtype=torch.float32)
        _coefficients(None, mean, rstd, weight, bias, hi, lo, ms, mt)
        part = torch.empty(N * C * P, 2, device=x.device, dtype=torch.float32)
        _grad_sums_kernel[(N * C * P,)](gy, x, hi, lo, ms, mt, part, S, chunk, P, RELU=ctx.relu, BLOCK=block,
                                        num_warps=warps)
        dw = torch.empty(C, device=x.device, dtype=weight.dtype) if need_w else None
        db = torch.empty(C, device=x.device, dtype=ctx.bias_dtype) if need_b else None
        _grad_coef_kernel[(G,)](part, rstd, rstd if weight is None else weight, a, s, t, rstd if dw is None else dw,
                                rstd if db is None else db, N, C, G, cpg, cpg * S, P, HAS_W=weight is not None,
                                NEED_X=need_x, NEED_W=need_w, NEED_B=need_b, BLOCK_C=triton.next_power_of_2(cpg),
                                BLOCK_P=triton.next_power_of_2(P))
        gx = None
        if need_x:
            gx = torch.empty_like(x)
            _affine(x, gy, gx, hi, lo, s, t, a, mask=(ms, mt) if ctx.relu else None)
        return gx, dw, db, None, None, None


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
