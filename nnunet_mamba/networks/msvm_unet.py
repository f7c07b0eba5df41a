"""MSVM-UNet (Chen et al., arXiv 2408.13735), faithful to the upstream code; spec: specs/msvm_unet.md.

Channels-first throughout. Encoder = VMamba v2 "tiny_0230s" (two-conv stem /f1f2, stages of VSS blocks with SS2D
``v05_noz``, strided-conv downsamplings); decoder = three UpBlocks (large-kernel patch expanding ``LKPE``, concat
with the skip, ``Linear2d`` fusion, two multi-scale VSS blocks) and a final x f1f2 expansion ``FLKPE`` with the
1x1 classifier. No deep supervision; always returns logits.

One code path for 2D (upstream) and 3D (project extension, spec §7: SS3D K = 6, Conv3d stem/downsamplings,
2x2x2 / 4x4x4 shuffles). The five x2 steps follow the plan's per-axis factors f1..f5 (README §5.2): stem convs
stride f1, f2; downsamplings f3..f5 (kernels unchanged); LKPE with f5, f4, f3; FLKPE with f1*f2.
Module names are upstream's (``encoder.layer0``, ``encoder.layers.i.blocks``, ``encoder.downsamples``,
``decoder.layers.i.up/concat_layer/vss_layer``, ``decoder.out_layers.0``).
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..modules.common import LayerNormNd, batch_norm_nd, conv_nd, depthwise_conv_nd
from ..modules.vmamba import Linear2d, VSSBlockV2, check_factors, pixel_shuffle_nd, vmamba_init_weights

N_STEPS = 5  # two stem convs, three downsamplings


class Encoder(nn.Module):
    """VMamba v2 tiny_0230s split as upstream: ``layer0``/``layer1`` (the patch-embedding stem), ``layers`` and
    ``downsamples``. Returns the four stage outputs, taken before each downsampling."""

    def __init__(self, in_channels: int = 3, dims: Sequence[int] = (96, 192, 384, 768),
                 depths: Sequence[int] = (2, 2, 8, 2), drop_path_rate: float = 0.2, spatial_dims: int = 2,
                 factors: Optional[Sequence[Sequence[int]]] = None, k_directions: Optional[int] = None):
        super().__init__()
        nd, conv = spatial_dims, conv_nd(spatial_dims)
        f = factors or [(2,) * nd] * N_STEPS
        self.dims = list(dims)
        self.layer0 = nn.Sequential(conv(in_channels, dims[0] // 2, 3, stride=f[0], padding=1), nn.Identity(),
                                    LayerNormNd(dims[0] // 2), nn.Identity(), nn.GELU())
        self.layer1 = nn.Sequential(conv(dims[0] // 2, dims[0], 3, stride=f[1], padding=1), nn.Identity(),
                                    LayerNormNd(dims[0]))
        dpr = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths))]
        self.layers, self.downsamples = nn.ModuleList(), nn.ModuleList()
        for i, depth in enumerate(depths):
            blocks = [VSSBlockV2(dims[i], dp, nd, k_directions) for dp in dpr[sum(depths[:i]):sum(depths[:i + 1])]]
            self.layers.append(nn.Sequential(OrderedDict(blocks=nn.Sequential(*blocks))))
            self.downsamples.append(nn.Sequential(
                nn.Identity(), conv(dims[i], dims[i + 1], 3, stride=f[2 + i], padding=1), nn.Identity(),
                LayerNormNd(dims[i + 1])) if i < len(depths) - 1 else nn.Identity())
        self.apply(vmamba_init_weights)  # VMamba's init over the whole VSSM

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.layer1(self.layer0(x))
        feats = []
        for layer, down in zip(self.layers, self.downsamples):
            x = layer(x)
            feats.append(x)
            x = down(x)
        return feats

    @torch.no_grad()
    def freeze_params(self) -> None:
        for p in self.parameters():
            p.requires_grad = False

    @torch.no_grad()
    def unfreeze_params(self) -> None:
        for p in self.parameters():
            p.requires_grad = True


class MSConv(nn.Module):
    """``x + dw1(x) + dw3(x) + dw5(x)``: depthwise convs without bias."""

    def __init__(self, dim: int, kernel_sizes: Sequence[int] = (1, 3, 5), spatial_dims: int = 2):
        super().__init__()
        self.dw_convs = nn.ModuleList([depthwise_conv_nd(spatial_dims)(dim, k, bias=False) for k in kernel_sizes])

    def forward(self, x):
        return x + sum(conv(x) for conv in self.dw_convs)


class MS_MLP(nn.Module):
    """``fc1 = Linear2d(d -> h)``, GELU, ``multiscale_conv = MSConv(h)``, ``fc2 = Linear2d(h -> d)``."""

    def __init__(self, in_features: int, hidden_features: int, spatial_dims: int = 2):
        super().__init__()
        self.fc1 = Linear2d(in_features, hidden_features)
        self.act = nn.GELU()
        self.multiscale_conv = MSConv(hidden_features, spatial_dims=spatial_dims)
        self.fc2 = Linear2d(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.multiscale_conv(self.act(self.fc1(x))))


class MSVSS(nn.Sequential):
    """``blocks``: VSS blocks v2 whose MLP is ``MS_MLP``."""

    def __init__(self, dim: int, drop_paths: Sequence[float], spatial_dims: int = 2,
                 k_directions: Optional[int] = None):
        mlp = lambda d, h: MS_MLP(d, h, spatial_dims)  # noqa: E731
        super().__init__(OrderedDict(blocks=nn.Sequential(*[
            VSSBlockV2(dim, dp, spatial_dims, k_directions, mlp=mlp) for dp in drop_paths])))


class LKPE(nn.Module):
    """Large-kernel patch expanding (c -> c/2, x f): ``expand`` = 1x1 conv (c -> c/2 * prod f), BN, ReLU, depthwise
    3x3 conv; pixel shuffle by f; ``norm = LN(c/2)``. 2D x2: expand width 2c (upstream)."""

    def __init__(self, dim: int, factors: Sequence[int], out_dim: Optional[int] = None):
        super().__init__()
        nd = len(factors)
        self.factors = tuple(factors)
        out_dim = out_dim or dim // 2
        width = out_dim * math.prod(self.factors)
        conv = conv_nd(nd)
        self.expand = nn.Sequential(conv(dim, width, 1), batch_norm_nd(nd)(width), nn.ReLU(inplace=True),
                                    depthwise_conv_nd(nd)(width, 3))
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x):
        x = pixel_shuffle_nd(self.expand(x).movedim(1, -1), self.factors)
        return self.norm(x).movedim(-1, 1)


class FLKPE(LKPE):
    """Final LKPE (x f1f2, width 96 * prod f, shuffle to 96 channels) followed by ``out = ConvNd(96 -> K, 1)``."""

    def __init__(self, dim: int, num_classes: int, factors: Sequence[int]):
        super().__init__(dim, factors, out_dim=dim)
        self.out = conv_nd(len(factors))(dim, num_classes, 1)

    def forward(self, x):
        return self.out(super().forward(x))


class UpBlock(nn.Module):
    """``up = LKPE(a)`` -> cat with the skip -> ``concat_layer = Linear2d(2b -> b)`` -> ``vss_layer = MSVSS(b)``."""

    def __init__(self, in_channels: int, out_channels: int, drop_paths: Sequence[float], factors: Sequence[int],
                 k_directions: Optional[int] = None):
        super().__init__()
        self.up = LKPE(in_channels, factors, out_dim=out_channels)
        self.concat_layer = Linear2d(2 * out_channels, out_channels)
        self.vss_layer = MSVSS(out_channels, drop_paths, len(factors), k_directions)

    def forward(self, x, skip):
        return self.vss_layer(self.concat_layer(torch.cat((self.up(x), skip), dim=1)))


class Decoder(nn.Module):
    """Three UpBlocks (768 -> 384 -> 192 -> 96) and ``out_layers = Sequential(FLKPE(96, K))``; torch-default init."""

    def __init__(self, dims: Sequence[int], num_classes: int, depths: Sequence[int] = (2, 2, 2, 2),
                 drop_path_rate: float = 0.2, factors: Optional[Sequence[Sequence[int]]] = None,
                 k_directions: Optional[int] = None, spatial_dims: int = 2):
        super().__init__()
        factors = factors or [(2,) * spatial_dims] * N_STEPS
        dpr = [v.item() for v in torch.linspace(drop_path_rate, 0, (len(dims) - 1) * 2)]
        up_factors = list(reversed(factors[2:]))  # f5, f4, f3
        self.layers = nn.ModuleList([
            UpBlock(dims[i - 1], dims[i], dpr[sum(depths[:i - 1]):sum(depths[:i])], up_factors[i - 1], k_directions)
            for i in range(1, len(dims))])
        stem = tuple(a * b for a, b in zip(factors[0], factors[1]))
        self.out_layers = nn.Sequential(FLKPE(dims[-1], num_classes, stem))

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        out = feats[0]
        for layer, skip in zip(self.layers, feats[1:]):
            out = layer(out, skip)
        return self.out_layers[0](out)


class MSVMUNet(nn.Module):
    """``MSVMUNet(in_channels=3, num_classes=9, spatial_dims=2, factors=None)``.

    2D with one input channel repeats it to 3 (upstream); other channel counts go straight into ``layer0``.
    ``freeze_encoder`` / ``unfreeze_encoder`` as upstream (used by the pretrained trainer's freeze schedule).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 9, spatial_dims: int = 2,
                 factors: Optional[Sequence[Sequence[int]]] = None, k_directions: Optional[int] = None,
                 drop_path_rate: float = 0.2):
        super().__init__()
        nd = spatial_dims
        f = check_factors(factors if factors is not None else [(2,) * nd] * N_STEPS, N_STEPS, nd, "MSVM-UNet")
        self.factors, self.spatial_dims, self.num_classes = f, nd, num_classes
        self.repeat_to_rgb = nd == 2 and in_channels == 1
        self.encoder = Encoder(3 if self.repeat_to_rgb else in_channels, drop_path_rate=drop_path_rate,
                               spatial_dims=nd, factors=f, k_directions=k_directions)
        self.dims = self.encoder.dims
        self.decoder = Decoder(self.dims[::-1], num_classes, drop_path_rate=drop_path_rate, factors=f,
                               k_directions=k_directions, spatial_dims=nd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat_to_rgb:
            x = x.repeat(1, 3, *([1] * self.spatial_dims))
        return self.decoder(self.encoder(x)[::-1])

    @torch.no_grad()
    def freeze_encoder(self) -> None:
        self.encoder.freeze_params()

    @torch.no_grad()
    def unfreeze_encoder(self) -> None:
        self.encoder.unfreeze_params()
