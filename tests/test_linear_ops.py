"""ops.linear_split and ops.linear_channels_first: nn.Linear arithmetic in other layouts, against float64 F.linear."""
import pytest
import torch
import torch.nn.functional as F

from nnunet_mamba.ops import linear_channels_first, linear_split
from oracle import rel_err


def _inputs(shape, c_out, bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    w = torch.randn(c_out, shape[-1], generator=g) / shape[-1] ** 0.5
    b = torch.randn(c_out, generator=g) if bias else None
    return x, w, b


def _leaves(*ts):
    return [t.clone().requires_grad_(True) if t is not None else None for t in ts]


@pytest.mark.parametrize("shape,sizes,bias,used", [
    ((2, 37, 8), (12, 12), False, (0, 1)),  # in_proj: x and z
    ((3, 20, 16), (2, 5, 5), False, (0, 1, 2)),  # x_proj: dt, B, C
    ((45, 6), (4, 3, 1), True, (0, 2)),  # 2-D input, bias, a block that does not reach the loss
])
def test_linear_split_matches_linear(shape, sizes, bias, used):
    x, w, b = _inputs(shape, sum(sizes), bias)
    weights = [torch.randn(*shape[:-1], n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
               for n in sizes]
    xs, ws, bs = _leaves(x, w, b)
    ours = linear_split(xs, ws, bs, sizes)
    xr, wr, br = _leaves(*(t.double() if t is not None else None for t in (x, w, b)))
    ref = F.linear(xr, wr, br).split(sizes, dim=-1)
    for k in range(len(sizes)):
        assert ours[k].shape == ref[k].shape and rel_err(ours[k], ref[k]) < 1e-6
    sum((ours[k].double() * weights[k]).sum() for k in used).backward()
    sum((ref[k] * weights[k]).sum() for k in used).backward()
    for a, r in ((xs, xr), (ws, wr), (bs, br)):
        if a is not None:
            assert a.grad.dtype == a.dtype and rel_err(a.grad, r.grad) < 1e-6
    if 1 not in used:  # an unused block's weight rows get a zero gradient, as F.linear's backward gives them
        assert torch.equal(ws.grad[sizes[0]:sizes[0] + sizes[1]], torch.zeros(sizes[1], shape[-1]))


def test_linear_split_rejects_sizes_that_do_not_cover_the_outputs():
    x, w, _ = _inputs((2, 5, 4), 6, False)
    with pytest.raises(ValueError, match="add up to the 6 output features"):
        linear_split(x, w, None, (3, 2))


@pytest.mark.parametrize("bias", [False, True])
def test_linear_channels_first_matches_linear(bias):
    x, w, b = _inputs((2, 50, 12), 7, bias)
    xs, ws, bs = _leaves(x.transpose(1, 2).contiguous().transpose(1, 2), w, b)  # tokens of a channels-first map
    y = linear_channels_first(xs, ws, bs)
    assert y.shape == (2, 7, 50) and y.is_contiguous()
    xr, wr, br = _leaves(*(t.double() if t is not None else None for t in (x, w, b)))
    ref = F.linear(xr, wr, br).transpose(1, 2)
    assert rel_err(y, ref) < 1e-6
    gy = torch.randn(2, 7, 50, dtype=torch.float64)
    (y.double() * gy).sum().backward()
    (ref * gy).sum().backward()
    assert xs.grad.transpose(1, 2).is_contiguous()  # token-major, whatever the input's layout
    for a, r in ((xs, xr), (ws, wr), (bs, br)):
        if a is not None:
            assert rel_err(a.grad, r.grad) < 1e-6


@pytest.mark.parametrize("s_grad", [True, False])
def test_linear_channels_first_with_a_scaled_residual(s_grad):
    """residual=(s, t): F.linear(...).transpose(1, 2) + s * t (ops.scaled_add's result), every gradient against
    float64; s's gradient only where it requires one."""
    x, w, b = _inputs((2, 50, 12), 7, True)
    t = torch.randn(2, 7, 50, generator=torch.Generator().manual_seed(4))
    s = torch.tensor([0.6])
    xs, ws, bs, ts = _leaves(x, w, b, t)
    ss = s.clone().requires_grad_(s_grad)
    y = linear_channels_first(xs, ws, bs, residual=(ss, ts))
    xr, wr, br, tr = _leaves(*(v.double() for v in (x, w, b, t)))
    sr = s.double().requires_grad_(s_grad)
    ref = F.linear(xr, wr, br).transpose(1, 2) + sr * tr
    assert y.shape == (2, 7, 50) and rel_err(y, ref) < 1e-6
    gy = torch.randn(2, 7, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (y.double() * gy).sum().backward()
    (ref * gy).sum().backward()
    for a, r in ((xs, xr), (ws, wr), (bs, br), (ts, tr)):
        assert a.grad.dtype == a.dtype and rel_err(a.grad, r.grad) < 1e-6
    if s_grad:  # sum(g * t) over 700 terms that cancel: its fp32 error scales with sum(|g * t|), not with the result
        assert ss.grad.dtype == torch.float32
        assert float((ss.grad.double() - sr.grad).abs()) < 1e-6 * float((gy * tr.detach()).abs().sum())
    else:
        assert ss.grad is None
    with pytest.raises(ValueError, match="residual must be"):
        linear_channels_first(x, w, b, residual=(s, t[:, :3]))


@pytest.mark.parametrize("case", ["side by side", "narrow, apart", "wide, apart", "one block"])
def test_linear_split_backward_takes_the_gradient_as_one_where_it_can(monkeypatch, case):
    """Block gradients written side by side into one buffer (as the Triton scan writes x_proj's dt, B, C) are used as
    that one (rows, sum(sizes)) gradient: one input-gradient product over all columns, nothing concatenated. Apart,
    blocks narrower than 16 columns are concatenated first (also one product), wider ones multiply block by block.
    Gradients against float64 F.linear either way."""
    import nnunet_mamba.ops.linear as lin

    sizes = {"side by side": (2, 5, 5), "narrow, apart": (2, 5, 5), "wide, apart": (16, 16),
             "one block": (9,)}[case]
    x, w, b = _inputs((3, 20, 16), sum(sizes), True)
    g = torch.randn(3, 20, sum(sizes), generator=torch.Generator().manual_seed(4))
    if case == "side by side":
        grads = g.clone().split(sizes, dim=-1)
    else:
        grads = [t.clone() for t in g.split(sizes, dim=-1)]  # separate buffers
    products, cats = [], []
    monkeypatch.setattr(lin, "_mm", lambda a, b_, out=None: (products.append(a.shape[1]), a @ b_ if out is None
                                                               else out.addmm_(a, b_))[1])
    real_cat = torch.cat
    monkeypatch.setattr(torch, "cat", lambda ts, dim=0: (cats.append(len(ts)), real_cat(ts, dim))[1])
    xs, ws, bs = _leaves(x, w, b)
    gx, gw, gb = torch.autograd.grad(linear_split(xs, ws, bs, sizes), [xs, ws, bs], grads)
    monkeypatch.undo()
    whole = case != "wide, apart"
    assert products == ([sum(sizes)] if whole else list(sizes))
    assert cats == ([len(sizes)] if case == "narrow, apart" else [])
    xr, wr, br = _leaves(*(t.double() for t in (x, w, b)))
    rx, rw, rb = torch.autograd.grad(F.linear(xr, wr, br), [xr, wr, br], g.double())
    assert rel_err(gx, rx) < 1e-6 and rel_err(gw, rw) < 1e-6 and rel_err(gb, rb) < 1e-6


def test_column_blocks_recognises_only_side_by_side_blocks():
    from nnunet_mamba.kernels.layout import column_blocks

    t = torch.randn(4, 6, 10)
    parts = t.split((2, 3, 5), dim=-1)
    assert torch.equal(column_blocks(parts), t) and column_blocks(parts).data_ptr() == t.data_ptr()
    assert column_blocks(parts[1:]).data_ptr() == parts[1].data_ptr()  # a run of blocks: its columns only
    assert column_blocks((parts[0], parts[2])) is None  # a gap
    assert column_blocks((parts[1], parts[0])) is None  # out of order
    assert column_blocks((parts[0], parts[1].clone())) is None  # another buffer
    assert column_blocks((parts[0].double(), parts[1].double())) is None  # copies: other buffers
    assert column_blocks((parts[0], None)) is None
    assert column_blocks([t.transpose(1, 2)[..., :3]]) is None  # columns not contiguous
    over = torch.randn(20).as_strided((4, 3), (2, 1))  # rows overlap
    assert column_blocks([over[:, :2], over[:, 2:]]) is None


def test_linear_ops_follow_autocast():
    x, w, b = _inputs((2, 9, 8), 6, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        parts = linear_split(x, w, b, (2, 4))
        y = linear_channels_first(x, w, b)
        ref = F.linear(x, w, b)
        t = torch.randn(2, 6, 9)
        yr = linear_channels_first(x, w, b, residual=(torch.tensor([0.5]), t))  # as scaled_add(y, s, t) promotes
    assert yr.dtype == torch.float32
    torch.testing.assert_close(yr, y.float() + 0.5 * t)
    assert all(p.dtype == ref.dtype == torch.bfloat16 for p in (*parts, y))
    torch.testing.assert_close(torch.cat(parts, -1), ref)
    torch.testing.assert_close(y, ref.transpose(1, 2), atol=1e-2, rtol=2e-2)  # the bias added after rounding


def test_linear_split_without_autograd_is_the_plain_split():
    x, w, b = _inputs((2, 9, 8), 6, True)
    with torch.no_grad():
        parts = linear_split(x, w.requires_grad_(), b, (2, 4))
    assert [p.grad_fn for p in parts] == [None, None]
    torch.testing.assert_close(torch.cat(parts, -1), F.linear(x, w, b).detach())
