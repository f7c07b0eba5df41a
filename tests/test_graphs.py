"""Training steps as CUDA graphs (nnunet_mamba/graphs.py): replaying the captured forward + backward gives the eager
step's outputs and gradients, step after step with new inputs and updated weights; the capture leaves buffers as
they were; eval mode runs eagerly. GPU only."""
import copy

import pytest
import torch

from nnunet_mamba.graphs import graph_for_training
from nnunet_mamba.networks.lightm_unet import LightMUNet
from nnunet_mamba.networks.nnmamba import nnMambaSeg
from nnunet_mamba.networks.vm_unet import VMUNet

NETS = {  # (builder, input shape): recomputed Mamba layers; BatchNorm + parameters the forward leaves unused; SS2D
    "lightm_unet_3d": (lambda: LightMUNet(3, 16, 1, 3), (2, 1, 32, 32, 32)),
    "nnmamba_3d": (lambda: nnMambaSeg(in_ch=1, channels=16, number_classes=3, spatial_dims=3, deep_supervision=False),
                   (2, 1, 32, 32, 32)),
    "vm_unet_2d": (lambda: VMUNet(1, 3, drop_path_rate=0.0, spatial_dims=2), (2, 1, 64, 64)),
}


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _step(net, x, target):
    net.zero_grad(set_to_none=True)
    out = _first(net(x))
    torch.nn.functional.cross_entropy(out, target).backward()
    return out.detach().clone(), [None if p.grad is None else p.grad.clone() for p in net.parameters()]


@pytest.mark.cuda
@pytest.mark.parametrize("name", sorted(NETS))
def test_replayed_steps_match_eager_steps(name):
    build, shape = NETS[name]
    torch.manual_seed(0)
    eager = build().cuda().train()
    graphed = copy.deepcopy(eager)
    gen = torch.Generator("cuda").manual_seed(1)
    xs = [torch.randn(shape, device="cuda", generator=gen) for _ in range(3)]
    targets = [torch.randint(0, 3, (shape[0], *shape[2:]), device="cuda", generator=gen) for _ in range(3)]
    buffers = [b.clone() for b in graphed.buffers()]
    graph_for_training(graphed, xs[0])
    assert all(torch.equal(a, b) for a, b in zip(buffers, graphed.buffers()))  # warm-up left BN statistics alone
    for x, t in zip(xs, targets):
        y0, g0 = _step(eager, x, t)
        y1, g1 = _step(graphed, x, t)
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
        assert [g is None for g in g1] == [g is None for g in g0]
        for a, b in zip(g1, g0):
            if b is not None:
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        with torch.no_grad():  # an optimizer step in place: the next replay must read the new weights
            for net in (eager, graphed):
                for p in net.parameters():
                    if p.grad is not None:
                        p -= 1e-2 * p.grad
    for a, b in zip(graphed.buffers(), eager.buffers()):  # the replays updated BN statistics as eager steps do
        torch.testing.assert_close(a, b)
    eager.eval()
    graphed.eval()
    with torch.no_grad():
        x = torch.randn(1, *shape[1:], device="cuda", generator=gen)  # another batch size: eval runs eagerly
        torch.testing.assert_close(_first(graphed(x)), _first(eager(x)), rtol=1e-5, atol=1e-5)


def test_refuses_a_cpu_input():
    with pytest.raises(ValueError, match="CUDA"):
        graph_for_training(torch.nn.Linear(2, 2), torch.zeros(1, 2))
