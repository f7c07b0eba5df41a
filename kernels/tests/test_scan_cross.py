"""The fused multi-direction (cross) scan against a float64 oracle and against the package's reference path.

The oracle materialises each direction's sequence (permute + flip), runs ``selective_scan_oracle`` per direction in
float64 and maps each output back; the fused kernel instead reads the map in every order by index arithmetic.
Non-square maps catch any mix-up of axes.
"""
import pytest
import torch

from oracle import rel_err, selective_scan_oracle
from nnunet_mamba.ops.scan import cross_scan_orders, cross_selective_scan_reference

ON_GPU = torch.cuda.is_available()


def cross_oracle(x, delta, A, B, C, D, bias, orders):
    f = torch.float64
    b, d = x.shape[:2]
    spatial = x.shape[2:]
    out = 0
    for k, (perm, flip) in enumerate(orders):
        def seq(t):
            s = t.permute(0, 1, *[2 + p for p in perm]).reshape(*t.shape[:2], -1)
            return s.flip(-1) if flip else s
        rows = slice(k * d, (k + 1) * d)
        y = selective_scan_oracle(seq(x).to(f), seq(delta[:, k]).to(f), A[rows].to(f), seq(B[:, k]).to(f),
                                  seq(C[:, k]).to(f), D=D[rows].to(f), delta_bias=bias[rows].to(f),
                                  delta_softplus=True)
        if flip:
            y = y.flip(-1)
        y = y.reshape(b, d, *[spatial[p] for p in perm])
        inv = [list(perm).index(i) for i in range(len(perm))]
        out = out + y.permute(0, 1, *[2 + i for i in inv])
    return out


def make(b, d, spatial, N, K, seed, device):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    t = dict(x=r(b, d, *spatial), delta=0.5 * r(b, K, d, *spatial), A=-torch.rand(K * d, N, generator=g) * 2 - 0.1,
             B=r(b, K, N, *spatial), C=r(b, K, N, *spatial), D=r(K * d), bias=0.3 * r(K * d))
    return {k: v.to(device) for k, v in t.items()}


def run_and_grad(fn, inp, gy, dtype=None):
    x = {k: (v.to(dtype) if dtype else v).detach().requires_grad_() for k, v in inp.items()}
    y = fn(x)
    (y * gy.to(y.dtype)).sum().backward()
    return y.detach(), {k: v.grad for k, v in x.items()}


@pytest.mark.parametrize("spatial,K,tune", [
    ((5, 7), 4, dict(T=16, BD=2)),  # 35 tokens: two whole chunks and a partial one
    ((3, 4, 5), 6, dict(T=16, BD=2)),
    ((2, 3, 4), 12, dict(T=16, BD=4)),
    ((1, 1), 4, dict(T=16, BD=2)),  # L = 1
])
def test_cross_matches_oracle(tk, tuning, dev, spatial, K, tune):
    tuning(**tune)
    nd = len(spatial)
    orders = cross_scan_orders(nd, K)
    inp = make(2, 3, spatial, 4, K, seed=sum(spatial) + K, device=dev)
    gy = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(1)).to(dev)
    y, gr = run_and_grad(lambda t: tk.cross_selective_scan_triton(
        t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["bias"], delta_softplus=True,
        orders=orders), inp, gy)
    y0, gr0 = run_and_grad(lambda t: cross_oracle(t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["bias"],
                                                  orders), inp, gy, torch.float64)
    assert y.dtype == torch.float32 and y.shape == y0.shape
    assert rel_err(y, y0) < 2e-5, rel_err(y, y0)
    for k in gr:
        assert gr[k].shape == inp[k].shape
        assert rel_err(gr[k], gr0[k]) < 1e-4, (k, rel_err(gr[k], gr0[k]))


@pytest.mark.parametrize("spatial,K", [((5, 7), 4), ((2, 3, 4), 6)])
def test_cross_reads_channels_last_maps_in_place(tk, tuning, dev, spatial, K):
    """Maps stored channels-last, as SS2D passes them: x (b, *S, d) in memory, delta a (b, *S, K, d) tensor, B/C
    column slices of one (b, *S, K, 2N) tensor (views with gaps). They are read in place, without a copy, give the
    oracle's result, and the output and the gradients of x and delta come back in the same layouts."""
    tuning(T=16, BD=2)
    orders = cross_scan_orders(len(spatial), K)
    inp = make(2, 3, spatial, 4, K, seed=7, device=dev)
    token_major = lambda t: t.movedim((1, 2), (-2, -1)).contiguous().movedim((-2, -1), (1, 2))
    cl = dict(inp, x=inp["x"].movedim(1, -1).contiguous().movedim(-1, 1), delta=token_major(inp["delta"]))
    bc = token_major(torch.cat([inp["B"], inp["C"]], 2))  # (b, K, 2N, *S) view of (b, *S, K, 2N)
    cl["B"], cl["C"] = bc[:, :, :4], bc[:, :, 4:]
    ch = dict(x=1, delta=2, B=2, C=2)
    assert all(tk._spatial_rowmajor(cl[k], ch[k] + 1) for k in ch) and not cl["x"].is_contiguous()
    gy = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(1)).to(dev)
    # the raw gradients (autograd.grad: no re-striding by AccumulateGrad), to check their layouts as well
    x = {k: v.detach().requires_grad_() for k, v in cl.items()}
    y = tk.cross_selective_scan_triton(x["x"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], delta_bias=x["bias"],
                                       orders=orders)
    gr = dict(zip(x, torch.autograd.grad((y * gy).sum(), list(x.values()))))
    y0, gr0 = run_and_grad(lambda t: cross_oracle(t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["bias"],
                                                  orders), inp, gy, torch.float64)
    assert rel_err(y, y0) < 2e-5, rel_err(y, y0)
    for k in gr:
        assert rel_err(gr[k], gr0[k]) < 1e-4, (k, rel_err(gr[k], gr0[k]))
    # layouts: the output and x's gradient like x, delta's gradient like delta
    assert y.stride() == gr["x"].stride() == cl["x"].stride() and gr["delta"].stride() == cl["delta"].stride()


@pytest.mark.parametrize("gaps", [False, True])
def test_cross_forms_dt_once_and_leaves_the_delta_alone(tk, tuning, dev, record_launches, gaps):
    """A full fp32 delta: each direction's first pass writes dt = softplus(delta + bias) into a buffer of the op's own
    (DT_OUT), the later passes read it (DT_DONE); the caller's delta (token-major, or a view with gaps, which is
    copied first) is left as it was, and the results match the oracle."""
    tuning(T=16, BD=2)
    log = record_launches({name: name for name in ("_chunk_kernel", "_bsum_kernel", "_bwd_kernel")})
    spatial, K = (5, 7), 4
    orders = cross_scan_orders(2, K)
    inp = make(2, 3, spatial, 4, K, seed=11, device=dev)
    wide = torch.cat([inp["delta"], inp["delta"]], 2) if gaps else inp["delta"]
    delta = wide.movedim((1, 2), (-2, -1)).contiguous().movedim((-2, -1), (1, 2))[:, :, :3]
    assert tk._spatial_rowmajor(delta, 3) and delta.is_contiguous() is False
    before = delta.clone()
    x = dict(inp, delta=delta)
    x = {k: v.detach().requires_grad_() for k, v in x.items()}
    gy = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(1)).to(dev)
    y = tk.cross_selective_scan_triton(x["x"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], delta_bias=x["bias"],
                                       orders=orders)
    gr = dict(zip(x, torch.autograd.grad((y * gy).sum(), list(x.values()))))
    assert torch.equal(x["delta"].detach(), before)
    fwd = [("_chunk_kernel", True, False), ("_chunk_kernel", False, True)]  # per direction: summary, output pass
    flags = [(name, meta.get("DT_OUT"), meta["DT_DONE"]) for name, meta in log]
    assert flags == fwd * K + [("_bsum_kernel", None, True), ("_bwd_kernel", None, True)] * K
    y0, gr0 = run_and_grad(lambda t: cross_oracle(t["x"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["bias"],
                                                  orders), inp, gy, torch.float64)
    assert rel_err(y, y0) < 2e-5, rel_err(y, y0)
    for k in gr:
        assert rel_err(gr[k], gr0[k]) < 1e-4, (k, rel_err(gr[k], gr0[k]))


@pytest.mark.parametrize("spatial,K,R", [((5, 7), 4, 2), ((2, 3, 4), 6, 3)])
def test_cross_low_rank_delta_matches_oracle(tk, tuning, dev, spatial, K, R):
    """delta_proj_weight W (K, d, R): delta given as (b, K, R, *S) token-major views, as SS2D passes its dt
    projections; each direction forms W[k] @ delta[:, k] in the kernels. Outputs and all gradients (delta and W
    included) against the oracle on the multiplied-out delta."""
    tuning(T=16, BD=2)
    orders = cross_scan_orders(len(spatial), K)
    inp = make(2, 3, spatial, 4, K, seed=9, device=dev)
    g = torch.Generator().manual_seed(4)
    v = 0.7 * torch.randn(2, *spatial, K, R, generator=g)
    inp["delta"] = v.to(dev).movedim((-2, -1), (1, 2))
    inp["W"] = (torch.randn(K, 3, R, generator=g) / R ** 0.5).to(dev)
    gy = torch.randn(2, 3, *spatial, generator=torch.Generator().manual_seed(1)).to(dev)
    y, gr = run_and_grad(lambda t: tk.cross_selective_scan_triton(
        t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["bias"], orders=orders,
        delta_proj_weight=t["W"]), inp, gy)
    y0, gr0 = run_and_grad(lambda t: cross_oracle(
        t["x"], torch.einsum("kdr,bkr...->bkd...", t["W"], t["delta"]), t["A"], t["B"], t["C"], t["D"], t["bias"],
        orders), inp, gy, torch.float64)
    assert rel_err(y, y0) < 2e-5, rel_err(y, y0)
    for k in gr:
        assert gr[k].shape == inp[k].shape
        assert rel_err(gr[k], gr0[k]) < 1e-4, (k, rel_err(gr[k], gr0[k]))


def test_cross_matches_reference_path(tk, tuning, dev):
    """Same function as ``cross_selective_scan_reference`` (materialised copies + one grouped scan, torch backend),
    with B/C given as strided views the way SS2D produces them (a split of a (b, K, R+2N, *S) projection)."""
    tuning(T=16, BD=2)
    orders = cross_scan_orders(2)
    inp = make(1, 4, (4, 6), 3, 4, seed=3, device=dev)
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(1, 4, 2 + 2 * 3, 4, 6, generator=g).to(dev)
    inp["B"], inp["C"] = proj[:, :, 2:5], proj[:, :, 5:8]
    gy = torch.randn(1, 4, 4, 6, generator=g).to(dev)
    y, gr = run_and_grad(lambda t: tk.cross_selective_scan_triton(
        t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["bias"], orders=orders), inp, gy)
    y0, gr0 = run_and_grad(lambda t: cross_selective_scan_reference(
        t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["bias"], delta_softplus=True,
        orders=orders, backend="torch"), inp, gy)
    assert rel_err(y, y0) < 1e-5
    for k in gr:
        assert rel_err(gr[k], gr0[k]) < 1e-4, k


def test_cross_rejects_bad_shapes(tk, dev):
    inp = make(1, 2, (3, 3), 2, 4, seed=0, device=dev)
    with pytest.raises(ValueError, match="K\\*d"):
        tk.cross_selective_scan_triton(inp["x"], inp["delta"], inp["A"][:4], inp["B"], inp["C"],
                                       orders=cross_scan_orders(2))
    with pytest.raises(ValueError, match="expected delta"):
        tk.cross_selective_scan_triton(inp["x"], inp["delta"][:, :2], inp["A"], inp["B"], inp["C"],
                                       orders=cross_scan_orders(2))


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("b,d,spatial,N,K", [(32, 384, (64, 64), 16, 4), (2, 96, (32, 32, 32), 16, 6),
                                             (2, 48, (16, 20, 24), 16, 12), (4, 192, (32, 32), 1, 4)])
def test_cross_full_size_matches_reference(tk, b, d, spatial, N, K):
    """Network-size cross scans (the 2D anchor shape, SS3D shapes, MSVM's N = 1) against the reference path."""
    orders = cross_scan_orders(len(spatial), K)
    inp = make(b, d, spatial, N, K, seed=2, device="cuda")
    gy = torch.randn(b, d, *spatial, generator=torch.Generator().manual_seed(1)).cuda()
    y, gr = run_and_grad(lambda t: tk.cross_selective_scan_triton(
        t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["bias"], orders=orders), inp, gy)
    y2, gr2 = run_and_grad(lambda t: tk.cross_selective_scan_triton(
        t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["bias"], orders=orders), inp, gy)
    assert torch.equal(y, y2) and all(torch.equal(gr[k], gr2[k]) for k in gr)  # deterministic
    y0, gr0 = run_and_grad(lambda t: cross_selective_scan_reference(
        t["x"], t["delta"], t["A"], t["B"], t["C"], D=t["D"], delta_bias=t["bias"], delta_softplus=True,
        orders=orders, backend="torch"), inp, gy)
    assert rel_err(y, y0) < 1e-5
    for k in gr:
        assert rel_err(gr[k], gr0[k]) < 1e-4, (k, rel_err(gr[k], gr0[k]))
