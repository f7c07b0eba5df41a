"""The low-rank delta's product and fused gradients (kernels/low_rank_triton.py) against float64.

On CPU these run through Triton's interpreter (small sizes); compiled on a GPU also at LightM-UNet's full-resolution
size. Both are fp32 multiply-adds: errors of fp32 rounding, well under SGEMM-with-TF32's.
"""
import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def lr():
    from nnunet_mamba.kernels import low_rank_triton as mod
    return mod


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEV)


def rel_err(y, ref):
    return float((y.double() - ref).abs().max() / ref.abs().max())


def x_dbl_view(M, R, extra, seed, dtype=torch.float32):
    """v as the Mamba mixer passes it: the first R columns of the token-major x_proj output (rows with gaps)."""
    return rand(M, R + extra, seed=seed).to(dtype)[:, :R]


@pytest.mark.parametrize("M,R,N,dtype", [(300, 2, 64, torch.float32), (77, 4, 128, torch.float32),
                                         (130, 3, 40, torch.float32), (65, 1, 16, torch.float32),
                                         (100, 2, 64, torch.bfloat16)])
def test_product_matches_float64(lr, M, R, N, dtype):
    """M, N not multiples of the tiles, R = 1 to 4 (3: not a power of two), v a strided column slice, bf16 v (AMP)."""
    v = x_dbl_view(M, R, 32, seed=1, dtype=dtype)
    Wt = rand(N, R, seed=2).t()  # dt_proj.weight (N, R) transposed: a strided view
    ref = v.double() @ Wt.double()
    y = lr.low_rank_product(v, Wt)
    assert y.shape == (M, N) and y.dtype == torch.float32
    assert rel_err(y, ref) < 1e-6


def test_product_into_a_strided_out(lr):
    """Written through out's strides: the (b, L, d) delta buffer, row-major, and a column-major view."""
    v, Wt = x_dbl_view(90, 2, 8, seed=3), rand(2, 24, seed=4)
    ref = v.double() @ Wt.double()
    for out in (torch.empty(90, 24, device=DEV), torch.empty(24, 90, device=DEV).t()):
        assert lr.low_rank_product(v, Wt, out=out) is out
        assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("M,R,N,splits", [(300, 2, 64, None), (1000, 4, 128, None), (257, 3, 40, None),
                                          (33, 1, 16, None), (5000, 2, 64, None), (200, 8, 256, None)])
def test_grads_match_float64(lr, M, R, N, splits):
    """gv = g Wt^T and gWt = v^T g: several token ranges per program and partial last ranges (M = 5000 on the
    interpreter's 4 'SMs'), a masked state row (R = 3), R = 8, N up to 256."""
    g = rand(M, N, seed=5)
    v = x_dbl_view(M, R, 34 - R, seed=6)
    Wt = rand(N, R, seed=7).t()
    gv, gW = lr.low_rank_grads(g, v, Wt)
    assert gv.shape == (M, R) and gW.shape == (R, N)
    assert rel_err(gv, g.double() @ Wt.double().t()) < 1e-6
    assert rel_err(gW, v.double().t() @ g.double()) < 1e-5


def test_grads_are_repeatable(lr):
    """No atomics: the partial sums are added in a fixed order, so two calls agree bit for bit."""
    g, v, Wt = rand(3000, 64, seed=8), x_dbl_view(3000, 2, 32, seed=9), rand(2, 64, seed=10)
    a, b = lr.low_rank_grads(g, v, Wt), lr.low_rank_grads(g, v, Wt)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_errors_name_the_shapes(lr):
    with pytest.raises(ValueError, match=r"v \(M, R\) and Wt \(R, N\)"):
        lr.low_rank_product(rand(4, 2), rand(3, 5))
    with pytest.raises(ValueError, match="g must be"):
        lr.low_rank_grads(rand(4, 6), rand(4, 2), rand(2, 5))
    with pytest.raises(ValueError, match="at most 256"):
        lr.low_rank_grads(rand(4, 300), rand(4, 2), rand(2, 300))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_resolution_size(lr):
    """LightM-UNet's full-resolution delta: 2 x 128^3 tokens, R = 2, d = 64 (int64 row offsets, many programs)."""
    M = 2 * 128 ** 3
    v, Wt, g = x_dbl_view(M, 2, 32, seed=11), rand(2, 64, seed=12), rand(M, 64, seed=13)
    assert rel_err(lr.low_rank_product(v, Wt), v.double() @ Wt.double()) < 1e-6
    gv, gW = lr.low_rank_grads(g, v, Wt)
    assert rel_err(gv, g.double() @ Wt.double().t()) < 1e-6
    assert rel_err(gW, v.double().t() @ g.double()) < 1e-5


@pytest.mark.parametrize("d", [64, 96])
def test_the_scans_dispatch_of_the_gradients(lr, monkeypatch, d):
    """selective_scan_triton._low_rank_grads from _LOW_RANK_TRITON_FROM elements: the fused kernel up to 64 channels,
    above them gv on the 3xTF32 GEMM and gW on cuBLAS (measured faster at 128); gv as the transposed (b, R, L) view,
    gW as dt_proj.weight's (d, R)."""
    from nnunet_mamba.kernels import selective_scan_triton as sst

    monkeypatch.setattr(sst, "_LOW_RANK_TRITON_FROM", 0)
    b, L, R = 2, 70, 3
    g = rand(b, L, d, seed=14)
    v = rand(b, L, R + 32, seed=15)[..., :R].transpose(1, 2)  # (b, R, L), as the mixer's x_dbl view
    Wt = rand(R, d, seed=16)
    gv, gW = sst._low_rank_grads(g, v, Wt)
    assert gv.shape == (b, R, L) and gW.shape == (d, R)
    ref_gv = torch.einsum("bld,rd->brl", g.double(), Wt.double())
    ref_gW = torch.einsum("brl,bld->dr", v.double(), g.double())
    assert rel_err(gv, ref_gv) < 1e-6 and rel_err(gW, ref_gW) < 1e-5
    # gv into its columns of x_proj's gradient buffer (the scan's backward): nothing else in the buffer changes
    g_dbl = rand(b, L, R + 32, seed=17)
    before = g_dbl.clone()
    gv2, gW2 = sst._low_rank_grads(g, v, Wt, g_dbl[..., :R])
    assert gv2.data_ptr() == g_dbl.data_ptr() and torch.equal(gv2, gv) and torch.equal(gW2, gW)
    assert torch.equal(g_dbl[..., R:], before[..., R:])


def test_grads_into_a_strided_buffer(lr):
    """gv_out: gv written into the first R columns of a wider row-major buffer, the rest untouched."""
    M, R, N = 700, 2, 64
    g, v, Wt = rand(M, N, seed=18), x_dbl_view(M, R, 32, seed=19), rand(R, N, seed=20)
    buf = rand(M, R + 32, seed=21)
    before = buf.clone()
    gv, gW = lr.low_rank_grads(g, v, Wt, gv_out=buf[:, :R])
    assert gv.data_ptr() == buf.data_ptr() and torch.equal(buf[:, R:], before[:, R:])
    assert rel_err(buf[:, :R], g.double() @ Wt.double().t()) < 1e-6
    with pytest.raises(ValueError, match="gv_out must be"):
        lr.low_rank_grads(g, v, Wt, gv_out=buf[:, :R + 1])
