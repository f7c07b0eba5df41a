"""The Triton selective scan against the float64 oracle: outputs, last state and every gradient.

On CPU these run through Triton's interpreter (see conftest.py) at small sizes with small tiles (chunk T = 8 to 32,
backward blocks F = 2..8, segments of several blocks) so that every code path is exercised: several chunks (the
forward and backward carries), L not a multiple of T, L = 1, several blocks per chunk, segments of several blocks,
several channel blocks per group (B/C gradient partial sums),
channel tiles that do not divide the group, channels-last inputs, every B/C layout and dtype. Full sizes run on the
GPU (``-m cuda``).
"""
import pytest
import torch
import triton
import triton.language as tl

from nnunet_mamba.kernels.selective_scan_triton import _softplus_grad_of
from oracle import rel_err, selective_scan_oracle

ON_GPU = torch.cuda.is_available()


def make_inputs(b, d, L, N, layout, groups=2, dtype=torch.float32, seed=0, device="cpu", positive=False,
                c_layout=None):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    delta = 0.5 * r(b, d, L)
    if positive:
        delta = delta.abs() + 0.05
    shapes = {"const": (d, N), "shared": (b, N, L), "grouped": (b, groups, N, L)}
    t = dict(u=r(b, d, L), delta=delta, A=-torch.rand(d, N, generator=g) * 2 - 0.1, B=r(*shapes[layout]),
             C=r(*shapes[c_layout or layout]), D=r(d), z=r(b, d, L), delta_bias=0.3 * r(d))
    out = {}
    for k, v in t.items():
        v = v.to(dtype) if k in ("u", "delta", "z") or (k in ("B", "C") and v.dim() > 2) else v
        out[k] = v.to(device)
    return out


def leaves(inp, dtype=None):
    return {k: (v.detach().to(dtype) if dtype is not None and v is not None else v.detach()).requires_grad_()
            if v is not None else None for k, v in inp.items()}


def call(fn, inp, softplus, last, use=("D", "z", "delta_bias"), **extra):
    kw = {k: inp[k] for k in ("D", "z", "delta_bias") if k in use}
    kw.update(extra)
    if "W" in inp:  # low-rank delta: (b, R, L) and W (d, R)
        kw["delta_proj_weight"] = inp["W"]
    return fn(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], delta_softplus=softplus,
              return_last_state=last, **kw)


def oracle(u, delta, A, B, C, delta_proj_weight=None, **kw):
    """The float64 oracle; a low-rank delta is first multiplied out (delta = W @ v, independent of the kernels)."""
    if delta_proj_weight is not None:
        delta = torch.einsum("dr,brl->bdl", delta_proj_weight, delta)
    return selective_scan_oracle(u, delta, A, B, C, **kw)


def check_against_oracle(tk, inp, softplus=True, use=("D", "z", "delta_bias"), tol=2e-5, gtol=1e-4,
                         with_last=True, grad_last=True, **extra):
    """``extra``: keyword arguments for the Triton call only (delta_in_kernels, reuse_buffers)."""
    ours = leaves(inp)
    ref = leaves(inp, torch.float64)
    res = call(tk.selective_scan_triton, ours, softplus, with_last, use, **extra)
    res0 = call(oracle, ref, softplus, with_last, use)
    y, y0 = (res[0], res0[0]) if with_last else (res, res0)
    assert y.dtype == inp["u"].dtype and y.shape == y0.shape
    assert torch.isfinite(y).all()
    assert rel_err(y, y0) < tol, rel_err(y, y0)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y.shape, generator=g).to(y.device)
    loss, loss0 = (y.float() * gy).sum(), (y0 * gy.double()).sum()
    if with_last:
        last, last0 = res[1], res0[1]
        assert last.dtype == torch.float32
        assert rel_err(last, last0) < max(tol, 2e-5), rel_err(last, last0)
        if grad_last:
            gl = torch.randn(last.shape, generator=g).to(y.device)
            loss, loss0 = loss + (last * gl).sum(), loss0 + (last0 * gl.double()).sum()
    loss.backward()
    loss0.backward()
    for k in ours:
        if ours[k] is None or (k in ("D", "z", "delta_bias") and k not in use):
            continue
        assert ours[k].grad is not None, k
        assert ours[k].grad.dtype == ours[k].dtype and ours[k].grad.shape == ours[k].shape, k
        e = rel_err(ours[k].grad, ref[k].grad)
        assert e < gtol, (k, e)


# (b, d, L, N, layout, groups, tuning)
CASES = [
    (2, 4, 1, 3, "shared", 1, dict(T=16, BD=2)),  # L = 1
    (1, 4, 37, 4, "shared", 1, dict(T=16, BD=2, F=8)),  # 3 chunks, L % T != 0
    (2, 4, 70, 4, "grouped", 2, dict(T=8, BD=2, F=2)),  # 9 chunks, 4 blocks each
    (1, 6, 50, 5, "grouped", 2, dict(T=16, BD=2, F=4)),  # dg=3: tile overhang
    (2, 8, 45, 2, "const", 1, dict(T=16, BD=2)),  # constant B/C
    (1, 8, 64, 16, "grouped", 4, dict(T=16, BD=1)),  # 4 groups, exact L
    (1, 4, 33, 1, "shared", 1, dict(T=16, BD=4)),  # N = 1
    (2, 6, 40, 3, "shared", 1, dict(T=16, BD=2, U=2)),  # 3 channel blocks per group + partials
    (2, 4, 70, 4, "grouped", 2, dict(T=16, BD=2, F=2, S=8)),  # 5 chunks of 2 segments of 4 blocks, L % T != 0
    (1, 4, 45, 3, "const", 1, dict(T=32, BD=4, F=4, S=16)),  # constant B/C, segments of 4 blocks, a partial one
    # B/C columns spread over the lanes (plan.spread: the default from N = 9): masked states, L % T != 0, segments
    (2, 8, 37, 12, "shared", 1, dict(T=16, BD=4)),
    (1, 6, 45, 16, "grouped", 2, dict(T=16, BD=2, F=2, S=8)),
    (2, 4, 33, 4, "shared", 1, dict(T=16, BD=2, spread=True)),  # forced at N = 4 (fewer values than lanes)
    (1, 8, 40, 16, "shared", 1, dict(T=16, BD=4, spread=False)),  # and off at N = 16
]


@pytest.mark.parametrize("b,d,L,N,layout,groups,tune", CASES)
def test_matches_oracle(tk, tuning, dev, b, d, L, N, layout, groups, tune):
    tuning(**tune)
    inp = make_inputs(b, d, L, N, layout, groups=groups, seed=L * 31 + N, device=dev)
    check_against_oracle(tk, inp, softplus=True)


def with_low_rank_delta(inp, R, seed):
    """Replace delta by (b, R, L) low-rank values in delta's dtype, token-major like the x_proj output they come from,
    and W (d, R)."""
    b, d, L = inp["u"].shape
    g = torch.Generator().manual_seed(seed)
    v = (0.7 * torch.randn(b, L, R, generator=g)).to(inp["delta"].dtype)
    inp["delta"] = v.to(inp["u"].device).transpose(1, 2)
    inp["W"] = (torch.randn(d, R, generator=g) / R ** 0.5).to(inp["u"].device)
    return inp


# (b, d, L, N, R, layout, groups, tuning)
LOW_RANK_CASES = [
    (2, 4, 37, 4, 2, "shared", 1, dict(T=16, BD=2)),  # 3 chunks, 2 channel blocks: partial sums of the dt gradient
    (1, 8, 70, 3, 3, "grouped", 2, dict(T=16, BD=2, F=2, S=8)),  # R = 3 (a masked row), groups, segments
    (2, 6, 1, 4, 1, "shared", 1, dict(T=16, BD=4)),  # L = 1, R = 1, channel tile overhang
    (1, 4, 50, 4, 2, "const", 1, dict(T=16, BD=4, F=4)),  # constant B/C
]


@pytest.mark.parametrize("b,d,L,N,R,layout,groups,tune", LOW_RANK_CASES)
def test_low_rank_delta_matches_oracle(tk, tuning, dev, b, d, L, N, R, layout, groups, tune):
    """delta_proj_weight: the scan forms delta = W @ v per step; outputs and the gradients of v and W (and all
    others) against the oracle on the multiplied-out delta."""
    tuning(**tune)
    inp = with_low_rank_delta(make_inputs(b, d, L, N, layout, groups=groups, seed=L + R, device=dev), R, seed=R)
    check_against_oracle(tk, inp)


@pytest.mark.parametrize("low_rank_kernels", [False, True])
@pytest.mark.parametrize("b,d,L,N,R,layout,groups,tune", LOW_RANK_CASES)
def test_low_rank_delta_multiplied_out_matches_oracle(tk, tuning, dev, monkeypatch, b, d, L, N, R, layout, groups, tune,
                                                      low_rank_kernels):
    """delta_in_kernels=False: the op multiplies delta out into its own buffer and writes d(delta) over it; the
    product and the gradients of v and W by PyTorch or (as from _LOW_RANK_TRITON_FROM elements) by
    kernels/low_rank_triton.py."""
    tuning(**tune)
    monkeypatch.setattr(tk, "_LOW_RANK_TRITON_FROM", 0 if low_rank_kernels else 2 ** 62)
    inp = with_low_rank_delta(make_inputs(b, d, L, N, layout, groups=groups, seed=L + R, device=dev), R, seed=R)
    check_against_oracle(tk, inp, delta_in_kernels=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_rank_delta_half_inputs(tk, tuning, dev, monkeypatch, dtype):
    tuning(T=16, BD=2)
    inp = with_low_rank_delta(make_inputs(2, 4, 40, 4, "shared", dtype=dtype, seed=6, device=dev), 2, 3)
    check_against_oracle(tk, inp, tol=1e-2, gtol=1.5e-2)
    check_against_oracle(tk, inp, tol=1e-2, gtol=1.5e-2, delta_in_kernels=False)
    monkeypatch.setattr(tk, "_LOW_RANK_TRITON_FROM", 0)  # the product of half v and its gradients on the kernels
    check_against_oracle(tk, inp, tol=1e-2, gtol=1.5e-2, delta_in_kernels=False)


def test_low_rank_delta_shape_errors(tk, dev):
    inp = with_low_rank_delta(make_inputs(1, 4, 10, 2, "shared", device=dev), 2, 1)
    inp["W"] = inp["W"][:3]
    with pytest.raises(ValueError, match="delta_proj_weight must be"):
        call(tk.selective_scan_triton, inp, True, False)
    inp = with_low_rank_delta(make_inputs(1, 4, 10, 2, "shared", device=dev), 2, 1)
    inp["delta"] = inp["delta"][:, :1]
    with pytest.raises(ValueError, match="delta must be"):
        call(tk.selective_scan_triton, inp, True, False)


@pytest.mark.parametrize("use", [(), ("D",), ("z",), ("delta_bias",)])
def test_optional_inputs_and_no_softplus(tk, tuning, dev, use):
    tuning(T=16, BD=2)
    inp = make_inputs(2, 4, 41, 4, "grouped", seed=len(use), device=dev, positive=True)
    check_against_oracle(tk, inp, softplus=False, use=use)


def test_without_last_state(tk, tuning, dev):
    tuning(T=16, BD=2)
    check_against_oracle(tk, make_inputs(1, 4, 30, 4, "shared", seed=3, device=dev), with_last=False)
    check_against_oracle(tk, make_inputs(1, 4, 30, 4, "shared", seed=4, device=dev), grad_last=False)


def test_mixed_layouts_and_strided_bc(tk, tuning, dev):
    """B time-varying and C constant (and the reverse); B/C given as transposed views (b, N, L) of (b, L, N)."""
    tuning(T=16, BD=2)
    check_against_oracle(tk, make_inputs(2, 4, 35, 3, "shared", c_layout="const", seed=11, device=dev))
    check_against_oracle(tk, make_inputs(2, 4, 35, 3, "const", c_layout="grouped", groups=2, seed=12, device=dev))
    inp = make_inputs(2, 4, 35, 3, "shared", seed=13, device=dev)
    inp["B"] = inp["B"].transpose(1, 2).contiguous().transpose(1, 2)  # strides (L*N, 1, N)
    inp["C"] = inp["C"].transpose(1, 2).contiguous().transpose(1, 2)
    assert inp["B"].stride(-1) != 1
    check_against_oracle(tk, inp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fp32_state(tk, tuning, dev, dtype):
    """Half-precision inputs: fp32 state and accumulation, output and input gradients in the input dtype.

    The oracle runs in float64 on the same (rounded) inputs; the output and the gradients are only rounded to the
    input dtype once at the end, so they land within a few half-precision ulps."""
    tuning(T=16, BD=2)
    inp = make_inputs(2, 4, 40, 4, "grouped", dtype=dtype, seed=5, device=dev)
    check_against_oracle(tk, inp, tol=1e-2, gtol=1.5e-2)


def test_large_steps_stay_finite(tk, tuning, dev):
    """delta*A of -hundreds per step over many chunks: no overflow, no NaN (no exp(-cumsum) tricks)."""
    tuning(T=16, BD=2)
    inp = make_inputs(1, 4, 150, 4, "shared", seed=9, device=dev)
    inp["delta"] = inp["delta"] * 0 + 30.0
    check_against_oracle(tk, inp)


def test_softplus_both_branches(tk, tuning, dev):
    """delta + bias spread over [-30, 30]: the x > 20 branch, the log1p branch and its far tail (tiny steps)."""
    tuning(T=16, BD=2)
    inp = make_inputs(2, 4, 60, 4, "shared", seed=14, device=dev)
    g = torch.Generator().manual_seed(15)
    inp["delta"] = (torch.rand(2, 4, 60, generator=g) * 60 - 30).to(dev)
    inp["A"] = inp["A"] * 0.1
    check_against_oracle(tk, inp)


def test_softplus_both_branches_with_the_dt_written_over_the_delta(tk, tuning, dev):
    """The multiplied-out low-rank delta is the op's own buffer: the forward writes dt = softplus(delta + bias) over
    it and the backward takes softplus's derivative from dt (1 - exp(-dt)). delta + bias over [-30, 30]: dt > 20,
    the series for small dt and its far tail."""
    tuning(T=16, BD=2, F=2, S=4)
    inp = make_inputs(2, 4, 60, 4, "shared", seed=16, device=dev)
    g = torch.Generator().manual_seed(17)
    inp["delta"] = (torch.rand(2, 60, 1, generator=g) * 60 - 30).to(dev).transpose(1, 2)  # v (b, R = 1, L)
    inp["W"] = torch.tensor([[1.0], [0.5], [-0.7], [1.2]], device=dev)
    inp["A"] = inp["A"] * 0.1
    check_against_oracle(tk, inp, delta_in_kernels=False)


@triton.jit
def _softplus_grad_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, _softplus_grad_of(tl.load(x_ptr + i, mask=i < n)), mask=i < n)


def test_softplus_derivative_from_dt(dev):
    """_softplus_grad_of(dt) against float64 1 - exp(-dt) element by element, over dt from 1e-30 to 60 (both sides of
    the series' limit 0.5): relative error below 1e-6."""
    dt = torch.cat([torch.logspace(-30, 1.78, 2000), torch.linspace(0.45, 0.55, 101), torch.zeros(1)]).to(dev)
    out = torch.empty_like(dt)
    _softplus_grad_kernel[(triton.cdiv(dt.numel(), 256),)](dt, out, dt.numel(), BLOCK=256)
    ref = -torch.expm1(-dt.double())
    err = ((out.double() - ref).abs() / ref.clamp_min(1e-300))[dt > 0]
    assert err.max() < 1e-6, err.max()
    assert out[-1] == 0


def test_positive_decay_matches_oracle(tk, tuning, dev):
    """A > 0 (growing state) is still the same recurrence (the chunk carries use exp(A * sum dt))."""
    tuning(T=16, BD=2)
    inp = make_inputs(1, 2, 48, 2, "shared", seed=10, device=dev)
    inp["A"] = inp["A"].abs() * 0.05
    check_against_oracle(tk, inp)


def test_default_plan_matches_oracle(tk, dev):
    """No overrides: the launch plan the package uses (interpreted: chunk >= 16, whatever the machine)."""
    check_against_oracle(tk, make_inputs(2, 4, 100, 4, "grouped", seed=21, device=dev))


def test_channels_last_inputs(tk, tuning, dev):
    """u, delta, z and B/C as channels-last views (the layout a Linear produces): same results, and the output and
    input gradients keep that layout."""
    tuning(T=16, BD=4, F=4)
    inp = make_inputs(2, 8, 45, 4, "grouped", groups=2, seed=17, device=dev)
    for k in ("u", "delta", "z"):
        inp[k] = inp[k].transpose(1, 2).contiguous().transpose(1, 2)
    for k in ("B", "C"):
        inp[k] = inp[k].permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    check_against_oracle(tk, inp)
    x = leaves(inp)
    y = call(tk.selective_scan_triton, x, True, False)
    assert y.stride() == inp["u"].stride()
    y.sum().backward()
    assert x["u"].grad.stride() == inp["u"].stride() and x["delta"].grad.stride() == inp["delta"].stride()


def test_views_with_gaps_as_the_mamba_mixer_passes_them(tk, tuning, dev):
    """u and z as the two halves of one (b, L, 2d) in_proj output, delta and B/C as column slices of wider (b, L, *)
    tensors: views with gaps between rows. The kernels must read through their strides and write the output and the
    gradients into new dense tensors (an empty_like of such a view is laid out differently)."""
    tuning(T=16, BD=4, F=4)
    b, d, L, N = 2, 8, 45, 4
    inp = make_inputs(b, d, L, N, "shared", seed=23, device=dev)
    xz = torch.cat([inp["u"], inp["z"]], 1).transpose(1, 2).contiguous().transpose(1, 2)  # (b, 2d, L), (b, L, 2d)
    inp["u"], inp["z"] = xz[:, :d], xz[:, d:]
    dbl = torch.cat([inp["delta"], inp["B"], inp["C"]], 1).transpose(1, 2).contiguous().transpose(1, 2)
    inp["delta"], inp["B"], inp["C"] = dbl[:, :d], dbl[:, d:d + N], dbl[:, d + N:]
    assert not inp["z"].is_contiguous() and inp["z"].stride() == (2 * d * L, 1, 2 * d)
    check_against_oracle(tk, inp)


def _mixer_like(tk, dev, seed, R=2, dtype=torch.float32):
    """The Mamba mixer's call as leaf tensors' views: u and z as halves of one (b, L, 2d) in_proj-like output, a
    low-rank delta (b, R, L) and B/C as columns of one x_proj-like output (b, L, R + 2N), W (d, R)."""
    b, d, L, N = 2, 8, 45, 4
    inp = with_low_rank_delta(make_inputs(b, d, L, N, "shared", seed=seed, device=dev, dtype=dtype), R, seed)
    xz = torch.cat([inp["u"], inp["z"]], 1).transpose(1, 2).contiguous().requires_grad_().transpose(1, 2)
    dbl = torch.cat([inp["delta"], inp["B"], inp["C"]], 1).transpose(1, 2).contiguous().requires_grad_()
    dbl = dbl.transpose(1, 2)
    return dict(u=xz[:, :d], z=xz[:, d:], delta=dbl[:, :R], B=dbl[:, R:R + N], C=dbl[:, R + N:],
                **leaves({k: inp[k] for k in ("A", "D", "delta_bias", "W")}))


@pytest.mark.parametrize("in_kernels,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_x_proj_blocks_get_their_gradients_side_by_side(tk, tuning, dev, in_kernels, dtype):
    """The Mamba mixer's low-rank dt, B and C as column blocks of one x_proj output: fp32 gradients come back side by
    side in one (b, L, R + 2N) buffer (ops.linear_split's backward then takes it without concatenating), with the
    delta multiplied out or formed in the kernels; bf16 ones (autocast) separately. Values against the oracle."""
    from nnunet_mamba.kernels.layout import column_blocks

    tuning(T=16, BD=4)
    x = _mixer_like(tk, dev, seed=12, dtype=dtype)
    ref = leaves(x, torch.float64)
    names = ["delta", "B", "C"]
    y = call(tk.selective_scan_triton, x, True, False, delta_in_kernels=in_kernels)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(5)).to(dev)
    grads = torch.autograd.grad(y, [x[k] for k in names], gy.to(y.dtype))
    assert (column_blocks([g.transpose(1, 2) for g in grads]) is not None) == (dtype == torch.float32)
    refs = torch.autograd.grad(call(oracle, ref, True, False), [ref[k] for k in names], gy.double())
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    for k, g, r in zip(names, grads, refs):
        assert g.dtype == dtype and float((g.double() - r).abs().max() / r.abs().max()) < tol, k


@pytest.mark.parametrize("parts", [1, 2, 3, 4])
@pytest.mark.parametrize("k, n", [(1, 4), (2, 4), (2, 3)])
def test_block_sums_into_strided_buffers(tk, dev, parts, k, n):
    """The backward's per-channel-block partials of k gradients side by side summed in one pass: into column blocks
    of a wider buffer (its other columns untouched) and into new contiguous tensors; against float64."""
    p = torch.randn(parts, 2, 1, 7, k * n, generator=torch.Generator().manual_seed(parts)).to(dev)
    buf = torch.full((2, 7, 11), float("nan"), device=dev)
    halves = [buf[..., 3 + i * n:3 + (i + 1) * n].unsqueeze(1) for i in range(k)]
    ref = p.double().sum(0)
    got = tk._block_sum(p, k, halves)
    assert [h.data_ptr() for h in got] == [h.data_ptr() for h in halves]
    assert float((torch.cat(halves, -1).double() - ref).abs().max()) < 1e-6
    assert buf[..., 3 + k * n:].isnan().all() and buf[..., :3].isnan().all()
    new = tk._block_sum(p, k)
    assert all(h.is_contiguous() and torch.equal(h, g) for h, g in zip(new, halves))
    with pytest.raises(ValueError, match="contiguous partials"):
        tk._block_sum(p.transpose(-1, -2).contiguous().transpose(-1, -2), k)


def test_x_proj_and_scan_compose_without_a_concatenation(tk, tuning, dev, monkeypatch):
    """x -> ops.linear_split(x_proj) -> dt, B, C -> the scan, as the Mamba mixer calls them: linear_split's backward
    finds the scan's three gradients side by side and takes them as x_proj's output gradient (torch.cat is not
    called); the gradients of x and of x_proj's weight against float64."""
    import nnunet_mamba.ops.linear as lin
    from nnunet_mamba.ops import linear_split

    tuning(T=16, BD=4)
    b, d, L, N, R = 2, 8, 45, 4, 2
    inp = make_inputs(b, d, L, N, "shared", seed=3, device=dev)
    g = torch.Generator().manual_seed(4)
    tokens = torch.randn(b, L, d, generator=g).to(dev)
    w = (torch.randn(R + 2 * N, d, generator=g) / d ** 0.5).to(dev)
    W = (torch.randn(d, R, generator=g) / R ** 0.5).to(dev)
    gy = torch.randn(b, d, L, generator=g).to(dev)

    def run(fn, tokens, w, W, **kw):
        dt, B, C = linear_split(tokens, w, None, (R, N, N))
        return fn(inp["u"].to(tokens.dtype), dt.transpose(1, 2), inp["A"].to(tokens.dtype), B.transpose(1, 2),
                  C.transpose(1, 2), delta_softplus=True, delta_proj_weight=W, **kw)

    found, cats = [], []
    blocks = lin.column_blocks
    monkeypatch.setattr(lin, "column_blocks", lambda parts: (found.append(blocks(parts) is not None), blocks(parts))[1])
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, dim=0: (cats.append(len(ts)), real_cat(ts, dim))[1])
    ours = [t.clone().requires_grad_() for t in (tokens, w, W)]
    grads = torch.autograd.grad(run(tk.selective_scan_triton, *ours, delta_in_kernels=False), ours, gy)
    monkeypatch.undo()
    assert found == [True] and cats == []
    ref = [t.double().requires_grad_() for t in (tokens, w, W)]
    refs = torch.autograd.grad(run(oracle, *ref), ref, gy.double())
    for name, a, r in zip(["x", "x_proj.weight", "dt_proj.weight"], grads, refs):
        assert float((a.double() - r).abs().max() / r.abs().max()) < 1e-4, name


@pytest.mark.parametrize("in_kernels,reuse", [(False, True), (True, False)])
def test_x_proj_inside_the_scan_matches_float64(tk, tuning, dev, in_kernels, reuse):
    """x_proj applied by the scan (ops.selective_scan's x_proj_weight on this backend): the (b, L, R + 2N) product of
    the tokens (u) computed in the forward, x_proj's backward in the scan's, its input gradient added into du. The
    output and the gradients of the tokens, of x_proj's and dt_proj's weights, A, D, the bias and z against the
    float64 oracle on the product formed independently, with the delta multiplied out (and du written over the
    output gradient) or formed in the kernels. x_proj's GEMMs are ops.linear's (on the CPU cuBLAS's stand-in)."""
    from nnunet_mamba.ops.linear import _product, linear_grads_into

    tuning(T=16, BD=4)
    b, d, L, N, R = 2, 8, 45, 4, 2
    g = torch.Generator().manual_seed(8)
    leaf = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).to(dev).requires_grad_()
    c = dict(x=leaf(b, L, d), Wx=leaf(R + 2 * N, d, scale=d ** -0.5), W=leaf(d, R, scale=R ** -0.5),
             A=(-torch.rand(d, N, generator=g) - 0.5).to(dev).requires_grad_(), D=leaf(d), bias=leaf(d, scale=0.5),
             z=leaf(b, L, d))
    ref = {k: v.detach().double().requires_grad_() for k, v in c.items()}  # before reuse writes dz over z
    y = tk.selective_scan_triton(c["x"].transpose(1, 2), None, c["A"], None, None, D=c["D"], z=c["z"].transpose(1, 2),
                                 delta_bias=c["bias"], delta_softplus=True, delta_proj_weight=c["W"],
                                 delta_in_kernels=in_kernels, reuse_buffers=reuse,
                                 x_proj=(c["Wx"], _product, linear_grads_into))
    gy = torch.randn(y.shape, generator=g).to(dev)
    grads = torch.autograd.grad(y, list(c.values()), gy.clone() if reuse else gy)
    dbl = ref["x"] @ ref["Wx"].t()
    y0 = oracle(ref["x"].transpose(1, 2), dbl[..., :R].transpose(1, 2), ref["A"], dbl[..., R:R + N].transpose(1, 2),
                dbl[..., R + N:].transpose(1, 2), delta_proj_weight=ref["W"], D=ref["D"], z=ref["z"].transpose(1, 2),
                delta_bias=ref["bias"], delta_softplus=True)
    assert float((y.detach().double() - y0.detach()).abs().max() / y0.detach().abs().max()) < 2e-5
    refs = torch.autograd.grad(y0, list(ref.values()), gy.double())
    for k, a, r in zip(c, grads, refs):
        assert float((a.double() - r).abs().max() / r.abs().max()) < 1e-4, k
    with pytest.raises(ValueError, match="x_proj needs"):
        tk.selective_scan_triton(c["x"].transpose(1, 2), None, c["A"], None, None, delta_proj_weight=c["W"],
                                 x_proj=(c["Wx"][1:], _product, linear_grads_into))


@pytest.mark.parametrize("expanded,dtype", [(False, torch.float32), (True, torch.float32), (False, torch.bfloat16)])
def test_reuse_buffers_writes_dz_and_du_in_place(tk, tuning, dev, expanded, dtype):
    """reuse_buffers=True (the Mamba mixer's call): dz is written over z, du over the output's gradient and d(delta)
    over the op's multiplied-out delta, and the gradients match the float64 oracle. ``expanded``: the gradient
    ``y.sum()`` passes, a stride-0 tensor that must not be written to (du then gets a buffer of its own). bfloat16:
    the mixer's inputs under autocast (the gradients written in place in that dtype)."""
    tuning(T=16, BD=4, F=2, S=4)
    x = _mixer_like(tk, dev, seed=31, dtype=dtype)
    ref = leaves(x, torch.float64)  # before the backward overwrites z
    y = call(tk.selective_scan_triton, x, True, False, delta_in_kernels=False, reuse_buffers=True)
    if expanded:
        gy = torch.ones((), device=dev, dtype=y.dtype).expand(y.shape)
    else:  # a fresh token-major gradient, as out_proj's backward gives
        gy = torch.randn(y.shape[0], y.shape[2], y.shape[1], generator=torch.Generator().manual_seed(2))
        gy = gy.to(dev, y.dtype).transpose(1, 2)
    gy0 = gy.double()
    names = ["u", "delta", "z", "B", "W", "D"]
    grads = torch.autograd.grad(y, [x[k] for k in names], gy)
    assert grads[2].data_ptr() == x["z"].data_ptr(), "dz was not written over z"
    assert (grads[0].data_ptr() == gy.data_ptr()) != expanded
    assert bool((gy == 1).all()) == expanded
    grads0 = torch.autograd.grad(call(oracle, ref, True, False), [ref[k] for k in names], gy0)
    for k, g, g0 in zip(names, grads, grads0):
        assert g.dtype == x[k].dtype
        assert rel_err(g, g0) < (1e-4 if dtype == torch.float32 else 1.5e-2), (k, rel_err(g, g0))


def test_second_backward_through_a_reused_buffer(tk, tuning, dev):
    """retain_graph: the overwritten multiplied-out delta is formed again (same gradients); a scan whose z and output
    gradient were reused refuses, with what to do instead."""
    tuning(T=16, BD=4)
    x = _mixer_like(tk, dev, seed=5)
    y = call(tk.selective_scan_triton, x, True, False, delta_in_kernels=False)
    first = torch.autograd.grad(y.square().sum(), [x["u"], x["delta"], x["W"]], retain_graph=True)
    second = torch.autograd.grad(y.square().sum(), [x["u"], x["delta"], x["W"]])
    for g1, g2 in zip(first, second):
        assert torch.equal(g1, g2)
    y = call(tk.selective_scan_triton, _mixer_like(tk, dev, seed=5), True, False, reuse_buffers=True)
    y.square().sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="reuse_buffers=False"):
        y.square().sum().backward()


@pytest.mark.parametrize("dtype,kept", [(torch.float32, True), (torch.bfloat16, False)])
def test_full_delta_dt_formed_once_into_a_buffer_of_the_ops_own(tk, tuning, dev, record_launches, dtype, kept):
    """A full fp32 delta with softplus: the forward's first pass writes dt = softplus(delta + bias) into a new buffer
    (DT_OUT), the output pass, _bsum_kernel and _bwd_kernel read it (DT_DONE), and the backward keeps it instead of
    the delta. The caller's delta is left as it was, a second backward (retain_graph) gives the same gradients, and
    both match the oracle. A half delta keeps the plain path (an fp32 dt would be a larger buffer)."""
    tuning(T=16, BD=4, F=2)
    log = record_launches({name: name for name in ("_chunk_kernel", "_bsum_kernel", "_bwd_kernel")})
    inp = make_inputs(2, 8, 45, 4, "shared", seed=31, device=dev, dtype=dtype)
    x = leaves(inp)
    before = x["delta"].detach().clone()
    y = call(tk.selective_scan_triton, x, True, False)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(4)).to(dev, dtype)
    names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias"]
    first = torch.autograd.grad(y, [x[k] for k in names], gy, retain_graph=True)
    second = torch.autograd.grad(y, [x[k] for k in names], gy)
    assert torch.equal(x["delta"].detach(), before)
    for k, g1, g2 in zip(names, first, second):
        assert torch.equal(g1, g2), k
    flags = [(n, m["DT_OUT"] if n == "_chunk_kernel" else None, m["DT_DONE"]) for n, m in log]
    if kept:  # summary pass writes dt; the output pass and both backwards read it
        assert flags == [("_chunk_kernel", True, False), ("_chunk_kernel", False, True)] + \
            [("_bsum_kernel", None, True), ("_bwd_kernel", None, True)] * 2
    else:
        assert all(not out and not done for _, out, done in flags)
    ref = leaves(inp, torch.float64)
    y0 = call(oracle, ref, True, False)
    g0 = torch.autograd.grad(y0, [ref[k] for k in names], gy.double())
    tol, gtol = (2e-5, 1e-4) if kept else (1e-2, 1.5e-2)
    assert rel_err(y, y0) < tol
    for k, g, r in zip(names, first, g0):
        assert rel_err(g, r) < gtol, k


@pytest.mark.parametrize("plan,env,seg", [(dict(T=16, BD=4), None, 16), (dict(T=16, BD=4, early_S=4), "1", 4),
                                          (dict(T=16, BD=4, F=2, S=8), "1", 8), (dict(T=16, BD=4), "0", 0)])
def test_recomputed_region_starts_at_the_output_pass(tk, tuning, dev, monkeypatch, record_launches, plan, env, seg):
    """In a region checkpointed with ops.recompute's contexts (modules.common.recomputed), the recomputation takes
    the chunk-entering states from the forward pass: one _chunk_kernel launch (the output pass) instead of two
    (summary, output); by default that pass also writes the backward's segment-entering states, one per
    min(EARLY_S, T) steps (``seg``), and _bwd_kernel skips its forward walk; NNUNET_MAMBA_EARLY_SCRATCH=0 leaves the
    walk to the backward (a scratch less at the peak). The output and every gradient are bitwise those of the same
    scan not recomputed. 3 chunks, L % T != 0; segments of a whole chunk, of 2 and of 4 blocks (the scratch's
    block-state buffers after the segment states)."""
    from torch.utils.checkpoint import checkpoint

    from nnunet_mamba.ops import recompute

    tuning(**plan)
    if env is None:
        monkeypatch.delenv("NNUNET_MAMBA_EARLY_SCRATCH", raising=False)
    else:
        monkeypatch.setenv("NNUNET_MAMBA_EARLY_SCRATCH", env)
    log = record_launches({"_chunk_kernel": "chunk", "_bwd_kernel": "bwd"})

    def launches():  # (kernel, its SEG or WALKED flag) per launch
        return [(n, meta["SEG" if n == "chunk" else "WALKED"]) for n, meta in log]

    names = ["u", "delta", "z", "B", "C", "W", "D", "delta_bias"]
    gy = torch.randn(2, 8, 45, generator=torch.Generator().manual_seed(3)).to(dev)

    def scan(*tensors, slot=None):
        return call(tk.selective_scan_triton, dict(zip(names, tensors), A=x["A"]), True, False,
                    delta_in_kernels=False, chunk_states=slot)

    x = _mixer_like(tk, dev, seed=8)
    y0 = scan(*[x[k] for k in names])
    g0 = torch.autograd.grad(y0, [x[k] for k in names], gy)
    assert [n for n, _ in launches()] == ["chunk", "chunk", "bwd"]  # summary, output; backward
    log.clear()
    x = _mixer_like(tk, dev, seed=8)
    y = checkpoint(lambda *t: scan(*t, slot=recompute.slot()), *[x[k] for k in names], use_reentrant=False,
                   context_fn=recompute.contexts)
    assert launches() == [("chunk", 0), ("chunk", 0)] and recompute.slot() is None  # outside the region again
    g = torch.autograd.grad(y, [x[k] for k in names], gy)
    assert launches()[2:] == [("chunk", seg), ("bwd", seg > 0)]
    assert torch.equal(y, y0)
    for k, a, b in zip(names, g, g0):
        assert torch.equal(a, b), k


def test_register_cap_reaches_the_backward_launch(tk, tuning, dev, record_launches):
    """set_tuning(bwd_maxnreg=...) launches _bwd_kernel with Triton's maxnreg (a sweep knob: kernels/inspect_sass.py
    --bwd-maxnreg shows the spills; no default cap); the results are the same."""
    log = record_launches({"_bwd_kernel": "bwd"})
    inp = make_inputs(2, 8, 40, 4, "shared", seed=2, device=dev)
    runs = []
    for cap in (None, 168):
        tuning(T=16, BD=4, bwd_maxnreg=cap)
        x = leaves(inp)
        y = call(tk.selective_scan_triton, x, True, False)
        runs.append([y, *torch.autograd.grad(y, [x["u"], x["delta"], x["B"]], torch.ones_like(y))])
    assert "maxnreg" not in log[0][1] and log[1][1]["maxnreg"] == 168
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_default_plan_bounds_the_block_state_scratch(tk, dev):
    """Blocks of F = 2 steps; the backward's scratch keeps one state per segment of S = F steps where that fits
    HF_SCRATCH_BYTES, else per segment of 16 steps (or longer, until it fits), as for LightM-UNet's full-resolution
    layers (2, 64, 128^3, N = 16); 64 steps where a recomputation's forward writes them (``early``)."""
    def nbytes(p, L, S):
        return p.scratch_states(2, 64, L, p.T, S) * 16 * 4

    small = tk._Plan(2, 64, 1, 64 ** 3, 16, dev)
    assert (small.F, small.S, small.stages, small.bwd_stages) == (2, 2, 3, 4)
    assert nbytes(small, 64 ** 3, small.S) <= tk._Plan.HF_SCRATCH_BYTES
    big = tk._Plan(2, 64, 1, 128 ** 3, 16, dev)
    assert big.F == 2 and big.S > 2 and big.T % big.S == 0
    assert nbytes(big, 128 ** 3, big.S) <= tk._Plan.HF_SCRATCH_BYTES < nbytes(big, 128 ** 3, big.S // 2)
    # states kept from a recomputation's forward: one per 64 steps, on the same chunks; a shorter chunk is one segment
    early = tk._Plan(2, 64, 1, 128 ** 3, 16, dev, early=True)
    assert (early.S, early.T) == (64, big.T)
    short = tk._Plan(2, 64, 1, 40, 16, dev, early=True)
    assert short.S == short.T == tk._Plan(2, 64, 1, 40, 16, dev).T < 64


def test_cross_scan_plan_takes_more_chunks_only_where_it_already_has_several(tk, tuning):
    """The cross-scan launches one direction at a time and asks for 32 programs per SM instead of 16, but only where
    16 already gives several chunks: a single chunk needs no summary pass, and splitting it measured slower
    (kernels/BENCHMARK.md, session 7). On a CPU device the plan counts 4 SMs; U = 4 steps is the shortest chunk."""
    cpu = torch.device("cpu")
    several = tk._Plan(2, 32, 1, 1024, 16, cpu), tk._Plan(2, 32, 1, 1024, 16, cpu, per_sm=32)
    assert (several[0].T, several[1].T) == (1024 // (16 * 4 // 2), 1024 // (32 * 4 // 2))  # 32 and 64 chunks
    single = tk._Plan(64, 32, 1, 1024, 16, cpu, per_sm=32)
    assert single.T == 1024 and single.n_chunks == 1
    tuning(per_sm=16)  # an explicit setting is used as given
    assert tk._Plan(2, 32, 1, 1024, 16, cpu, per_sm=32).T == several[0].T


def test_unknown_tuning_key(tk):
    with pytest.raises(ValueError, match="unknown keys"):
        tk.set_tuning(n_seg_fwd=2)


def test_rejects_a_chunk_that_is_not_whole_steps_and_blocks(tk, tuning, dev):
    tuning(T=12, F=8)  # a chunk is walked in blocks of F steps: T must be a multiple of F (and of U)
    with pytest.raises(ValueError, match="multiple of"):
        call(tk.selective_scan_triton, make_inputs(1, 4, 30, 4, "shared", device=dev), True, False)
    tuning(T=16, F=4, S=6)  # segments are whole blocks
    with pytest.raises(ValueError, match="multiple of"):
        call(tk.selective_scan_triton, make_inputs(1, 4, 30, 4, "shared", device=dev), True, False)


def test_rejects_bad_groups(tk, dev):
    inp = make_inputs(1, 6, 8, 2, "grouped", groups=4, device=dev)
    with pytest.raises(ValueError, match="divisible"):
        call(tk.selective_scan_triton, inp, True, False)


# ------------------------------------------------------------------------------------------------------------------
# full size, on the GPU


def _torch_backend(inp, softplus=True):
    from nnunet_mamba.ops.torch_scan import selective_scan_torch
    return selective_scan_torch(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"], z=inp["z"],
                                delta_bias=inp["delta_bias"], delta_softplus=softplus, return_last_state=True)


def _grads(fn, inp, gy, gl):
    x = leaves(inp)
    y, last = fn(x)
    ((y.float() * gy).sum() + (last * gl).sum()).backward()
    return y.detach(), last.detach(), {k: v.grad for k, v in x.items()}


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("b,d,L,N,layout,groups", [(2, 64, 262144, 16, "shared", 1), (2, 640, 4096, 16, "shared", 1),
                                                   (4, 96, 20000, 16, "grouped", 4), (2, 32, 32768, 1, "shared", 1),
                                                   (2, 64, 9999, 16, "const", 1)])
def test_full_size_matches_torch_backend(tk, b, d, L, N, layout, groups):
    """Full-size shapes against the validated PyTorch backend (fp32 both), forward and all gradients; twice, to
    check that repeated runs give bitwise identical results (no races, no atomics)."""
    inp = make_inputs(b, d, L, N, layout, groups=groups, seed=1, device="cuda")
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(b, d, L, generator=g).cuda()
    gl = torch.randn(b, d, N, generator=g).cuda()
    fn = lambda x: call(tk.selective_scan_triton, x, True, True)
    y, last, gr = _grads(fn, inp, gy, gl)
    y2, last2, gr2 = _grads(fn, inp, gy, gl)
    assert torch.equal(y, y2) and torch.equal(last, last2)
    for k in gr:
        assert torch.equal(gr[k], gr2[k]), k
    y0, last0, gr0 = _grads(_torch_backend, inp, gy, gl)
    assert rel_err(y, y0) < 1e-5 and rel_err(last, last0) < 1e-5
    for k in gr:
        assert rel_err(gr[k], gr0[k]) < 1e-4, (k, rel_err(gr[k], gr0[k]))


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("b,d,L,R", [(2, 64, 262144, 2), (2, 256, 4096, 16)])
def test_full_size_low_rank_delta_matches_torch_backend(tk, b, d, L, R):
    """The Mamba mixer's shapes (LightM-UNet levels 1 and 4, dt_rank 2 and 16) with the low-rank delta formed in the
    kernels, against the PyTorch backend on the multiplied-out delta; all gradients, the low-rank ones included."""
    inp = with_low_rank_delta(make_inputs(b, d, L, 16, "shared", seed=1, device="cuda"), R, seed=2)
    g = torch.Generator().manual_seed(2)
    gy, gl = torch.randn(b, d, L, generator=g).cuda(), torch.randn(b, d, 16, generator=g).cuda()
    y, last, gr = _grads(lambda x: call(tk.selective_scan_triton, x, True, True), inp, gy, gl)

    def torch_backend(x):
        return _torch_backend(dict(x, delta=torch.einsum("dr,brl->bdl", x["W"], x["delta"])))

    y0, last0, gr0 = _grads(torch_backend, inp, gy, gl)
    assert rel_err(y, y0) < 1e-5 and rel_err(last, last0) < 1e-5
    for k in gr:
        assert rel_err(gr[k], gr0[k]) < 1e-4, (k, rel_err(gr[k], gr0[k]))


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("layout,groups,dtype", [("shared", 1, torch.float32), ("grouped", 4, torch.float32),
                                                 ("const", 1, torch.float32), ("grouped", 2, torch.bfloat16)])
def test_gpu_matches_oracle(tk, layout, groups, dtype):
    """Compiled kernels against the float64 oracle with the default launch plan (several chunks)."""
    inp = make_inputs(2, 16, 3000, 16, layout, groups=groups, dtype=dtype, seed=4, device="cuda")
    tol, gtol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 1.5e-2)
    check_against_oracle(tk, inp, tol=tol, gtol=gtol)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_against_mamba_ssm():
    """Where mamba-ssm's CUDA kernel is installed: same outputs and gradients on an anchor shape. mamba-ssm's
    ``selective_scan_fn`` does not backpropagate a gradient of the last state (its backward takes ``dout`` only), so
    none is given here; that path is checked against the float64 oracle (check_against_oracle, grad_last)."""
    pytest.importorskip("selective_scan_cuda", reason="mamba-ssm's CUDA extension is not installed")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    from nnunet_mamba.kernels.selective_scan_triton import selective_scan_triton
    inp = make_inputs(2, 128, 32768, 16, "shared", seed=8, device="cuda")
    g = torch.Generator().manual_seed(2)
    gy = torch.randn(2, 128, 32768, generator=g).cuda()
    gl = torch.zeros(2, 128, 16).cuda()
    y, last, gr = _grads(lambda x: call(selective_scan_triton, x, True, True), inp, gy, gl)
    y0, last0, gr0 = _grads(lambda x: call(selective_scan_fn, x, True, True), inp, gy, gl)
    assert rel_err(y, y0) < 1e-5 and rel_err(last, last0) < 1e-5
    for k in gr:
        assert rel_err(gr[k], gr0[k]) < 1e-4, (k, rel_err(gr[k], gr0[k]))


@pytest.mark.parametrize("n_chunks, groups_from", [(5, 64), (21, 2), (64, 64)])
@pytest.mark.parametrize("rev, init", [(False, False), (True, True), (True, False)])
def test_carry_walks_in_groups(tk, dev, monkeypatch, n_chunks, groups_from, rev, init):
    """Every chunk's entering state from the chunk summaries (_carry), in one serial walk or in groups (their
    composites first, then each group from its entering state): against the recurrence in float64."""
    from types import SimpleNamespace
    monkeypatch.setattr(tk, "_CARRY_GROUPS_FROM", groups_from)
    b, d, N = 2, 6, 5
    g = torch.Generator().manual_seed(n_chunks)
    A = -torch.rand(N, d, generator=g) - 0.1
    loc = torch.randn(b, n_chunks, N, d, generator=g)
    sums = torch.rand(b, d, n_chunks, generator=g)
    glast = torch.randn(b, d, N, generator=g) if init else None
    plan = SimpleNamespace(BN=8, n_chunks=n_chunks, carry_BD=8)
    out = tk._carry(A.to(dev), loc.to(dev), sums.to(dev), glast.to(dev) if init else None, rev, plan, b, d, N)
    H = glast.double().transpose(1, 2) if init else torch.zeros(b, N, d, dtype=torch.float64)
    ref = torch.empty(b, n_chunks, N, d, dtype=torch.float64)
    for k in range(n_chunks):
        j = n_chunks - 1 - k if rev else k
        ref[:, j] = H
        H = torch.exp(A.double() * sums.double()[:, :, j].unsqueeze(1)) * H + loc.double()[:, j]
    assert float((out.cpu().double() - ref).abs().max() / ref.abs().max()) < 1e-5
