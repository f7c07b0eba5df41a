"""nnMamba (Gong et al., arXiv 2402.03526), faithful to the upstream code; spec: specs/nnmamba.md.

A residual U-Net with BatchNorm whose encoder blocks add a Mamba branch ("Mamba-in-Convolution", MIC) in parallel
to the convolution path, and whose skips are rescaled by an SE-like gate ("scaling concatenation").

* Default = the network of upstream's nnU-Net-v1 trainers (``nnunet/network_architecture/nnMamba.py``): single
  forward scan, deep-supervision heads.
* ``css=True`` = the paper's MICCSS block (repository-root ``nnMamba.py``): four scans of one shared Mamba
  (forward, token-reversed, channel-reversed, both), residual and a second 1x1 conv-BN-ReLU. Upstream has no
  deep-supervision heads there; ``ds_heads=True`` adds the same three heads as the default.

One implementation for 2D and 3D (``spatial_dims``; 2D is the project's extension). The four x2 steps upstream
hard-codes follow the plan's per-axis factors (``strides``): stem stride f1, residual layer j stride f_{j+1},
each upsampling undoes the factor of its step. No parameter depends on the factors. Module names follow upstream,
so upstream state dicts load (each shared MambaLayer appears under ``layerN.1`` and ``layerN.2``, as upstream).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..modules.common import (Upsample, adaptive_avg_pool_nd, batch_norm_nd, conv_nd, flatten_tokens, fp32_core,
                              interp_mode, unflatten_tokens)
from ..modules.mamba import Mamba


class DoubleConv(nn.Module):
    """``conv`` = Sequential(ConvNd(a->b, 3, stride, bias), BN, ReLU, ConvNd(b->b, 3, bias), BN, ReLU)."""

    def __init__(self, nd: int, in_ch: int, out_ch: int, stride=1):
        super().__init__()
        conv, bn = conv_nd(nd), batch_norm_nd(nd)
        self.conv = nn.Sequential(conv(in_ch, out_ch, 3, stride=stride, padding=1), bn(out_ch), nn.ReLU(),
                                  conv(out_ch, out_ch, 3, padding=1), bn(out_ch), nn.ReLU())

    def forward(self, x):
        return self.conv(x)


class MambaLayer(nn.Module):
    """MIC branch: 1x1 conv (no bias) -> BN -> ReLU -> Mamba over the raster-flattened tokens.

    ``css=True`` (paper's MICCSS): the mean of four scans of the same Mamba (forward, token-reversed,
    channel-reversed, both), plus the activation, then ``nin2`` (1x1, no bias) -> ``norm2`` (BN) -> ReLU.
    The whole layer runs under the fp32 core policy (specs/README.md §7).
    """

    def __init__(self, nd: int, dim: int, d_state=16, d_conv=4, expand=2, css: bool = False):
        super().__init__()
        self.dim, self.css = dim, css
        self.nin = conv_nd(nd)(dim, dim, 1, bias=False)
        self.norm = batch_norm_nd(nd)(dim)
        self.relu = nn.ReLU()
        self.mamba = Mamba(dim, d_state=d_state, d_conv=d_conv, expand=expand)
        if css:
            self.nin2 = conv_nd(nd)(dim, dim, 1, bias=False)
            self.norm2 = batch_norm_nd(nd)(dim)
            self.relu2 = nn.ReLU()

    def _siamese_scans(self, t):
        """(M(t) + rev_L M(rev_L t) + rev_C M(rev_C t) + rev_LC M(rev_LC t)) / 4 on tokens (B, L, C)."""
        total = 0
        for dims in ((), (1,), (2,), (1, 2)):  # 1 = token axis L, 2 = channel axis C
            if dims:
                total = total + torch.flip(self.mamba(torch.flip(t, dims)), dims)
            else:
                total = total + self.mamba(t)
        return total / 4

    @fp32_core
    def forward(self, x):
        a = self.relu(self.norm(self.nin(x)))
        t = flatten_tokens(a)
        if not self.css:
            return unflatten_tokens(self.mamba(t), a.shape[2:])
        out = unflatten_tokens(self._siamese_scans(t), a.shape[2:]) + a
        return self.relu2(self.norm2(self.nin2(out)))


class BasicBlock(nn.Module):
    """Residual block: bn2(conv2(relu(bn1(conv1(x))))) [+ mamba_layer(x)] + shortcut(x), then ReLU.

    There is no ReLU before the addition (the paper's figure draws one; the code has none).
    """

    def __init__(self, nd: int, inplanes: int, planes: int, stride=1, downsample: nn.Module | None = None,
                 mamba_layer: nn.Module | None = None):
        super().__init__()
        conv, bn = conv_nd(nd), batch_norm_nd(nd)
        self.conv1 = conv(inplanes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = bn(planes)
        self.relu = nn.ReLU()
        self.conv2 = conv(planes, planes, 3, padding=1, bias=False)
        self.bn2 = bn(planes)
        self.mamba_layer = mamba_layer
        self.downsample = downsample

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        if self.mamba_layer is not None:
            out = out + self.mamba_layer(x)  # fp32 under AMP (the core's output dtype)
        identity = self.downsample(x) if self.downsample is not None else x
        return self.relu(out + identity)


def make_res_layer(nd: int, inplanes: int, planes: int, blocks: int, stride, mamba_layer: nn.Module):
    """Block 0 downsamples (1x1 strided conv + BN shortcut), no Mamba; blocks 1.. share ONE ``mamba_layer``."""
    downsample = nn.Sequential(conv_nd(nd)(inplanes, planes, 1, stride=stride, bias=False), batch_norm_nd(nd)(planes))
    layers = [BasicBlock(nd, inplanes, planes, stride, downsample)]
    layers += [BasicBlock(nd, planes, planes, mamba_layer=mamba_layer) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class Attentionlayer(nn.Module):
    """Skip gate: sigmoid(layer2(relu(layer1(gap)))) for a pooled skip (B, C) -> (B, C)."""

    def __init__(self, dim: int, r: int = 16):
        super().__init__()
        self.layer1 = nn.Linear(dim, dim // r)
        self.layer2 = nn.Linear(dim // r, dim)
        self.relu = nn.ReLU()
        self.sigmoid = nn.Sigmoid()

    def forward(self, pooled):
        return self.sigmoid(self.layer2(self.relu(self.layer1(pooled))))


class nnMambaSeg(nn.Module):
    """``nnMambaSeg(in_ch=1, channels=32, blocks=3, number_classes=6, spatial_dims=3, strides=None, css=False,
    ds_heads=None, deep_supervision=True)``.

    ``strides``: per-axis factors of the 4 downsampling steps (default x2 everywhere, as upstream).
    ``ds_heads``: build ``ds1/ds2/ds3_cls_conv``; default True for the default network and False for ``css``
    (both as upstream). Forward returns ``[c8, ds1(c7), ds2(c6), ds3(c5)]`` (highest resolution first) when
    ``self.deep_supervision`` is True, else the full-resolution logits ``c8`` (which pass through BN + ReLU, an
    upstream quirk kept for faithfulness).
    """

    n_steps = 4

    def __init__(self, in_ch: int = 1, channels: int = 32, blocks: int = 3, number_classes: int = 6,
                 spatial_dims: int = 3, strides: Sequence[Sequence[int]] | None = None, css: bool = False,
                 ds_heads: bool | None = None, deep_supervision: bool = True):
        super().__init__()
        nd = spatial_dims
        if nd not in (2, 3):
            raise ValueError(f"nnMambaSeg: spatial_dims must be 2 or 3, got {nd}")
        strides = [(2,) * nd] * self.n_steps if strides is None else [tuple(int(v) for v in s) for s in strides]
        if len(strides) != self.n_steps or any(len(s) != nd for s in strides):
            raise ValueError(f"nnMambaSeg needs {self.n_steps} per-axis step factors with {nd} entries each "
                             f"(stem + 3 residual layers), got strides={[list(s) for s in strides]}")
        self.spatial_dims, self.strides, self.css = nd, strides, css
        self.ds_heads = (not css) if ds_heads is None else bool(ds_heads)
        if deep_supervision and not self.ds_heads:
            raise ValueError("nnMambaSeg: deep_supervision=True needs the DS heads; pass ds_heads=True (or "
                             "deep_supervision=False for the head-less upstream css network)")
        self.deep_supervision = deep_supervision
        c = channels
        f1, f2, f3, f4 = strides

        # encoder: stem at /f1, three residual layers each with one shared MIC branch
        self.in_conv = DoubleConv(nd, in_ch, c, stride=f1)
        self.pooling = adaptive_avg_pool_nd(nd)(1)
        self.att1 = Attentionlayer(c)
        self.layer1 = make_res_layer(nd, c, 2 * c, blocks, f2, MambaLayer(nd, 2 * c, css=css))
        self.att2 = Attentionlayer(2 * c)
        self.layer2 = make_res_layer(nd, 2 * c, 4 * c, blocks, f3, MambaLayer(nd, 4 * c, css=css))
        self.att3 = Attentionlayer(4 * c)
        self.layer3 = make_res_layer(nd, 4 * c, 8 * c, blocks, f4, MambaLayer(nd, 8 * c, css=css))

        # decoder: each upsampling undoes the factor of the step it mirrors
        up = lambda f: Upsample(scale_factor=tuple(float(v) for v in f), mode=interp_mode(nd), align_corners=False)
        self.up5, self.conv5 = up(f4), DoubleConv(nd, 12 * c, 4 * c)
        self.up6, self.conv6 = up(f3), DoubleConv(nd, 6 * c, 2 * c)
        self.up7, self.conv7 = up(f2), DoubleConv(nd, 3 * c, c)
        self.up8, self.conv8 = up(f1), DoubleConv(nd, c, number_classes)  # logits through BN + ReLU (upstream)

        if self.ds_heads:
            self.ds1_cls_conv = conv_nd(nd)(c, number_classes, 1)
            self.ds2_cls_conv = conv_nd(nd)(2 * c, number_classes, 1)
            self.ds3_cls_conv = conv_nd(nd)(4 * c, number_classes, 1)

    def _gate(self, att: Attentionlayer, skip: torch.Tensor) -> torch.Tensor:
        """Skip rescaled channel-wise by the gate of its global average pool."""
        b, ch = skip.shape[:2]
        scale = att(self.pooling(skip).reshape(b, ch))
        return skip * scale.reshape(b, ch, *([1] * self.spatial_dims))

    def forward(self, x):
        if self.deep_supervision and not self.ds_heads:
            raise RuntimeError("nnMambaSeg built with ds_heads=False cannot run with deep_supervision=True; "
                               "set network.deep_supervision = False or build it with ds_heads=True")
        c1 = self.in_conv(x)
        s1 = self._gate(self.att1, c1)
        c2 = self.layer1(c1)
        s2 = self._gate(self.att2, c2)
        c3 = self.layer2(c2)
        s3 = self._gate(self.att3, c3)
        c4 = self.layer3(c3)

        c5 = self.conv5(torch.cat([self.up5(c4), s3], dim=1))
        c6 = self.conv6(torch.cat([self.up6(c5), s2], dim=1))
        c7 = self.conv7(torch.cat([self.up7(c6), s1], dim=1))
        c8 = self.conv8(self.up8(c7))
        if not self.deep_supervision:
            return c8
        return [c8, self.ds1_cls_conv(c7), self.ds2_cls_conv(c6), self.ds3_cls_conv(c5)]
