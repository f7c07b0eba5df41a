"""The Triton bilinear / trilinear upsampling (integer factors, align_corners=False) against a float64 oracle
(``F.interpolate`` on float64 copies, its gradient from autograd): output and input gradient, borders, odd and tiny
sizes, mixed factors; the backward's bitwise repeatability; the op boundary and the ``Upsample`` module dispatching to
the kernel.

On CPU these run through Triton's interpreter (conftest.py) at small sizes; ``small_tiles`` shrinks the tiles so that
maps split into several programs along rows and columns, the last ones partial. On a GPU compiled, plus the full-size
map the kernel is for.
"""
import pytest
import torch
import torch.nn.functional as F

from oracle import rel_err

ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def up():
    from nnunet_mamba.kernels import upsample_triton as mod
    return mod


@pytest.fixture
def small_tiles(up, monkeypatch):
    """Forward tiles of 64 outputs and backward tiles of 32 inputs, at most 4 columns wide."""
    monkeypatch.setattr(up, "FWD_TILE", 64)
    monkeypatch.setattr(up, "BWD_TILE", 32)
    monkeypatch.setattr(up, "MAX_BW", 4)


def oracle(x, factors):
    mode = {2: "bilinear", 3: "trilinear"}[len(factors)]
    return F.interpolate(x, scale_factor=tuple(float(f) for f in factors), mode=mode, align_corners=False)


def check(up, x, factors, tol=1e-6, seed=0):
    """Output and input gradient against the float64 oracle; returns our input gradient."""
    xs = x.detach().clone().requires_grad_()
    x0 = x.detach().double().requires_grad_()
    y, y0 = up.upsample_linear_triton(xs, factors), oracle(x0, factors)
    assert y.shape == y0.shape and y.dtype == x.dtype and y.is_contiguous()
    assert rel_err(y, y0) < tol, rel_err(y, y0)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    y.backward(gy.to(y.dtype))
    y0.backward(gy.to(y.dtype).double())
    assert xs.grad.shape == x.shape and xs.grad.dtype == x.dtype
    assert rel_err(xs.grad, x0.grad) < tol, rel_err(xs.grad, x0.grad)
    return xs.grad


def randn(shape, dev, dtype=torch.float32, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dev, dtype)


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2), (2, 1, 2), (2, 2, 1), (1, 1, 1)])
def test_3d_maps(up, dev, factors):
    """(B, C, D, H, W) with odd sizes: every border of every axis."""
    check(up, randn((2, 3, 3, 5, 7), dev, seed=sum(factors)), factors)


@pytest.mark.parametrize("factors", [(2, 2), (1, 2), (2, 1)])
def test_2d_maps(up, dev, factors):
    check(up, randn((2, 3, 5, 7), dev, seed=10 + sum(factors)), factors)


@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 2, 2, 1, 3), (1, 2, 1, 2, 5), (2, 1, 3, 2, 1)])
def test_tiny_3d_maps(up, dev, shape):
    """Axes of 1, 2, 3 and 5 inputs: at 1 every output reads input 0 twice (i1 clamped onto i0)."""
    check(up, randn(shape, dev, seed=sum(shape)), (2, 2, 2))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 1, 2), (1, 2, 3, 1), (3, 2, 2, 5)])
def test_tiny_2d_maps(up, dev, shape):
    check(up, randn(shape, dev, seed=20 + sum(shape)), (2, 2))


@pytest.mark.parametrize("factors", [(2, 2, 2), (1, 2, 2)])
def test_several_programs_per_axis(up, dev, small_tiles, factors):
    """Tiles smaller than a line: several column blocks (the last partial) and row blocks spanning (b, c, d) lines."""
    check(up, randn((1, 2, 3, 3, 7), dev, seed=30), factors)
    check(up, randn((2, 1, 5, 6), dev, seed=31), factors[1:])


@pytest.mark.parametrize("factors", [(3, 1), (3, 2), (4, 1), (5, 3)])
def test_other_integer_factors(up, dev, factors):
    """Factors other than 1 and 2 (fp32 rounding of 1 / 3 and 1 / 5: the backward's wider window)."""
    check(up, randn((1, 2, 3, 4), dev, seed=40 + sum(factors)), factors)
    check(up, randn((1, 1, 2, 3, 2), dev, seed=41), (factors[0], 1, factors[1]))


def test_matches_pytorch_fp32_exactly_for_factor_two(up, dev):
    """Factors 1 and 2: every weight is exact in fp32, so the output is PyTorch's own fp32 output up to the
    rounding of the sums' order (identical nesting: within 1 ulp)."""
    x = randn((2, 3, 4, 5, 6), dev, seed=50)
    y, y0 = up.upsample_linear_triton(x, (2, 1, 2)), oracle(x, (2, 1, 2))
    torch.testing.assert_close(y, y0, rtol=2e-7, atol=2e-7)


def test_non_contiguous_input(up, dev):
    """A strided slice and a channels-last map: made contiguous; output and gradient dense."""
    x = randn((2, 4, 3, 5, 12), dev, seed=60)
    check(up, x[..., ::2], (2, 2, 2))
    check(up, x.to(memory_format=torch.channels_last_3d), (1, 2, 2))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fp32_arithmetic(up, dev, dtype):
    """y and the gradient in x's dtype, computed in fp32: within the dtype's rounding of the oracle."""
    check(up, randn((2, 3, 3, 4, 5), dev, dtype=dtype, seed=70), (2, 2, 2), tol=1e-2)


def test_backward_is_bitwise_repeatable(up, dev):
    x = randn((2, 3, 3, 5, 6), dev, seed=80)
    gy = randn((2, 3, 6, 10, 12), dev, seed=81)
    grads = []
    for _ in range(2):
        xs = x.clone().requires_grad_()
        up.upsample_linear_triton(xs, (2, 2, 2)).backward(gy)
        grads.append(xs.grad)
    assert torch.equal(*grads)


def test_rejects_wrong_arguments(up, dev):
    x = randn((1, 2, 3, 4), dev)
    for factors in [(2,), (2, 2, 2), (0, 2), (1.5, 2), (True, 2)]:
        with pytest.raises(ValueError, match="integer factor"):
            up.upsample_linear_triton(x, factors)
    with pytest.raises(ValueError, match="integer factor"):
        up.upsample_linear_triton(x[0], (2, 2))


def test_op_boundary_and_module_dispatch_to_the_kernel(up, dev, monkeypatch):
    """``ops.upsample_linear`` and ``modules.common.Upsample`` reach the kernel when the backend is forced through
    the environment variable (``_triton_unavailable`` patched: on CPU the op boundary refuses Triton otherwise), with
    nn.Upsample's output and gradient; a non-integer factor stays on nn.Upsample's forward."""
    from nnunet_mamba.modules.common import Upsample
    from nnunet_mamba.ops import token_ops

    calls = []
    kernel = up.upsample_linear_triton
    monkeypatch.setattr(up, "upsample_linear_triton", lambda x, f: calls.append(f) or kernel(x, f))
    monkeypatch.setattr(token_ops, "_triton_unavailable", lambda device: None)
    monkeypatch.setenv(token_ops.ENV_BACKEND, "triton")
    for sf, shape in (((1.0, 2.0, 2.0), (2, 3, 3, 4, 5)), (2.0, (2, 3, 4, 5))):
        mode = "trilinear" if len(shape) == 5 else "bilinear"
        ours, ref = Upsample(scale_factor=sf, mode=mode, align_corners=False), torch.nn.Upsample(
            scale_factor=sf, mode=mode, align_corners=False)
        x = randn(shape, dev, seed=90).requires_grad_()
        x0 = x.detach().clone().requires_grad_()
        y, y0 = ours(x), ref(x0)
        torch.testing.assert_close(y, y0, rtol=2e-7, atol=2e-7)
        gy = torch.randn_like(y)
        y.backward(gy)
        y0.backward(gy)
        torch.testing.assert_close(x.grad, x0.grad, rtol=1e-6, atol=1e-6)
    assert calls == [(1, 2, 2), (2, 2)]
    x = randn((1, 2, 3, 4), dev)
    torch.testing.assert_close(Upsample(scale_factor=1.5, mode="bilinear")(x),
                               F.interpolate(x, scale_factor=1.5, mode="bilinear"))
    assert len(calls) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_full_size_matches_torch(up):
    """LightM-UNet's largest decoder step, (2, 32, 64^3) -> 128^3 fp32, against a float64 oracle on the GPU;
    PyTorch's own fp32 errors beside, and the backward bitwise repeatable."""
    x = randn((2, 32, 64, 64, 64), "cuda", seed=100)
    gy = torch.randn((2, 32, 128, 128, 128), device="cuda")
    runs = {}
    for name, dtype, fn in (("triton", torch.float32, lambda t: up.upsample_linear_triton(t, (2, 2, 2))),
                            ("torch fp32", torch.float32, lambda t: oracle(t, (2, 2, 2))),
                            ("oracle", torch.float64, lambda t: oracle(t, (2, 2, 2)))):
        t = x.detach().to(dtype, copy=True).requires_grad_()
        y = fn(t)
        y.backward(gy.to(dtype))
        runs[name] = (y.detach(), t.grad)
        del t, y
    errs = {name: [rel_err(a, o) for a, o in zip(runs[name], runs["oracle"])] for name in ("triton", "torch fp32")}
    assert max(errs["triton"]) < 1e-6, errs
    t = x.detach().clone().requires_grad_()
    up.upsample_linear_triton(t, (2, 2, 2)).backward(gy)
    assert torch.equal(t.grad, runs["triton"][1])
