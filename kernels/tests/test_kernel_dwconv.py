"""The Triton depthwise 3D / 2D convolution against a float64 oracle: output, its memory format and every gradient.

The oracle is PyTorch's ``conv3d`` / ``conv2d`` with ``groups=C`` and 'same' padding in float64. On CPU these run
through Triton's interpreter (conftest.py), at small sizes and kernels up to 5; on a GPU compiled, plus full size.
"""
import pytest
import torch
import torch.nn.functional as F

from oracle import rel_err

ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def mod():
    from nnunet_mamba.kernels import depthwise_conv_triton as mod
    return mod


@pytest.fixture(scope="module")
def conv(mod):
    return mod.depthwise_conv_triton


def oracle(x, w, bias):
    conv_nd = F.conv3d if x.dim() == 5 else F.conv2d
    return conv_nd(x, w, bias, padding=tuple(k // 2 for k in w.shape[2:]), groups=x.shape[1])


def fmt(channels_last, dim):
    if not channels_last:
        return torch.contiguous_format
    return torch.channels_last_3d if dim == 5 else torch.channels_last


def check(conv, x, w, bias, tol=1e-5, gtol=1e-5, seed=0):
    """Output and gradients of x, w, bias (those that require grad) against the oracle; y and gx must be in x's
    memory format (channels-last when x's channel stride is 1, else contiguous). Returns the leaves differentiated."""
    leaf = lambda t, dt=None: None if t is None else t.detach().to(dt or t.dtype).requires_grad_(t.requires_grad)
    xs, ws, bs = leaf(x), leaf(w), leaf(bias)
    x0, w0, b0 = leaf(x, torch.float64), leaf(w, torch.float64), leaf(bias, torch.float64)
    y, y0 = conv(xs, ws, bs), oracle(x0, w0, b0)
    layout = fmt(x.stride(1) == 1 and x.shape[1] > 1, x.dim())
    assert y.shape == y0.shape and y.dtype == x.dtype and y.is_contiguous(memory_format=layout)
    assert rel_err(y, y0) < tol, rel_err(y, y0)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    (y.float() * gy.contiguous(memory_format=layout)).sum().backward()
    (y0 * gy.double()).sum().backward()
    for name, a, b in (("x", xs, x0), ("weight", ws, w0), ("bias", bs, b0)):
        if a is None or not a.requires_grad:
            continue
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        assert rel_err(a.grad, b.grad) < gtol, (name, rel_err(a.grad, b.grad))
    assert xs.grad is None or xs.grad.is_contiguous(memory_format=layout)
    return xs, ws, bs


def inputs(shape, ks, dev, seed=0, dtype=torch.float32, channels_last=False, bias=True):
    """x (b, C, *spatial) in the given layout, weight (C, 1, *ks), bias (C,) or None; all require grad."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dev, dtype).contiguous(memory_format=fmt(channels_last, len(shape)))
    w = 0.3 * torch.randn(shape[1], 1, *ks, generator=g).to(dev)
    b = 0.3 * torch.randn(shape[1], generator=g).to(dev) if bias else None
    return [t if t is None else t.requires_grad_() for t in (x, w, b)]


@pytest.mark.parametrize("shape,ks,channels_last,bias", [
    ((2, 5, 7, 9, 11), (3, 3, 3), False, True),  # no extent a multiple of a tile
    ((2, 5, 7, 9, 11), (3, 3, 3), True, False),
    ((1, 3, 4, 5, 6), (1, 1, 1), False, True),
    ((1, 3, 4, 5, 6), (1, 1, 1), True, True),
    ((1, 3, 4, 6, 5), (5, 5, 5), False, True),  # kernel wider than the map along D
    ((1, 3, 4, 6, 5), (5, 5, 5), True, False),
    ((1, 2, 3, 5, 7), (1, 3, 5), False, True),  # anisotropic kernel
    ((1, 2, 3, 5, 7), (5, 1, 3), True, True),
    ((1, 2, 2, 20, 130), (3, 3, 3), False, True),  # several row and column blocks of a channel plane
    ((1, 70, 2, 3, 5), (3, 3, 3), True, True),  # channels-last: C over two blocks of 64, not a multiple
    ((1, 17, 2, 4, 8), (3, 3, 3), False, False),  # channels-first, small planes: C over two blocks of 16
    ((2, 1, 5, 6, 7), (3, 3, 3), False, False),  # one channel (LightM-UNet's convInit)
])
def test_matches_oracle(conv, dev, shape, ks, channels_last, bias):
    check(conv, *inputs(shape, ks, dev, seed=sum(shape), channels_last=channels_last, bias=bias))


@pytest.mark.parametrize("shape,ks,channels_last", [
    ((2, 6, 9, 13), (3, 3), False),
    ((2, 6, 9, 13), (3, 3), True),
    ((1, 3, 8, 7), (5, 1), False),
])
def test_2d_maps(conv, dev, shape, ks, channels_last):
    check(conv, *inputs(shape, ks, dev, seed=3, channels_last=channels_last))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_inputs_fp32_arithmetic(conv, dev, dtype, channels_last):
    x, w, bias = inputs((2, 4, 5, 6, 7), (3, 3, 3), dev, seed=7, dtype=dtype, channels_last=channels_last)
    check(conv, x, w, bias, tol=1e-2, gtol=1e-2)


def test_strided_view(conv, dev):
    """x as a slice of a larger map (no unit stride): read in place; output and gx contiguous."""
    big = torch.randn(2, 8, 5, 6, 14, generator=torch.Generator().manual_seed(4)).to(dev)
    _, w, bias = inputs((1, 3, 1, 1, 1), (3, 3, 3), dev, seed=5)
    x = big[:, 2:5, :, 1:, ::2].requires_grad_()
    assert x.stride(1) != 1 and not x.is_contiguous()
    check(conv, x, w, bias)


def test_broadcast_output_gradient(conv, dev):
    """``y.sum()`` hands the backward a gy with zero strides."""
    x, w, bias = inputs((1, 3, 4, 5, 6), (3, 3, 3), dev, seed=10, channels_last=True)
    conv(x, w, bias).sum().backward()
    leaves = [t.detach().double().requires_grad_() for t in (x, w, bias)]
    oracle(*leaves).sum().backward()
    for a, b in zip((x, w, bias), leaves):
        assert rel_err(a.grad, b.grad) < 1e-5, rel_err(a.grad, b.grad)


@pytest.mark.parametrize("wanted", ["x", "weight", "bias"])
def test_only_the_wanted_gradients(conv, mod, dev, monkeypatch, wanted):
    """Gradients are computed only for the inputs that require them: the input gradient's convolution runs only for
    x, the weight / bias reduction only for the weight or the bias."""
    calls = []
    for name in ("_conv", "_weight_bias_grad"):
        f = getattr(mod, name)
        monkeypatch.setattr(mod, name, lambda *a, f=f, name=name: calls.append(name) or f(*a))
    x, w, bias = (t.detach().requires_grad_(n == wanted) for t, n in
                  zip(inputs((1, 3, 3, 4, 5), (3, 3, 3), dev, seed=6), ("x", "weight", "bias")))
    leaves = check(conv, x, w, bias)
    assert calls == ["_conv", "_conv" if wanted == "x" else "_weight_bias_grad"]
    assert [t.grad is not None for t in leaves] == [n == wanted for n in ("x", "weight", "bias")]


def test_backward_is_bitwise_repeatable(conv, dev):
    x, w, bias = inputs((2, 3, 4, 9, 10), (3, 3, 3), dev, seed=8)
    grads = []
    for _ in range(2):
        ws, bs = w.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
        conv(x.detach(), ws, bs).square().sum().backward()
        grads.append((ws.grad, bs.grad))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_rejects_wrong_shapes(conv, dev):
    x, w, bias = inputs((1, 4, 3, 3, 3), (3, 3, 3), dev)
    with pytest.raises(ValueError, match="odd"):
        conv(x, w[..., :2], bias)  # even kernel size
    with pytest.raises(ValueError, match="odd"):
        conv(x, w[:3], bias)  # weight for another channel count
    with pytest.raises(ValueError, match="odd"):
        conv(x[0], w, bias)  # no batch axis


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_full_size_matches_torch(conv):
    """A full-resolution (2, 32, 128^3) fp32 channels-first map, 3x3x3 kernel, against PyTorch's conv3d in fp32
    (cuDNN off: no TF32)."""
    x, w, bias = inputs((2, 32, 128, 128, 128), (3, 3, 3), "cuda", seed=9)
    y = conv(x, w, bias)
    with torch.backends.cudnn.flags(enabled=False):
        y0 = F.conv3d(x, w, bias, padding=1, groups=32)
    assert rel_err(y, y0) < 1e-5, rel_err(y, y0)
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, w, bias), gy)
    with torch.backends.cudnn.flags(enabled=False):
        grads0 = torch.autograd.grad(y0, (x, w, bias), gy)
    for name, a, b in zip(("x", "weight", "bias"), grads, grads0):
        assert rel_err(a, b) < 1e-4, (name, rel_err(a, b))
