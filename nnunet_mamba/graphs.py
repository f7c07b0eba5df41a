"""Training steps as CUDA graphs: a network's forward and backward captured once, then replayed every step.

A Mamba network's training step issues thousands of small kernels (LightM-UNet 3D: ~3,700), each with its Python,
autograd and launch work on the host. Where that host work outruns the GPU work (the low-resolution levels, small
batches) the GPU idles: on the H200 machine LightM-UNet's 300 ms of kernels took 340-360 ms per step. Replaying a
captured graph costs the host one launch, so the step takes its GPU time (docs/benchmarking.md, "CUDA graphs").

``graph_for_training`` wraps ``torch.cuda.make_graphed_callables``: the module's forward replays the captured graphs
while ``module.training`` is True and runs eagerly in eval mode (validation, inference). The capture's warm-up
passes leave the module's buffers (BatchNorm running statistics) as they were. Graphs need the same input shape on
every call and fixed control flow inside the network (the plugin's networks have both for a given plan).
"""
from __future__ import annotations

import torch

ENV = "NNUNET_MAMBA_CUDA_GRAPHS"


def graph_for_training(module: torch.nn.Module, sample: torch.Tensor, warmup: int = 3) -> torch.nn.Module:
    """Capture ``module``'s training forward and backward for inputs shaped like ``sample`` (a CUDA batch; its
    values drive the warm-up passes) and return the module, whose forward now replays them in training mode.

    Parameters keep their storage (optimizers step them in place; the graphs read the new values); parameters the
    forward does not use get no gradient, as in eager mode."""
    if not sample.is_cuda:
        raise ValueError(f"CUDA graphs need a CUDA input, got one on {sample.device}")
    saved = [b.detach().clone() for b in module.buffers()]
    was_training = module.training
    module.train()
    graphed = torch.cuda.make_graphed_callables(module, (sample.detach(),), num_warmup_iters=warmup,
                                                allow_unused_input=True)
    with torch.no_grad():
        for b, s in zip(module.buffers(), saved):
            b.copy_(s)
    module.train(was_training)
    return graphed
