"""The Mamba mixer's causal depthwise conv + SiLU on token-major (b, L, C) tensors: one function, two backends.

* ``"torch"``  - ``F.conv1d`` on the transposed view; any device.
* ``"triton"`` - ``kernels/causal_conv1d_triton.py``: reads and writes (b, L, C) directly (no transposed copies);
  CUDA tensors. ``"auto"`` takes it on CUDA when Triton is installed (measured faster at every network shape:
  kernels/BENCHMARK.md), else ``"torch"``. ``NNUNET_MAMBA_CONV_BACKEND`` forces one (benchmarks, debugging).

The result is the same function either way; its layout differs (Triton: dense (b, L, C); torch: a transposed view).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .scan import BackendUnavailable, _triton_unavailable

ENV_BACKEND = "NNUNET_MAMBA_CONV_BACKEND"


def _conv_torch(x, weight, bias):
    L, C, K = x.shape[1], x.shape[2], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight.reshape(C, 1, K), bias, padding=K - 1, groups=C)[..., :L]
    return F.silu(y).transpose(1, 2)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """silu(causal depthwise conv1d) along L of x (b, L, C) with an ``nn.Conv1d(C, C, K, groups=C)`` weight
    (C, 1, K) and bias (C,): output position l sees inputs l-K+1 .. l. Returns (b, L, C)."""
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND) or ("triton" if _triton_unavailable(x.device) is None else "torch")
    if backend == "torch":
        return _conv_torch(x, weight, bias)
    if backend == "triton":
        why = _triton_unavailable(x.device)
        if why:
            raise BackendUnavailable(f"causal-conv1d backend 'triton' is not usable on {x.device}: {why}")
        from ..kernels.causal_conv1d_triton import causal_conv1d_silu_triton
        return causal_conv1d_silu_triton(x, weight, bias)
    raise ValueError(f"unknown causal-conv1d backend {backend!r}; known: auto, torch, triton")
