"""The networks' non-scan ops, each with a PyTorch and a Triton backend: on token-major (b, L, C) tensors

* ``causal_conv1d_silu`` - the mixer's causal depthwise conv + SiLU. Torch: ``F.conv1d`` on the transposed view;
  Triton (``kernels/causal_conv1d_triton.py``): reads and writes (b, L, C) directly, no transposed copies.
* ``layer_norm`` - LayerNorm over C. Torch: ``F.layer_norm``; Triton (``kernels/layer_norm_triton.py``): many rows
  per program (PyTorch's kernel gives each short row its own block).

and on (B, C, *S) feature maps

* ``depthwise_conv`` - a depthwise k^nd conv, stride 1, "same" padding. Torch: ``F.conv2d`` / ``F.conv3d`` with
  ``groups=C`` (PyTorch's own 3D depthwise kernels for fp32); Triton (``kernels/depthwise_conv_triton.py``).
* ``group_norm`` - GroupNorm. Torch: ``F.group_norm`` (one thread block per (sample, group) for the statistics), or
  from ``VAR_MEAN_FROM`` elements statistics from ``torch.var_mean``; Triton (``kernels/group_norm_triton.py``):
  many programs per (sample, channel).
* ``max_pool`` - max pooling with kernel = stride. Torch: ``F.max_pool2d/3d``; Triton
  (``kernels/max_pool_triton.py``): one-byte window indices, a backward without fill or scatter.
* ``upsample`` - bilinear / trilinear up-sampling (``align_corners=False``) by 1 or 2 per axis, plus an optional
  map (a skip connection) in the same pass. Torch: ``F.interpolate`` and an add; Triton
  (``kernels/upsample_triton.py``): a backward that gathers (PyTorch's scatters with atomics).
* ``scaled_add`` - y + s * t with a 1-element s (a residual's learnt scale). Forward: ``torch.addcmul`` (one pass);
  backward: torch ops (``g * s`` and a sum of ``g * t``: three passes), or the Triton kernel
  (``kernels/scaled_add_triton.py``): both gradients from one read of g and t.

``backend="auto"`` takes Triton for CUDA tensors (when installed) from the smallest size at which its GPU time measured
below PyTorch's (kernels/BENCHMARK_mixer_ops.md; ``TRITON_FROM``),
except the depthwise conv of 2D channels-last maps (cuDNN measured faster), else PyTorch.
``NNUNET_MAMBA_TOKEN_OPS_BACKEND`` forces one (benchmarks, debugging). Both backends compute the same function
(Triton: fp32 arithmetic, dense outputs; torch: the conv's output is a transposed view). Nothing here imports triton
at module import time.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .scan import BackendUnavailable, _triton_unavailable

ENV_BACKEND = "NNUNET_MAMBA_TOKEN_OPS_BACKEND"


# smallest measured size (elements) from which the Triton kernel beat PyTorch in GPU kernel time, forward + backward
# (kernels/BENCHMARK_mixer_ops.md, H200, session 10). Kernel time, not the wall time of an isolated call: inside a
# GPU-bound training step the host issues each op while earlier ones run, and below ~1 ms the isolated calls only
# measure the host (the Triton GroupNorm's wall time is ~2 ms at every size). The conv1d, the LayerNorm and the
# depthwise conv won at every measured size (the smallest are listed: for the depthwise conv LightM-UNet's one-channel
# convInit map at 128^3, 22.9x PyTorch's GPU time, session 19); the GroupNorm from 2 x 64 x 64^3.
TRITON_FROM = {"causal-conv1d": 2 * 4096 * 512, "layer-norm": 2 * 4096 * 256, "group-norm": 2 * 64 * 64 ** 3,
               "depthwise-conv": 2 * 128 ** 3, "linear": 2 * 64 ** 3 * 64, "linear-wgrad": 2 * 128 ** 3 * 32,
               "scaled-add": 2 * 32 * 64 ** 3, "max-pool": 2 * 64 * 128 ** 3, "upsample": 2 * 128 * 16 ** 3,
               "pointwise-narrow": 2 * 32 * 128 ** 3, "layer-norm-fold": 2 * 128 ** 3 * 32}
# "linear": the projections' fp32 GEMMs (ops/linear.py), from the smallest operand kernels/bench_linear.py measured
# (2 x 64^3 tokens x 64 channels; H200, session 11: the Triton 3xTF32 GEMM 1.29-1.71x cuBLAS's SGEMM, as accurate);
# "linear-wgrad": their weight gradients, from the output gradient's size (session 13: 2.1-3.2x cuBLAS from 2 x 128^3
# tokens x 32 outputs; at 2 x 64^3 tokens equal or slower)
# "scaled-add": the backward's map; LightM-UNet's 64^3 and 128^3 levels take it. PyTorch's backward is three passes
# (0.38 + 0.37 + 0.28 ms at 2 x 32 x 128^3, H200 profile); with the kernel the step took 251.4 against 253.9 ms
# (H200, session 15, CUDA graphs, same call). Smaller maps not measured
# "upsample": the input map; LightM-UNet's decoder x2 with the skip added, forward + backward, in GPU time 2.90x
# PyTorch's (interpolate + add) at 2 x 32 x 64^3, 3.21x at 2 x 64 x 32^3, 4.47x at 2 x 128 x 16^3 (H200, session 19).
# Smaller maps not measured
# "pointwise-narrow": the wider map of a 1x1(x1) conv with fewer than 16 channels on one side (ops.pointwise_conv);
# LightM-UNet's convInit 1 -> 32 and conv_final 32 -> 3 at 2 x 128^3: 3.4x and 1.3x cuDNN's GPU time (session 19)
# "layer-norm-fold": the LayerNorm's input; a LayerNorm folded into the Linear after it (ops.linear's _NormLinearFn):
# LightM-UNet's in_proj and proj at 2 x 128^3 x 32 (forward + backward GPU time 3.62 -> 3.46 and 2.86 -> 2.22 ms;
# at 2 x 64^3 x 64, 1.34 -> 2.52 and 1.09 -> 1.41 ms: not taken; H200, session 20). Smaller maps not measured
# "max-pool": the pooled map; LightM-UNet's full-resolution down-sampling (2 x 64 x 128^3: PyTorch 0.57 ms forward,
# 0.23 ms fill, 0.61 ms backward, H200 session 16 profile). Smaller maps not measured
# group_norm's torch backend takes its statistics from var_mean from this size (below: F.group_norm): in GPU time
# 3.5x faster than F.group_norm at 2 x 128 x 32^3, 2.0x at 2 x 256 x 16^3 (the smallest measured) on the H200, and
# faster than the Triton kernel below 2 x 64 x 64^3.
VAR_MEAN_FROM = 2 * 256 * 16 ** 3


def _use_triton(op: str, x: torch.Tensor, backend: str, measured_faster: bool = True, size: int | None = None) -> bool:
    """Whether to run the Triton kernel: "auto" takes it from the op's ``TRITON_FROM`` size (of x, or ``size``) where
    the caller's layout rule (``measured_faster``) does not exclude x; the environment variable overrides "auto"."""
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND) or (
            "triton" if measured_faster and (x.numel() if size is None else size) >= TRITON_FROM[op]
            and _triton_unavailable(x.device) is None else "torch")
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown {op} backend {backend!r}; known: auto, torch, triton")
    if backend == "triton":
        why = _triton_unavailable(x.device)
        if why:
            raise BackendUnavailable(f"{op} backend 'triton' is not usable on {x.device}: {why}")
    return backend == "triton"


def _conv_torch(x, weight, bias):
    L, C, K = x.shape[1], x.shape[2], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight.reshape(C, 1, K), bias, padding=K - 1, groups=C)[..., :L]
    return F.silu(y).transpose(1, 2)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """silu(causal depthwise conv1d) along L of x (b, L, C) with an ``nn.Conv1d(C, C, K, groups=C)`` weight
    (C, 1, K) and bias (C,): output position l sees inputs l-K+1 .. l. Returns (b, L, C)."""
    if _use_triton("causal-conv1d", x, backend):
        from ..kernels.causal_conv1d_triton import causal_conv1d_silu_triton
        return causal_conv1d_silu_triton(x, weight, bias)
    return _conv_torch(x, weight, bias)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               backend: str = "auto") -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last axis of x (..., C)."""
    if _use_triton("layer-norm", x, backend):
        from ..kernels.layer_norm_triton import layer_norm_triton
        return layer_norm_triton(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)


def depthwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   backend: str = "auto") -> torch.Tensor:
    """``F.conv{nd}d(x, weight, bias, padding=k // 2, groups=C)`` for x (B, C, *S) (nd = 2 or 3) and a depthwise
    weight (C, 1, *k) of odd sizes. Under autocast x and the weight take the autocast dtype, as a conv would (the
    Triton kernel's arithmetic is fp32 either way). The output keeps x's memory format."""
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    # 2D channels-last maps (SS2D's): cuDNN's kernel measured 2.3x faster than the Triton one
    if _use_triton("depthwise-conv", x, backend, measured_faster=not (x.dim() == 4 and x.stride(1) == 1)):
        from ..kernels.depthwise_conv_triton import depthwise_conv_triton
        return depthwise_conv_triton(x, weight, bias)
    conv = {4: F.conv2d, 5: F.conv3d}[x.dim()]
    return conv(x, weight, bias, padding=[k // 2 for k in weight.shape[2:]], groups=x.shape[1])


def group_norm(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5, backend: str = "auto",
               relu: bool = False) -> torch.Tensor:
    """``F.group_norm(x, num_groups, weight, bias, eps)``; fp32 under autocast, as autocast runs ``group_norm``.

    ``relu=True``: ``F.relu`` of it (same values and gradients, relu'(0) = 0). The Triton kernel fuses it (no extra
    pass over the map, nothing more saved); the torch paths apply ``relu_`` in place on the norm's output (neither
    group-norm backward needs that output)."""
    if torch.is_autocast_enabled(x.device.type):
        x = x.float()
    if _use_triton("group-norm", x, backend):
        from ..kernels.group_norm_triton import group_norm_triton
        return group_norm_triton(x, weight, bias, num_groups, eps, relu=relu)
    if x.numel() >= VAR_MEAN_FROM:
        y = _GroupNormFn.apply(x, weight, bias, num_groups, eps)
    else:
        y = F.group_norm(x, num_groups, weight, bias, eps)
    return y.relu_() if relu else y


class _GroupNormFn(torch.autograd.Function):
    """GroupNorm with the statistics from ``torch.var_mean`` and the backward from ATen's own group-norm backward.

    PyTorch's CUDA group-norm forward computes the statistics with one thread block per (sample, group): 16 blocks
    for LightM-UNet's (2, 32, 128^3) maps, 10.1 ms forward + backward on an H100 against 3.6 ms this way
    (kernels/BENCHMARK_mixer_ops.md). ``var_mean`` splits such long rows over many blocks; the normalisation is one
    ``addcmul``."""

    @staticmethod
    def forward(ctx, x, weight, bias, groups, eps):
        n, c = x.shape[:2]
        x = x.contiguous()
        var, mean = torch.var_mean(x.view(n, groups, -1), dim=-1, correction=0)
        rstd = (var + eps).rsqrt()
        scale = rstd.repeat_interleave(c // groups, dim=1)  # (n, c)
        if weight is not None:
            scale = scale * weight
        shift = -mean.repeat_interleave(c // groups, dim=1) * scale
        if bias is not None:
            shift = shift + bias
        per_channel = (n, c) + (1,) * (x.dim() - 2)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.groups = groups
        return torch.addcmul(shift.view(per_channel), x, scale.view(per_channel))

    @staticmethod
    def backward(ctx, gy):
        x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        need = ctx.needs_input_grad
        gx, gw, gb = torch.ops.aten.native_group_norm_backward(
            gy.contiguous(), x, mean, rstd, weight, n, c, x[0, 0].numel(), ctx.groups,
            [need[0], weight is not None and need[1], need[2]])
        return gx, gw, gb, None, None


def scaled_add(y: torch.Tensor, s: torch.Tensor, t: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``y + s * t``, i.e. ``torch.addcmul(y, s, t)``, for y and t of one shape and a 1-element s (a residual's learnt
    scale, LightM-UNet's ``skip_scale``); s broadcasts, nothing else does.

    The forward is that ``torch.addcmul`` call (one pass): the same values and dtype, and under autocast the same
    promotion of the inputs to the widest dtype (autocast stays on inside the autograd Function's forward). The
    backward returns y's gradient g, t's g * s and s's sum(g * t), each only if required, in the inputs' dtypes. On
    the Triton backend (``kernels/scaled_add_triton.py``) t's and s's come from one read of g and t, s's as fp32
    per-block partial sums added in a fixed order (bitwise repeatable); on the torch backend from ``g * s`` and a sum
    of ``g * t`` (PyTorch's own three passes)."""
    if not isinstance(s, torch.Tensor) or s.numel() != 1 or s.dim() > y.dim():
        raise ValueError(f"scaled_add: s must be a 1-element tensor of at most y's {y.dim()} dims, got "
                         f"{tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__}")
    if y.shape != t.shape:
        raise ValueError(f"scaled_add: y and t must have one shape, got {tuple(y.shape)} and {tuple(t.shape)}")
    triton = _use_triton("scaled-add", y, backend)
    if not (torch.is_grad_enabled() and (y.requires_grad or s.requires_grad or t.requires_grad)):
        return torch.addcmul(y, s, t)
    return _ScaledAddFn.apply(y, s, t, triton)


class _ScaledAddFn(torch.autograd.Function):
    """``torch.addcmul(y, s, t)`` (1-element s) with a backward that computes only the required gradients: g for y,
    g * s for t and sum(g * t) for s, the last two fused on the Triton backend."""

    @staticmethod
    def forward(ctx, y, s, t, triton):
        ctx.triton = triton
        ctx.dtypes = y.dtype, t.dtype
        ctx.save_for_backward(s, t if ctx.needs_input_grad[1] else None)  # t only for s's gradient
        return torch.addcmul(y, s, t)

    @staticmethod
    def backward(ctx, g):
        s, t = ctx.saved_tensors
        need_y, need_s, need_t = ctx.needs_input_grad[:3]
        gy = g.to(ctx.dtypes[0]) if need_y else None
        gs, gt = scaled_residual_grads(g, s, t, need_s, need_t, ctx.triton, ctx.dtypes[1])
        return gy, gs, gt, None


def scaled_residual_grads(g, s, t, need_s, need_t, triton, t_dtype):
    """The gradients (of s, of t) of a scaled residual ``... + s * t`` for its output gradient g: ``sum(g * t)`` in s's
    shape and dtype, ``g * s`` in ``t_dtype``, each only if needed (else None); from one pass over g and t on the
    Triton backend (``kernels/scaled_add_triton.py``)."""
    gs = gt = None
    if triton and (need_s or need_t):
        from ..kernels.scaled_add_triton import scaled_add_grads
        gt, gs = scaled_add_grads(g, s.to(g.device), t, need_gt=need_t, need_gs=need_s, dtype=t_dtype)
    else:
        if need_t:
            gt = (g * s).to(t_dtype)
        if need_s:  # summed in at least fp32 (a bf16 g * t would otherwise give a bf16 sum)
            gs = (g * t).sum(dtype=torch.promote_types(g.dtype, torch.float32))
    if gs is not None:
        gs = gs.reshape(s.shape).to(s.dtype)
    return gs, gt


def upsample(x: torch.Tensor, scale_factor, skip: torch.Tensor | None = None, backend: str = "auto") -> torch.Tensor:
    """``F.interpolate(x, scale_factor=scale_factor, mode="bilinear"/"trilinear", align_corners=False)`` of a
    (B, C, *S) map, plus ``skip`` (the output's shape) if given. The Triton kernel takes contiguous float maps
    up-sampled by 1 or 2 per axis outside autocast (under autocast, interpolation runs as autocast runs it);
    PyTorch the rest."""
    nd = x.dim() - 2
    if nd not in (2, 3):
        raise ValueError(f"upsample: a (B, C, H, W) or (B, C, D, H, W) map expected, got {tuple(x.shape)}")
    f = tuple(scale_factor) if isinstance(scale_factor, (tuple, list)) else (scale_factor,) * nd
    if len(f) != nd:
        raise ValueError(f"upsample: {nd} scale factors expected for a {nd}D map, got {scale_factor}")
    out_shape = (*x.shape[:2], *(int(s * v) for s, v in zip(x.shape[2:], f)))
    if skip is not None and tuple(skip.shape) != out_shape:
        raise ValueError(f"upsample: skip must have the output's shape {out_shape}, got {tuple(skip.shape)}")
    supported = (all(v in (1, 2) for v in f) and x.is_floating_point() and x.is_contiguous()
                 and not torch.is_autocast_enabled(x.device.type)
                 and (skip is None or (skip.dtype == x.dtype and skip.is_contiguous())))
    if supported and _use_triton("upsample", x, backend):
        return _UpsampleFn.apply(x, skip, tuple(int(v) for v in f))
    y = F.interpolate(x, scale_factor=tuple(float(v) for v in f), mode="bilinear" if nd == 2 else "trilinear",
                      align_corners=False)
    return y if skip is None else y + skip


class _UpsampleFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, skip, factors):
        from ..kernels.upsample_triton import upsample_forward
        ctx.factors = factors
        return upsample_forward(x, factors, skip)

    @staticmethod
    def backward(ctx, g):
        from ..kernels.upsample_triton import upsample_backward
        gx = upsample_backward(g, ctx.factors) if ctx.needs_input_grad[0] else None
        return gx, g if ctx.needs_input_grad[1] else None, None


def max_pool(x: torch.Tensor, kernel_size, backend: str = "auto") -> torch.Tensor:
    """``F.max_pool2d/3d(x, kernel_size)`` (stride = kernel, no padding) of a (B, C, *S) map: values, and the
    gradient routed to the first maximum of each window (a NaN wins), exactly as PyTorch. The Triton kernel takes
    contiguous float maps whose sizes are multiples of the kernel (windows of at most 127 elements); PyTorch the
    rest."""
    nd = x.dim() - 2
    if nd not in (2, 3):
        raise ValueError(f"max_pool: a (B, C, H, W) or (B, C, D, H, W) map expected, got {tuple(x.shape)}")
    k = tuple(int(v) for v in kernel_size) if isinstance(kernel_size, (tuple, list)) else (int(kernel_size),) * nd
    if len(k) != nd:
        raise ValueError(f"max_pool: {nd} kernel sizes expected for a {nd}D map, got {kernel_size}")
    supported = (x.is_floating_point() and x.is_contiguous() and all(s % f == 0 for s, f in zip(x.shape[2:], k))
                 and math.prod(k) <= 127)
    if supported and _use_triton("max-pool", x, backend):
        return _MaxPoolFn.apply(x, k)
    return (F.max_pool2d if nd == 2 else F.max_pool3d)(x, k)


class _MaxPoolFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        from ..kernels.max_pool_triton import max_pool_forward
        y, idx = max_pool_forward(x, k)
        ctx.save_for_backward(idx)
        ctx.shape, ctx.k = x.shape, k
        return y

    @staticmethod
    def backward(ctx, g):
        from ..kernels.max_pool_triton import max_pool_backward
        (idx,) = ctx.saved_tensors
        return max_pool_backward(g, idx, ctx.shape, ctx.k), None
