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


def close(a, b, floor=0.0, tol=1e-2, what="", amp=False):
    """Equal up to summation order, to 1 % of each tensor's largest value: the eager and the replayed kernels sum in
    different orders where cuDNN or cuBLAS pick other algorithms (differences up to 0.13 % of a tensor's largest
    value seen on the H200, BatchNorm running variances and conv weight gradients). A replay that read stale
    weights (the steps below move each tensor by 10 % of its scale) or a stale input is far outside. ``floor``: for
    gradients that are zero up to round-off (a conv bias before a norm), a bound from the step's largest gradient.

    ``amp``: float16 steps are compared by the norm of the difference, within 3 * ``tol`` of the tensor's norm (plus
    ``floor`` per element): an element of a weight gradient that sums 65,536 float16 products of both signs can
    differ by more than 3 % of the tensor's largest value with the summation order (H200: LightM-UNet's first conv,
    1 of 27 elements, in 2 of 11 runs of this file), and that gradient as a whole by 1.0 % and 1.4 % of its norm
    (session 14, one run each of two trees whose Mamba layers give bitwise the same steps: the differences come from
    the network's other kernels, its upsampling's atomic gradient sums among them). A stale replay moves 10 %."""
    a, b = a.detach().double(), b.detach().double()
    if amp:
        diff, bound = float((a - b).norm()), 3 * tol * float(b.norm()) + floor * b.numel() ** 0.5
        assert diff <= bound, f"{what}: |difference| {diff:.3e} > {bound:.3e} ({3 * tol} of |eager| {float(b.norm()):.3e})"
        return
    torch.testing.assert_close(a, b, rtol=tol, atol=max(tol * float(b.abs().max()), floor),
                               msg=lambda m: f"{what}: {m}")


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _step(net, x, target, amp=False):
    """One step as nnU-Net runs it: forward and loss under autocast (float16) for AMP, backward outside it."""
    net.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
        out = _first(net(x))
        loss = torch.nn.functional.cross_entropy(out, target)
    loss.backward()
    return out.detach().clone(), [None if p.grad is None else p.grad.clone() for p in net.parameters()]


@pytest.fixture
def deterministic_cudnn():
    """cuDNN's deterministic algorithms for both the eager and the captured steps (its default weight-gradient
    algorithms are not repeatable from run to run, eager against eager included)."""
    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    yield
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved


@pytest.mark.cuda
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "amp_fp16"])
@pytest.mark.parametrize("name", sorted(NETS))
def test_replayed_steps_match_eager_steps(name, amp, deterministic_cudnn):
    """``amp``: the forward captured under float16 autocast (compared by norms, see ``close``)."""
    build, shape = NETS[name]
    torch.manual_seed(0)
    eager = build().cuda().train()
    graphed = copy.deepcopy(eager)
    gen = torch.Generator("cuda").manual_seed(1)
    xs = [torch.randn(shape, device="cuda", generator=gen) for _ in range(3)]
    targets = [torch.randint(0, 3, (shape[0], *shape[2:]), device="cuda", generator=gen) for _ in range(3)]
    buffers = [b.clone() for b in graphed.buffers()]
    graph_for_training(graphed, xs[0], autocast_dtype=torch.float16 if amp else None)
    assert all(torch.equal(a, b) for a, b in zip(buffers, graphed.buffers()))  # warm-up left BN statistics alone
    for x, t in zip(xs, targets):
        y0, g0 = _step(eager, x, t, amp)
        y1, g1 = _step(graphed, x, t, amp)
        assert y1.dtype == y0.dtype
        close(y1, y0, what="output", amp=amp)
        assert [g is None for g in g1] == [g is None for g in g0]
        floor = 1e-5 * max(float(g.abs().max()) for g in g0 if g is not None)
        for (n, _), a, b in zip(graphed.named_parameters(), g1, g0):
            if b is not None:
                close(a, b, floor, what=f"gradient of {n}", amp=amp)
        for (n, a), b in zip(graphed.named_buffers(), eager.buffers()):  # BN statistics updated as the eager step
            close(a, b, what=n, amp=amp)
        with torch.no_grad():  # an optimizer step in place, 10 % of each tensor's scale: the next replay must read
            for p in graphed.parameters():  # the new weights; the eager copy restarts from the same state
                if p.grad is not None:
                    p -= 0.1 * p.grad / p.grad.abs().max().clamp(min=1e-12) * p.abs().max().clamp(min=1e-3)
        eager.load_state_dict(graphed.state_dict())
    eager.eval()
    graphed.eval()
    with torch.no_grad():
        x = torch.randn(1, *shape[1:], device="cuda", generator=gen)  # another batch size: eval runs eagerly
        close(_first(graphed(x)), _first(eager(x)))
    graphed.train()
    eager.train()
    with torch.autocast("cuda", dtype=torch.float16, enabled=not amp):  # the other autocast state: eagerly too
        close(_first(graphed(x)), _first(eager(x)), amp=True)


def test_refuses_a_cpu_input():
    with pytest.raises(ValueError, match="CUDA"):
        graph_for_training(torch.nn.Linear(2, 2), torch.zeros(1, 2))


@pytest.mark.cuda
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graphed"])
def test_kept_segment_states_leave_the_steps_bitwise_unchanged(graphs, monkeypatch):
    """LightM-UNet's recomputed Mamba layer by default has the recomputation write the backward's segment states,
    which then live until the backward (kernels/selective_scan_triton.py, ``_early_scratch``); with
    NNUNET_MAMBA_EARLY_SCRATCH=0 the backward walks for them itself. The same arithmetic either way: two steps give
    bitwise the same outputs and gradients, eager and replayed from CUDA graphs (the box that hands the states to the
    backward is filled again at every replay). A layer, not the network: the network's trilinear upsampling sums its
    gradient with atomics, so two of its steps differ in the last bits whatever the scan does."""
    from nnunet_mamba.networks.lightm_unet import MambaLayer

    shape = (2, 16, 32, 32, 32)
    runs = []
    for mode in ("1", "1", "0"):
        monkeypatch.setenv("NNUNET_MAMBA_EARLY_SCRATCH", mode)
        torch.manual_seed(0)
        net = MambaLayer(16, 16).cuda().train()
        gen = torch.Generator("cuda").manual_seed(1)
        xs = [torch.randn(shape, device="cuda", generator=gen) for _ in range(2)]
        targets = [torch.randint(0, 16, (shape[0], *shape[2:]), device="cuda", generator=gen) for _ in range(2)]
        if graphs:
            graph_for_training(net, xs[0])
        runs.append([_step(net, x, t) for x, t in zip(xs, targets)])
    for what, other in (("repeated", runs[1]), ("NNUNET_MAMBA_EARLY_SCRATCH=0", runs[2])):
        for (y1, g1), (y0, g0) in zip(runs[0], other):
            assert torch.equal(y1, y0), what
            assert all(torch.equal(a, b) for a, b in zip(g1, g0)), what
