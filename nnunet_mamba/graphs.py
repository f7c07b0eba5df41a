"""Training steps as CUDA graphs: a network's forward and backward captured once, then replayed every step.

A Mamba network's training step issues thousands of small kernels (LightM-UNet 3D: ~3,700), each with its Python,
autograd and launch work on the host. Where that host work outruns the GPU work (the low-resolution levels, small
batches) the GPU idles: on the H200 machine LightM-UNet's 300 ms of kernels took 340-360 ms per step. Replaying a
captured graph costs the host one launch, so the step takes its GPU time (docs/benchmarking.md, "CUDA graphs").

``graph_for_training`` wraps ``torch.cuda.make_graphed_callables``: the module's forward replays the captured graphs
while ``module.training`` is True (and autocast is as at the capture) and runs eagerly otherwise (eval mode:
validation, inference). Under mixed precision (``autocast_dtype``) only the forward is captured inside autocast, as
in an eager AMP step, where ``backward()`` runs outside it. The capture's warm-up passes leave the module's buffers
(BatchNorm running statistics) as they were. Graphs need the same input shape on every call and fixed control flow
inside the network (the plugin's networks have both for a given plan).
"""
from __future__ import annotations

from typing import Optional

import torch

ENV = "NNUNET_MAMBA_CUDA_GRAPHS"


class _Captured(torch.nn.Module):
    """The module's own forward, in the autocast state of the step it stands for (the callable that is captured)."""

    def __init__(self, module: torch.nn.Module, forward, autocast_dtype: Optional[torch.dtype]):
        super().__init__()
        self.module, self._forward, self.autocast_dtype = module, forward, autocast_dtype

    def forward(self, x):
        with torch.autocast("cuda", dtype=self.autocast_dtype or torch.float16, enabled=self.autocast_dtype is not None,
                            cache_enabled=False):  # no cast weights cached across replays: the optimizer moves them
            return self._forward(x)


def graph_for_training(module: torch.nn.Module, sample: torch.Tensor, warmup: int = 3,
                       autocast_dtype: Optional[torch.dtype] = None) -> torch.nn.Module:
    """Capture ``module``'s training forward and backward for inputs shaped like ``sample`` (a CUDA batch; its
    values drive the warm-up passes) and return the module, whose forward now replays them in training mode.

    ``autocast_dtype``: the step runs the forward under ``torch.autocast("cuda", dtype)`` (nnU-Net's AMP recipe:
    float16); the graphs are replayed only when the module is called in that autocast state (else eagerly).
    Parameters keep their storage (optimizers step them in place; the graphs read the new values); parameters the
    forward does not use get no gradient, as in eager mode."""
    if not sample.is_cuda:
        raise ValueError(f"CUDA graphs need a CUDA input, got one on {sample.device}")
    saved = [b.detach().clone() for b in module.buffers()]
    was_training = module.training
    module.train()
    eager = module.forward
    captured = torch.cuda.make_graphed_callables(_Captured(module, eager, autocast_dtype), (sample.detach(),),
                                                 num_warmup_iters=warmup, allow_unused_input=True)
    with torch.no_grad():
        for b, s in zip(module.buffers(), saved):
            b.copy_(s)

    def forward(x, *args, **kwargs):
        autocast = torch.is_autocast_enabled("cuda")
        if (module.training and not args and not kwargs and autocast == (autocast_dtype is not None)
                and (not autocast or torch.get_autocast_dtype("cuda") == autocast_dtype)):
            return captured(x)
        return eager(x, *args, **kwargs)

    module.forward = forward
    module.train(was_training)
    return module
