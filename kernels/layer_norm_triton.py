"""LayerNorm over the last axis in Triton, for many short rows: forward and backward.

Use case: token tensors (b, L, C) with L up to millions and C = 32..512. PyTorch's CUDA LayerNorm gives each row its
own block, which for such short rows runs well below memory bandwidth. Here a program owns a **tile** of
``BLOCK_ROWS x BLOCK_C`` elements (``BLOCK_C = next_power_of_2(C)``, rows chosen so a tile holds ~4K elements): one
masked 2-D load, per-row statistics by sums along the channel axis, one masked store.

* **Forward** (one tile per program): mean, then the variance of the centred values (two passes over registers, no
  ``E[x^2] - E[x]^2`` cancellation for inputs with a large offset), ``rstd = 1 / sqrt(var + eps)``, all fp32. The
  per-row mean and rstd (fp32) are saved with ``x`` itself (no normalised copy).
* **Backward**: ``xhat = (x - mean) rstd``, ``g = dy w``, ``dx = rstd (g - mean(g) - xhat mean(g xhat))``. A fixed
  number of programs walk the tiles (program p takes tiles p, p + P, ...) and keep ``dy xhat`` and ``dy`` summed in
  fp32 tile registers; each writes its (C,) partial sums of dweight / dbias to a (P, C) buffer, summed on the host.
  No atomics: results are bitwise repeatable for a given device and shape.

Measured against ``F.layer_norm`` by ``kernels/bench_mixer_ops.py`` (kernels/BENCHMARK_mixer_ops.md).

Rows may be strided: the leading axes of ``x`` are collapsed to at most two (row = i0 * R1 + i1, offset = i0 * s0 +
i1 * s1), so a slice such as ``x[..., :C]`` or ``x[:, ::2]`` of a wider tensor is read in place. The channel axis
may have a stride sc != 1 when the rows are **channels-first tokens**: the row axes (size-1 axes dropped) collapse
to at most two, batch and positions, the positions of stride 1 (``_channels_first``), e.g. the token view
``feat.flatten(2).transpose(1, 2)`` of a contiguous (B, C, *S) map, strides (C L, 1, L). Such an ``x`` is read in
place by tiles of BLOCK_ROWS positions of one batch row (offsets i0 * s0 + i1 + c * sc with i1 a visibly contiguous
range: loads coalesced along the positions), and dx is returned in x's layout (dense (B, C, L) memory). Otherwise
(a strided channel axis without such rows, or more than two non-collapsible row axes) ``x`` is made contiguous. y is
dense (..., C), channels fastest; dy may have any layout with at most two row axes jointly with x (else it is made
contiguous), with a strided channel axis only when x is channels-first. Inputs may be fp32, bf16 or fp16; outputs
and dx have x's dtype, dweight / dbias the weight's dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached_launch
from .tuning import sm_count

TILE_ELEMS = 4096  # elements per tile (a program's rows x padded channels)
BWD_PROGRAMS_PER_SM = 4  # backward programs (= rows of the dweight / dbias partial-sum buffer) per SM
BWD_PROGRAMS_CPU = 4  # the same, for the interpreter on CPU


@triton.jit
def _tile(t, n_rows, C, R1, T1, CF: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """Tile t's rows (int32: n_rows < 2**31), row mask, columns, element mask and dense offsets row * C + col. CF:
    tile t = i0 * T1 + j holds the positions i1 = j * BLOCK_ROWS + arange of batch row i0 (row = i0 * R1 + i1; the
    split is scalar, so Triton sees i1 contiguous); else rows t * BLOCK_ROWS + arange."""
    if CF:
        i1 = (t % T1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rows = (t // T1) * R1 + i1
        rm = i1 < R1
    else:
        rows = t * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
        rm = rows < n_rows
    cols = tl.arange(0, BLOCK_C)
    m = rm[:, None] & (cols < C)[None, :]
    return rows, rm, cols, m, rows.to(tl.int64)[:, None] * C + cols[None, :]


@triton.jit
def _offs(t, rows, cols, R1, T1, s0, s1, sc, SPLIT: tl.constexpr, CF: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """int64 element offsets of tile t (rows from _tile) in a tensor with row strides (s0, s1) and channel stride sc:
    i0 * s0 + i1 * s1 + col * sc with row = i0 * R1 + i1 when SPLIT or CF, else row * s0 + col * sc. Strides equal
    to 1 are compile-time constants, so CF positions of stride 1 are seen contiguous (loads coalesced along them)."""
    if CF:
        roff = (t // T1).to(tl.int64) * s0 + ((t % T1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64) * s1
    elif SPLIT:
        roff = (rows // R1).to(tl.int64) * s0 + (rows % R1).to(tl.int64) * s1
    else:
        roff = rows.to(tl.int64) * s0
    return roff[:, None] + cols.to(tl.int64)[None, :] * sc


@cached_launch
@triton.jit
def _ln_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, n_rows, C, inv_C, R1, T1, s0, s1, sc, eps,
                   SPLIT: tl.constexpr, CF: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    t = tl.program_id(0)
    rows, rm, cols, m, yo = _tile(t, n_rows, C, R1, T1, CF, BLOCK_ROWS, BLOCK_C)
    x = tl.load(x_ptr + _offs(t, rows, cols, R1, T1, s0, s1, sc, SPLIT, CF, BLOCK_ROWS), mask=m, other=0.0)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=1) * inv_C  # inv_C = 1/C from the host: a multiply, exact for C = 1
    xc = tl.where(m, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) * inv_C + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(b_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + yo, y, mask=m)  # dense, channels fastest (with CF a layout conversion from the load's)
    tl.store(mean_ptr + rows, mean, mask=rm)
    tl.store(rstd_ptr + rows, rstd, mask=rm)


@cached_launch
@triton.jit
def _ln_bwd_kernel(x_ptr, dy_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_ptr, db_ptr, n_rows, n_tiles, C, inv_C, R1, T1,
                   s0, s1, sc, t0, t1, tc, u0, u1, uc, SPLIT: tl.constexpr, CF: tl.constexpr, HAS_W: tl.constexpr,
                   DW: tl.constexpr, DB: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_C: tl.constexpr):
    """x at strides (s0, s1, sc), dy at (t0, t1, tc); dx dense (b, L, C), or with CF at (u0, u1, uc) (x's layout)."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=cols < C, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_ROWS, BLOCK_C), tl.float32)
    db_acc = tl.zeros((BLOCK_ROWS, BLOCK_C), tl.float32)
    for t in range(pid, n_tiles, tl.num_programs(0)):
        rows, rm, cols, m, do = _tile(t, n_rows, C, R1, T1, CF, BLOCK_ROWS, BLOCK_C)
        x = tl.load(x_ptr + _offs(t, rows, cols, R1, T1, s0, s1, sc, SPLIT, CF, BLOCK_ROWS), mask=m, other=0.0)
        dy = tl.load(dy_ptr + _offs(t, rows, cols, R1, T1, t0, t1, tc, SPLIT, CF, BLOCK_ROWS), mask=m, other=0.0)
        x, dy = x.to(tl.float32), dy.to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=rm, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rm, other=0.0)
        xhat = tl.where(m, (x - mean[:, None]) * rstd[:, None], 0.0)
        g = dy * w[None, :] if HAS_W else dy
        c1 = tl.sum(g * xhat, axis=1) * inv_C
        c2 = tl.sum(g, axis=1) * inv_C
        dx = rstd[:, None] * (g - c2[:, None] - xhat * c1[:, None])
        if CF:
            do = _offs(t, rows, cols, R1, T1, u0, u1, uc, SPLIT, CF, BLOCK_ROWS)
        tl.store(dx_ptr + do, dx, mask=m)
        if DW:
            dw_acc += dy * xhat
        if DB:
            db_acc += dy
    if DW:
        tl.store(dw_ptr + pid * C + cols, tl.sum(dw_acc, axis=0), mask=cols < C)
    if DB:
        tl.store(db_ptr + pid * C + cols, tl.sum(db_acc, axis=0), mask=cols < C)


# ------------------------------------------------------------------------------------------------------------------
# host side


def _row_layout(shape, *strides):
    """Collapse the leading (row) axes, jointly for tensors of one shape with these strides: (R0, R1) and per tensor
    (s0, s1) with row offset i0 * s0 + i1 * s1; None when more than two axes remain."""
    dims = []
    for i, n in enumerate(shape):
        st = [s[i] for s in strides]
        if n == 1:
            continue
        if dims and all(p == q * n for p, q in zip(dims[-1][1], st)):
            dims[-1] = (dims[-1][0] * n, st)
        else:
            dims.append((n, st))
    if len(dims) > 2:
        return None
    dims = [(1, [0] * len(strides))] * (2 - len(dims)) + dims
    return dims[0][0], dims[1][0], [(a, b) for a, b in zip(dims[0][1], dims[1][1])]


def _channels_first(x):
    """x's row layout (R0, R1, [(s0, s1)]) when it is read in place as channels-first tokens, else None: C > 1, a
    channel stride != 1, no empty axis, the row axes (size-1 axes dropped) collapse to at most two and the inner one
    (positions) has stride 1; e.g. ``feat.flatten(2).transpose(1, 2)`` of a contiguous (B, C, *S) map."""
    if x.shape[-1] == 1 or x.stride(-1) == 1 or x.numel() == 0:
        return None
    lay = _row_layout(x.shape[:-1], x.stride()[:-1])
    return lay if lay is not None and lay[2][0][1] == 1 else None


def _plan(C, n_rows):
    BLOCK_C = triton.next_power_of_2(C)
    if BLOCK_C > 16384:
        raise ValueError(f"layer_norm_triton: C={C} too large for a register tile; use torch")
    BLOCK_ROWS = max(1, min(TILE_ELEMS // BLOCK_C, triton.next_power_of_2(max(n_rows, 1))))
    return BLOCK_ROWS, BLOCK_C, triton.cdiv(n_rows, BLOCK_ROWS)


def _grid(lay, C, n_rows, cf):
    """BLOCK_ROWS, BLOCK_C, T1 (tiles per batch row: CF tiles do not straddle batch rows; else 1), number of tiles."""
    if cf:
        BLOCK_ROWS, BLOCK_C, T1 = _plan(C, lay[1])
        return BLOCK_ROWS, BLOCK_C, T1, lay[0] * T1
    BLOCK_ROWS, BLOCK_C, n_tiles = _plan(C, n_rows)
    return BLOCK_ROWS, BLOCK_C, 1, n_tiles


def _args(lay, cf=False):
    """R1, per tensor (s0, s1), and the SPLIT flag of a row layout (a single row axis and not CF: offset row * s0, no
    split; CF: always i0 * s0 + i1 * s1)."""
    R0, R1, st = lay
    if R0 == 1 and not cf:
        return 1, [(b, 0) for _, b in st], False
    return R1, st, not cf


class _LayerNormFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        C = x.shape[-1]
        lay = _channels_first(x)
        cf = lay is not None
        if not cf:
            lay = _row_layout(x.shape[:-1], x.stride()[:-1]) if x.stride(-1) == 1 or C == 1 else None
        if lay is None:
            x = x.contiguous()
            lay = _row_layout(x.shape[:-1], x.stride()[:-1])
        n_rows = x.numel() // C
        y = torch.empty(x.shape, device=x.device, dtype=x.dtype)
        mean = torch.empty(n_rows, device=x.device, dtype=torch.float32)
        rstd = torch.empty_like(mean)
        w = weight.contiguous() if weight is not None else None
        b = bias.contiguous() if bias is not None else None
        BLOCK_ROWS, BLOCK_C, T1, n_tiles = _grid(lay, C, n_rows, cf)
        R1, ((s0, s1),), split = _args(lay, cf)
        if n_rows:
            _ln_fwd_kernel[(n_tiles,)](x, w if w is not None else x, b if b is not None else x, y, mean, rstd, n_rows,
                                       C, 1.0 / C, R1, T1, s0, s1, x.stride(-1) if cf else 1, eps, SPLIT=split, CF=cf,
                                       HAS_W=w is not None, HAS_B=b is not None, BLOCK_ROWS=BLOCK_ROWS,
                                       BLOCK_C=BLOCK_C, num_warps=max(1, min(4, BLOCK_ROWS * BLOCK_C // 1024)))
        ctx.save_for_backward(x, w, b, mean, rstd)
        ctx.cf = cf
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w, b, mean, rstd = ctx.saved_tensors
        C = x.shape[-1]
        n_rows = mean.numel()
        dev = x.device
        cf = ctx.cf
        if cf:  # dx in x's layout: dense (R0, C, R1) memory viewed as x's shape; dy in any layout with <= 2 row axes
            R0, R1, _ = _row_layout(x.shape[:-1], x.stride()[:-1])
            dx = torch.empty(R0, C, R1, device=dev, dtype=x.dtype).transpose(1, 2).reshape(x.shape)
            dx = dx.as_strided(x.shape, [a if n == 1 else d for n, a, d in zip(x.shape, x.stride(), dx.stride())])
            lay = _row_layout(x.shape[:-1], x.stride()[:-1], dy.stride()[:-1], dx.stride()[:-1])
            if lay is None:
                dy = dy.contiguous()
                lay = _row_layout(x.shape[:-1], x.stride()[:-1], dy.stride()[:-1], dx.stride()[:-1])
        else:
            dx = torch.empty(x.shape, device=dev, dtype=x.dtype)
            ok = dy.stride(-1) == 1 or C == 1
            lay = _row_layout(x.shape[:-1], x.stride()[:-1], dy.stride()[:-1]) if ok else None
            if lay is None:
                x, dy = x.contiguous(), dy.contiguous()
                lay = _row_layout(x.shape[:-1], x.stride()[:-1], dy.stride()[:-1])
        BLOCK_ROWS, BLOCK_C, T1, n_tiles = _grid(lay, C, n_rows, cf)
        n_sm = sm_count(dev, 0)
        P = max(1, min(n_tiles, BWD_PROGRAMS_PER_SM * n_sm if n_sm else BWD_PROGRAMS_CPU))
        want_dw = w is not None and ctx.needs_input_grad[1]
        want_db = b is not None and ctx.needs_input_grad[2]
        part = torch.empty if n_rows else torch.zeros  # every program writes its row of the partial sums
        dw = part(P, C, device=dev, dtype=torch.float32) if want_dw else mean
        db = part(P, C, device=dev, dtype=torch.float32) if want_db else mean
        R1, st, split = _args(lay, cf)
        (s0, s1), (t0, t1), (u0, u1) = st[0], st[1], st[2] if cf else (0, 0)
        sc, tc, uc = (x.stride(-1), dy.stride(-1), dx.stride(-1)) if cf else (1, 1, 1)
        if n_rows:
            _ln_bwd_kernel[(P,)](x, dy, w if w is not None else x, mean, rstd, dx, dw, db, n_rows, n_tiles, C, 1.0 / C,
                                 R1, T1, s0, s1, sc, t0, t1, tc, u0, u1, uc, SPLIT=split, CF=cf, HAS_W=w is not None,
                                 DW=want_dw, DB=want_db, BLOCK_ROWS=BLOCK_ROWS, BLOCK_C=BLOCK_C,
                                 num_warps=max(1, min(8, BLOCK_ROWS * BLOCK_C // 512)))
        return (dx if ctx.needs_input_grad[0] else None, dw.sum(0).to(w.dtype) if want_dw else None,
                db.sum(0).to(b.dtype) if want_db else None, None)


def layer_norm_triton(x, weight=None, bias=None, eps=1e-5):
    """``torch.nn.functional.layer_norm(x, (C,), weight, bias, eps)`` for x of shape (..., C) (module docstring)."""
    if weight is not None and weight.shape != x.shape[-1:] or bias is not None and bias.shape != x.shape[-1:]:
        raise ValueError(f"layer_norm_triton: weight/bias must have shape ({x.shape[-1]},)")
    return _LayerNormFn.apply(x, weight, bias, float(eps))
