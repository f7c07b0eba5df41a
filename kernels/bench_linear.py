"""Benchmark: LightM-UNet's fp32 projections, tall-skinny GEMMs (M = tokens, K and N = 32-256), in cuBLAS's SGEMM
against the project's Triton tile GEMM (kernels/linear_triton.py) with fp32 FMA ("ieee") and with 3xTF32 ("tf32x3":
each fp32 operand split into a TF32 part and a TF32 remainder, three tensor-core products, fp32 accumulation), each
at the best of a small tile sweep (its results chose linear_triton's tiles).

    python kernels/bench_linear.py [--channels-first | --wgrad [--sweep] | --low-rank | --stream [--sweep]]

Prints each time, the memory-traffic floor (one read of x, one write of y at 4.8 TB/s) and the largest error
against a float64 product, relative to the result's largest value. Latest results: docs/kernels.md, "Projections".
"""
import itertools
import pathlib
import sys

import torch
import triton
from triton.testing import do_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nnunet_mamba.kernels import linear_triton  # noqa: E402
from nnunet_mamba.kernels.linear_triton import _mm_kernel, matmul_tf32x3, weight_grad_tf32x3  # noqa: E402
from nnunet_mamba.kernels.low_rank_triton import low_rank_grads, low_rank_product  # noqa: E402
from nnunet_mamba.ops.linear import _wgrad_cublas  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # SGEMM, as the fp32 recipes run it
DEV = "cuda"


def mm(a, b, out, prec, BM, BN, BK, nw, ns):
    """out = a (M, K) @ b (K, N), any strides, on the project's kernel with the given tile and precision."""
    (M, K), N = a.shape, b.shape[1]
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _mm_kernel[grid](a, b, b, out, out, b, M, N, K, *a.stride(), *b.stride(), *out.stride(), *out.stride(),
                     HAS_BIAS=False, ACCUM=False, RESID=False, BM=BM, BN=BN, BK=BK, PREC=prec, num_warps=nw,
                     num_stages=ns)
    return out


def tri(x, w, prec, BM, BN, BK, nw, ns):
    """x (M, K) @ w.T for a Linear weight w (N, K) on the project's kernel with the given tile and precision."""
    return mm(x, w.t(), torch.empty(x.shape[0], w.shape[0], device=x.device), prec, BM, BN, BK, nw, ns)


def max_err(y, ref):
    """The largest error of y against the float64 ``ref``, relative to the result's largest value."""
    return float((y.double() - ref).abs().max() / ref.abs().max())


def best_of(fn, tiles):
    """The fastest tile (time, tile) of ``fn(*tile)``, skipping tiles that do not fit."""
    best = None
    for tile in tiles:
        try:
            t = do_bench(lambda: fn(*tile), warmup=5, rep=20)
        except triton.runtime.errors.OutOfResources:
            continue
        if best is None or t < best[0]:
            best = (t, tile)
    return best


SHAPES = [("in_proj fwd 128^3", 2 * 128**3, 32, 128), ("in_proj dgrad 128^3", 2 * 128**3, 128, 32),
          ("x_proj fwd 128^3", 2 * 128**3, 64, 34), ("out_proj fwd 128^3", 2 * 128**3, 64, 32),
          ("in_proj fwd 64^3", 2 * 64**3, 64, 256), ("in_proj dgrad 64^3", 2 * 64**3, 256, 64)]


# channels-first Linear layers (ops.linear_channels_first: the Mamba mixer's out_proj and LightM-UNet's proj):
# tokens x (B, L, C_in) -> y (B, C_out, L), one product per batch element; the input gradient from a channels-first
# gradient g (B, C_out, L) back to token-major (B, L, C_in); the weight gradient sum_b g_b x_b (a reduction over L).
CF_SHAPES = [("out_proj 128^3", 2, 128**3, 64, 32), ("proj 128^3", 2, 128**3, 32, 32),
             ("proj 128^3 32->64", 2, 128**3, 32, 64), ("out_proj 64^3", 2, 64**3, 128, 64)]


# weight gradients dW = sum_b g_b^T x_b (B, L tokens; N outputs, K inputs): g channels-first (B, N, L) for the
# channels-first Linears, else token-major, as one block of in_proj's split output (row stride = all of in_proj's
# outputs) or x_proj's whole output
WG_SHAPES = [("in_proj block 128^3", 1, 2 * 128**3, 64, 32, "rows 128"), ("x_proj 128^3", 1, 2 * 128**3, 34, 64, ""),
             ("out_proj 128^3", 2, 128**3, 32, 64, "cf"), ("proj 128^3", 2, 128**3, 32, 32, "cf"),
             ("proj 128^3 32->64", 2, 128**3, 64, 32, "cf"), ("in_proj block 64^3", 1, 2 * 64**3, 128, 64, "rows 256"),
             ("x_proj 64^3", 1, 2 * 64**3, 36, 128, ""), ("out_proj 64^3", 2, 64**3, 64, 128, "cf"),
             # the 32^3 and 16^3 levels (on cuBLAS in the step)
             ("in_proj block 32^3", 1, 2 * 32**3, 256, 128, "rows 512"), ("out_proj 32^3", 2, 32**3, 128, 256, "cf"),
             ("in_proj block 16^3", 1, 2 * 16**3, 512, 256, "rows 1024"), ("out_proj 16^3", 2, 16**3, 256, 512, "cf")]


# the Mamba mixer's dt_proj as the scan multiplies it out: delta (M, d) = v (M, R) W^T, v the first R columns of
# x_proj's output (M, R + 2N); its backward dv = g W and dW = g^T v
LR_SHAPES = [("dt_proj 128^3", 2 * 128**3, 2, 64, 34), ("dt_proj 64^3", 2 * 64**3, 4, 128, 36),
             ("dt_proj 32^3", 2 * 32**3, 8, 256, 40)]


# every product matmul_tf32x3 runs in a LightM-UNet 3D step (128^3, batch 2): (name, M, K, N, layout of x, layout
# of y, accumulate). "rows S": x is a column block of a (M, S) row-major buffer (in_proj's split gradient); "col":
# column-major (a channels-first gradient read as tokens, or a channels-first output written through its transpose)
STREAM_SHAPES = [("in_proj fwd 128^3", 2 * 128**3, 32, 128, "row", "row", False),
                 ("in_proj dgrad block 128^3", 2 * 128**3, 64, 32, "rows 128", "row", True),
                 ("x_proj fwd 128^3", 2 * 128**3, 64, 34, "row", "row", False),
                 ("x_proj dgrad 128^3", 2 * 128**3, 34, 64, "row", "row", False),
                 ("out_proj fwd 128^3 (per b)", 128**3, 64, 32, "row", "col", False),
                 ("out_proj dgrad 128^3 (per b)", 128**3, 32, 64, "col", "row", False),
                 ("proj fwd 128^3 (per b)", 128**3, 32, 32, "row", "col", False),
                 ("proj dgrad 128^3 (per b)", 128**3, 32, 32, "col", "row", False),
                 ("in_proj fwd 64^3", 2 * 64**3, 64, 256, "row", "row", False),
                 ("in_proj dgrad block 64^3", 2 * 64**3, 128, 64, "rows 256", "row", True),
                 ("x_proj fwd 64^3", 2 * 64**3, 128, 36, "row", "row", False),
                 ("out_proj fwd 64^3 (per b)", 64**3, 128, 64, "row", "col", False),
                 # the 32^3 and 16^3 levels, on cuBLAS in the step (below ops/linear.py's sizes): SGEMM is bound by
                 # its fp32 arithmetic there, where 3xTF32 runs on the tensor cores
                 ("in_proj fwd 32^3", 2 * 32**3, 128, 512, "row", "row", False),
                 ("in_proj dgrad block 32^3", 2 * 32**3, 256, 128, "rows 512", "row", True),
                 ("x_proj fwd 32^3", 2 * 32**3, 256, 40, "row", "row", False),
                 ("x_proj dgrad 32^3", 2 * 32**3, 40, 256, "row", "row", False),
                 ("out_proj fwd 32^3 (per b)", 32**3, 256, 128, "row", "col", False),
                 ("in_proj fwd 16^3", 2 * 16**3, 256, 1024, "row", "row", False),
                 ("in_proj dgrad block 16^3", 2 * 16**3, 512, 256, "rows 1024", "row", True),
                 ("out_proj fwd 16^3 (per b)", 16**3, 512, 256, "row", "col", False)]


def _operand(M, n, layout):
    """An (M, n) fp32 operand: "row" (row-major), "col" (column-major) or "rows S" (the first n columns of (M, S))."""
    if layout.startswith("rows"):
        return torch.randn(M, int(layout.split()[1]), device=DEV)[:, :n]
    return torch.randn(n, M, device=DEV).t() if layout == "col" else torch.randn(M, n, device=DEV)


def row_stream(name, M, K, N, x_layout, y_layout, accumulate):
    """cuBLAS's SGEMM, matmul_tf32x3 on one program per tile (its tiles until session 15, ``stream=0``), with its
    default tiles, and at the best of a sweep of the persistent form (programs per SM, row tile, warps, pipeline stages); the memory floor is
    one read of x (and of y when accumulating) and one write of y at 4.8 TB/s."""
    x, w, y0 = _operand(M, K, x_layout), torch.randn(K, N, device=DEV) / K ** 0.5, _operand(M, N, y_layout)
    y = y0.clone() if y_layout == "row" else (y0.t().clone().t() if y_layout == "col" else _operand(M, N, y_layout))
    ref = x.double() @ w.double() + (y0.double() if accumulate else 0)

    def run():
        return matmul_tf32x3(x, w, out=y, accumulate=accumulate)

    def cublas():  # SGEMM (TF32 off) into the same output layout
        if accumulate:
            return y.addmm_(x, w)
        if y_layout == "col":
            return torch.mm(w.t(), x.t(), out=y.t()).t()
        return torch.mm(x, w, out=y)

    def timed(**tuning):
        linear_triton.set_tuning(**tuning)
        t = do_bench(run, warmup=5, rep=20)
        y.copy_(y0)
        return t, max_err(run(), ref)

    floor = M * (K + N * (2 if accumulate else 1)) * 4 / 4.8e12 * 1e3
    line = f"{name} (M={M} K={K} N={N} x {x_layout} y {y_layout}, floor {floor:.3f} ms)"
    t = do_bench(cublas, warmup=5, rep=20)
    y.copy_(y0)
    line += f" | cuBLAS {t:.3f} err {max_err(cublas(), ref):.1e}"
    line += " | per tile {:.3f} err {:.1e} | default {:.3f} err {:.1e}".format(*timed(stream=0), *timed())
    if "--sweep" in sys.argv:
        results = []
        for bm, nw, ns in itertools.product([64, 128], [4, 8], [2, 3, 4]):
            for per_sm in (1, 2, 4):
                try:
                    results.append((timed(stream=per_sm, BM=bm, num_warps=nw, num_stages=ns)[0], (per_sm, bm, nw, ns)))
                except triton.runtime.errors.OutOfResources:
                    break
        t, (per_sm, bm, nw, ns) = min(results)
        line += f" | best {t:.3f} (per SM {per_sm}, BM {bm}, warps {nw}, stages {ns})"
    linear_triton.set_tuning()
    print(line, flush=True)


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    if "--stream" in sys.argv:
        for shape in STREAM_SHAPES:
            row_stream(*shape)
        return
    if "--low-rank" in sys.argv:
        for shape in LR_SHAPES:
            row_low_rank(*shape)
        return
    if "--wgrad" in sys.argv:
        for shape in WG_SHAPES:
            row_wgrad(*shape)
        return
    if "--channels-first" not in sys.argv:
        for name, M, K, N in SHAPES:
            row(name, M, K, N)
    for name, B, L, cin, cout in CF_SHAPES:
        row_channels_first(name, B, L, cin, cout)


def row_low_rank(name, M, R, d, width):
    """The low-rank delta's product and gradients in cuBLAS (as the scan ran them until session 14: SGEMM, and dv on
    the 3xTF32 GEMM) against kernels/low_rank_triton.py (fp32 multiply-adds; dv and dW from one read of g)."""
    v = torch.randn(M, width, device=DEV)[:, :R]
    Wt = torch.randn(R, d, device=DEV) / R ** 0.5
    g = torch.randn(M, d, device=DEV)
    ref_delta, ref_dv, ref_dw = v.double() @ Wt.double(), g.double() @ Wt.double().t(), v.double().t() @ g.double()
    line = f"{name} (M={M} R={R} d={d}, roofline {M * d * 4 / 4.8e12 * 1e3:.3f} ms per pass over delta)"
    line += f": fwd cuBLAS {do_bench(lambda: v @ Wt):.3f} err {max_err(v @ Wt, ref_delta):.1e}"
    line += f" | Triton {do_bench(lambda: low_rank_product(v, Wt)):.3f} err {max_err(low_rank_product(v, Wt), ref_delta):.1e}"

    def before():
        return matmul_tf32x3(g, Wt.t()), v.t() @ g

    dv, dw = before()
    line += f" || dv+dW before {do_bench(before):.3f} err {max_err(dv, ref_dv):.1e} {max_err(dw, ref_dw):.1e}"
    dv, dw = low_rank_grads(g, v, Wt)
    line += f" | fused {do_bench(lambda: low_rank_grads(g, v, Wt)):.3f} err {max_err(dv, ref_dv):.1e} " \
            f"{max_err(dw, ref_dw):.1e}"
    print(line, flush=True)


def row_wgrad(name, B, L, N, K, layout):
    """A weight gradient in cuBLAS (as ops/linear.py ran it: one GEMM over the tokens, per batch element for the
    channels-first layers) against weight_grad_tf32x3 with its default tiles and (--sweep) at the best of a sweep."""
    x = torch.randn(B, L, K, device=DEV)
    if layout == "cf":
        g = torch.randn(B, N, L, device=DEV).transpose(1, 2)
    elif layout.startswith("rows"):
        g = torch.randn(B, L, int(layout.split()[1]), device=DEV)[..., :N]
    else:
        g = torch.randn(B, L, N, device=DEV)
    ref = torch.einsum("bln,blk->nk", g.double(), x.double())
    traffic = B * L * (N + K) * 4 / 4.8e12 * 1e3
    line = (f"{name} (B={B} L={L} N={N} K={K} {layout or 'token-major'}, roofline {traffic:.3f} ms): "
            f"cuBLAS {do_bench(lambda: _wgrad_cublas(g, x)):.3f} err {max_err(_wgrad_cublas(g, x), ref):.1e}")
    line += (f" | default {do_bench(lambda: weight_grad_tf32x3(g, x)):.3f} "
             f"err {max_err(weight_grad_tf32x3(g, x), ref):.1e}")
    if "--sweep" not in sys.argv:
        print(line, flush=True)
        return
    sm = torch.cuda.get_device_properties(0).multi_processor_count
    BN, BK = (max(16, triton.next_power_of_2(n)) for n in (N, K))
    tiles = [dict(BL=bl, BN=min(cap, BN), BK=min(cap, BK), num_warps=nw, num_stages=ns, splits=max(1, per * sm // B))
             for bl, cap, nw, ns, per in itertools.product([64, 128], [64, 128], [4, 8], [2, 3], [2, 4, 8])]
    t, cfg = best_of(lambda c: weight_grad_tf32x3(g, x, **c), [(c,) for c in tiles])
    cfg = cfg[0]
    line += f" | best {t:.3f} {cfg} err {max_err(weight_grad_tf32x3(g, x, **cfg), ref):.1e}"
    print(line, flush=True)


def row_channels_first(name, B, L, cin, cout):
    """Each product of a channels-first Linear in cuBLAS (as ops/linear.py runs it) and in the 3xTF32 kernel: the
    forward as y_b = W x_b^T (tiles along the tokens, "A") or as y_b^T = x_b W^T stored transposed (tiles along the
    output channels, "B") and the input gradient as dx_b = g_b^T W; the weight gradient's time in cuBLAS beside
    them."""
    x = torch.randn(B, L, cin, device=DEV)
    w = torch.randn(cout, cin, device=DEV) / cin ** 0.5
    g = torch.randn(B, cout, L, device=DEV)
    y, dx = torch.empty(B, cout, L, device=DEV), torch.empty(B, L, cin, device=DEV)
    ref_y = torch.einsum("oc,blc->bol", w.double(), x.double())
    ref_dx = torch.einsum("bol,oc->blc", g.double(), w.double())

    def fwd_cublas():
        for b in range(B):
            torch.mm(w, x[b].t(), out=y[b])

    def fwd_a(*tile):
        for b in range(B):
            mm(w, x[b].t(), y[b], "tf32x3", *tile)

    def fwd_b(*tile):
        for b in range(B):
            mm(x[b], w.t(), y[b].t(), "tf32x3", *tile)

    def dgrad_cublas():
        for b in range(B):
            torch.mm(g[b].t(), w, out=dx[b])

    def dgrad(*tile):
        for b in range(B):
            mm(g[b].t(), w, dx[b], "tf32x3", *tile)

    traffic = (B * L * (cin + cout)) * 4 / 4.8e12 * 1e3
    line = f"{name} (B={B} L={L} {cin}->{cout}, roofline {traffic:.3f} ms): fwd cuBLAS {do_bench(fwd_cublas):.3f}"
    fwd_cublas()
    line += f" err {max_err(y, ref_y):.1e}"
    along_tokens = itertools.product([32, 64], [128, 256], [32], [4, 8], [2, 3])
    along_channels = itertools.product([64, 128, 256], [max(16, triton.next_power_of_2(cout))], [32], [4, 8], [2, 3])
    for label, fn, tiles in (("A", fwd_a, along_tokens), ("B", fwd_b, along_channels)):
        t, tile = best_of(fn, [t for t in tiles if t[0] * t[1] <= 256 * 128])
        fn(*tile)
        line += f" | fwd {label} {t:.3f} {tile} err {max_err(y, ref_y):.1e}"

    def fwd_default():
        for b in range(B):
            matmul_tf32x3(x[b], w.t(), out=y[b].t())
    line += f" | fwd B default tiles {do_bench(fwd_default):.3f}"
    line += f" || dgrad cuBLAS {do_bench(dgrad_cublas):.3f}"
    dgrad_cublas()
    line += f" err {max_err(dx, ref_dx):.1e}"
    tiles = itertools.product([64, 128, 256], [max(16, triton.next_power_of_2(cin))], [32, 64], [4, 8], [3])
    t, tile = best_of(dgrad, [t for t in tiles if t[0] * t[1] <= 256 * 128])
    dgrad(*tile)
    line += f" | dgrad {t:.3f} {tile} err {max_err(dx, ref_dx):.1e}"

    def dgrad_default():
        for b in range(B):
            matmul_tf32x3(g[b].t(), w, out=dx[b])
    line += f" | dgrad default tiles {do_bench(dgrad_default):.3f}"

    line += f" || wgrad cuBLAS {do_bench(lambda: _wgrad_cublas(g.transpose(1, 2), x)):.3f}"
    print(line, flush=True)


def row(name, M, K, N):
    x = torch.randn(M, K, device=DEV)
    w = torch.randn(N, K, device=DEV) / K ** 0.5
    ref = (x.double() @ w.double().t())
    t_cub = do_bench(lambda: torch.nn.functional.linear(x, w))
    e_cub = max_err(torch.nn.functional.linear(x, w), ref)
    traffic = (M * K + M * N) * 4 / 4.8e12 * 1e3
    line = f"{name}: M={M} K={K} N={N} | cuBLAS {t_cub:.3f} ms err {e_cub:.1e} | roofline {traffic:.3f} ms"
    for prec in ("ieee", "tf32x3"):
        BNs = [triton.next_power_of_2(N)] if N <= 128 else [64, 128]
        tiles = itertools.product([64, 128, 256], BNs, [min(32, K), min(64, K)], [4, 8], [2, 3])
        best = best_of(lambda *tile: tri(x, w, prec, *tile), [t for t in tiles if t[0] * t[1] <= 256 * 128])
        y = tri(x, w, prec, *best[1])
        line += f" | {prec} {best[0]:.3f} ms {best[1]} err {max_err(y, ref):.1e}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
