"""VM-UNet (Ruan & Xiang, arXiv 2402.02491), faithful to the upstream code; spec: specs/vm_unet.md.

A pure VMamba-v0 U-Net, channels-last inside: patch embedding (/f1f2), four encoder stages of VSS blocks with patch
merging, a mirrored decoder whose stages start with patch expanding and receive **additive** skips, a final
expansion (x f1f2) to 24 channels and a 1x1 conv. No deep supervision.

One code path for 2D (upstream) and 3D (project extension, spec §7: SS3D with K = 6 directions, 8-neighbour merging,
2x2x2 / 4x4x4 shuffles). The five x2 steps of upstream follow the plan's per-axis factors f1..f5 (README §5.2).
Module names are upstream's (``vmunet.patch_embed``, ``vmunet.layers``, ``vmunet.layers_up``, ``vmunet.final_up``,
``vmunet.final_conv``), so VM-UNet checkpoints and VMamba ImageNet weights load (see ``networks/pretrained.py``).
Unlike upstream, the network always returns logits (no sigmoid for one output channel).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from ..modules.common import conv_nd
from ..modules.vmamba import PatchEmbed, PatchExpand, PatchMerging, VSSLayer, VSSLayerUp, check_factors, \
    vmamba_init_weights

N_STEPS = 5  # patch embedding (2 steps), three patch mergings


def _drop_path_rates(rate: float, depths: Sequence[int]) -> list[list[float]]:
    dpr = [v.item() for v in torch.linspace(0, rate, sum(depths))]
    return [dpr[sum(depths[:i]):sum(depths[:i + 1])] for i in range(len(depths))]


class VSSM(nn.Module):
    """VM-UNet's ``VSSM``: encoder, mirrored decoder and head, channels-last inside; (B, C, *S) -> (B, K, *S)."""

    def __init__(self, in_chans: int = 3, num_classes: int = 1, depths: Sequence[int] = (2, 2, 9, 2),
                 depths_decoder: Sequence[int] = (2, 9, 2, 2), dims: Sequence[int] = (96, 192, 384, 768),
                 dims_decoder: Sequence[int] = (768, 384, 192, 96), d_state: int = 16, drop_path_rate: float = 0.2,
                 spatial_dims: int = 2, factors: Optional[Sequence[Sequence[int]]] = None,
                 k_directions: Optional[int] = None):
        super().__init__()
        nd = spatial_dims
        f = check_factors(factors if factors is not None else [(2,) * nd] * N_STEPS, N_STEPS, nd, "VM-UNet")
        self.factors = f
        patch = tuple(a * b for a, b in zip(f[0], f[1]))  # the /4 patch embedding = steps 1 and 2
        layer_kw = dict(spatial_dims=nd, k_directions=k_directions, d_state=d_state)

        self.patch_embed = PatchEmbed(in_chans, dims[0], patch, nd)
        self.pos_drop = nn.Dropout(0.0)  # upstream drop_rate 0: a no-op kept for the module tree
        dpr = _drop_path_rates(drop_path_rate, depths)
        self.layers = nn.ModuleList([
            VSSLayer(dims[i], dpr[i], PatchMerging(dims[i], f[2 + i]) if i < len(depths) - 1 else None, **layer_kw)
            for i in range(len(depths))])
        # decoder rates: linspace over the decoder blocks, reversed, assigned from layers_up[0]
        dpr_dec = [v.item() for v in torch.linspace(0, drop_path_rate, sum(depths_decoder))][::-1]
        self.layers_up = nn.ModuleList()
        for i, depth in enumerate(depths_decoder):
            rates = dpr_dec[sum(depths_decoder[:i]):sum(depths_decoder[:i + 1])]
            # layers_up[i] undoes the merge of layers[3 - i] (factor f_{6-i}); input width 2 * dims_decoder[i]
            up = None if i == 0 else PatchExpand(2 * dims_decoder[i], dims_decoder[i], f[N_STEPS - i])
            self.layers_up.append(VSSLayerUp(dims_decoder[i], rates, up, **layer_kw))
        self.final_up = PatchExpand(dims_decoder[-1], dims_decoder[-1] // 4, patch)
        self.final_conv = conv_nd(nd)(dims_decoder[-1] // 4, num_classes, 1)
        self.apply(vmamba_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pos_drop(self.patch_embed(x))
        skips = []
        for layer in self.layers:
            skips.append(x)  # the input of each encoder stage
            x = layer(x)
        for i, layer_up in enumerate(self.layers_up):
            x = layer_up(x if i == 0 else x + skips[-i])
        return self.final_conv(self.final_up(x).movedim(-1, 1))


class VMUNet(nn.Module):
    """``VMUNet(input_channels, num_classes, depths=[2,2,2,2], depths_decoder=[2,2,2,1], drop_path_rate=0.2,
    spatial_dims=2, factors=None)``.

    2D with one input channel repeats it to 3 (as upstream; keeps the ImageNet patch embedding loadable). 3D takes
    the channels as they are. ``factors``: per-axis factors of the five steps (default x2 everywhere).
    """

    def __init__(self, input_channels: int = 3, num_classes: int = 1, depths: Sequence[int] = (2, 2, 2, 2),
                 depths_decoder: Sequence[int] = (2, 2, 2, 1), drop_path_rate: float = 0.2, spatial_dims: int = 2,
                 factors: Optional[Sequence[Sequence[int]]] = None, k_directions: Optional[int] = None):
        super().__init__()
        self.input_channels, self.num_classes, self.spatial_dims = input_channels, num_classes, spatial_dims
        self.repeat_to_rgb = spatial_dims == 2 and input_channels == 1
        self.vmunet = VSSM(in_chans=3 if self.repeat_to_rgb else input_channels, num_classes=num_classes,
                           depths=depths, depths_decoder=depths_decoder, drop_path_rate=drop_path_rate,
                           spatial_dims=spatial_dims, factors=factors, k_directions=k_directions)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.repeat_to_rgb:
            x = x.repeat(1, 3, *([1] * self.spatial_dims))
        return self.vmunet(x)  # logits (nnU-Net applies softmax / sigmoid itself)
