"""The Triton LayerNorm against a float64 oracle (``torch.nn.functional.layer_norm`` on float64 copies): output, dx,
dweight and dbias.

On CPU these run through Triton's interpreter (``TRITON_INTERPRET=1`` set before triton is imported, see
conftest.py) at small sizes; some tests shrink the tile (``TILE_ELEMS``) so that the backward programs walk several
tiles, the last one partial.
"""
import pytest
import torch
import torch.nn.functional as F

from oracle import rel_err

DEV = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.fixture(scope="module")
def ln():
    from nnunet_mamba.kernels import layer_norm_triton as mod
    return mod


@pytest.fixture
def small_tiles(ln, monkeypatch):
    monkeypatch.setattr(ln, "TILE_ELEMS", 256)


def close(a, b, tol):
    """Relative (norm-wise) error below tol, or both (near) zero (C = 1: dx and dweight vanish)."""
    assert a.shape == b.shape
    assert torch.isfinite(a).all()
    if b.double().norm() < 1e-12:
        assert a.double().norm() < 1e-6
    else:
        assert rel_err(a, b) < tol, rel_err(a, b)


def make(shape, dtype=torch.float32, affine=(True, True), offset=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[-1]
    x = (torch.randn(shape, generator=g) * 1.5 + 0.3 + offset).to(dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g)) if affine[0] else None
    b = 0.5 * torch.randn(C, generator=g) if affine[1] else None
    return x.to(DEV), (w.to(DEV) if w is not None else None), (b.to(DEV) if b is not None else None)


def channels_first(B, C, spatial, dtype=torch.float32):
    """The token view x = feat.flatten(2).transpose(1, 2) (``modules.common.flatten_tokens``) of a contiguous
    (B, C, *spatial) map: shape (B, L, C), strides (C L, 1, L); and weight, bias."""
    x, w, b = make((B, *spatial, C), dtype=dtype)
    return x.movedim(-1, 1).contiguous().flatten(2).transpose(1, 2), w, b


def kernel_dx(ln, x, w, b, dy=None):
    """dx as the kernel returns it, seen by a hook on a view of x: a leaf's .grad gets the leaf's strides when the leaf
    is dense (AccumulateGrad restrides it) and is made contiguous when it is not."""
    seen = []
    xv = x.detach().requires_grad_()[:]
    xv.register_hook(seen.append)
    y = ln.layer_norm_triton(xv, w, b, 1e-5)
    y.backward(torch.ones_like(y) if dy is None else dy)
    return seen[0]


def long_strides(t):
    """Strides of the axes longer than 1 (a size-1 axis's stride is arbitrary)."""
    return tuple(s for n, s in zip(t.shape, t.stride()) if n > 1)


def run(fn, x, w, b, dy, dtype=None, eps=1e-5):
    cast = (lambda t: t.detach().to(dtype)) if dtype is not None else (lambda t: t.detach())
    x, w, b = (cast(t).requires_grad_() if t is not None else None for t in (x, w, b))
    y = fn(x, w, b, eps)
    y.backward(cast(dy) if dtype is not None else dy.to(y.dtype))
    return y, x.grad, (w.grad if w is not None else None), (b.grad if b is not None else None)


def check(ln, x, w, b, tol=2e-5, gtol=5e-5, eps=1e-5):
    C = x.shape[-1]
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype).to(DEV)
    y, dx, dw, db = run(ln.layer_norm_triton, x, w, b, dy, eps=eps)
    ref = run(lambda x, w, b, eps: F.layer_norm(x, (C,), w, b, eps), x, w, b, dy, dtype=torch.float64, eps=eps)
    assert y.dtype == x.dtype and y.shape == x.shape and y.is_contiguous()
    assert dx.dtype == x.dtype and dx.shape == x.shape
    close(y, ref[0], tol)
    close(dx, ref[1], gtol)
    for ours, r, p in ((dw, ref[2], w), (db, ref[3], b)):
        if p is None:
            assert ours is None
        else:
            assert ours.dtype == p.dtype and ours.shape == p.shape
            close(ours, r, gtol)


@pytest.mark.parametrize("C", [1, 3, 32, 48, 64, 96, 512])
@pytest.mark.parametrize("rows", [1, 37, 300])
def test_shapes(ln, C, rows):
    check(ln, *make((rows, C)))


@pytest.mark.parametrize("C", [3, 48, 96])
def test_many_tiles(ln, small_tiles, C):
    """Tiles of 256 elements: the 4 backward programs walk several tiles each, the last tile is partial."""
    check(ln, *make((2, 53, C)))


def test_3d(ln):
    check(ln, *make((2, 50, 48)))


@pytest.mark.parametrize("affine", [(False, False), (True, False), (False, True)])
def test_no_weight_or_bias(ln, affine):
    check(ln, *make((3, 21, 32), affine=affine))


@pytest.mark.parametrize("view, levels", [("last_slice", 1), ("row_slice", 2), ("three_levels", 3),
                                          ("channel_stride", 0), ("channel_row_stride", 0)])
def test_strided_input(ln, small_tiles, view, levels):
    """Views read in place: x[..., :C] of a wider tensor (one row axis, stride 80), x[:, 1:31] of (2, 60, C) (two row
    axes; x[:, ::2] collapses to one row axis of stride 2C, see test_strided_grad_output), t.t() of (C, 30) (channel
    stride 30, rows of stride 1: channels-first); copied: x[:, :3, :3] of (2, 6, 8, C) (three row axes) and
    t.t()[::2] of (C, 60) (channel stride 60, rows of stride 2)."""
    g = torch.Generator().manual_seed(3)
    base = {"last_slice": (40, 80), "row_slice": (2, 60, 48), "three_levels": (2, 6, 8, 48),
            "channel_stride": (48, 30), "channel_row_stride": (48, 60)}[view]
    t = torch.randn(base, generator=g).to(DEV)
    x = {"last_slice": lambda: t[:, :48], "row_slice": lambda: t[:, 1:31], "three_levels": lambda: t[:, :3, :3],
         "channel_stride": lambda: t.t(), "channel_row_stride": lambda: t.t()[::2]}[view]()
    assert not x.is_contiguous()
    assert (ln._channels_first(x) is not None) == (view == "channel_stride")
    if levels:
        lay = ln._row_layout(x.shape[:-1], x.stride()[:-1])
        assert (lay is None) if levels == 3 else ((lay[0] > 1) == (levels == 2))
    _, w, b = make((1, 48))
    check(ln, x, w, b)


@pytest.mark.parametrize("spatial", [(3, 5, 7), (9, 13)], ids=["3d", "2d"])
@pytest.mark.parametrize("C", [12, 33])
@pytest.mark.parametrize("B", [1, 2])
def test_channels_first(ln, small_tiles, B, C, spatial):
    """Token view of a (B, C, D, H, W) or (B, C, H, W) map, read in place: tiles of 16 (C = 12) or 4 (C = 33) positions
    of one batch row, L = 105 / 117 (the last tile partial); y dense, dx in x's layout."""
    x, w, b = channels_first(B, C, spatial)
    L = x.shape[1]
    assert x.stride() == (C * L, 1, L)
    assert ln._channels_first(x)[:2] == (B, L)
    check(ln, x, w, b)
    assert kernel_dx(ln, x, w, b).stride() == x.stride()


def test_channels_first_in_place(ln):
    """The forward saves x itself (no contiguous copy); the gradient reaches the map as a contiguous (B, C, *S)."""
    x, w, b = channels_first(2, 12, (4, 6))
    feat = x.transpose(1, 2).unflatten(2, (4, 6)).detach().requires_grad_()
    x = feat.flatten(2).transpose(1, 2)
    y = ln.layer_norm_triton(x, w, b, 1e-5)
    saved = y.grad_fn.saved_tensors[0]
    assert saved.data_ptr() == x.data_ptr() and saved.stride() == x.stride()
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(DEV))
    assert feat.grad.is_contiguous()


@pytest.mark.parametrize("view", ["positions_slice", "channels_slice", "movedim", "single_row"])
def test_channels_first_views(ln, small_tiles, view):
    """Other channels-first views read in place: positions x[:, 3:20] and channels x[..., 2:9] slices of the token view
    (not dense: dx in dense (B, C, L) memory), a 5-D movedim (B, D, H, W, C) view (positions collapse to one axis) and
    a (L, C) map without batch axis."""
    x, w, b = channels_first(2, 12, (4, 6))
    if view == "movedim":
        x = x.transpose(1, 2).unflatten(2, (2, 3, 4)).movedim(1, -1)
    x = {"positions_slice": x[:, 3:20], "channels_slice": x[..., 2:9], "single_row": x[1]}.get(view, x)
    w, b = (w[2:9], b[2:9]) if view == "channels_slice" else (w, b)
    R0, R1 = {"positions_slice": (2, 17), "single_row": (1, 24)}.get(view, (2, 24))
    assert ln._channels_first(x)[:2] == (R0, R1)
    check(ln, x, w, b)
    C = x.shape[-1]
    assert long_strides(kernel_dx(ln, x, w, b).reshape(R0, R1, C)) == long_strides(torch.empty(R0, C, R1).mT)


@pytest.mark.parametrize("dy_layout", ["channels_first", "three_row_axes"])
def test_channels_first_grad_layouts(ln, small_tiles, dy_layout):
    """Upstream gradients in other layouts: channels-first like x (read in place, channel stride L), and a slice of
    a (B, D, H + 2, W, C) tensor, three row axes jointly with x's two (made contiguous)."""
    x, w, b = channels_first(2, 12, (3, 4, 5))
    x = x.transpose(1, 2).unflatten(2, (3, 4, 5)).movedim(1, -1)
    g = torch.Generator().manual_seed(5)
    if dy_layout == "channels_first":
        dy = torch.randn(2, 12, 3, 4, 5, generator=g).to(DEV).movedim(1, -1)
    else:
        dy = torch.randn(2, 3, 6, 5, 12, generator=g).to(DEV)[:, :, 1:5]
        assert ln._row_layout(x.shape[:-1], x.stride()[:-1], dy.stride()[:-1]) is None
    ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
    dx = kernel_dx(ln, x, ws, bs, dy)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.layer_norm(xr, (12,), wr, br, 1e-5).backward(dy.double())
    for ours, ref in ((dx, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)):
        close(ours, ref, 5e-5)
    assert dx.stride() == x.stride()


def test_strided_grad_output(ln, small_tiles):
    """A non-contiguous upstream gradient whose row strides differ from the input's: x[:, ::2] has one row axis of
    stride 64, dy = (4, 16, 64)[:, :15, 16:48] two (1024, 64), so the joint layout has two row axes."""
    x, w, b = make((4, 30, 32))
    x = x[:, ::2]
    dy = torch.randn(4, 16, 64, generator=torch.Generator().manual_seed(5)).to(DEV)[:, :15, 16:48]
    assert ln._row_layout(x.shape[:-1], x.stride()[:-1])[0] == 1
    assert ln._row_layout(x.shape[:-1], x.stride()[:-1], dy.stride()[:-1])[0] == 4
    xs = x.clone().requires_grad_()
    ws, bs = w.clone().requires_grad_(), b.clone().requires_grad_()
    ln.layer_norm_triton(xs, ws, bs, 1e-5).backward(dy)
    xr, wr, br = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.layer_norm(xr, (32,), wr, br, 1e-5).backward(dy.double())
    for ours, ref in ((xs.grad, xr.grad), (ws.grad, wr.grad), (bs.grad, br.grad)):
        close(ours, ref, 5e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("C", [48, 64])
def test_low_precision(ln, dtype, C):
    """bf16 / fp16 inputs, fp32 weights: output and dx in the input dtype (one rounding), statistics in fp32."""
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    check(ln, *make((2, 37, C), dtype=dtype), tol=tol, gtol=tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_channels_first_low_precision(ln, small_tiles, dtype):
    """bf16 / fp16 channels-first token view: read in place, fp32 statistics, y and dx in the input dtype."""
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    x, w, b = channels_first(2, 33, (5, 7), dtype=dtype)
    assert ln._channels_first(x) is not None
    check(ln, x, w, b, tol=tol, gtol=tol)
    assert kernel_dx(ln, x, w, b).stride() == x.stride()


def test_autocast(ln):
    """Under autocast the kernel keeps the input dtype (bf16 in, bf16 out)."""
    x, w, b = make((2, 37, 48), dtype=torch.bfloat16)
    with torch.autocast(device_type=DEV, dtype=torch.bfloat16):
        y = ln.layer_norm_triton(x, w, b, 1e-5)
    assert y.dtype == torch.bfloat16
    close(y, F.layer_norm(x.double(), (48,), w.double(), b.double(), 1e-5), 1e-2)


def test_large_offset(ln):
    """x + 1000: the centred (two-pass) variance has no cancellation; E[x^2] - E[x]^2 in fp32 would be far off."""
    check(ln, *make((2, 37, 96), offset=1000.0), tol=1e-4, gtol=1e-4)


def test_eps(ln):
    check(ln, *make((37, 32)), eps=0.1)


def test_backward_bitwise_repeatable(ln, small_tiles):
    x, w, b = make((3, 40, 96))
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(DEV)
    a = run(ln.layer_norm_triton, x, w, b, dy)
    c = run(ln.layer_norm_triton, x, w, b, dy)
    for u, v in zip(a, c):
        assert torch.equal(u, v)


def test_partial_requires_grad(ln):
    """Only the weight needs a gradient: dx and dbias are not returned."""
    x, w, b = make((37, 32))
    w = w.clone().requires_grad_()
    ln.layer_norm_triton(x, w, b, 1e-5).sum().backward()
    wr = w.detach().double().requires_grad_()
    F.layer_norm(x.double(), (32,), wr, b.double(), 1e-5).sum().backward()
    close(w.grad, wr.grad, 5e-5)


def test_empty(ln):
    x, w, b = make((0, 32))
    x.requires_grad_()
    y = ln.layer_norm_triton(x, w, b, 1e-5)
    assert y.shape == (0, 32)
