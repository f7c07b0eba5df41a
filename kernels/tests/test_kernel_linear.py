"""The Triton 3xTF32 GEMM (kernels/linear_triton.py) against float64 products.

On CPU these run through Triton's interpreter (an fp32 numpy product: they check indexing, masks, strides, bias and
accumulation). Compiled on a GPU they also check the 3xTF32 accuracy: no worse than twice cuBLAS's fp32 GEMM (SGEMM,
TF32 off) on the same operands, relative to the result's largest value.
"""
import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def lt():
    from nnunet_mamba.kernels import linear_triton as mod
    return mod


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def max_err(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max())


def sgemm_err(a, b, ref, bias=None):
    """The largest error of cuBLAS's (or the CPU's) fp32 product of the same operands."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        y = a @ b if bias is None else torch.addmm(bias, a, b)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return max_err(y, ref)


@pytest.mark.parametrize("M,K,N,bias", [(300, 34, 50, True), (129, 16, 16, False), (70, 130, 20, False),
                                        (64, 5, 3, True)])
def test_matches_float64(lt, M, K, N, bias):
    """Masked edges in every dimension (M, K, N not multiples of the tiles; K below one tile), with and without bias."""
    x, w = rand(M, K, seed=1), rand(K, N, seed=2) / K ** 0.5
    b = rand(N, seed=3) if bias else None
    ref = x.double() @ w.double() + (b.double() if bias else 0)
    y = lt.matmul_tf32x3(x, w, b)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert max_err(y, ref) <= max(2 * sgemm_err(x, w, ref, b), 1e-6), (max_err(y, ref), sgemm_err(x, w, ref, b))


def test_strided_operands_and_accumulation(lt):
    """x a column slice of a wider tensor (rows with gaps), w the transposed view of a Linear weight, y written into
    a transposed (column-major) view and accumulated onto what it holds."""
    M, K, N = 200, 48, 40
    wide = rand(M, K + 16, seed=4)
    x = wide[:, 8:8 + K]
    weight = rand(N, K, seed=5) / K ** 0.5  # (N, K) as nn.Linear stores it
    base = rand(N, M, seed=6)
    out = base.clone().t()  # (M, N), column-major
    ref = base.t().double() + x.double() @ weight.double().t()
    res = lt.matmul_tf32x3(x, weight.t(), out=out, accumulate=True)
    assert res is out
    assert max_err(out, ref) <= max(2 * sgemm_err(x, weight.t(), x.double() @ weight.double().t()), 1e-6)


def test_rejects_what_it_does_not_compute(lt):
    x = rand(10, 16)
    with pytest.raises(ValueError, match="fp32"):
        lt.matmul_tf32x3(x.double(), rand(16, 4).double())
    with pytest.raises(ValueError, match="fp32"):
        lt.matmul_tf32x3(x, rand(17, 4))
    with pytest.raises(ValueError, match="accumulate needs out"):
        lt.matmul_tf32x3(x, rand(16, 4), accumulate=True)
    huge_stride = torch.empty_strided((10, 4), (1, 2 ** 30), device="meta")  # column offsets past 2**31
    with pytest.raises(ValueError, match="32-bit"):
        lt.matmul_tf32x3(x, rand(16, 4), out=huge_stride, accumulate=True)


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("M,K,N", [(2 * 128 ** 3, 32, 128), (2 * 128 ** 3, 128, 32), (2 * 128 ** 3, 64, 34),
                                   (2 * 64 ** 3, 64, 256), (2 * 64 ** 3, 256, 64)])
def test_full_size_as_accurate_as_sgemm(lt, M, K, N):
    """LightM-UNet's projections at the reference plan (in_proj, its input gradient, x_proj; 64^3 level)."""
    x, w = rand(M, K, seed=7), rand(K, N, seed=8) / K ** 0.5
    ref = x.double() @ w.double()
    assert max_err(lt.matmul_tf32x3(x, w), ref) <= 2 * sgemm_err(x, w, ref)


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_mixer_projections_take_it_and_match_float64():
    """ops.linear_tokens / linear_split on fp32 CUDA tokens of the measured size run the Triton GEMM (the dispatch), and
    their outputs and input gradients match float64 as closely as SGEMM's (2x)."""
    import nnunet_mamba.ops.linear as lin
    from nnunet_mamba.ops import linear_split, linear_tokens

    x = rand(2, 64 ** 3, 64, seed=9).requires_grad_()
    w = (rand(256, 64, seed=10) / 8).requires_grad_()
    assert lin._tf32x3(lin._rows(x.detach()), w.detach().t())
    for fn in (lambda x, w: linear_tokens(x, w), lambda x, w: torch.cat(linear_split(x, w, None, (128, 128)), -1)):
        y = fn(x, w)
        gy = rand(*y.shape, seed=11)
        (gx,) = torch.autograd.grad(y, [x], gy)
        ref = x.detach().double() @ w.detach().double().t()
        assert max_err(y.detach(), ref) <= 2 * sgemm_err(lin._rows(x.detach()), w.detach().t(), ref.view(-1, 256))
        gref = gy.double() @ w.detach().double()
        assert max_err(gx, gref) <= 2 * sgemm_err(gy.view(-1, 256), w.detach(), gref.view(-1, 64))
