"""The Mamba layers' non-scan ops on token-major (b, L, C) tensors, each with a PyTorch and a Triton backend.

* ``causal_conv1d_silu`` - the mixer's causal depthwise conv + SiLU. Torch: ``F.conv1d`` on the transposed view;
  Triton (``kernels/causal_conv1d_triton.py``): reads and writes (b, L, C) directly, no transposed copies.
* ``layer_norm`` - LayerNorm over C. Torch: ``F.layer_norm``; Triton (``kernels/layer_norm_triton.py``): many rows
  per program (PyTorch's kernel gives each short row its own block).

``backend="auto"`` takes Triton for CUDA tensors (when installed) from the smallest size at which it measured faster
than PyTorch on the H100 (kernels/BENCHMARK_mixer_ops.md: the conv from 2 x 32768 x 256 elements, LayerNorm from
2 x 262144 x 64; at the smaller measured sizes PyTorch was faster), else PyTorch.
``NNUNET_MAMBA_TOKEN_OPS_BACKEND`` forces one (benchmarks, debugging). Both backends compute the same function
(Triton: fp32 arithmetic, dense outputs; torch: the conv's output is a transposed view). Nothing here imports triton
at module import time.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from .scan import BackendUnavailable, _triton_unavailable

ENV_BACKEND = "NNUNET_MAMBA_TOKEN_OPS_BACKEND"


# smallest measured size (elements) at which the Triton kernel beat PyTorch, per op (kernels/BENCHMARK_mixer_ops.md)
TRITON_FROM = {"causal-conv1d": 2 * 32768 * 256, "layer-norm": 2 * 262144 * 64}


def _use_triton(op: str, x: torch.Tensor, backend: str) -> bool:
    if backend == "auto":
        backend = os.environ.get(ENV_BACKEND) or (
            "triton" if x.numel() >= TRITON_FROM[op] and _triton_unavailable(x.device) is None else "torch")
    if backend not in ("torch", "triton"):
        raise ValueError(f"unknown {op} backend {backend!r}; known: auto, torch, triton")
    if backend == "triton":
        why = _triton_unavailable(x.device)
        if why:
            raise BackendUnavailable(f"{op} backend 'triton' is not usable on {x.device}: {why}")
    return backend == "triton"


def _conv_torch(x, weight, bias):
    L, C, K = x.shape[1], x.shape[2], weight.shape[-1]
    y = F.conv1d(x.transpose(1, 2), weight.reshape(C, 1, K), bias, padding=K - 1, groups=C)[..., :L]
    return F.silu(y).transpose(1, 2)


def causal_conv1d_silu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       backend: str = "auto") -> torch.Tensor:
    """silu(causal depthwise conv1d) along L of x (b, L, C) with an ``nn.Conv1d(C, C, K, groups=C)`` weight
    (C, 1, K) and bias (C,): output position l sees inputs l-K+1 .. l. Returns (b, L, C)."""
    if _use_triton("causal-conv1d", x, backend):
        from ..kernels.causal_conv1d_triton import causal_conv1d_silu_triton
        return causal_conv1d_silu_triton(x, weight, bias)
    return _conv_torch(x, weight, bias)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float = 1e-5,
               backend: str = "auto") -> torch.Tensor:
    """``F.layer_norm(x, (C,), weight, bias, eps)`` over the last axis of x (..., C)."""
    if _use_triton("layer-norm", x, backend):
        from ..kernels.layer_norm_triton import layer_norm_triton
        return layer_norm_triton(x, weight, bias, eps)
    return F.layer_norm(x, x.shape[-1:], weight, bias, eps)
