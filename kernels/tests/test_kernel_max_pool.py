"""The Triton max pooling (kernels/max_pool_triton.py, through ops.max_pool) against PyTorch's: values, the
gradient's routing to the first maximum of each window (ties, NaN) and dtypes, 2D and 3D, per-axis kernels as
nnU-Net plans give them. Interpreted on CPU, compiled on a GPU; the comparison is exact (pooling copies values)."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_mamba.ops import max_pool
from nnunet_mamba.ops.token_ops import _MaxPoolFn

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def pool(x, kernel):
    """The kernel's pooling: through ops.max_pool on a GPU, its autograd Function directly under the interpreter
    (ops refuse the Triton backend for CPU tensors)."""
    if DEV == "cuda":
        return max_pool(x, kernel, backend="triton")
    return _MaxPoolFn.apply(x, (kernel,) * (x.dim() - 2) if isinstance(kernel, int) else kernel)


@pytest.mark.parametrize("shape,kernel", [((2, 3, 4, 6, 8), (2, 2, 2)), ((1, 2, 6, 4, 10), (1, 2, 2)),
                                          ((2, 5, 6, 9), (2, 3)), ((1, 3, 3, 4, 4), (3, 1, 2))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_pytorch_exactly(shape, kernel, dtype):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g).to(DEV, dtype)
    x[0, 0].view(-1)[:5] = 1.0  # ties inside windows: the first maximum takes the gradient
    x = x.requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    y = pool(x, kernel)
    ref = (F.max_pool2d if len(kernel) == 2 else F.max_pool3d)(ref_x, kernel)
    assert y.dtype == dtype and y.shape == ref.shape and torch.equal(y, ref)
    gy = torch.randn(ref.shape, generator=g).to(DEV, dtype)
    y.backward(gy)
    ref.backward(gy)
    assert x.grad.is_contiguous() and torch.equal(x.grad, ref_x.grad)


def test_nan_wins_its_window():
    x = torch.arange(2 * 2 * 4 * 4, dtype=torch.float32).view(2, 2, 4, 4).to(DEV)
    x[1, 1, 2, 3] = float("nan")
    y = pool(x.requires_grad_(), 2)
    assert torch.isnan(y[1, 1, 1, 1]) and torch.isnan(y).sum() == 1
    y.sum().backward()
    assert x.grad[1, 1, 2, 3] == 1 and x.grad[1, 1, 3, 3] == 0


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_unsupported_maps_go_to_pytorch(monkeypatch):
    """Sizes that are not multiples of the kernel, non-contiguous maps: F.max_pool's result (floor), not the
    kernel's, even with the Triton backend asked for."""
    import nnunet_mamba.ops.token_ops as to
    called = []
    monkeypatch.setattr(to._MaxPoolFn, "apply", lambda *a: called.append(a))
    x = torch.randn(1, 2, 5, 6, 7, device=DEV)
    torch.testing.assert_close(max_pool(x, 2, backend="triton"), F.max_pool3d(x, 2))
    xt = torch.randn(1, 4, 4, 4, 2, device=DEV).transpose(1, 4)
    torch.testing.assert_close(max_pool(xt, 2, backend="triton"), F.max_pool3d(xt, 2))
    assert called == []
    with pytest.raises(ValueError, match="kernel sizes"):
        max_pool(x, (2, 2))
