"""The Triton up-sampling (kernels/upsample_triton.py, through ops.upsample) against F.interpolate in float64:
values and gradients, with and without the added skip map, 2D and 3D, per-axis factors of 1 and 2 as nnU-Net plans
give them, odd sizes and sizes of 1 (where the clamped neighbours carry the weight). Interpreted on CPU, compiled on
a GPU."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_mamba.ops import upsample
from nnunet_mamba.ops.token_ops import _UpsampleFn

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def up(x, factors, skip=None):
    """The kernel's up-sampling: through ops.upsample on a GPU, its autograd Function directly under the
    interpreter (ops refuse the Triton backend for CPU tensors)."""
    if DEV == "cuda":
        return upsample(x, factors, skip, backend="triton")
    return _UpsampleFn.apply(x, skip, tuple(factors))


def reference(x, factors, skip=None):
    y = F.interpolate(x, scale_factor=tuple(float(f) for f in factors),
                      mode="bilinear" if len(factors) == 2 else "trilinear", align_corners=False)
    return y if skip is None else y + skip


@pytest.mark.parametrize("shape,factors", [((2, 3, 4, 5, 6), (2, 2, 2)), ((1, 2, 3, 1, 5), (2, 2, 1)),
                                           ((1, 2, 5, 4, 1), (1, 2, 2)), ((2, 3, 5, 7), (2, 2)), ((1, 2, 1, 6), (2, 1)),
                                           ((1, 1, 1, 1, 1), (2, 2, 2))])
@pytest.mark.parametrize("with_skip", [False, True])
def test_matches_interpolate_in_float64(shape, factors, with_skip):
    g = torch.Generator().manual_seed(sum(shape) + with_skip)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    out_shape = (*shape[:2], *(s * f for s, f in zip(shape[2:], factors)))
    skip = torch.randn(*out_shape, generator=g, dtype=torch.float64) if with_skip else None
    gy = torch.randn(*out_shape, generator=g, dtype=torch.float64)
    xr = x.clone().requires_grad_()
    sr = skip.clone().requires_grad_() if with_skip else None
    ref = reference(xr, factors, sr)
    ref.backward(gy)

    xk = x.float().to(DEV).requires_grad_()
    sk = skip.float().to(DEV).requires_grad_() if with_skip else None
    y = up(xk, factors, sk)
    y.backward(gy.float().to(DEV))
    assert y.shape == ref.shape and y.dtype == torch.float32 and y.is_contiguous()
    torch.testing.assert_close(y.double().cpu(), ref.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xk.grad.double().cpu(), xr.grad, rtol=1e-6, atol=1e-6)
    if with_skip:
        torch.testing.assert_close(sk.grad.double().cpu(), sr.grad)


def test_half_maps_keep_their_dtype():
    x = torch.randn(1, 2, 3, 4, 5).to(DEV, torch.bfloat16)
    y = up(x, (2, 2, 2))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), reference(x.float(), (2, 2, 2)), rtol=1e-2, atol=1e-2)


def test_module_adds_the_skip_and_falls_back_where_the_kernel_does_not_apply():
    """modules.common.Upsample: the skip added (any device: the torch backend on CPU), and a factor of 3 or a
    non-contiguous map going to F.interpolate."""
    from nnunet_mamba.modules.common import Upsample
    x, skip = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 6, 8)
    m = Upsample(scale_factor=(2.0, 2.0), mode="bilinear", align_corners=False)
    torch.testing.assert_close(m(x, skip=skip), reference(x, (2, 2), skip))
    torch.testing.assert_close(upsample(x, 3), F.interpolate(x, scale_factor=3.0, mode="bilinear", align_corners=False))
    xt = torch.randn(1, 4, 3, 2).transpose(1, 3)
    torch.testing.assert_close(upsample(xt, (2, 2)), reference(xt, (2, 2)))
    with pytest.raises(ValueError, match="skip must have the output's shape"):
        upsample(x, 2, torch.randn(1, 2, 6, 6))
