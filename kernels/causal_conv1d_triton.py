"""Causal depthwise 1D convolution + SiLU on token-major tensors, in Triton (the Mamba mixer's ``conv1d`` + ``act``).

    y[b, l, c] = silu(bias[c] + sum_k w[c, k] * x[b, l - (K-1) + k, c])        (x = 0 before the sequence start)

which is ``silu(conv1d(x.transpose(1, 2), w[:, None], bias, padding=K-1, groups=C)[..., :L]).transpose(1, 2)``.
The tensors are (b, L, C) with the channels fastest in memory, the layout a ``Linear`` produces, so the mixer never
transposes to (b, C, L) and back. A program owns a (BL, BC) tile of positions x channels; the K shifted input tiles
it reads overlap, so they come from cache. The backward recomputes the pre-activation instead of storing it and
writes the weight and bias gradients as per-program partial sums reduced on the host (no atomics: bitwise
repeatable). Inputs may be fp32, bf16 or fp16 with any strides; the arithmetic is fp32.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tile(pid_l, pid_c, C, BL: tl.constexpr, BC: tl.constexpr):
    rl = (pid_l * BL + tl.arange(0, BL)).to(tl.int64)  # positions x row strides can pass 2**31 elements
    rc = pid_c * BC + tl.arange(0, BC)
    return rl, rc, rc < C


@triton.jit
def _pre_activation(x_base, w_ptr, bias_ptr, rl, rc, cm, shift, L, s_xl, s_xc,
                    K: tl.constexpr, HAS_BIAS: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """a[l] = bias + sum_k w[k] x[l + shift - (K-1) + k] over the tile's rows l (shift >= 0), and whether l + shift
    is inside the sequence."""
    p = rl + shift
    acc = tl.zeros((BL, BC), tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rc, mask=cm, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(K):
        q = p - (K - 1) + k
        m = ((q >= 0) & (q < L))[:, None] & cm[None, :]
        xv = tl.load(x_base + q[:, None] * s_xl + rc[None, :] * s_xc, mask=m, other=0.0).to(tl.float32)
        acc += tl.load(w_ptr + rc * K + k, mask=cm, other=0.0).to(tl.float32)[None, :] * xv
    return acc, p < L


@triton.jit
def _conv_fwd_kernel(x_ptr, w_ptr, bias_ptr, y_ptr, L, C, s_xb, s_xl, s_xc, s_yb, s_yl, s_yc,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    rl, rc, cm = _tile(tl.program_id(0), tl.program_id(1), C, BL, BC)
    a, inside = _pre_activation(x_ptr + b * s_xb, w_ptr, bias_ptr, rl, rc, cm, 0, L, s_xl, s_xc, K, HAS_BIAS, BL, BC)
    y = a * tl.sigmoid(a)
    tl.store(y_ptr + b * s_yb + rl[:, None] * s_yl + rc[None, :] * s_yc, y, mask=inside[:, None] & cm[None, :])


@triton.jit
def _conv_bwd_kernel(x_ptr, w_ptr, bias_ptr, gy_ptr, gx_ptr, part_ptr, L, C, n_l,
                     s_xb, s_xl, s_xc, s_gb, s_gl, s_gc, s_hb, s_hl, s_hc,
                     K: tl.constexpr, HAS_BIAS: tl.constexpr, BL: tl.constexpr, BC: tl.constexpr):
    """gx[l] = sum_k w[k] ga[l + (K-1) - k], ga = gy * silu'(a); this tile's sums gw[k] = sum_l ga[l] x[l - (K-1) + k]
    and gb = sum_l ga[l] go to rows 0..K-1 and K of its (K + 1, C) block of part."""
    pid_l = tl.program_id(0)
    b = tl.program_id(2).to(tl.int64)
    rl, rc, cm = _tile(pid_l, tl.program_id(1), C, BL, BC)
    x_base = x_ptr + b * s_xb
    gx = tl.zeros((BL, BC), tl.float32)
    for s in tl.static_range(K):  # ga at l + s feeds gx[l] through the tap K-1-s
        a, inside = _pre_activation(x_base, w_ptr, bias_ptr, rl, rc, cm, s, L, s_xl, s_xc, K, HAS_BIAS, BL, BC)
        m = inside[:, None] & cm[None, :]
        gy = tl.load(gy_ptr + b * s_gb + (rl + s)[:, None] * s_gl + rc[None, :] * s_gc, mask=m, other=0.0)
        sg = tl.sigmoid(a)
        ga = tl.where(m, gy.to(tl.float32) * sg * (1.0 + a * (1.0 - sg)), 0.0)
        gx += tl.load(w_ptr + rc * K + (K - 1 - s), mask=cm, other=0.0).to(tl.float32)[None, :] * ga
        if s == 0:  # this tile's own ga: weight and bias gradient partials
            prow = (b * n_l + pid_l) * (K + 1)
            for k in tl.static_range(K):
                q = rl - (K - 1) + k
                mq = ((q >= 0) & (q < L))[:, None] & cm[None, :]
                xv = tl.load(x_base + q[:, None] * s_xl + rc[None, :] * s_xc, mask=mq, other=0.0).to(tl.float32)
                tl.store(part_ptr + (prow + k) * C + rc, tl.sum(ga * xv, axis=0), mask=cm)
            tl.store(part_ptr + (prow + K) * C + rc, tl.sum(ga, axis=0), mask=cm)
    tl.store(gx_ptr + b * s_hb + rl[:, None] * s_hl + rc[None, :] * s_hc, gx, mask=(rl < L)[:, None] & cm[None, :])


def _plan(C):
    BC = min(64, triton.next_power_of_2(C))
    return max(16, 4096 // BC), BC


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
        BL, BC = _plan(C)
        n_l = triton.cdiv(L, BL)
        gx = torch.empty(b, L, C, device=x.device, dtype=x.dtype)
        part = torch.empty(b * n_l, K + 1, C, device=x.device, dtype=torch.float32)  # K weight taps + bias
        _conv_bwd_kernel[(n_l, triton.cdiv(C, BC), b)](
            x, w, bf if bf is not None else w, gy, gx, part, L, C, n_l, *x.stride(), *gy.stride(),
            *gx.stride(), K=K, HAS_BIAS=bf is not None, BL=BL, BC=BC, num_warps=4)
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
