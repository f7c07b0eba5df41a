"""LightM-UNet (Liao et al., arXiv 2403.05246), faithful to the upstream code; spec: specs/lightm_unet.md.

A 4-level U-Net on MONAI SegResNet-style helpers in which nearly every feature extractor is an "RVM" Mamba layer.
One implementation for 2D and 3D (``spatial_dims``). The three x2 steps of upstream follow the plan's per-axis
factors (``strides``); this changes no parameter. Module names follow upstream, so upstream state dicts load.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import torch.nn as nn

from ..modules.common import (GroupNorm, TokenLayerNorm, Upsample, conv_nd, depthwise_conv_nd, fp32_core,
                              interp_mode, max_pool_nd, pointwise_conv_nd, recomputed)
from ..modules.mamba import Mamba
from ..ops import linear_channels_first, scaled_add


class ConvOnly(nn.Sequential):
    """MONAI ``Convolution(conv_only=True)``: a Sequential holding one conv named ``conv`` (a 1x1(x1) one through
    ``ops.pointwise_conv``: same parameters and function)."""

    def __init__(self, nd, a, b, k, bias, depthwise=False):
        super().__init__()
        self.add_module("conv", depthwise_conv_nd(nd)(a, k, bias=bias) if depthwise else
                        (pointwise_conv_nd(nd) if k == 1 else conv_nd(nd))(a, b, k, padding=k // 2, bias=bias))


def dw_conv(nd, a, b, k, bias=False) -> nn.Sequential:
    """Depthwise-separable conv: depthwise k (a -> a) then pointwise 1 (a -> b)."""
    return nn.Sequential(ConvOnly(nd, a, a, k, bias, depthwise=True), ConvOnly(nd, a, b, 1, bias))


class MambaLayer(nn.Module):
    """RVM layer: LN -> Mamba -> scaled residual -> the same LN again -> Linear(a -> b). fp32 core.

    ``recompute``: recompute the layer in the backward pass instead of storing its activations (None: on CUDA).
    At full resolution its activations are ~20 fp32 copies of (tokens x 2·d_inner); this is what made the upstream
    network need 60 GiB at 128^3. The function computed is the same.
    """

    def __init__(self, in_channels, out_channels, d_state=16, d_conv=4, expand=2, recompute=None):
        super().__init__()
        self.recompute = recompute
        self.norm = TokenLayerNorm(in_channels)
        self.mamba = Mamba(in_channels, d_state=d_state, d_conv=d_conv, expand=expand)
        self.proj = nn.Linear(in_channels, out_channels)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x, pre=None):
        """``pre``: a function applied to x first, inside the recomputed region, so that its output is not stored
        either (ResMambaBlock passes its GroupNorm + ReLU: 2 fewer stored maps per block)."""
        return recomputed(self, functools.partial(self._forward, pre=pre), x, self.recompute)

    @fp32_core
    def _forward(self, x, pre=None):
        if pre is not None:
            x = pre(x)
        # Channels-first throughout, like the feature maps around the layer: the LayerNorm reads the token view of
        # a (B, C, L) tensor in place (on CUDA inside the projections' GEMMs, which never write its output) and the
        # projections write (B, C, L) back (ops.linear_channels_first), so the residual sums and the layer's
        # neighbours (GroupNorm, ReLU, adds) see one layout, and nothing is copied to change layouts.
        t = x.flatten(2)  # (B, C, L)
        # u = mamba(norm(t)) + skip_scale * t, the residual added in out_proj's pass; the norm folded into in_proj
        u = self.mamba(t.transpose(1, 2), channels_first=True, residual=(self.skip_scale, t), norm=self.norm)
        # upstream quirk: the same norm applied a second time (folded into proj)
        v = linear_channels_first(u.transpose(1, 2), self.proj.weight, self.proj.bias, norm=self.norm)
        return v.view(*v.shape[:2], *x.shape[2:])


class ResMambaBlock(nn.Module):
    def __init__(self, nd, channels, num_groups=8):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, channels)
        self.norm2 = GroupNorm(num_groups, channels)
        self.act = nn.ReLU()
        self.conv1 = MambaLayer(channels, channels)
        self.conv2 = MambaLayer(channels, channels)

    def forward(self, x):
        # conv1(act(norm1(x))), the ReLU fused into the GroupNorm (self.act is the module upstream applies)
        y = self.conv1(x, pre=functools.partial(self.norm1, relu=True))
        y = self.conv2(y, pre=functools.partial(self.norm2, relu=True))
        return y + x


class ResUpBlock(nn.Module):
    def __init__(self, nd, channels, num_groups=8):
        super().__init__()
        self.norm1 = GroupNorm(num_groups, channels)
        self.norm2 = GroupNorm(num_groups, channels)
        self.act = nn.ReLU()
        self.conv = dw_conv(nd, channels, channels, 3, bias=False)
        self.skip_scale = nn.Parameter(torch.ones(1))

    def forward(self, x):
        # conv(act(norm1(x))) + skip_scale * x, then act(norm2(y)); the ReLUs fused into the GroupNorms
        y = scaled_add(self.conv(self.norm1(x, relu=True)), self.skip_scale, x)
        return self.norm2(y, relu=True)


class LightMUNet(nn.Module):
    """``LightMUNet(spatial_dims, init_filters=32, in_channels, out_channels, blocks_down=(1, 2, 2, 4),
    blocks_up=(1, 1, 1), strides=None)``.

    ``strides``: the per-axis factors of the three downsampling steps (default x2 on every axis, as upstream).
    No deep supervision; returns logits (B, out_channels, *S).
    """

    def __init__(self, spatial_dims: int = 3, init_filters: int = 32, in_channels: int = 1, out_channels: int = 2,
                 blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1),
                 strides: Sequence[Sequence[int]] | None = None, num_groups: int = 8):
        super().__init__()
        nd = spatial_dims
        n_levels = len(blocks_down)
        if strides is None:
            strides = [(2,) * nd] * (n_levels - 1)
        if len(strides) != n_levels - 1 or len(blocks_up) != n_levels - 1:
            raise ValueError(f"LightMUNet with {n_levels} levels needs {n_levels - 1} strides and blocks_up entries")
        self.spatial_dims, self.strides = nd, [tuple(s) for s in strides]
        widths = [init_filters * 2 ** i for i in range(n_levels)]

        self.convInit = dw_conv(nd, in_channels, init_filters, 3, bias=False)
        self.down_layers = nn.ModuleList()
        for i, n_blocks in enumerate(blocks_down):
            down = nn.Identity() if i == 0 else nn.Sequential(
                MambaLayer(widths[i - 1], widths[i]),
                max_pool_nd(nd)(kernel_size=self.strides[i - 1], stride=self.strides[i - 1]))
            self.down_layers.append(nn.Sequential(down, *[ResMambaBlock(nd, widths[i], num_groups)
                                                          for _ in range(n_blocks)]))
        self.up_samples, self.up_layers = nn.ModuleList(), nn.ModuleList()
        for j, n_blocks in enumerate(blocks_up):
            c = widths[n_levels - 1 - j]
            self.up_samples.append(nn.Sequential(
                ConvOnly(nd, c, c // 2, 1, bias=False),
                Upsample(scale_factor=tuple(float(f) for f in self.strides[n_levels - 2 - j]),
                         mode=interp_mode(nd), align_corners=False)))
            self.up_layers.append(nn.Sequential(*[ResUpBlock(nd, c // 2, num_groups) for _ in range(n_blocks)]))
        self.conv_final = nn.Sequential(GroupNorm(num_groups, init_filters), nn.ReLU(),
                                        dw_conv(nd, init_filters, out_channels, 1, bias=True))

    def forward(self, x):
        x = self.convInit(x)
        skips = []
        for down in self.down_layers:
            x = down(x)
            skips.append(x)
        for j, ((conv, upsample), up_layer) in enumerate(zip(self.up_samples, self.up_layers)):
            x = up_layer(upsample(conv(x), skip=skips[-2 - j]))  # the skip added in the up-sampling's pass
        norm, _, conv = self.conv_final  # GroupNorm, ReLU (fused into it here), DWConv
        return conv(norm(x, relu=True))
