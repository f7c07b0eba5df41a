"""The Triton causal depthwise conv + SiLU (token-major) against a float64 oracle: output and every gradient.

The oracle is PyTorch's ``conv1d`` in float64 on the channels-first transpose, cut to the causal part. On CPU these
run through Triton's interpreter (conftest.py), at small sizes; on a GPU compiled, plus full size. The backward
streams segments of R positions, T per program (module docstring); ``set_tuning`` shrinks them so that small
sizes cross segment, program and channel-tile boundaries.
"""
import pytest
import torch
import torch.nn.functional as F

from oracle import rel_err

ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def conv():
    from nnunet_mamba.kernels.causal_conv1d_triton import causal_conv1d_silu_triton
    return causal_conv1d_silu_triton


@pytest.fixture
def plan():
    """Set backward launch-plan overrides for one test; reset afterwards."""
    from nnunet_mamba.kernels import causal_conv1d_triton as mod
    yield mod.set_tuning
    mod.set_tuning()


def oracle(x, w, bias):
    C, K = x.shape[2], w.shape[-1]
    y = F.conv1d(x.transpose(1, 2), w.reshape(C, 1, K), bias, padding=K - 1, groups=C)[..., :x.shape[1]]
    return F.silu(y).transpose(1, 2)


def check(conv, x, w, bias, tol=1e-5, gtol=1e-5, seed=0, gy=None):
    """Output and gradients against the oracle; gy (y's dtype, any strides) is passed to the backward as given."""
    leaf = lambda t, dt=None: None if t is None else t.detach().to(dt or t.dtype).requires_grad_()
    xs, ws, bs = leaf(x), leaf(w), leaf(bias)
    x0, w0, b0 = leaf(x, torch.float64), leaf(w, torch.float64), leaf(bias, torch.float64)
    y, y0 = conv(xs, ws, bs), oracle(x0, w0, b0)
    assert y.shape == y0.shape and y.dtype == x.dtype and y.is_contiguous()
    assert rel_err(y, y0) < tol, rel_err(y, y0)
    if gy is None:
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
        (y.float() * gy).sum().backward()
    else:
        y.backward(gy)
    (y0 * gy.double()).sum().backward()
    for name, a, b in (("x", xs, x0), ("weight", ws, w0), ("bias", bs, b0)):
        if a is None:
            continue
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        assert rel_err(a.grad, b.grad) < gtol, (name, rel_err(a.grad, b.grad))


def inputs(b, L, C, K, dev, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, L, C, generator=g).to(dev, dtype), 0.5 * torch.randn(C, 1, K, generator=g).to(dev),
            0.3 * torch.randn(C, generator=g).to(dev))


@pytest.mark.parametrize("b,L,C,K", [
    (2, 1, 4, 4),  # L = 1: only the last tap sees data
    (1, 3, 5, 4),  # L < K
    (2, 70, 8, 4),  # one forward tile (BL = 512 rows at C = 8), one backward program per batch element
    (1, 600, 8, 4),  # rows over several tiles and backward programs (of 8 x 32 rows interpreted), L a multiple
    # of neither
    (1, 40, 100, 4),  # C over two channel tiles, not a multiple of the tile
    (2, 33, 6, 2), (1, 33, 3, 1),  # other kernel sizes
])
def test_matches_oracle(conv, dev, b, L, C, K):
    check(conv, *inputs(b, L, C, K, dev, seed=L + C))


def test_no_bias_and_weight_shape_c_by_k(conv, dev):
    x, w, _ = inputs(2, 50, 6, 4, dev, seed=3)
    check(conv, x, w.reshape(6, 4), None)


def test_strided_view_as_the_mixer_passes_it(conv, dev):
    """x as the first half of a (b, L, 2C) in_proj output: rows with gaps; output and gradient dense."""
    xz = torch.randn(2, 45, 16, generator=torch.Generator().manual_seed(5)).to(dev)
    _, w, bias = inputs(1, 1, 8, 4, dev, seed=6)
    check(conv, xz[..., :8], w, bias)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fp32_arithmetic(conv, dev, dtype):
    check(conv, *inputs(2, 40, 8, 4, dev, seed=7, dtype=dtype), tol=1e-2, gtol=1e-2)


@pytest.mark.parametrize("b,L,C,K,tiles", [
    (2, 3, 5, 4, dict(T=2, R=5)),  # L < K: the whole sequence within the first segment and its halo
    (1, 37, 12, 4, dict(T=2, R=5, BC=8)),  # segments of 5, programs of 10 rows, L a multiple of neither; C over
    # two channel tiles, the second partly masked
    (2, 23, 6, 4, dict(T=4, R=2)),  # segments shorter than the halo (K-1 rows each side)
    (1, 19, 3, 4, dict(T=1, R=1)),  # one position per segment
    (1, 45, 7, 4, dict(T=2, R=8, U=5, stages=1)),  # more steps per loop iteration than K-1, R + 2(K-1) not a multiple
    (1, 30, 5, 3, dict(T=2, R=4)), (2, 21, 4, 2, dict(T=2, R=3)), (1, 17, 4, 1, dict(T=2, R=3)),  # other K
])
def test_backward_segment_boundaries(conv, dev, plan, b, L, C, K, tiles):
    plan(**tiles)
    check(conv, *inputs(b, L, C, K, dev, seed=L + C + K))


def test_backward_boundaries_no_bias(conv, dev, plan):
    plan(T=2, R=3, BC=4)
    x, w, _ = inputs(2, 29, 6, 4, dev, seed=11)
    check(conv, x, w.reshape(6, 4), None)


def test_backward_any_strides(conv, dev, plan):
    """x with the channels strided (a (b, C, L) map's transpose) and gy in two layouts: rows with gaps, and
    channels-strided too; across segment and channel-tile boundaries."""
    plan(T=2, R=4, BC=4)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(2, 6, 33, generator=g).to(dev).transpose(1, 2)
    _, w, bias = inputs(1, 1, 6, 4, dev, seed=13)
    gaps = torch.randn(2, 33, 16, generator=g).to(dev)[..., 3:9]
    check(conv, x, w, bias, gy=gaps)
    check(conv, x, w, bias, gy=torch.randn(2, 6, 33, generator=g).to(dev).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_backward_boundaries_half_inputs(conv, dev, plan, dtype):
    plan(T=2, R=5, BC=4)
    x, w, bias = inputs(2, 27, 6, 4, dev, seed=14, dtype=dtype)
    gy = torch.randn(2, 27, 6, generator=torch.Generator().manual_seed(15)).to(dev, dtype)
    check(conv, x, w, bias, tol=1e-2, gtol=1e-2, gy=gy)


def test_backward_is_bitwise_repeatable_over_many_programs(conv, dev, plan):
    plan(T=2, R=3, BC=4)
    x, w, bias = inputs(2, 61, 10, 4, dev, seed=16)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (x, w, bias)]
        conv(*leaves).square().sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_set_tuning_rejects_unknown_keys(plan):
    with pytest.raises(ValueError, match="unknown keys"):
        plan(BL=4)


def test_backward_is_bitwise_repeatable(conv, dev):
    x, w, bias = inputs(1, 300, 8, 4, dev, seed=8)
    grads = []
    for _ in range(2):
        ws = w.clone().requires_grad_()
        conv(x, ws, bias).square().sum().backward()
        grads.append(ws.grad)
    assert torch.equal(grads[0], grads[1])


def test_rejects_wrong_shapes(conv, dev):
    x, w, bias = inputs(1, 10, 8, 4, dev)
    with pytest.raises(ValueError, match=r"\(b, L, C\)"):
        conv(x.transpose(1, 2), w, bias)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_full_size_matches_torch(conv):
    """LightM-UNet's full-resolution mixer shape (2 x 128^3 tokens, 64 channels) against PyTorch's conv in fp32."""
    x, w, bias = inputs(2, 128 ** 3, 64, 4, "cuda", seed=9)
    check(conv, x, w, bias, tol=1e-5, gtol=1e-4)
