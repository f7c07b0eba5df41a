"""The Triton 3xTF32 GEMM and weight-gradient reduction (kernels/linear_triton.py) against float64 products.

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


@pytest.mark.parametrize("tuning", [dict(stream=0), dict(stream=1, BM=32), dict(stream=3, BM=16, BN2=0, K_MAIN=0)],
                         ids=["one program per tile", "persistent", "persistent, every mask"])
@pytest.mark.parametrize("M,K,N,bias,accumulate", [(300, 34, 50, True, False), (250, 48, 34, False, True),
                                                   (70, 130, 20, True, True), (33, 64, 128, False, False)])
def test_both_launch_forms_match_float64(lt, tuning, M, K, N, bias, accumulate):
    """The persistent form (a program takes several row tiles in turn; the default) and one program per tile, with
    the split column tile (N = 20, 34, 50: 16 + 16, 32 + 16, 32 + 32 columns), K steps without the column mask and
    accumulation; and the persistent form with every mask on (BN2=0, K_MAIN=0)."""
    x, w = rand(M, K, seed=1), rand(K, N, seed=2) / K ** 0.5
    b = rand(N, seed=3) if bias else None
    base = rand(M, N, seed=4)
    ref = x.double() @ w.double() + (b.double() if bias else 0) + (base.double() if accumulate else 0)
    lt.set_tuning(**tuning)
    try:
        y = lt.matmul_tf32x3(x, w, b, out=base.clone() if accumulate else None, accumulate=accumulate)
    finally:
        lt.set_tuning()
    assert max_err(y, ref) <= max(2 * sgemm_err(x, w, ref - (base.double() if accumulate else 0), b), 1e-6)


def test_launch_plan(lt, monkeypatch):
    """The default plan: persistent, x_proj's 34 columns as 32 unmasked + a 16-column masked tile and its one full K
    step unmasked; 2 stages where 3 do not fit the H200's 227 KiB (K = 128), one program per tile where 2 do not
    (K = 256) unless set_tuning asks for the persistent form."""
    monkeypatch.setattr(lt, "smem_bytes", lambda device: 232448)
    cfg = lt._config(64, 34, torch.device(DEV))
    assert (cfg["BN"], cfg["BN2"], cfg["K_MAIN"], cfg["num_stages"], cfg["stream"]) == (32, 16, 2, 3, 2)
    assert lt._config(34, 64, torch.device(DEV))["K_MAIN"] == 1
    assert lt._config(128, 64, torch.device(DEV))["num_stages"] == 2
    assert "stream" not in lt._config(256, 64, torch.device(DEV))
    lt.set_tuning(stream=0)
    try:
        assert "stream" not in lt._config(64, 34, torch.device(DEV))
        lt.set_tuning(stream=2)  # a sweep asking for the persistent form gets it where it may not fit
        assert lt._config(256, 64, torch.device(DEV))["num_stages"] == 1
    finally:
        lt.set_tuning()


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


def test_column_major_input_and_output(lt):
    """The layouts of a channels-first Linear: its forward x_b W^T stored into a transposed slice (bias fused) and its
    input gradient from a column-major g_b^T (both take their own tile configs)."""
    L, cin, cout = 150, 40, 24
    x, weight, bias = rand(L, cin, seed=20), rand(cout, cin, seed=21) / cin ** 0.5, rand(cout, seed=22)
    y = torch.full((cout, L), float("nan"), device=DEV)
    lt.matmul_tf32x3(x, weight.t(), bias, out=y.t())
    ref = weight.double() @ x.double().t() + bias.double()[:, None]
    assert max_err(y, ref) <= max(2 * sgemm_err(x, weight.t(), ref.t(), bias), 1e-6)
    g = rand(cout, L, seed=23)  # channels-first gradient of y
    dx = lt.matmul_tf32x3(g.t(), weight)
    gref = g.double().t() @ weight.double()
    assert dx.shape == (L, cin) and max_err(dx, gref) <= max(2 * sgemm_err(g.t(), weight, gref), 1e-6)


@pytest.mark.parametrize("tuning", [dict(stream=0), dict(stream=2, BM=32)], ids=["one program per tile", "persistent"])
@pytest.mark.parametrize("N", [24, 34])
def test_scaled_residual_in_the_epilogue(lt, tuning, N):
    """residual=(s, r): x W^T + bias + s * r in one pass, into and from column-major (channels-first) tiles as
    LightM-UNet's out_proj + skip_scale runs it; with the split column tile (N = 34); against float64."""
    L, cin = 150, 40
    x, weight, bias = rand(L, cin, seed=30), rand(N, cin, seed=31) / cin ** 0.5, rand(N, seed=32)
    s, r = rand(1, seed=33), rand(N, L, seed=34)  # r channels-first
    y = torch.full((N, L), float("nan"), device=DEV)
    lt.set_tuning(**tuning)
    try:
        lt.matmul_tf32x3(x, weight.t(), bias, out=y.t(), residual=(s, r.t()))
    finally:
        lt.set_tuning()
    prod = weight.double() @ x.double().t() + bias.double()[:, None]
    ref = prod + s.double() * r.double()
    assert max_err(y, ref) <= max(2 * sgemm_err(x, weight.t(), prod.t(), bias), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        lt.matmul_tf32x3(x, weight.t(), residual=(rand(2, seed=1), r.t()))


@pytest.mark.parametrize("spatial,cin,cout,bias", [((5, 6, 7), 20, 24, True), ((9, 11), 16, 40, False),
                                                   ((5, 6, 7), 1, 32, False), ((5, 6, 7), 32, 3, True)])
def test_pointwise_conv_on_the_gemm_matches_float64(spatial, cin, cout, bias):
    """ops.pointwise_conv's GEMM form (ops.linear._PointwiseConvFn, taken on CUDA from the measured size): a 1x1(x1)
    conv of a channels-first map as column-major GEMMs per batch element, its output, input, weight and bias
    gradients against float64 F.conv2d/3d (2D and 3D, widths off the tiles)."""
    import torch.nn.functional as F

    from nnunet_mamba.ops.linear import _PointwiseConvFn

    nd = len(spatial)
    x = rand(2, cin, *spatial, seed=50).requires_grad_()
    w = (rand(cout, cin, *(1,) * nd, seed=51) / cin ** 0.5).requires_grad_()
    b = rand(cout, seed=52).requires_grad_() if bias else None
    g = rand(2, cout, *spatial, seed=53)
    y = _PointwiseConvFn.apply(x, w, b)
    conv = {2: F.conv2d, 3: F.conv3d}[nd]
    leaves = [t.detach().double().requires_grad_() for t in ([x, w] + ([b] if bias else []))]
    ref = conv(leaves[0], leaves[1], leaves[2] if bias else None)
    assert y.shape == ref.shape and y.is_contiguous() and max_err(y.detach(), ref.detach()) < 1e-5
    grads = torch.autograd.grad(y, [x, w] + ([b] if bias else []), g)
    refs = torch.autograd.grad(ref, leaves, g.double())
    for got, want in zip(grads, refs):
        assert got.shape == want.shape and max_err(got, want) < 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_pointwise_conv_takes_the_gemm_at_full_resolution(monkeypatch):
    """LightM-UNet's ResUpBlock conv at 128^3 (32 -> 32, batch 2) runs on the Triton GEMM (forward, input gradient)
    and the split-token weight-gradient reduction, each within twice SGEMM's error against float64; below the
    measured size (64^3 x 64) it stays on cuDNN."""
    import nnunet_mamba.ops.linear as lin

    x = rand(2, 32, 128, 128, 128, seed=54).requires_grad_()
    w = (rand(32, 32, 1, 1, 1, seed=55) / 32 ** 0.5).requires_grad_()
    g = rand(2, 32, 128, 128, 128, seed=56)
    calls = []
    real = lin._PointwiseConvFn.apply
    monkeypatch.setattr(lin._PointwiseConvFn, "apply", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    y = lin.pointwise_conv(x, w)
    lin.pointwise_conv(rand(2, 64, 64, 64, 64, seed=57), rand(64, 64, 1, 1, 1, seed=58))
    assert calls == [x.shape]
    gx, gw = torch.autograd.grad(y, [x, w], g)
    x2, w2 = x.detach().view(2, 32, -1), w.detach().view(32, 32)
    ref = torch.einsum("oc,bcl->bol", w2.double(), x2.double())
    assert max_err(y.detach().view(2, 32, -1), ref) <= 2 * sgemm_err(x2[0].t(), w2.t(), ref[0].t())
    gd = g.view(2, 32, -1).double()
    gxref = torch.einsum("oc,bol->bcl", w2.double(), gd)
    assert max_err(gx.view(2, 32, -1), gxref) <= 2 * sgemm_err(g.view(2, 32, -1)[0].t(), w2, gxref[0].t())
    gwref = torch.einsum("bol,bcl->oc", gd, x2.double())
    assert max_err(gw.view(32, 32), gwref) <= 2 * sgemm_err(
        g.view(2, 32, -1).transpose(1, 2).reshape(-1, 32).t(), x2.transpose(1, 2).reshape(-1, 32), gwref)


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_narrow_pointwise_convs_take_the_gemm_at_full_resolution(monkeypatch):
    """LightM-UNet's convInit 1 -> 32 and conv_final 32 -> 3 (with bias) at 128^3 run on the GEMM and match float64;
    the same convs at 32^3 stay on cuDNN."""
    import nnunet_mamba.ops.linear as lin

    calls = []
    real = lin._PointwiseConvFn.apply
    monkeypatch.setattr(lin._PointwiseConvFn, "apply", lambda *a: (calls.append(a[0].shape), real(*a))[1])
    for cin, cout, b in ((1, 32, None), (32, 3, rand(3, seed=61))):
        x = rand(2, cin, 128, 128, 128, seed=59)
        w = rand(cout, cin, 1, 1, 1, seed=60) / cin ** 0.5
        y = lin.pointwise_conv(x, w, b)
        ref = torch.nn.functional.conv3d(x.double(), w.double(), None if b is None else b.double())
        assert max_err(y, ref) < 1e-5
        lin.pointwise_conv(rand(2, cin, 32, 32, 32, seed=62), w, b)
    assert calls == [(2, 1, 128, 128, 128), (2, 32, 128, 128, 128)]


@pytest.mark.parametrize("B,L,N,K,layout,cfg", [
    (2, 300, 32, 64, "channels-first", {}),  # L not a multiple of the 64-token step
    (2, 300, 32, 64, "channels-first", dict(splits=3, BL=16)),  # several ranges per batch element, a partial last
    (1, 77, 34, 20, "token-major", {}),  # N, K off the tiles
    (3, 130, 64, 32, "block", dict(BN=16, BK=16, splits=2)),  # several N and K tiles
    (1, 1, 16, 16, "token-major", {})])
def test_weight_grad_matches_float64(lt, B, L, N, K, layout, cfg):
    """sum_b g_b^T x_b for a channels-first g (B, N, L) passed transposed, a token-major one and one block of a wider
    output (in_proj's split), into a new tensor and into ``out``."""
    x = rand(B, L, K, seed=24)
    if layout == "channels-first":
        g = rand(B, N, L, seed=25).transpose(1, 2)
    elif layout == "block":
        g = rand(B, L, 2 * N, seed=25)[..., N:]
    else:
        g = rand(B, L, N, seed=25)
    ref = torch.einsum("bln,blk->nk", g.double(), x.double())
    sgemm = sgemm_err(g.reshape(-1, N).t(), x.reshape(-1, K), ref)
    dw = lt.weight_grad_tf32x3(g, x, **cfg)
    assert dw.shape == (N, K) and max_err(dw, ref) <= max(2 * sgemm, 1e-6), (max_err(dw, ref), sgemm)
    wide = torch.full((N + 5, K), float("nan"), device=DEV)
    assert lt.weight_grad_tf32x3(g, x, out=wide[5:], **cfg).data_ptr() == wide[5:].data_ptr()
    assert torch.equal(wide[5:], dw) and wide[:5].isnan().all()


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
    with pytest.raises(ValueError, match=r"g \(B, L, N\) and x \(B, L, K\)"):
        lt.weight_grad_tf32x3(rand(2, 10, 4), rand(2, 11, 4))
    with pytest.raises(ValueError, match="fp32"):
        lt.weight_grad_tf32x3(rand(1, 10, 4).double(), rand(1, 10, 4).double())


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
@pytest.mark.parametrize("B,L,N,K,layout", [(1, 2 * 128 ** 3, 64, 32, "block"), (2, 128 ** 3, 32, 64, "channels-first"),
                                            (2, 128 ** 3, 64, 32, "channels-first")])
def test_full_size_weight_grad_as_accurate_as_sgemm(lt, B, L, N, K, layout):
    """LightM-UNet's full-resolution weight gradients (in_proj's blocks, out_proj, proj 32 -> 64), which the
    dispatch sends to the split-token reduction."""
    x = rand(B, L, K, seed=26)
    g = rand(B, L, 2 * N, seed=27)[..., :N] if layout == "block" else rand(B, N, L, seed=27).transpose(1, 2)
    ref = torch.einsum("bln,blk->nk", g.double(), x.double())
    assert max_err(lt.weight_grad_tf32x3(g, x), ref) <= 2 * sgemm_err(g.reshape(-1, N).t(), x.reshape(-1, K), ref)


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_channels_first_linear_takes_it_and_matches_float64():
    """ops.linear_channels_first at LightM-UNet's full resolution (out_proj 64 -> 32) runs the Triton GEMM for its
    forward and input gradient and the split-token reduction for its weight gradient (the dispatch), each within
    twice SGEMM's error against float64."""
    import nnunet_mamba.ops.linear as lin
    from nnunet_mamba.ops import linear_channels_first

    x = rand(2, 128 ** 3, 64, seed=28).requires_grad_()
    w = (rand(32, 64, seed=29) / 8).requires_grad_()
    b = rand(32, seed=30).requires_grad_()
    g = rand(2, 32, 128 ** 3, seed=31)
    assert lin._tf32x3(x[0].detach(), w.detach().t()) and lin._tf32x3(g[0].t(), w.detach())
    assert lin._use_triton("linear-wgrad", g, "auto", measured_faster=True)
    y = linear_channels_first(x, w, b)
    gx, gw, gb = torch.autograd.grad(y, [x, w, b], g)
    xd, wd, gd = x.detach().double(), w.detach().double(), g.double()
    ref = torch.einsum("oc,blc->bol", wd, xd) + b.detach().double()[:, None]
    assert max_err(y.detach(), ref) <= 2 * sgemm_err(x[0].detach(), w.detach().t(), ref[0].t(), b.detach())
    gxref = torch.einsum("bol,oc->blc", gd, wd)
    assert max_err(gx, gxref) <= 2 * sgemm_err(g[0].t(), w.detach(), gxref[0])
    gwref = torch.einsum("bol,blc->oc", gd, xd)
    assert max_err(gw, gwref) <= 2 * sgemm_err(g.transpose(1, 2).reshape(-1, 32).t(), x.detach().reshape(-1, 64), gwref)
    assert max_err(gb, gd.sum((0, 2))) <= 1e-6


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_channels_first_linear_with_the_residual_in_its_epilogue():
    """ops.linear_channels_first(..., residual=(s, t)) at LightM-UNet's full resolution (out_proj 64 -> 32 with the
    Mamba layer's skip_scale residual) adds s * t in the Triton GEMM's pass (the fused kernel launched, no separate
    pass), within twice SGEMM's error of float64; s's and t's gradients as ops.scaled_add gives them."""
    import nnunet_mamba.kernels.linear_triton as lt_mod
    from nnunet_mamba.ops import linear_channels_first, scaled_add

    x = rand(2, 128 ** 3, 64, seed=40).requires_grad_()
    w = (rand(32, 64, seed=41) / 8).requires_grad_()
    s = torch.full((1,), 0.7, device=DEV, requires_grad=True)
    t = rand(2, 32, 128 ** 3, seed=42).requires_grad_()
    g = rand(2, 32, 128 ** 3, seed=43)
    launches = []
    real = lt_mod._mm_stream_kernel
    lt_mod._mm_stream_kernel = type("Rec", (), {"__getitem__": lambda self, grid: lambda *a, **k: (
        launches.append(k["RESID"]), real[grid](*a, **k))})()
    try:
        y = linear_channels_first(x, w, None, residual=(s, t))
    finally:
        lt_mod._mm_stream_kernel = real
    assert launches == [True, True]  # one fused launch per batch element
    xd, wd = x.detach().double(), w.detach().double()
    prod = torch.einsum("oc,blc->bol", wd, xd)
    ref = prod + 0.7 * t.detach().double()
    assert max_err(y.detach(), ref) <= 2 * sgemm_err(x[0].detach(), w.detach().t(), prod[0].t())
    grads = torch.autograd.grad(y, [x, w, s, t], g)
    y2 = scaled_add(linear_channels_first(x, w), s, t)
    for a, b in zip(grads, torch.autograd.grad(y2, [x, w, s, t], g)):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
def test_mixer_projections_take_it_and_match_float64():
    """ops.linear_split (one block, as x_proj's side-by-side gradient is taken, and two) on fp32 CUDA tokens of the
    measured size runs the Triton GEMM (the dispatch), and its outputs and input gradients match float64 as closely
    as SGEMM's (2x)."""
    import nnunet_mamba.ops.linear as lin
    from nnunet_mamba.ops import linear_split

    x = rand(2, 64 ** 3, 64, seed=9).requires_grad_()
    w = (rand(256, 64, seed=10) / 8).requires_grad_()
    assert lin._tf32x3(lin._rows(x.detach()), w.detach().t())
    for fn in (lambda x, w: linear_split(x, w, None, (256,))[0],
               lambda x, w: torch.cat(linear_split(x, w, None, (128, 128)), -1)):
        y = fn(x, w)
        gy = rand(*y.shape, seed=11)
        (gx,) = torch.autograd.grad(y, [x], gy)
        ref = x.detach().double() @ w.detach().double().t()
        assert max_err(y.detach(), ref) <= 2 * sgemm_err(lin._rows(x.detach()), w.detach().t(), ref.view(-1, 256))
        gref = gy.double() @ w.detach().double()
        assert max_err(gx, gref) <= 2 * sgemm_err(gy.view(-1, 256), w.detach(), gref.view(-1, 64))


def _ln_linear_case(layout, C, N, L=70, B=2, affine=True, bias=True, seed=50):
    """x (B, L, C) token-major or as the channels-first token view, with an offset (the centred variance); a LayerNorm's
    weight and bias, a Linear's."""
    x = rand(B, L, C, seed=seed) * 3 + 2 if layout == "token-major" else \
        (rand(B, C, L, seed=seed) * 3 + 2).transpose(1, 2)
    lw, lb = (rand(C, seed=seed + 1), rand(C, seed=seed + 2)) if affine else (None, None)
    return x, lw, lb, rand(N, C, seed=seed + 3) / C ** 0.5, rand(N, seed=seed + 4) if bias else None


def _ln_linear_grads(x, lw, lb, w, b, outputs, gs, dtype):
    """The outputs and the gradients of x, the LayerNorm's and the Linear's parameters of F.linear(F.layer_norm(x))
    in ``dtype`` (TF32 off), for outputs = callable(y) and output gradients gs."""
    import torch.nn.functional as F
    assert not torch.backends.cuda.matmul.allow_tf32
    leaves = [t.detach().to(dtype).requires_grad_() if t is not None else None for t in (x, lw, lb, w, b)]
    xl, lwl, lbl, wl, bl = leaves
    ys = outputs(F.linear(F.layer_norm(xl, xl.shape[-1:], lwl, lbl, 1e-5), wl, bl))
    used = [(y, g) for y, g in zip(ys, gs) if g is not None]
    grads = torch.autograd.grad([y for y, _ in used], [t for t in leaves if t is not None],
                                [g.to(dtype) for _, g in used])
    return [y.detach() for y in ys], grads


def _assert_as_accurate_as_fp32(ys, grads, names, case, outputs, gs):
    """Outputs ys and gradients (of the leaves ``names``) against float64 F.linear(F.layer_norm(x)) of ``case``, each
    within 4x the error of the same ops in fp32 (or 1e-6)."""
    ref_y, ref_g = _ln_linear_grads(*case, outputs, gs, torch.float64)
    fp32_y, fp32_g = _ln_linear_grads(*case, outputs, gs, torch.float32)
    for name, got, ref, f32 in [*zip(["y"] * len(ys), ys, ref_y, fp32_y), *zip(names, grads, ref_g, fp32_g)]:
        err, bound = max_err(got.detach(), ref), max(4 * max_err(f32, ref), 1e-6)
        assert err <= bound, (name, err, bound)


@pytest.mark.parametrize("layout", ["token-major", "channels-first"])
@pytest.mark.parametrize("out", ["split", "one block used", "side by side", "channels-first"])
@pytest.mark.parametrize("affine,wgrad", [(True, "triton"), (True, "torch"), (False, "triton")])
def test_layer_norm_folded_into_the_gemms_matches_float64(monkeypatch, layout, out, affine, wgrad):
    """ops.linear's _NormLinearFn (F.linear(LayerNorm(x)) with the LayerNorm in the GEMMs' prologue and epilogue and its
    affine folded into the Linear's weight and bias): outputs and the gradients of x, the LayerNorm's weight and bias
    and the Linear's weight and bias against float64, within 4x the error of the same ops in fp32 (F.layer_norm, then
    F.linear), for token-major and channels-first x, split or channels-first outputs, a block's gradient missing, the
    blocks' gradients side by side, with and without the LayerNorm's affine, and the weight gradient on the
    split-token kernel (statistics and column sums in its pass) or on cuBLAS from the normalised x."""
    import nnunet_mamba.ops.linear as lin

    monkeypatch.setattr(lin, "_use_triton", lambda op, *a, **k: op == "linear-wgrad" and wgrad == "triton")
    C, N = 32, 48
    sizes = (16, 32) if out != "channels-first" else (N,)
    x, lw, lb, w, b = _ln_linear_case(layout, C, N, affine=affine)
    leaves = [t.requires_grad_() if t is not None else None for t in (x, lw, lb, w, b)]
    y = lin._NormLinearFn.apply(x, lw, lb, w, b, 1e-5, sizes, out == "channels-first")
    ys = [y.transpose(1, 2)] if out == "channels-first" else list(y)
    gs = [rand(*t.shape, seed=60 + k) for k, t in enumerate(ys)]
    if out == "one block used":
        gs[0] = None
    if out == "side by side":  # gradients written next to each other into one buffer (as the Triton scan does)
        whole = rand(*x.shape[:2], N, seed=66)
        gs = list(whole.split(sizes, -1))
    split = (lambda t: t.split(sizes, -1)) if out != "channels-first" else (lambda t: [t])
    used = [(t, g) for t, g in zip(ys, gs) if g is not None]
    grads = torch.autograd.grad([t for t, _ in used], [t for t in leaves if t is not None],
                                [g for _, g in used])
    names = [n for n, t in zip(["x", "ln weight", "ln bias", "weight", "bias"], leaves) if t is not None]
    _assert_as_accurate_as_fp32(ys, grads, names, (x, lw, lb, w, b), split, gs)
    if layout == "channels-first":  # x's gradient in x's layout
        assert grads[0].stride() == x.stride()


def test_layer_norm_fold_rejects_what_it_does_not_compute(lt):
    x, mu, rs = rand(40, 32), torch.empty(40, device=DEV), torch.empty(40, device=DEV)
    with pytest.raises(ValueError, match="exclude each other"):
        lt.matmul_tf32x3(x, rand(32, 16), norm=(mu, rs, 1e-5), norm_grad=(x, mu, rs))
    with pytest.raises(ValueError, match="statistics"):
        lt.matmul_tf32x3(x, rand(32, 16), norm=(mu[:20], rs, 1e-5))
    with pytest.raises(ValueError, match="at most 128 output columns"):
        lt.matmul_tf32x3(rand(40, 16), rand(16, 40), out=torch.empty(40, 40, device=DEV),
                         norm_grad=(rand(40, 40), mu, rs))
    with pytest.raises(ValueError, match="statistics"):
        lt.weight_grad_tf32x3(rand(2, 20, 16), rand(2, 20, 32), norm=(mu.view(2, 20), rs[:20]))


@pytest.mark.cuda
@pytest.mark.skipif(DEV != "cuda", reason="needs CUDA")
@pytest.mark.parametrize("C,N,out", [(32, 128, "split"), (32, 64, "channels-first"), (64, 256, "split"),
                                     (64, 128, "channels-first")])
def test_lightm_unet_layer_norms_fold_into_the_projections(C, N, out):
    """LightM-UNet's LayerNorm + Linear pairs at 128^3 (C = 32) and 64^3 (C = 64) tokens, x the channels-first token
    view as the Mamba layer passes it: ops.linear_split (in_proj, norm=) and ops.linear_channels_first (proj, norm=)
    take _NormLinearFn at 128^3 and not at 64^3 (measured slower there: the dispatch), and match float64 within 4x
    the error of F.layer_norm + F.linear in fp32 either way."""
    import torch.nn as nn
    import nnunet_mamba.ops.linear as lin
    from nnunet_mamba.ops import linear_channels_first, linear_split

    L = (128 if C == 32 else 64) ** 3
    x, lw, lb, w, b = _ln_linear_case("channels-first", C, N, L=L, bias=out == "channels-first")
    ln = nn.LayerNorm(C).to(DEV)
    with torch.no_grad():
        ln.weight.copy_(lw), ln.bias.copy_(lb)
    leaves = [x.requires_grad_(), ln.weight, ln.bias, w.requires_grad_()]
    leaves += [b.requires_grad_()] if b is not None else []
    calls = []
    real = lin._NormLinearFn.apply
    lin._NormLinearFn.apply = lambda *a: calls.append(a[-1]) or real(*a)
    try:
        if out == "split":
            ys = list(linear_split(x, w, None, (N // 2, N // 2), norm=ln))
            split = lambda t: t.split(N // 2, -1)
        else:
            ys = [linear_channels_first(x, w, b, norm=ln).transpose(1, 2)]
            split = lambda t: [t]
    finally:
        lin._NormLinearFn.apply = real
    assert calls == ([out == "channels-first"] if C == 32 else [])
    gs = [rand(*t.shape, seed=70 + k) for k, t in enumerate(ys)]
    grads = torch.autograd.grad(ys, leaves, gs)
    _assert_as_accurate_as_fp32(ys, grads, ["x", "ln weight", "ln bias", "weight", "bias"], (x, lw, lb, w, b), split,
                                gs)
