"""Causal depthwise 1D convolution + SiLU on token-major tensors, in Triton (the Mamba mixer's ``conv1d`` + ``act``).

    y[b, l, c] = silu(bias[c] + sum_k w[c, k] * x[b, l - (K-1) + k, c])        (x = 0 before the sequence start)

which is ``silu(conv1d(x.transpose(1, 2), w[:, None], bias, padding=K-1, groups=C)[..., :L]).transpose(1, 2)``.
The tensors are (b, L, C) with the channels fastest in memory, the layout a ``Linear`` produces, so the mixer never
transposes to (b, C, L) and back. Inputs may be fp32, bf16 or fp16 with any strides; the arithmetic is fp32.

Forward: a program owns a (BL, BC) tile of positions x channels; the K shifted input tiles it reads overlap, so they
come from cache.

Backward: gx[l] = sum_s w[K-1-s] ga[l+s] with ga = gy * silu'(a) (a the pre-activation, recomputed, not stored),
gw[k] = sum_l ga[l] x[l-(K-1)+k] and gb = sum_l ga[l]: shifts along the sequence, which a Triton register tile
cannot make. So the backward *streams*: a program owns T segments of R consecutive positions (x BC channels) and
walks them in lockstep, one position per step, a (T, BC) tile per step. The last K-1 inputs and ga's of each
segment stay in registers (tuples shifted by one each step), so a step loads x and gy once, evaluates the
pre-activation and ga once, stores one row of gx (K-1 steps behind) and adds to the weight/bias sums; the only
extra reads are a segment's halo (its K-1 neighbouring rows on either side: 2(K-1)/R more reads of x, (K-1)/R of
gy). The tile kernel this replaced recomputed the pre-activation for each of the K shifts: K*K + 2K tile loads per
output tile (24 for K = 4, mostly cache hits) and ~K times the arithmetic. The alternatives weighed: ga through
DRAM between two kernels adds 8 bytes per element to the 12 (fp32) of reading x, gy and writing gx; a halo'd 2D
tile re-reads ga K times from a scratch buffer or ``tl.gather`` (shared memory) and wastes the halo rows' work;
streaming needs neither, and no data crosses threads. Its steps are sequential per program, so the loads are
software-pipelined through shared memory (``num_stages``; U >= K-1 steps per loop iteration, see the kernel) to keep
enough bytes in flight, and R is chosen to leave enough programs per SM. The weight and bias gradients are
per-program partial sums reduced on the host (no atomics: bitwise repeatable for a given shape).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached_launch
from .tuning import sm_count, tuning_setter


@triton.jit
def _tile(pid_l, pid_c, C, BL: tl.constexpr, BC: tl.constexpr):
    rl = (pid_l * BL + tl.arange(0, BL)).to(tl.int64)  # positions x row strides can pass 2**31 elements
    rc = pid_c * BC + tl.arange(0, BC)
    return rl, rc, rc < C


@triton.jit
def _pre_activation(x_base, w_ptr, bias_ptr, rl, rc, cm, L, s_xl, s_xc,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """a[l] = bias + sum_k w[k] x[l - (K-1) + k] over the tile's rows l, and whether l is inside the sequence."""
    acc = tl.zeros((BL, BC), tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rc, mask=cm, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        q = rl - (K - 1) + k
        m = ((q >= 0) & (q < L))[:, None] & cm[None, :]
        xv = tl.load(x_base + q[:, None] * s_xl + rc[None, :] * s_xc, mask=m, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + rc * K + k, mask=cm, other=0.0).to(tl.float32)[None, :] * xv
    return acc, rl < L


@cached_launch
@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, L, C, s_xb, s_xl, s_xc, s_yb, s_yl, s_yc,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    rl, rc, cm = _tile(tl.program_id(0), tl.program_id(1), C, BL, BC)
    a, inside = _pre_activation(x_ptr + b * s_xb, w_ptr, bias_ptr, rl, rc, cm, L, s_xl, s_xc, K, HAS_BIAS, BL, BC)
    y = a * tl.sigmoid(a)
    tl.store(y_ptr + b * s_yb + rl[:, None] * s_yl + rc[None, :] * s_yc, y, mask=inside[:, None] & cm[None, :])


@cached_launch
@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, gy_ptr, gx_ptr, part_ptr, L, C, R,
                     s_xb, s_xl, s_xc, s_gb, s_gl, s_gc, s_hb, s_hl, s_hc, K: tl.constexpr, HAS_BIAS: tl.constexpr,
                     T: tl.constexpr, BC: tl.constexpr, U: tl.constexpr, STAGES: tl.constexpr):
    """T segments of R positions x BC channels, walked in lockstep: the step at offset i (1-K <= i < R+K-1) loads
    x and gy at p = start + i, forms ga[p], stores gx[p-(K-1)] and, for 0 <= i < R, adds ga[p] into the sums
    gw[k] (times x[p-(K-1)+k]) and gb, which go to rows 0..K-1 and K of this program's (K + 1, C) block of part."""
    pid_l = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    rc = tl.program_id(1) * BC + tl.arange(0, BC)
    cm = rc < C
    start = (pid_l * T + tl.arange(0, T)).to(tl.int64) * R  # positions x row strides can pass 2**31 elements
    x_base = x_ptr + b * s_xb + rc.to(tl.int64)[None, :] * s_xc
    gy_base = gy_ptr + b * s_gb + rc.to(tl.int64)[None, :] * s_gc
    gx_base = gx_ptr + b * s_hb + rc.to(tl.int64)[None, :] * s_hc
    w = ()  # w[k] as (1, BC) rows
    for k in tl.static_range(K):
        w = w + (tl.load(w_ptr + rc * K + k, mask=cm, other=0.0)[None, :],)
    a0 = tl.zeros((T, BC), tl.float32)
    if HAS_BIAS:
        a0 += tl.load(bias_ptr + rc, mask=cm, other=0.0)[None, :]
    zero = tl.zeros((T, BC), tl.float32)
    xs = (zero,) * (K - 1)  # x[p-(K-1)], ..., x[p-1]
    gas = (zero,) * (K - 1)  # ga[p-(K-1)], ..., ga[p-1]
    gw = (zero,) * K
    gb = zero
    # U >= K-1 steps per loop iteration: the windows' shifts then resolve at compile time (a window value carried
    # unchanged from iteration to iteration, an iter_arg yielded as another, stops Triton 3.x from pipelining the
    # loads); steps past R+K-2 are masked out
    for j in tl.range(0, tl.cdiv(R + 2 * K - 2, U), num_stages=STAGES):
        for u in tl.static_range(U):
            i = j * U + u + 1 - K
            p = start + i
            m = ((p >= 0) & (p < L))[:, None] & cm[None, :]
            xv = tl.load(x_base + p[:, None] * s_xl, mask=m, other=0.0).to(tl.float32)
            a = a0 + w[K - 1] * xv
            for k in tl.static_range(K - 1):
                a += w[k] * xs[k]
            mg = m & (i >= 0) & (i < R + K - 1)  # no ga before the segment (the neighbour's) or past the last step
            gy = tl.load(gy_base + p[:, None] * s_gl, mask=mg, other=0.0).to(tl.float32)
            sg = tl.sigmoid(a)
            ga = tl.where(mg, gy * sg * (1.0 + a * (1.0 - sg)), 0.0)
            gx = w[0] * ga  # gx[p-(K-1)]: ga[p-(K-1)+s] through the tap K-1-s
            for s in tl.static_range(K - 1):
                gx += w[K - 1 - s] * gas[s]
            q = p - (K - 1)
            tl.store(gx_base + q[:, None] * s_hl, gx,
                     mask=((q < L) & (i >= K - 1) & (i < R + K - 1))[:, None] & cm[None, :])
            own = tl.where(i < R, ga, 0.0)  # ga after the segment is its neighbour's
            gb += own
            gw_new = ()
            for k in tl.static_range(K - 1):
                gw_new = gw_new + (gw[k] + own * xs[k],)
            gw = gw_new + (gw[K - 1] + own * xv,)
            if K > 1:
                xs = xs[1:] + (xv,)
                gas = gas[1:] + (ga,)
    prow = (b * tl.num_programs(0) + pid_l) * (K + 1)
    for k in tl.static_range(K):
        tl.store(part_ptr + (prow + k) * C + rc, tl.sum(gw[k], axis=0), mask=cm)
    tl.store(part_ptr + (prow + K) * C + rc, tl.sum(gb, axis=0), mask=cm)


def _plan(C):
    BC = min(64, triton.next_power_of_2(C))
    return max(16, 4096 // BC), BC


# Backward launch-plan overrides (benchmark sweeps, tests); empty = the defaults of _bwd_plan. Keys: T (segments per
# program), BC (channels per program), R (positions per segment), U (steps per loop iteration; at least K-1),
# per_sm (programs per SM the segment length aims at when R is not given), warps (num_warps), stages (software
# pipelining of the step loads, num_stages; 1 = none).
_OVERRIDE: dict = {}
_TUNING_KEYS = ("T", "BC", "R", "U", "per_sm", "warps", "stages")


set_tuning = tuning_setter(_OVERRIDE, _TUNING_KEYS)


def _bwd_plan(b, L, C, K, device):
    """(T, BC, R, U, warps, stages). Defaults, to be swept on the GPU: 8 segments x 64 channels per program (4 warps,
    fp32: 4 channels of one row per thread, ~126 registers at K = 4), segments as long as leaves ~per_sm = 16
    programs per SM (at least 32 positions, for the halo; at most 1024), U = K-1, num_stages = 3 (the loads of two
    loop iterations ahead in flight)."""
    o = _OVERRIDE
    BC = min(o.get("BC", 64), triton.next_power_of_2(C))
    T = o.get("T", 8)
    R = o.get("R")
    if R is None:
        n_sm = sm_count(device, 4)
        rows = b * triton.cdiv(C, BC) * L  # segment positions to cover, over all programs
        R = min(1024, max(32, rows // (T * o.get("per_sm", 16) * n_sm)))
    return T, BC, R, max(K - 1, o.get("U", 1)), o.get("warps", 4), o.get("stages", 3)


class _ConvSiluFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias):
        b, L, C = x.shape
        K = weight.shape[-1]
        w = weight.reshape(C, K).float().contiguous()
        bf = bias.float().contiguous() if bias is not None else None
        y = torch.empty(b, L, C, device=x.device, dtype=x.dtype)
        BL, BC = _plan(C)
        grid = (triton.cdiv(L, BL), triton.cdiv(C, BC), b)
        _conv_fwd_kernel[grid](x, w, bf if bf is not None else w, y, L, C, *x.stride(), *y.stride(),
                               K=K, HAS_BIAS=bf is not None, BL=BL, BC=BC, num_warps=4)
        ctx.save_for_backward(x, w, bf)
        ctx.shapes = (weight.shape, weight.dtype, bias.dtype if bias is not None else None)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, w, bf = ctx.saved_tensors
        w_shape, w_dtype, b_dtype = ctx.shapes
        b, L, C = x.shape
        K = w.shape[1]
        T, BC, R, U, warps, stages = _bwd_plan(b, L, C, K, x.device)
        n_l = triton.cdiv(L, T * R)
        gx = torch.empty(b, L, C, device=x.device, dtype=x.dtype)
        part = torch.empty(b * n_l, K + 1, C, device=x.device, dtype=torch.float32)  # K weight taps + bias
        _conv_bwd_kernel[(n_l, triton.cdiv(C, BC), b)](
            x, w, bf if bf is not None else w, gy, gx, part, L, C, R, *x.stride(), *gy.stride(), *gx.stride(),
            K=K, HAS_BIAS=bf is not None, T=T, BC=BC, U=U, STAGES=stages, num_warps=warps)
        sums = part.sum(0)
        gw = sums[:K].t().reshape(w_shape).to(w_dtype)
        gb = sums[K].to(b_dtype) if b_dtype is not None else None
        return gx, gw, gb


def causal_conv1d_silu_triton(x, weight, bias=None):
    """x: (b, L, C), any strides; weight: (C, K) or (C, 1, K) (an ``nn.Conv1d(C, C, K, groups=C)`` weight); bias: (C,)
    or None. Returns silu(causal depthwise conv) as a new dense (b, L, C) tensor in x's dtype."""
    if x.dim() != 3 or weight.shape[0] != x.shape[2] or weight.numel() % x.shape[2]:
        raise ValueError(f"causal_conv1d_silu: x must be (b, L, C) and weight (C, [1,] K); got {tuple(x.shape)} and "
                         f"{tuple(weight.shape)}")
    return _ConvSiluFn.apply(x, weight, bias)
