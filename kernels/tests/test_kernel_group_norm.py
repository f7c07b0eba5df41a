"""The Triton GroupNorm against a float64 oracle (``F.group_norm`` on float64 copies): output and every gradient.

On CPU these run through Triton's interpreter (conftest.py) at small sizes; ``small_blocks`` shrinks the block and
sets the number of reduction programs so that rows split into several chunks of several steps, the last one
partial. On a GPU compiled, plus the full-size map the kernel is for.
"""
import pytest
import torch
import torch.nn.functional as F

from oracle import rel_err

ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def gn():
    from nnunet_mamba.kernels import group_norm_triton as mod
    return mod


@pytest.fixture
def small_blocks(gn, monkeypatch):
    """BLOCK = 32; the test sets ``gn.PROGRAMS_CPU`` (reduction programs in all) through ``monkeypatch``."""
    monkeypatch.setattr(gn, "BLOCK", 32)
    return monkeypatch


def check(gn, x, w, b, G, tol=1e-5, need=(True, True, True), seed=0):
    """Output and the gradients for the inputs in ``need`` (the others get none) against the oracle."""
    leaf = lambda t, req, dt=None: None if t is None else t.detach().to(dt or t.dtype).requires_grad_(req)
    ours = [leaf(t, req) for t, req in zip((x, w, b), need)]
    ref = [leaf(t, req, torch.float64) for t, req in zip((x, w, b), need)]
    # the oracle with weight None and a bias: a weight of ones (PyTorch's CUDA group-norm backward fails for that
    # combination with "tensor does not have a device", H200, torch 2.11)
    w0 = ref[1] if ref[1] is not None or ref[2] is None else torch.ones_like(ref[2])
    y, y0 = gn.group_norm_triton(*ours, G, 1e-5), F.group_norm(ref[0], G, w0, ref[2], 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert rel_err(y, y0) < tol, rel_err(y, y0)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    (y.float() * gy).sum().backward()
    (y0 * gy.double()).sum().backward()
    for name, a, a0, req in zip(("x", "weight", "bias"), ours, ref, need):
        if a is None:
            continue
        if not req:
            assert a.grad is None, name
            continue
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        assert rel_err(a.grad, a0.grad) < tol, (name, rel_err(a.grad, a0.grad))


def inputs(shape, dev, affine=(True, True), offset=0.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (1.5 * torch.randn(shape, generator=g) + 0.3 + offset).to(dev, dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(dev) if affine[0] else None
    b = (0.5 * torch.randn(C, generator=g)).to(dev) if affine[1] else None
    return x, w, b


@pytest.mark.parametrize("G", [1, 4, 8])  # 8 = C: one channel a group
@pytest.mark.parametrize("affine", [(True, True), (False, False)])
def test_3d_maps(gn, dev, G, affine):
    """(N, C, D, H, W) with S = 210: not a multiple of the block (256)."""
    x, w, b = inputs((2, 8, 5, 6, 7), dev, affine, seed=G)
    check(gn, x, w, b, G)


@pytest.mark.parametrize("G", [1, 3, 6])
def test_2d_maps(gn, dev, G):
    x, w, b = inputs((3, 6, 9, 11), dev, seed=10 + G)
    check(gn, x, w, b, G)


def test_1d_maps_and_one_element_rows(gn, dev):
    """S = 37, and S = 1 with 6-element groups (2-element groups are ill-conditioned: y = +-1, dx ~ eps)."""
    check(gn, *inputs((2, 4, 37), dev, seed=20), G=2)
    check(gn, *inputs((3, 12, 1, 1), dev, seed=21), G=2)


@pytest.mark.parametrize("programs", [1, 16, 64])  # 8 rows: one chunk a row (fewer programs than rows), 2, 8
def test_several_chunks_and_steps(gn, dev, small_blocks, programs):
    """S = 693 in 32-element steps: 1 chunk of 22 steps, 2 of 11, or 8 of 3 (the last one 21 elements)."""
    small_blocks.setattr(gn, "PROGRAMS_CPU", programs)
    check(gn, *inputs((2, 4, 7, 9, 11), dev, seed=30), G=2)


@pytest.mark.parametrize("affine", [(True, False), (False, True)])
def test_weight_or_bias_alone(gn, dev, affine):
    check(gn, *inputs((2, 6, 4, 5, 6), dev, affine, seed=40), G=3)


@pytest.mark.parametrize("offset", [1e3, -1e4])
def test_large_common_offset(gn, dev, small_blocks, offset):
    """x = offset + 1.5 randn: fp32 accuracy relative to the spread, not the offset (PyTorch's own fp32 group norm
    is off by ~3e-5 on y and ~1e-4 on dweight at 1e3; sum / sum of squares in fp32 by far more)."""
    small_blocks.setattr(gn, "PROGRAMS_CPU", 16)
    check(gn, *inputs((2, 4, 7, 9, 11), dev, offset=offset, seed=50), G=2)


def test_non_contiguous_input(gn, dev):
    """A strided slice and a channels-last map: made contiguous; output and dx dense."""
    x, w, b = inputs((2, 8, 6, 5, 10), dev, seed=60)
    check(gn, x[..., ::2], w, b, 4)
    check(gn, x.to(memory_format=torch.channels_last_3d), w, b, 4)


@pytest.mark.parametrize("need", [(False, True, True), (True, False, False), (False, False, True)])
def test_some_gradients_not_requested(gn, dev, need):
    check(gn, *inputs((2, 6, 5, 7), dev, seed=70), G=2, need=need)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fp32_arithmetic(gn, dev, dtype):
    check(gn, *inputs((2, 8, 5, 6, 7), dev, dtype=dtype, seed=80), G=4, tol=1e-2)


def test_backward_is_bitwise_repeatable(gn, dev, small_blocks):
    small_blocks.setattr(gn, "PROGRAMS_CPU", 16)
    x, w, b = inputs((2, 4, 7, 9, 11), dev, seed=90)
    grads = []
    for _ in range(2):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        gn.group_norm_triton(xs, ws, b, 2, 1e-5).square().sum().backward()
        grads.append((xs.grad, ws.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_rejects_wrong_shapes(gn, dev):
    x, w, b = inputs((2, 6, 5, 7), dev)
    with pytest.raises(ValueError, match="divisible"):
        gn.group_norm_triton(x, w, b, 4)
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        gn.group_norm_triton(x[:, :, 0, 0], w, b, 2)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        gn.group_norm_triton(x, w[:3], b, 2)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_full_size_matches_torch(gn):
    """LightM-UNet's full-resolution map (2, 32, 128^3), 8 groups, against PyTorch's group norm in fp32 (the oracle
    here: a float64 copy of 134M elements would double the test's memory for no gain at this tolerance)."""
    x, w, b = inputs((2, 32, 128, 128, 128), "cuda", seed=100)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    x0, w0, b0 = (t.clone().requires_grad_() for t in (x, w, b))
    y, y0 = gn.group_norm_triton(xs, ws, bs, 8, 1e-5), F.group_norm(x0, 8, w0, b0, 1e-5)
    assert rel_err(y, y0) < 1e-5, rel_err(y, y0)
    gy = torch.randn_like(y)
    y.backward(gy)
    y0.backward(gy)
    for name, a, a0 in (("x", xs, x0), ("weight", ws, w0), ("bias", bs, b0)):
        assert rel_err(a.grad, a0.grad) < 1e-4, (name, rel_err(a.grad, a0.grad))
