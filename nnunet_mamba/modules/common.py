"""Small building blocks shared by every network (one code path for 2D and 3D)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..ops import layer_norm


def conv_nd(nd: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]


def conv_transpose_nd(nd: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]


def batch_norm_nd(nd: int) -> type[nn.Module]:
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]


def instance_norm_nd(nd: int) -> type[nn.Module]:
    return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[nd]


def max_pool_nd(nd: int) -> type[nn.Module]:
    return {2: nn.MaxPool2d, 3: nn.MaxPool3d}[nd]


def adaptive_avg_pool_nd(nd: int) -> type[nn.Module]:
    return {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[nd]


def interp_mode(nd: int) -> str:
    return {2: "bilinear", 3: "trilinear"}[nd]


def flatten_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, C, *S) -> (B, L, C) in raster order (last axis fastest)."""
    return x.flatten(2).transpose(1, 2)


def unflatten_tokens(t: torch.Tensor, spatial) -> torch.Tensor:
    """(B, L, C) -> (B, C, *S)."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], *spatial)


class TokenLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm(C)`` over the last axis of (..., C) tokens (same parameters and state dict) through
    ``ops.layer_norm``: the Triton kernel on CUDA. No autocast rule: use it inside an fp32 core (``fp32_core``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.weight, self.bias, self.eps)


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


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same arguments, parameters and state dict) that takes ``_GroupNormFn`` for maps of at least
    ``fast_from`` elements, where it measured faster (kernels/BENCHMARK_mixer_ops.md, H100: 2.8x at 2 x 32 x 128^3
    and 2 x 64 x 64^3; slower from 2 x 128 x 32^3 down), and ``F.group_norm`` below. Under autocast it runs in
    fp32, as autocast runs ``group_norm``."""

    fast_from = 1 << 24

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() < self.fast_from:
            return super().forward(x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
        return _GroupNormFn.apply(x, self.weight, self.bias, self.num_groups, self.eps)


class LayerNormNd(nn.LayerNorm):
    """LayerNorm over the channel axis of a channels-first (B, C, *S) tensor (LN2d / LN3d); LN(c) parameters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class DropPath(nn.Module):
    """Per-sample stochastic depth (identity at eval or with p = 0)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x):
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self):
        return f"drop_prob={self.drop_prob}"


def fp32_core(forward):
    """Decorator for an SSM-core forward (README §7 of the specs): autocast off, fp32 input, fp32 output."""

    @functools.wraps(forward)
    def wrapper(self, x, *args, **kwargs):
        with torch.autocast(device_type=x.device.type, enabled=False):
            return forward(self, x.float(), *args, **kwargs)

    return wrapper


def recomputed(module: nn.Module, forward, x: torch.Tensor, enabled=None):
    """``forward(x)``, recomputed in the backward pass instead of storing its activations when training.

    ``enabled=None`` recomputes on CUDA only (GPU memory is the constraint there; on CPU it would only cost time).
    Results and gradients are identical either way.
    """
    if enabled is None:
        enabled = x.is_cuda
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(forward, x, use_reentrant=False)
    return forward(x)
