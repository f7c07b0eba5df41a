"""The scaled residual's fused backward (kernels/scaled_add_triton.py) and ``ops.scaled_add`` on it, against float64.

gt = g * s is one fp32 product per element (exact up to its rounding); gs = sum(g * t) is an fp32 sum of per-block
tree sums, compared relative to sum |g * t| (the size of its rounding errors; the sum itself cancels). On CPU these
run through Triton's interpreter (small sizes); compiled on a GPU also at LightM-UNet's full-resolution map.
"""
import itertools

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def sa():
    from nnunet_mamba.kernels import scaled_add_triton as mod
    return mod


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def check_grads(gt, gs, g, s, t, gt_tol=1e-7, gs_tol=1e-6):
    """gt against g * s (relative to its largest element), gs against sum(g * t) (relative to sum |g * t|)."""
    prod = g.double() * t.double()
    ref_gt = g.double() * s.double()
    assert gt.shape == g.shape
    assert float((gt.double() - ref_gt).abs().max()) <= gt_tol * float(ref_gt.abs().max())
    assert gs.dim() == 0 and gs.dtype == torch.float32
    assert abs(float(gs) - float(prod.sum())) <= gs_tol * float(prod.abs().sum())


@pytest.mark.parametrize("n", [1, 1000, 3 * 4096 + 5])
def test_grads_match_float64(sa, n):
    """Sizes that are not multiples of the block: one partial block, several programs and a partial last one."""
    g, t, s = rand(n, seed=1), rand(n, seed=2), rand(1, seed=3)
    gt, gs = sa.scaled_add_grads(g, s, t)
    assert gt.dtype == torch.float32 and gt.is_contiguous()
    check_grads(gt, gs, g, s, t)


def test_many_programs_of_small_blocks(sa, monkeypatch):
    """BLOCK = 64: 40 programs and partial sums over a (B, C, L) map, s a 0-dim tensor."""
    monkeypatch.setattr(sa, "BLOCK", 64)
    g, t, s = rand(2, 5, 251, seed=4), rand(2, 5, 251, seed=5), rand((), seed=6)
    gt, gs = sa.scaled_add_grads(g, s, t)
    check_grads(gt, gs, g, s, t)


def test_grads_are_repeatable(sa):
    """No atomics: the partial sums are added in a fixed order, so two calls agree bit for bit."""
    g, t, s = rand(5 * 4096 + 17, seed=7), rand(5 * 4096 + 17, seed=8), rand(1, seed=9)
    (a_gt, a_gs), (b_gt, b_gs) = sa.scaled_add_grads(g, s, t), sa.scaled_add_grads(g, s, t)
    assert torch.equal(a_gt, b_gt) and torch.equal(a_gs, b_gs)


def test_only_the_wanted_gradients(sa):
    """need_gt / need_gs: None for the other one; t is needed only for gs."""
    g, t, s = rand(3, 700, seed=10), rand(3, 700, seed=11), rand(1, seed=12)
    gt, gs = sa.scaled_add_grads(g, s, None, need_gs=False)
    assert gs is None
    assert torch.equal(gt, sa.scaled_add_grads(g, s, t)[0])
    gt, gs = sa.scaled_add_grads(g, s, t, need_gt=False)
    assert gt is None
    assert torch.equal(gs, sa.scaled_add_grads(g, s, t)[1])


def test_layouts(sa):
    """Dense tensors of one memory order are walked in place (gt keeps it: channels-last here); a strided slice, the
    zero-stride gradient of ``y.sum()`` and two different orders go through contiguous copies."""
    s = rand(1, seed=13)
    g = rand(2, 3, 4, 5, 6, seed=14).contiguous(memory_format=torch.channels_last_3d)
    t = rand(2, 3, 4, 5, 6, seed=15).contiguous(memory_format=torch.channels_last_3d)
    gt, gs = sa.scaled_add_grads(g, s, t)
    assert gt.stride() == g.stride()
    check_grads(gt, gs, g, s, t)
    big = rand(2, 8, 40, seed=16)
    cases = [(big[:, 1:4, ::2], rand(2, 3, 20, seed=17)),  # a strided slice
             (torch.ones(1, device=DEV).expand(2, 3, 20), rand(2, 3, 20, seed=18)),  # y.sum()'s gradient
             (rand(2, 20, 3, seed=19).transpose(1, 2), rand(2, 3, 20, seed=20))]  # dense, another order than t
    for g, t in cases:
        gt, gs = sa.scaled_add_grads(g, s, t)
        check_grads(gt, gs, g, s, t)


def test_half_inputs_and_output_dtype(sa):
    """bf16 g and t read as such (fp32 arithmetic); gt stored in the requested dtype, rounded once: to nearest even
    compiled (as torch's cast), within one bf16 ulp interpreted (the interpreter's fp32 -> bf16 cast truncates)."""
    g, t, s = rand(3000, seed=21, dtype=torch.bfloat16), rand(3000, seed=22, dtype=torch.bfloat16), rand(1, seed=23)
    gt, gs = sa.scaled_add_grads(g, s, t, dtype=torch.bfloat16)
    assert gt.dtype == torch.bfloat16
    ref = g.float() * s
    assert ((gt.float() - ref).abs() <= ref.abs() * 2.0 ** -7).all()
    if DEV == "cuda":
        assert torch.equal(gt, ref.bfloat16())
    prod = g.double() * t.double()
    assert abs(float(gs) - float(prod.sum())) <= 1e-6 * float(prod.abs().sum())


def test_empty_and_errors(sa):
    gt, gs = sa.scaled_add_grads(rand(0, 4), rand(1), rand(0, 4))
    assert gt.shape == (0, 4) and float(gs) == 0.0
    with pytest.raises(ValueError, match="1 element"):
        sa.scaled_add_grads(rand(4), rand(2), rand(4))
    with pytest.raises(ValueError, match="needed for gs"):
        sa.scaled_add_grads(rand(4), rand(1), rand(5))


@pytest.fixture
def triton_op(monkeypatch):
    """ops.scaled_add with backend "triton" usable on the CPU (the interpreter), counting the kernel's calls."""
    from nnunet_mamba.kernels import scaled_add_triton as mod
    from nnunet_mamba.ops import token_ops

    monkeypatch.setattr(token_ops, "_triton_unavailable", lambda device: None)
    calls = []
    f = mod.scaled_add_grads
    monkeypatch.setattr(mod, "scaled_add_grads", lambda *a, **kw: calls.append(kw) or f(*a, **kw))
    return token_ops.scaled_add, calls


@pytest.mark.parametrize("need", [c for c in itertools.product((False, True), repeat=3) if any(c)])
def test_op_gradients_match_float64_autograd(triton_op, need):
    """Every combination of y, s, t requiring grad: the op's forward and gradients against float64 autograd of
    y + s * t; the kernel runs when s or t needs its gradient, and computes only what is needed."""
    scaled_add, calls = triton_op
    shape = (2, 3, 1111)
    leaves = [rand(*shape, seed=24), rand(1, seed=25), rand(*shape, seed=26)]
    ours = [x.clone().requires_grad_(r) for x, r in zip(leaves, need)]
    ref = [x.double().requires_grad_(r) for x, r in zip(leaves, need)]
    out = scaled_add(*ours, backend="triton")
    out0 = ref[0] + ref[1] * ref[2]
    assert out.dtype == torch.float32 and torch.equal(out, torch.addcmul(*leaves))
    gy = rand(*shape, seed=27)
    (out * gy).sum().backward()
    (out0 * gy.double()).sum().backward()
    scales = {"y": gy.abs().max(), "s": (gy.double() * leaves[2]).abs().sum(), "t": (gy * leaves[1]).abs().max()}
    for name, a, b in zip("yst", ours, ref):
        assert (a.grad is None) != a.requires_grad, name
        if a.requires_grad:
            assert a.grad.shape == a.shape and a.grad.dtype == a.dtype, name
            assert float((a.grad.double() - b.grad).abs().max()) <= 1e-6 * float(scales[name]), name
    assert calls == ([dict(need_gt=need[2], need_gs=need[1], dtype=torch.float32)] if need[1] or need[2] else [])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_resolution_against_addcmul_backward():
    """LightM-UNet's full-resolution map (2, 32, 128^3), (B, C, L) views as the Mamba layer passes them: the op's
    gradients on the kernel against torch's addcmul backward in float64."""
    from nnunet_mamba.ops import scaled_add

    shape = (2, 32, 128, 128, 128)
    leaves = [rand(*shape, seed=28), torch.full((1,), 0.7, device=DEV), rand(*shape, seed=29)]
    ours = [x.clone().requires_grad_() for x in leaves]
    ref = [x.double().requires_grad_() for x in leaves]
    g = rand(*shape, seed=30).flatten(2)
    scaled_add(ours[0].flatten(2), ours[1], ours[2].flatten(2), backend="triton").backward(g)
    torch.addcmul(ref[0].flatten(2), ref[1], ref[2].flatten(2)).backward(g.double())
    g = g.view(shape)
    assert torch.equal(ours[0].grad, g)
    assert float((ours[2].grad.double() - ref[2].grad).abs().max()) <= 1e-7 * float(ref[2].grad.abs().max())
    scale = float((g.double() * ref[2]).abs().sum())
    assert abs(float(ours[1].grad) - float(ref[1].grad)) <= 1e-6 * scale
