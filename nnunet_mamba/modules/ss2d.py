"""VMamba's SS2D selective-scan mixer and its 3D form SS3D, as one module (specs/ss2d.md).

Two flavours share one code path:

* ``"v0"`` (VM-UNet, Swin-UMamba): channels-last ``(B, *S, d)``; ``in_proj`` gives ``x`` and a gate ``z``;
  ``d_state`` 16, ``d_inner = 2d``; output ``out_proj(LN(y) * SiLU(z))``.
* ``"v05_noz"`` (MSVM-UNet, VMamba v2): channels-first ``(B, d, *S)``; no gate; ``d_state`` 1, ``d_inner = d``;
  ``Linear2d`` projections, ``LN2d`` out-norm, no conv bias.

The spatial dimensionality is a parameter: 2D uses ``conv2d`` and K = 4 scan directions (VMamba), 3D uses ``conv3d``
and K = 6 (or 12) directions (project extension, specs/ss2d.md §5). The scan directions are data
(``nnunet_mamba.ops.cross_scan_orders``) and all K directions go through ``cross_selective_scan`` in one call:
the per-direction projections are pointwise, so they are computed once per direction on the map in its own layout
(channels-last in memory after the depthwise conv) and the op reads the map in every order (no re-ordered copies
are made here).

Parameter names are VMamba's (``in_proj``, ``conv2d``, ``x_proj_weight``, ``dt_projs_weight``, ``dt_projs_bias``,
``A_logs``, ``Ds``, ``out_norm``, ``out_proj``), so ImageNet VMamba state dicts load without renaming.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import cross_scan_orders, cross_selective_scan
from .common import LayerNormNd, depthwise_conv_nd
from .mamba import a_log_init, dt_bias_init, dt_weight_init

_CHANNELS_LAST = {2: torch.channels_last, 3: torch.channels_last_3d}

# d_state, ssm_ratio (d_inner / d), conv bias, gate, channels-first of each flavour (specs/ss2d.md table)
FLAVOURS = {
    "v0": dict(d_state=16, ssm_ratio=2.0, conv_bias=True, gated=True, channel_first=False),
    "v05_noz": dict(d_state=1, ssm_ratio=1.0, conv_bias=False, gated=False, channel_first=True),
}


class Linear2d(nn.Linear):
    """An ``nn.Linear`` applied to a channels-first map ``(B, C, *S)`` as a 1x1 convolution (2D or 3D).

    The weight is stored as ``(out, in)`` like ``nn.Linear`` (so Linear initialisers reach it); state dicts holding
    a convolution-shaped ``(out, in, 1, 1[, 1])`` weight load too.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        nd = x.dim() - 2
        w = self.weight.view(*self.weight.shape, *([1] * nd))
        return (F.conv2d if nd == 2 else F.conv3d if nd == 3 else F.conv1d)(x, w, self.bias)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        w = state_dict.get(key)
        if w is not None and w.dim() > 2 and all(s == 1 for s in w.shape[2:]):
            state_dict[key] = w.reshape(w.shape[0], w.shape[1])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


class SS2D(nn.Module):
    """SS2D / SS3D mixer.

    ``SS2D(d_model, forward_type="v0" | "v05_noz", spatial_dims=2 | 3, k_directions=None)``; ``d_state``,
    ``ssm_ratio`` and ``conv_bias`` default to the flavour's values. ``core_fp32=True`` (default, project fp32
    policy) runs the whole mixer with autocast disabled on an fp32 copy of the input and returns fp32;
    ``core_fp32=False`` lets the projections and the depthwise conv run under autocast and casts only the scan
    inputs to fp32 (VMamba v0 behaviour).
    """

    def __init__(self, d_model: int, forward_type: str = "v0", spatial_dims: int = 2,
                 k_directions: Optional[int] = None, d_state: Optional[int] = None,
                 ssm_ratio: Optional[float] = None, dt_rank="auto", d_conv: int = 3,
                 conv_bias: Optional[bool] = None, bias: bool = False, dt_min: float = 0.001, dt_max: float = 0.1,
                 dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 core_fp32: bool = True, scan_backend: str = "auto"):
        super().__init__()
        if forward_type not in FLAVOURS:
            raise ValueError(f"SS2D forward_type must be one of {sorted(FLAVOURS)}, got {forward_type!r}")
        if spatial_dims not in (2, 3):
            raise ValueError(f"SS2D supports spatial_dims 2 or 3, got {spatial_dims}")
        fl = FLAVOURS[forward_type]
        self.forward_type, self.spatial_dims = forward_type, spatial_dims
        self.gated, self.channel_first = fl["gated"], fl["channel_first"]
        self.core_fp32, self.scan_backend = core_fp32, scan_backend
        self.d_model = d_model
        self.d_state = N = fl["d_state"] if d_state is None else d_state
        self.d_inner = D = int((fl["ssm_ratio"] if ssm_ratio is None else ssm_ratio) * d_model)
        self.dt_rank = R = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.orders = cross_scan_orders(spatial_dims, k_directions)  # scan directions as data
        self.K = K = len(self.orders)
        conv_bias = fl["conv_bias"] if conv_bias is None else conv_bias

        # input projection: v0 -> (x, z) channels-last; v05_noz -> x channels-first
        if self.gated:
            self.in_proj = nn.Linear(d_model, 2 * D, bias=bias)
        else:
            self.in_proj = Linear2d(d_model, D, bias=bias)
        self.conv_name = f"conv{spatial_dims}d"
        self.add_module(self.conv_name, depthwise_conv_nd(spatial_dims)(D, d_conv, bias=conv_bias))
        self.act = nn.SiLU()

        # per-direction SSM parameters, packed with direction k at rows [k*D, (k+1)*D)
        bound = D ** -0.5  # nn.Linear(D, R + 2N) default init, one draw per direction
        self.x_proj_weight = nn.Parameter(torch.empty(K, R + 2 * N, D).uniform_(-bound, bound))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, D, R))
        dt_weight_init(self.dt_projs_weight, R, dt_init, dt_scale)
        self.dt_projs_bias = nn.Parameter(dt_bias_init(K * D, dt_min, dt_max, dt_init_floor).view(K, D))
        self.A_logs = nn.Parameter(a_log_init(K * D, N))
        self.Ds = nn.Parameter(torch.ones(K * D))
        for p in (self.A_logs, self.Ds):
            p._no_weight_decay = True

        if self.channel_first:
            self.out_norm = LayerNormNd(D)
            self.out_proj = Linear2d(D, d_model, bias=bias)
        else:
            self.out_norm = nn.LayerNorm(D)
            self.out_proj = nn.Linear(D, d_model, bias=bias)

    @property
    def conv(self) -> nn.Module:
        return getattr(self, self.conv_name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """v0: (B, *S, d) -> (B, *S, d); v05_noz: (B, d, *S) -> (B, d, *S)."""
        if not self.core_fp32:
            return self._forward(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return self._forward(x.float())

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        if self.gated:
            x, z = self.in_proj(x).chunk(2, dim=-1)  # channels-last
            x = x.movedim(-1, 1)
        else:
            x = self.in_proj(x)  # channels-first
        # channels-last memory from here on: the depthwise conv keeps it, the projections below are then plain
        # matmuls and the fused scan reads the map and writes y in place, coalesced along the channels
        x = self.act(self.conv(x.contiguous(memory_format=_CHANNELS_LAST[self.spatial_dims])))
        y = self.scan(x)  # (B, D, *S) fp32, channels-last memory
        if self.channel_first:
            return self.out_proj(self.out_norm(y).to(in_dtype))
        y = self.out_norm(y.movedim(1, -1))
        return self.out_proj(y * F.silu(z))

    def scan(self, x: torch.Tensor) -> torch.Tensor:
        """The K-direction selective scan of a map (B, D, *S), merged (fp32). The per-direction projections are
        per position, so they are computed token-major, (B, *S, K, .), which is a plain matmul when x is
        channels-last in memory; the scan inputs are (B, K, ., *S) views of them (no re-ordered copies)."""
        K, R, N = self.K, self.dt_rank, self.d_state
        xt = x.movedim(1, -1)  # (b, *S, D)
        x_dbl = F.linear(xt, self.x_proj_weight.flatten(0, 1).to(xt.dtype)).unflatten(-1, (K, R + 2 * N))
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=-1)  # (b, *S, K, .)
        per_direction = lambda t: t.movedim((-2, -1), (1, 2))  # (b, *S, K, c) -> (b, K, c, *S)
        return cross_selective_scan(  # dt_projs as a low-rank delta (multiplied out in the op by default)
            x, per_direction(dts), -torch.exp(self.A_logs.float()), per_direction(Bs), per_direction(Cs),
            D=self.Ds.float(), delta_bias=self.dt_projs_bias.float().flatten(), delta_softplus=True,
            orders=self.orders, backend=self.scan_backend, delta_proj_weight=self.dt_projs_weight)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, forward_type={self.forward_type!r}, spatial_dims={self.spatial_dims}, "
                f"K={self.K}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}")


def ss2d_param_count(d: int, forward_type: str = "v0", spatial_dims: int = 2, k_directions: Optional[int] = None,
                     k_conv: int = 3) -> int:
    """Closed-form parameter count of SS2D/SS3D (specs/ss2d.md §2.3, §3.3, §5.2)."""
    fl = FLAVOURS[forward_type]
    K = len(cross_scan_orders(spatial_dims, k_directions))
    D, N, R = int(fl["ssm_ratio"] * d), fl["d_state"], math.ceil(d / 16)
    in_proj = d * D * (2 if fl["gated"] else 1)
    conv = D * k_conv ** spatial_dims + (D if fl["conv_bias"] else 0)
    return in_proj + conv + K * D * (2 * R + 3 * N + 2) + 2 * D + D * d
