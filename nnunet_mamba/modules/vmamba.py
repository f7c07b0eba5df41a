"""VMamba building blocks shared by VM-UNet, MSVM-UNet and Swin-UMamba (specs/ss2d.md §2.4, §3.4, §4, §5.3).

Everything is written once for 2D and 3D and for per-axis factors (nnU-Net plans, specs/README.md §5.2); with
``nd = 2`` and factors of 2 each layer is exactly its upstream 2D counterpart (same module names, shapes, order).

* ``VSSBlock``   - VMamba v0 block, channels-last: ``x + DropPath(SS2D_v0(ln_1(x)))`` (no MLP).
* ``VSSBlockV2`` - VMamba v2 block, channels-first: SS2D ``v05_noz`` branch + MLP branch (``Mlp`` or a custom one).
* ``VSSLayer``   - ``blocks`` then optional ``downsample`` (VM-UNet / Swin-UMamba encoder stage).
* ``VSSLayerUp`` - optional ``upsample`` then ``blocks`` (VM-UNet decoder stage).
* ``PatchEmbed`` - ConvNd with kernel = stride = patch + LN, output channels-last.
* ``PatchMerging`` - concat of the prod(f) neighbours (first axis fastest) -> LN -> Linear(-> 2c), channels-last.
* ``PatchExpand`` - Linear(c_in -> c_out * prod(f)) -> pixel shuffle by f -> LN(c_out), channels-last.
* ``vmamba_init_weights`` - VMamba's host init: Linear trunc-normal(0.02)/0, LayerNorm 1/0.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn as nn

from .common import DropPath, LayerNormNd, conv_nd
from .ss2d import SS2D, Linear2d

__all__ = ["Linear2d", "Mlp", "PatchEmbed", "PatchExpand", "PatchMerging", "VSSBlock", "VSSBlockV2", "VSSLayer",
           "VSSLayerUp", "check_factors", "pixel_shuffle_nd", "vmamba_init_weights"]


def _run_core(fn: Callable, x: torch.Tensor, fp32: bool) -> torch.Tensor:
    """Run an SSM-core branch (pre-norm + mixer) in fp32 with autocast off (project fp32 policy, README §7)."""
    if not fp32:
        return fn(x)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return fn(x.float())


def check_factors(factors: Sequence[Sequence[int]], n_steps: int, nd: int, network: str) -> list[tuple[int, ...]]:
    """Validate per-axis step factors given directly to a network (plans go through ``plan_step_factors``)."""
    factors = [tuple(int(v) for v in f) for f in factors]
    if len(factors) != n_steps or any(len(f) != nd for f in factors):
        raise ValueError(f"{network} needs {n_steps} downsampling steps with {nd} per-axis factors each, got "
                         f"{[list(f) for f in factors]}")
    if any(v not in (1, 2) for f in factors for v in f):
        raise ValueError(f"{network} supports per-axis downsampling factors of 1 or 2 only, got "
                         f"{[list(f) for f in factors]}; use a plan whose first {n_steps} pooling steps are 1 or 2 "
                         f"on every axis")
    return factors


def vmamba_init_weights(module: nn.Module) -> None:
    """VMamba ``_init_weights`` for ``module.apply``: every nn.Linear (incl. Linear2d) trunc-normal(std 0.02) with
    bias 0, every nn.LayerNorm (incl. LN2d) weight 1 / bias 0. Convolutions and SS2D's plain parameters untouched."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def pixel_shuffle_nd(x: torch.Tensor, factors: Sequence[int]) -> torch.Tensor:
    """Channels-last pixel shuffle: (B, *q, prod(f)*c) -> (B, q0*f0, q1*f1, ..., c).

    Input channel ``((p0*f1 + p1)*f2 + p2)*c + j`` goes to output voxel ``(q0*f0 + p0, q1*f1 + p1, ...)``, channel
    ``j`` (specs/ss2d.md §4: channel fastest, then the last spatial offset) - einops ``b h w (p1 p2 c)``.
    """
    nd = len(factors)
    b, q, C = x.shape[0], x.shape[1:-1], x.shape[-1]
    c = C // math.prod(factors)
    x = x.reshape(b, *q, *factors, c)
    # (b, q0..q_{nd-1}, p0..p_{nd-1}, c) -> (b, q0, p0, q1, p1, ..., c)
    order = [0] + [a for i in range(nd) for a in (1 + i, 1 + nd + i)] + [1 + 2 * nd]
    return x.permute(*order).reshape(b, *[qi * fi for qi, fi in zip(q, factors)], c)


class PatchEmbed(nn.Module):
    """``proj = ConvNd(C -> dim, k = s = patch, bias)`` -> channels-last -> ``norm = LN(dim)`` (PatchEmbed2D)."""

    def __init__(self, in_chans: int, embed_dim: int, patch: Sequence[int], nd: int = 2):
        super().__init__()
        patch = tuple(patch)
        self.proj = conv_nd(nd)(in_chans, embed_dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).movedim(1, -1))


class PatchMerging(nn.Module):
    """PatchMerging2D generalised (channels-last): gather the prod(f) neighbours, offsets enumerated first axis
    fastest (2D x2: (0,0), (1,0), (0,1), (1,1)), concat -> ``norm = LN(prod(f)*c)`` -> ``reduction`` (-> 2c)."""

    def __init__(self, dim: int, factors: Sequence[int], out_dim: Optional[int] = None):
        super().__init__()
        self.factors = tuple(factors)
        n = math.prod(self.factors)
        self.norm = nn.LayerNorm(n * dim)
        self.reduction = nn.Linear(n * dim, out_dim or 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, S, c = x.shape[0], x.shape[1:-1], x.shape[-1]
        f, nd = self.factors, len(self.factors)
        if any(s % fi for s, fi in zip(S, f)):
            raise ValueError(f"PatchMerging with factors {list(f)} needs a feature map divisible by them, got "
                             f"{list(S)}; use input sizes divisible by the product of the network's factors (nnU-Net "
                             f"patch sizes are)")
        x = x.reshape(b, *[v for s, fi in zip(S, f) for v in (s // fi, fi)], c)
        # (b, q0, p0, q1, p1, ..., c) -> (b, q0, q1, ..., p_{nd-1}, ..., p0, c): p0 fastest after c
        order = [0] + [1 + 2 * i for i in range(nd)] + [2 + 2 * i for i in reversed(range(nd))] + [1 + 2 * nd]
        x = x.permute(*order).reshape(b, *[s // fi for s, fi in zip(S, f)], math.prod(f) * c)
        return self.reduction(self.norm(x))


class PatchExpand(nn.Module):
    """PatchExpand2D / Final_PatchExpand2D generalised (channels-last): ``expand = Linear(c_in -> c_out*prod(f),
    no bias)``, pixel shuffle by ``f``, ``norm = LN(c_out)``."""

    def __init__(self, in_dim: int, out_dim: int, factors: Sequence[int]):
        super().__init__()
        self.factors = tuple(factors)
        self.expand = nn.Linear(in_dim, out_dim * math.prod(self.factors), bias=False)
        self.norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(pixel_shuffle_nd(self.expand(x), self.factors))


class VSSBlock(nn.Module):
    """VMamba v0 block (channels-last): ``x + drop_path(self_attention(ln_1(x)))`` with SS2D/SS3D v0. No MLP."""

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, spatial_dims: int = 2,
                 k_directions: Optional[int] = None, d_state: int = 16, **ss2d_kwargs):
        super().__init__()
        self.ln_1 = nn.LayerNorm(hidden_dim)
        self.self_attention = SS2D(hidden_dim, "v0", spatial_dims, k_directions, d_state=d_state, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path)

    def _core(self, x):
        return self.self_attention(self.ln_1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop_path(_run_core(self._core, x, self.self_attention.core_fp32))


class Mlp(nn.Module):
    """VMamba's channels-first MLP: ``fc1 = Linear2d(d -> h)``, GELU, ``fc2 = Linear2d(h -> d)`` (dropout 0)."""

    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = Linear2d(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = Linear2d(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class VSSBlockV2(nn.Module):
    """VMamba v2 block (channels-first), SS2D/SS3D ``v05_noz``:

    ``x = x + drop_path(op(norm(x)))``; ``x = x + drop_path(mlp(norm2(x)))``. ``mlp`` defaults to ``Mlp(d, 4d)``;
    MSVM-UNet's decoder passes its multi-scale MLP.
    """

    def __init__(self, hidden_dim: int, drop_path: float = 0.0, spatial_dims: int = 2,
                 k_directions: Optional[int] = None, mlp_ratio: float = 4.0,
                 mlp: Optional[Callable[[int, int], nn.Module]] = None, **ss2d_kwargs):
        super().__init__()
        self.norm = LayerNormNd(hidden_dim)
        self.op = SS2D(hidden_dim, "v05_noz", spatial_dims, k_directions, **ss2d_kwargs)
        self.drop_path = DropPath(drop_path)
        self.norm2 = LayerNormNd(hidden_dim)
        self.mlp = (mlp or Mlp)(hidden_dim, int(hidden_dim * mlp_ratio))

    def _core(self, x):
        return self.op(self.norm(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(_run_core(self._core, x, self.op.core_fp32))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class VSSLayer(nn.Module):
    """``blocks`` (VSSBlock v0, one drop-path rate each) then ``downsample`` (or none)."""

    def __init__(self, dim: int, drop_paths: Sequence[float], downsample: Optional[nn.Module] = None,
                 spatial_dims: int = 2, k_directions: Optional[int] = None, d_state: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList([VSSBlock(dim, dp, spatial_dims, k_directions, d_state) for dp in drop_paths])
        self.downsample = downsample

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x if self.downsample is None else self.downsample(x)


class VSSLayerUp(nn.Module):
    """``upsample`` (or none) then ``blocks`` (VSSBlock v0)."""

    def __init__(self, dim: int, drop_paths: Sequence[float], upsample: Optional[nn.Module] = None,
                 spatial_dims: int = 2, k_directions: Optional[int] = None, d_state: int = 16):
        super().__init__()
        self.upsample = upsample
        self.blocks = nn.ModuleList([VSSBlock(dim, dp, spatial_dims, k_directions, d_state) for dp in drop_paths])

    def forward(self, x):
        if self.upsample is not None:
            x = self.upsample(x)
        for blk in self.blocks:
            x = blk(x)
        return x
