"""Small building blocks shared by every network (one code path for 2D and 3D)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..ops import depthwise_conv, group_norm, layer_norm, max_pool, pointwise_conv, recompute, upsample


def conv_nd(nd: int) -> type[nn.Module]:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]


def conv_transpose_nd(nd: int) -> type[nn.Module]:
    return {2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[nd]


def batch_norm_nd(nd: int) -> type[nn.Module]:
    return {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[nd]


def instance_norm_nd(nd: int) -> type[nn.Module]:
    return {2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[nd]


class _MaxPool:
    """Forward of a max-pool module through ``ops.max_pool`` (the Triton kernel on CUDA where it measured faster) when
    its stride is its kernel, without padding, dilation, ceil mode or returned indices; otherwise its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = x.dim() - 2
        per_axis = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd  # noqa: E731
        kernel = per_axis(self.kernel_size)
        if per_axis(self.stride) == kernel and set(per_axis(self.padding)) == {0} \
                and set(per_axis(self.dilation)) == {1} and not self.ceil_mode and not self.return_indices:
            return max_pool(x, kernel)
        return super().forward(x)


class MaxPool2d(_MaxPool, nn.MaxPool2d):
    pass


class MaxPool3d(_MaxPool, nn.MaxPool3d):
    pass


def max_pool_nd(nd: int) -> type[nn.Module]:
    """``MaxPool{nd}d``: ``nn.MaxPool{nd}d`` (same arguments and function) through ``ops.max_pool``."""
    return {2: MaxPool2d, 3: MaxPool3d}[nd]


def adaptive_avg_pool_nd(nd: int) -> type[nn.Module]:
    return {2: nn.AdaptiveAvgPool2d, 3: nn.AdaptiveAvgPool3d}[nd]


def interp_mode(nd: int) -> str:
    return {2: "bilinear", 3: "trilinear"}[nd]


class Upsample(nn.Upsample):
    """``nn.Upsample`` whose forward also adds a map of the output's shape (``skip``, a U-Net's skip connection);
    linear modes without ``align_corners`` go through ``ops.upsample`` (on CUDA a Triton kernel where measured
    faster: the skip added in the same pass, a backward without atomics)."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode in ("bilinear", "trilinear") and not self.align_corners and self.scale_factor is not None \
                and self.size is None:
            return upsample(x, self.scale_factor, skip)
        y = super().forward(x)
        return y if skip is None else y + skip


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


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (same arguments, parameters and state dict) through ``ops.group_norm``: on CUDA the Triton
    kernel or statistics from ``torch.var_mean`` for large maps, where they measured faster
    (kernels/BENCHMARK_mixer_ops.md), ``F.group_norm`` otherwise. Under autocast it runs in fp32, as autocast runs
    ``group_norm``.

    ``norm(x, relu=True)`` (keyword only) computes ``F.relu(norm(x))`` - same values and gradients - with the ReLU
    fused into the Triton kernel (no extra pass over the map, no extra saved tensor): for ``act(norm(x))`` with a
    ReLU ``act``. ``norm(x)`` is unchanged, as are the constructor, parameters and state dict."""

    def forward(self, x: torch.Tensor, *, relu: bool = False) -> torch.Tensor:
        return group_norm(x, self.num_groups, self.weight, self.bias, self.eps, relu=relu)


class _DepthwiseConv:
    """Forward of a depthwise conv module (``groups = in = out channels``, stride 1) through ``ops.depthwise_conv``
    (the Triton kernel on CUDA where it measured faster) when its kernel sizes are odd and the padding is "same";
    otherwise the conv's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if all(k % 2 and p == k // 2 for k, p in zip(self.kernel_size, self.padding)):
            return depthwise_conv(x, self.weight, self.bias)
        return super().forward(x)


class DepthwiseConv2d(_DepthwiseConv, nn.Conv2d):
    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__(channels, channels, kernel_size, padding=(kernel_size - 1) // 2, groups=channels, bias=bias)


class DepthwiseConv3d(_DepthwiseConv, nn.Conv3d):
    def __init__(self, channels: int, kernel_size: int, bias: bool = True):
        super().__init__(channels, channels, kernel_size, padding=(kernel_size - 1) // 2, groups=channels, bias=bias)


def depthwise_conv_nd(nd: int) -> type[nn.Module]:
    """``DepthwiseConv{nd}d(channels, kernel_size, bias=True)``: ``nn.Conv{nd}d(c, c, k, padding=(k - 1) // 2,
    groups=c)`` - same parameters, state dict and function - through ``ops.depthwise_conv``."""
    return {2: DepthwiseConv2d, 3: DepthwiseConv3d}[nd]


class _PointwiseConv:
    """Forward of a 1x1(x1) conv module (stride 1, no padding, one group) through ``ops.pointwise_conv`` (the Triton
    GEMM on CUDA where it measured faster); otherwise the conv's own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if set(self.kernel_size) == {1} and set(self.stride) == {1} and set(self.padding) == {0} \
                and set(self.dilation) == {1} and self.groups == 1 and self.padding_mode == "zeros":
            return pointwise_conv(x, self.weight, self.bias)
        return super().forward(x)


class PointwiseConv2d(_PointwiseConv, nn.Conv2d):
    pass


class PointwiseConv3d(_PointwiseConv, nn.Conv3d):
    pass


def pointwise_conv_nd(nd: int) -> type[nn.Module]:
    """``PointwiseConv{nd}d(in, out, 1, bias=True)``: ``nn.Conv{nd}d`` - same arguments, parameters, state dict and
    function - whose 1x1(x1) form runs through ``ops.pointwise_conv``."""
    return {2: PointwiseConv2d, 3: PointwiseConv3d}[nd]


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
    Results and gradients are identical either way. Ops may keep small results of the forward for the
    recomputation (``ops.recompute``: the scan's chunk-entering states).
    """
    if enabled is None:
        enabled = x.is_cuda
    if enabled and module.training and torch.is_grad_enabled():
        return checkpoint(forward, x, use_reentrant=False, context_fn=recompute.contexts)
    return forward(x)
