"""The selective-scan op boundary: one function, several backends.

``selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
return_last_state=False, backend="auto", delta_proj_weight=None)`` has exactly the semantics and layouts of
mamba-ssm's ``selective_scan_fn``, plus an optional low-rank delta (``delta_proj_weight``; docs/ops.md). Backends:

* ``"torch"``    - vectorised PyTorch (chunked scan, fp32 state, hand-written backward); any device.
* ``"mamba_ssm"`` - mamba-ssm's CUDA kernel; CUDA tensors, needs ``pip install 'nnunet-mamba[cuda]'``.
* ``"triton"``   - the project's own chunk-parallel Triton kernel (``kernels/``); CUDA tensors.

``"auto"`` picks the best backend available for the tensors' device and says once which one it uses.
``causal_conv1d_silu`` and ``layer_norm`` (the Mamba layers' conv + SiLU and LayerNorm on (b, L, C) tokens), and
``depthwise_conv``, ``group_norm``, ``max_pool`` and ``upsample`` on (B, C, *S) maps, and ``scaled_add`` (y + s * t, s a
residual's 1-element scale; its backward fused), have a PyTorch and a Triton backend
(``ops/token_ops.py``); ``linear_split`` and ``linear_channels_first`` are Linear layers computed
in the layouts the Mamba layers need, and ``pointwise_conv`` a 1x1(x1) conv of a channels-first map, their fp32
products on a Triton 3xTF32 GEMM where measured faster (``ops/linear.py``).
Nothing here imports mamba_ssm or triton at module import time.
"""
from .scan import (
    BackendUnavailable,
    available_backends,
    cross_scan_orders,
    cross_selective_scan,
    register_backend,
    selective_scan,
)
from .linear import linear_channels_first, linear_split, pointwise_conv
from .token_ops import causal_conv1d_silu, depthwise_conv, group_norm, layer_norm, max_pool, scaled_add, upsample

__all__ = [
    "BackendUnavailable",
    "available_backends",
    "causal_conv1d_silu",
    "depthwise_conv",
    "group_norm",
    "layer_norm",
    "linear_channels_first",
    "linear_split",
    "max_pool",
    "upsample",
    "pointwise_conv",
    "cross_scan_orders",
    "cross_selective_scan",
    "register_backend",
    "scaled_add",
    "selective_scan",
]
