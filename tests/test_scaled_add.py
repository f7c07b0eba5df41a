"""``ops.scaled_add`` (y + s * t, s a 1-element scale) on its torch backend: values, dtypes and autocast as
``torch.addcmul``, gradients by gradcheck, only the required ones computed, and the argument errors. The Triton
backward is tested in kernels/tests/test_kernel_scaled_add.py."""
import itertools

import pytest
import torch

from nnunet_mamba.ops import BackendUnavailable, scaled_add
from nnunet_mamba.ops import token_ops


def rand(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("need", [c for c in itertools.product((False, True), repeat=3) if any(c)])
@pytest.mark.parametrize("s_shape", [(1,), (), (1, 1, 1)])
def test_gradcheck(need, s_shape):
    """float64 gradcheck of y, s, t for every combination requiring grad; s of shape (1,), () and (1, 1, 1)."""
    y, s, t = rand(2, 3, 5, seed=1, dtype=torch.float64), rand(*s_shape, seed=2, dtype=torch.float64), \
        rand(2, 3, 5, seed=3, dtype=torch.float64)
    args = [x.requires_grad_(r) for x, r in zip((y, s, t), need)]
    assert torch.autograd.gradcheck(lambda *a: scaled_add(*a, backend="torch"), args)


@pytest.mark.parametrize("need", [c for c in itertools.product((False, True), repeat=3) if any(c)])
def test_values_and_gradients_are_addcmuls(need):
    """fp32: the output equals torch.addcmul's bit for bit, the gradients autograd's of it (y's is g itself; the
    others to fp32 rounding); gradients only for the inputs that require them."""
    leaves = [rand(2, 4, 33, seed=4), rand(1, seed=5), rand(2, 4, 33, seed=6).transpose(1, 2).contiguous()
              .transpose(1, 2)]  # t: a dense view in another memory order than y
    ours = [x.clone().requires_grad_(r) for x, r in zip(leaves, need)]
    ref = [x.clone().requires_grad_(r) for x, r in zip(leaves, need)]
    out, out0 = scaled_add(*ours), torch.addcmul(*ref)
    assert torch.equal(out, out0)
    g = rand(2, 4, 33, seed=7)
    out.backward(g)
    out0.backward(g)
    for name, a, b in zip("yst", ours, ref):
        assert (a.grad is None) == (b.grad is None) == (not a.requires_grad), name
        if a.grad is not None:
            assert a.grad.shape == a.shape and a.grad.dtype == a.dtype, name
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6 * float(b.grad.abs().max()))


def test_no_grad_is_plain_addcmul(monkeypatch):
    """Nothing requires grad, or grad mode is off: the plain addcmul, no autograd Function."""
    monkeypatch.setattr(token_ops._ScaledAddFn, "apply", None)  # would fail if called
    y, s, t = rand(3, 4, seed=8), rand(1, seed=9).requires_grad_(), rand(3, 4, seed=10)
    with torch.no_grad():
        assert torch.equal(scaled_add(y, s, t), torch.addcmul(y, s, t))
    assert torch.equal(scaled_add(y, s.detach(), t), torch.addcmul(y, s.detach(), t))


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32, torch.bfloat16),
                                    (torch.float32, torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16, torch.bfloat16)])
@pytest.mark.parametrize("autocast", [False, True])
def test_dtypes_and_autocast_as_addcmul(dtypes, autocast):
    """Mixed dtypes (a (1,) fp32 s promotes bf16 maps to fp32, as in addcmul) with and without autocast: the output's
    dtype and values are addcmul's; each gradient comes back in its input's dtype."""
    leaves = [rand(2, 6, seed=11 + i, dtype=d) for i, d in enumerate(dtypes)]
    leaves[1] = leaves[1][:1, :1].reshape(1).clone()
    ours = [x.clone().requires_grad_() for x in leaves]
    ref = [x.clone().requires_grad_() for x in leaves]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out, out0 = scaled_add(*ours), torch.addcmul(*ref)
    assert out.dtype == out0.dtype and torch.equal(out, out0)
    out.float().sum().backward()
    out0.float().sum().backward()
    for a, b in zip(ours, ref):
        assert a.grad.dtype == a.dtype == b.grad.dtype
        torch.testing.assert_close(a.grad.float(), b.grad.float(), rtol=1e-2, atol=1e-2)


def test_argument_errors():
    y, t = rand(2, 3), rand(2, 3)
    with pytest.raises(ValueError, match="1-element"):
        scaled_add(y, rand(3), t)
    with pytest.raises(ValueError, match="1-element"):
        scaled_add(y, rand(1, 1, 1), t)  # would broadcast y to 3 dims
    with pytest.raises(ValueError, match="1-element"):
        scaled_add(y, 2.0, t)
    with pytest.raises(ValueError, match="one shape"):
        scaled_add(y, rand(1), rand(1, 3))
    with pytest.raises(ValueError, match="unknown scaled-add backend"):
        scaled_add(y, rand(1), t, backend="cuda")
    with pytest.raises(BackendUnavailable, match="CUDA tensors only"):
        scaled_add(y, rand(1), t, backend="triton")


def test_auto_takes_the_kernel_from_the_provisional_size(monkeypatch):
    monkeypatch.setattr(token_ops, "_triton_unavailable", lambda device: None)  # as on a CUDA machine
    n = token_ops.TRITON_FROM["scaled-add"]
    assert not token_ops._use_triton("scaled-add", torch.zeros(1).expand(n - 1), "auto")
    assert token_ops._use_triton("scaled-add", torch.zeros(1).expand(n), "auto")
