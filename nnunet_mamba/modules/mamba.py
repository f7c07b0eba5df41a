"""Mamba-1 mixer with mamba-ssm 2.x parameter names, shapes and initialisation (specs/mamba_block.md).

State dicts move unchanged between this module and ``mamba_ssm.Mamba``. The scan goes through the op boundary
``nnunet_mamba.ops.selective_scan`` and the causal conv through ``nnunet_mamba.ops.causal_conv1d_silu``;
``mamba_ssm`` is never imported here.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops import causal_conv1d_silu, linear_channels_first, linear_split, selective_scan


def dt_bias_init(n: int, dt_min=1e-3, dt_max=0.1, dt_init_floor=1e-4) -> torch.Tensor:
    """Inverse softplus of a log-uniform initial step size in [dt_min, dt_max] (mamba_block.md §2)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


def dt_weight_init(weight: torch.Tensor, dt_rank: int, dt_init="random", dt_scale=1.0):
    std = dt_rank ** -0.5 * dt_scale
    with torch.no_grad():
        if dt_init == "constant":
            weight.fill_(std)
        elif dt_init == "random":
            weight.uniform_(-std, std)
        else:
            raise ValueError(f"dt_init must be 'random' or 'constant', got {dt_init!r}")


def a_log_init(rows: int, d_state: int) -> torch.Tensor:
    """S4D-real: A_log[c, n] = log(n + 1) on every row."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(rows, 1).contiguous()


class Mamba(nn.Module):
    """``Mamba(d_model, d_state=16, d_conv=4, expand=2)``: (B, L, d_model) -> (B, L, d_model).

    The weights of ``in_proj`` (and of ``out_proj`` for a channels-first output) are applied through
    ``ops.linear_split`` / ``ops.linear_channels_first``, those of ``x_proj`` and ``dt_proj`` by the scan op
    (``ops.selective_scan``'s ``x_proj_weight`` / ``delta_proj_weight``): same parameters and function, but those
    submodules' ``forward`` (and hooks on it) are not called."""

    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 scan_backend="auto", device=None, dtype=None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.scan_backend = scan_backend
        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                                bias=conv_bias, **factory)
        self.act = nn.SiLU()  # mamba-ssm's module tree; applied inside causal_conv1d_silu
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        dt_weight_init(self.dt_proj.weight, self.dt_rank, dt_init, dt_scale)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, dt_min, dt_max, dt_init_floor))
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(a_log_init(self.d_inner, d_state))
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: torch.Tensor, channels_first: bool = False, residual=None,
                norm: nn.LayerNorm | None = None) -> torch.Tensor:
        """(B, L, d_model) tokens -> (B, L, d_model); with ``channels_first`` the same values as a contiguous
        (B, d_model, L) tensor (out_proj computed in that layout: ``ops.linear_channels_first``), to which
        ``residual`` = (s, t), t (B, d_model, L), adds s * t in out_proj's pass (``ops.scaled_add``'s result).
        ``norm``: a LayerNorm over d_model applied to hidden_states first (``mixer(norm(x))``), folded into in_proj's
        GEMMs where they run on Triton (``ops.linear_split``)."""
        if residual is not None and not channels_first:
            raise ValueError("Mamba: a residual is added only to a channels-first output (channels_first=True)")
        # Token-major (b, L, channels) throughout: the projections' outputs are handed to the conv and the scan as
        # channels-last views (the scan's (b, d, L) arguments are transposed views, no copies). The in_proj output
        # is split without its gradients being concatenated in the backward (ops.linear_split): at full resolution
        # that concatenation copied 2 GB.
        x, z = linear_split(hidden_states, self.in_proj.weight, self.in_proj.bias, (self.d_inner, self.d_inner), norm)
        x = causal_conv1d_silu(x, self.conv1d.weight, self.conv1d.bias)  # (b, L, D)
        # x_proj (dt, B, C) and dt_proj go to the scan op, which applies them (ops.selective_scan): x_proj's weight
        # (the Triton backend computes the product itself and adds x_proj's input gradient into du), dt_proj's weight
        # as the low-rank delta's W (multiplied out by the op, or formed inside the Triton kernels with
        # NNUNET_MAMBA_FUSED_DELTA=1, docs/ops.md), its bias as delta_bias. z is this layer's own view and y goes to
        # out_proj alone, so the scan may write dz over z and du over y's gradient.
        y = selective_scan(x.transpose(1, 2), None, -torch.exp(self.A_log.float()), None, None, D=self.D.float(),
                           z=z.transpose(1, 2), delta_bias=self.dt_proj.bias.float(), delta_softplus=True,
                           backend=self.scan_backend, delta_proj_weight=self.dt_proj.weight, reuse_buffers=True,
                           x_proj_weight=self.x_proj.weight)
        if channels_first:
            return linear_channels_first(y.transpose(1, 2), self.out_proj.weight, self.out_proj.bias, residual)
        return self.out_proj(y.transpose(1, 2))
