"""fp32 matrix products of the Mamba layers' projections in Triton, with 3xTF32 tensor-core products.

    y = x @ w (+ bias) (+ y)        x (M, K), w (K, N), y (M, N): any strides; bias (N,)
    dW = sum_b g_b^T x_b            g (B, L, N), x (B, L, K): any strides (a Linear's weight gradient)

The projections are tall and skinny (M = tokens, up to 2 x 128^3; K, N = 16 to 256). cuBLAS's fp32 GEMM (SGEMM, no
TF32: the fp32 recipes) runs them at 2-3.7x their memory-traffic floor. Here a program owns a (BM, BN) tile of y and
walks K in steps of BK; each step's product is ``tl.dot(..., input_precision="tf32x3")``: every fp32 operand is split
into a TF32 value and a TF32 remainder and three tensor-core products are accumulated in fp32 (the small remainder x
remainder term is dropped), which is as accurate as SGEMM on these shapes: largest error against a float64 product
2-4e-7 of the result's scale, SGEMM 3-8e-7, and 1.29-1.71x faster (H200; kernels/bench_linear.py, docs/kernels.md
"Projections"). Since session 15 the product runs persistent (``_mm_stream_kernel``: one or two programs per SM
take row tiles in turn, so Triton pipelines the next tiles' loads; 1.1-1.8x the one-program-per-tile kernel on
LightM-UNet's products; since session 19 each program splits its weight tile once and keeps it in shared memory:
1.2-2.1x cuBLAS's SGEMM on the 128^3 and 64^3 products, LightM-UNet's step 233 -> 227 ms), with output columns past
the last multiple of 16 in a second, masked tile. A weight gradient reduces over all L tokens into a small (N, K)
matrix, which cuBLAS runs on a few thread blocks (3.7x its memory floor for ``out_proj`` at 128^3);
``weight_grad_tf32x3`` splits the tokens over programs that each write a partial (N, K) sum, summed in a fixed order
afterwards (no atomics: bitwise repeatable). With fp32 FMA instead (``PREC="ieee"``) the same kernel is slower than
cuBLAS. Under ``TRITON_INTERPRET=1`` the product is numpy's fp32 matmul.

A LayerNorm before the product folds in (session 20; ops.linear's ``_NormLinearFn`` folds its affine into w and the
bias): ``matmul_tf32x3(norm=...)`` normalises x's rows in the persistent kernel's prologue and stores their mean and
rstd, ``norm_grad=...`` ends the input gradient's product in LayerNorm's backward (whole rows in one tile), and
``weight_grad_tf32x3(norm=...)`` normalises x from the stored statistics and sums the gradient's columns in its pass.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached_launch
from .tuning import sm_count, smem_bytes, tuning_setter

_TUNING: dict = {}
# matmul_tf32x3's launch overrides for sweeps and tests: the tiles (BM, BN, BN2, BK), K_MAIN, num_warps, num_stages;
# stream = programs per SM of the persistent form (_mm_stream_kernel; 0: one program per tile, _mm_kernel)
set_tuning = tuning_setter(_TUNING, ("BM", "BN", "BN2", "BK", "K_MAIN", "num_warps", "num_stages", "stream"))


@triton.jit
def _epilogue(acc, y_ptr, b_ptr, r_ptr, sc_ptr, rows, mm, rn, nm, s_ym, s_yn, s_rm, s_rn, HAS_BIAS: tl.constexpr,
              ACCUM: tl.constexpr, RESID: tl.constexpr, MASK_N: tl.constexpr):
    """acc (+ bias) (+ y) (+ sc * r) stored into y's (rows, rn) tile; the column mask nm applied only with MASK_N (a
    mask of a width that is not a multiple of 16 makes Triton store every element on its own)."""
    mask = mm[:, None] & nm[None, :] if MASK_N else mm[:, None]
    if HAS_BIAS:
        if MASK_N:
            acc += tl.load(b_ptr + rn, mask=nm, other=0.0)[None, :]
        else:
            acc += tl.load(b_ptr + rn)[None, :]
    y_ptrs = y_ptr + rows * s_ym + rn[None, :] * s_yn
    if ACCUM:
        acc += tl.load(y_ptrs, mask=mask, other=0.0)
    if RESID:
        acc += tl.load(sc_ptr) * tl.load(r_ptr + rows * s_rm + rn[None, :] * s_rn, mask=mask, other=0.0)
    tl.store(y_ptrs, acc, mask=mask)


@triton.jit
def _row_stats(xs, K, inv_K, eps, BK: tl.constexpr, KSTEPS: tl.constexpr):
    """LayerNorm statistics of the rows of the (BM, K) tile held as KSTEPS (BM, BK) tiles: the mean, then the
    variance of the centred values (two passes over registers, as kernels/layer_norm_triton.py), rstd."""
    s = tl.sum(xs[0], axis=1)
    for ks in tl.static_range(1, KSTEPS):
        s += tl.sum(xs[ks], axis=1)
    mean = s * inv_K
    v = tl.zeros_like(mean)
    for ks in tl.static_range(KSTEPS):
        rk = ks * BK + tl.arange(0, BK)
        xc = tl.where((rk < K)[None, :], xs[ks] - mean[:, None], 0.0)
        v += tl.sum(xc * xc, axis=1)
    return mean, 1.0 / tl.sqrt(v * inv_K + eps)


@triton.jit
def _norm_bwd_epilogue(acc, y_ptr, xn_ptr, mu_ptr, rs_ptr, rows, rm, mm, rn, nm, s_ym, s_yn, s_nm, s_nk, inv_N,
                       ACCUM: tl.constexpr):
    """LayerNorm's backward on whole rows: acc (+ y) is the gradient of the normalised input xhat = (x - mean) rstd
    (its weight folded into the product's), x the LayerNorm's input at xn; stores
    dx = rstd (acc - mean(acc) - xhat mean(acc xhat)) into y's tile."""
    mask = mm[:, None] & nm[None, :]
    if ACCUM:
        acc += tl.load(y_ptr + rows * s_ym + rn[None, :] * s_yn, mask=mask, other=0.0)
    mu = tl.load(mu_ptr + rm, mask=mm, other=0.0)
    rs = tl.load(rs_ptr + rm, mask=mm, other=0.0)
    xn = tl.load(xn_ptr + rows * s_nm + rn[None, :] * s_nk, mask=mask, other=0.0)
    xh = tl.where(mask, (xn - mu[:, None]) * rs[:, None], 0.0)
    acc = tl.where(mask, acc, 0.0)
    c1 = tl.sum(acc * xh, axis=1) * inv_N
    c2 = tl.sum(acc, axis=1) * inv_N
    tl.store(y_ptr + rows * s_ym + rn[None, :] * s_yn, rs[:, None] * (acc - c2[:, None] - xh * c1[:, None]),
             mask=mask)


@cached_launch
@triton.jit
def _mm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, sc_ptr, M, N, K, s_xm, s_xk, s_wk, s_wn, s_ym, s_yn, s_rm, s_rn,
               HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr, RESID: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, PREC: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm, nm = rm < M, rn < N
    rows = rm[:, None].to(tl.int64)  # M x row stride can pass 2**31 elements
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        km = rk < K
        x = tl.load(x_ptr + rows * s_xm + rk[None, :] * s_xk, mask=mm[:, None] & km[None, :], other=0.0)
        w = tl.load(w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wn, mask=km[:, None] & nm[None, :], other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    _epilogue(acc, y_ptr, b_ptr, r_ptr, sc_ptr, rows, mm, rn, nm, s_ym, s_yn, s_rm, s_rn, HAS_BIAS, ACCUM, RESID,
              True)


@triton.jit
def _w_tiles(w_ptr, rn, nm, K, s_wk, s_wn, BK: tl.constexpr, KSTEPS: tl.constexpr):
    """The (BK, len(rn)) tiles of w over all K steps, as a tuple."""
    tiles = ()
    for ks in tl.static_range(KSTEPS):
        rk = ks * BK + tl.arange(0, BK)
        tiles = tiles + (tl.load(w_ptr + rk[:, None] * s_wk + rn[None, :] * s_wn,
                                 mask=(rk < K)[:, None] & nm[None, :], other=0.0),)
    return tiles


@cached_launch
@triton.jit
def _mm_stream_kernel(x_ptr, w_ptr, b_ptr, y_ptr, r_ptr, sc_ptr, xn_ptr, mu_ptr, rs_ptr, M, N, K, s_xm, s_xk, s_wk,
                      s_wn, s_ym, s_yn, s_rm, s_rn, s_nm, s_nk, eps, inv_n, HAS_BIAS: tl.constexpr,
                      ACCUM: tl.constexpr, RESID: tl.constexpr, NORM: tl.constexpr, NORM_BWD: tl.constexpr,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KSTEPS: tl.constexpr,
                      K_MAIN: tl.constexpr, BN2: tl.constexpr, PREC: tl.constexpr, STAGES: tl.constexpr):
    """``_mm_kernel`` as a persistent program: programs (p, column tile), a few per SM, each loading its column
    tile's weight for all of K once and taking the (BM, BN) row tiles p, p + programs, ... of y in turn, with the
    whole K in KSTEPS unrolled steps, so that the tile loop is the innermost loop and Triton pipelines its loads over
    STAGES tiles (one-step K loops pipeline nothing).

    Widths that are not multiples of 16 are kept out of the masks Triton cannot vectorise: the first K_MAIN K steps
    load x without a column mask; with BN2 > 0 (one column tile, N not a multiple of 16) columns 0 .. BN - 1 are
    stored without a column mask and the rest from a second, masked (BM, BN2) accumulator (x_proj's 34 outputs:
    32 + 2).

    LayerNorm folded in (its weight and bias in w and the bias by the caller): with NORM the rows of x are
    normalised first, (x - mean) rstd (eps, inv_n = 1 / K), and the first column tile's programs store mean and
    rstd (mu, rs); with NORM_BWD (one column tile holding all N columns) y is the gradient of the LayerNorm's input
    xn (strides s_nm, s_nk; statistics mu, rs; inv_n = 1 / N), computed from the product (+ y) in the epilogue."""
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    nm = rn < N
    w = _w_tiles(w_ptr, rn, nm, K, s_wk, s_wn, BK, KSTEPS)
    if BN2:
        rn2 = BN + tl.arange(0, BN2)
        nm2 = rn2 < N
        w2 = _w_tiles(w_ptr, rn2, nm2, K, s_wk, s_wn, BK, KSTEPS)
    for t in tl.range(tl.program_id(0), tl.cdiv(M, BM), tl.num_programs(0), num_stages=STAGES):
        rm = t * BM + tl.arange(0, BM)
        mm = rm < M
        rows = rm[:, None].to(tl.int64)
        xs = ()
        for ks in tl.static_range(KSTEPS):
            rk = ks * BK + tl.arange(0, BK)
            x_ptrs = x_ptr + rows * s_xm + rk[None, :] * s_xk
            if ks < K_MAIN:
                xs = xs + (tl.load(x_ptrs, mask=mm[:, None], other=0.0),)
            else:
                xs = xs + (tl.load(x_ptrs, mask=mm[:, None] & (rk < K)[None, :], other=0.0),)
        if NORM:
            mean, rstd = _row_stats(xs, K, inv_n, eps, BK, KSTEPS)
            if tl.program_id(1) == 0:
                tl.store(mu_ptr + rm, mean, mask=mm)
                tl.store(rs_ptr + rm, rstd, mask=mm)
        acc = tl.zeros((BM, BN), tl.float32)
        if BN2:
            acc2 = tl.zeros((BM, BN2), tl.float32)
        for ks in tl.static_range(KSTEPS):
            x = xs[ks]
            if NORM:
                rk = ks * BK + tl.arange(0, BK)
                x = tl.where((rk < K)[None, :], (x - mean[:, None]) * rstd[:, None], 0.0)
            acc = tl.dot(x, w[ks], acc, input_precision=PREC)
            if BN2:
                acc2 = tl.dot(x, w2[ks], acc2, input_precision=PREC)
        if NORM_BWD:
            _norm_bwd_epilogue(acc, y_ptr, xn_ptr, mu_ptr, rs_ptr, rows, rm, mm, rn, nm, s_ym, s_yn, s_nm, s_nk,
                               inv_n, ACCUM)
        else:
            _epilogue(acc, y_ptr, b_ptr, r_ptr, sc_ptr, rows, mm, rn, nm, s_ym, s_yn, s_rm, s_rn, HAS_BIAS, ACCUM,
                      RESID, BN2 == 0)
        if BN2:
            _epilogue(acc2, y_ptr, b_ptr, r_ptr, sc_ptr, rows, mm, rn2, nm2, s_ym, s_yn, s_rm, s_rn, HAS_BIAS, ACCUM,
                      RESID, True)


def _config(K, N, device, column_major_x=False, column_major_out=False, accumulate=False):
    """Tile sizes and launch shape, from the sweeps of kernels/bench_linear.py on the H200.

    Since session 15 the persistent form (``stream`` programs per SM) on 128-row tiles: faster than one program per
    tile on each of LightM-UNet's products but one (``--stream``). Since session 19 each program keeps its column
    tile's weight for all of K in shared memory (as the TF32 value and remainder that tf32x3 splits it into, split
    once instead of in every row tile; session 19's results file lists the products); its pipeline holds
    every K step's x tile per stage, plus the epilogue's tile: up to 3 stages as the device's shared memory allows
    (2 at K = 128 on the H200); where fewer than 2 fit (K = 256), one program per tile. N not a multiple of 16
    (x_proj): an unmasked tile of the largest power of 2 below N and a masked rest (BN2). 8 warps from K = 64, and
    when accumulating: on 4 warps the pipelined tile of y spilled registers (compiled for sm_90: 324 bytes at x_proj's
    input gradient, 34 -> 64; 2.76 ms at 128^3 against 0.61 ms without accumulating, session 20).

    One program per tile (``stream=0``): row-major operands (session 11); a column-major x (a channels-first Linear's
    input gradient) runs best on 4 warps, a column-major output of up to 32 columns (its forward) on 64-row tiles
    (session 13)."""
    BN = min(128, max(16, triton.next_power_of_2(N)))
    BK = min(32, max(16, triton.next_power_of_2(K)))
    if _TUNING.get("stream", 2):
        p2 = triton.next_power_of_2(N)
        BN1, BN2 = (BN, 0) if N % 16 == 0 or N < 16 or N > 128 else (
            p2 // 2, max(16, triton.next_power_of_2(N - p2 // 2)))
        BM = 128
        Kp = triton.cdiv(K, BK) * BK
        resident = Kp * (BN1 + BN2) * 4 * 2  # the weight, as its TF32 value and remainder
        stages = min(3, (smem_bytes(device) - BM * (BN1 + BN2) * 4 - resident) // (Kp * BM * 4))
        if stages >= 2 or "stream" in _TUNING:  # a sweep's explicit request is taken (and may not fit)
            return dict(BM=BM, BN=BN1, BN2=BN2, BK=BK, K_MAIN=K // BK, num_warps=8 if K >= 64 or accumulate else 4,
                        num_stages=max(stages, 1), stream=1 if K >= 128 or N > 128 else 2)
    cfg = dict(BM=64 if BN >= 128 else 128, BN=BN, BK=BK, num_warps=8 if BN == 64 else 4,
               num_stages=2 if BN >= 128 else 3)
    if column_major_x:
        cfg["num_warps"] = 4
    if column_major_out and BN <= 32:
        cfg["BM"] = 64
    return cfg


def streams(K, N, device) -> bool:
    """Whether ``matmul_tf32x3`` runs (K, N) products on the persistent kernel, the one that can fold a LayerNorm in
    (``norm`` / ``norm_grad``): at most 128 output columns per tile and the pipeline's stages fit (``_config``)."""
    return bool({**_config(K, N, device), **_TUNING}.get("stream", 0))


def matmul_tf32x3(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  accumulate: bool = False, residual: tuple[torch.Tensor, torch.Tensor] | None = None,
                  norm: tuple[torch.Tensor, torch.Tensor, float] | None = None,
                  norm_grad: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """``x @ w (+ bias)`` for fp32 x (M, K), w (K, N), into ``out`` (M, N) (a new row-major tensor by default); with
    ``accumulate`` added to what ``out`` holds; with ``residual`` = (s, r), s a 1-element fp32 tensor and r (M, N) fp32
    of any strides, ``+ s * r`` (a scaled residual in the same pass). K must be at least 1 (tl.dot tiles are at least
    16 wide; masked).

    A LayerNorm over x's rows, its weight and bias folded into w and bias by the caller (ops.linear):
    ``norm`` = (mean, rstd, eps): ``LN(x) @ w (+ bias)``, LN without its affine, storing each row's mean and rstd into
    the (M,) fp32 tensors given. ``norm_grad`` = (xn, mean, rstd): x @ w (+ out with ``accumulate``) is the gradient
    of LN(xn) (xn (M, N), any strides; its statistics as ``norm`` stored them), and out receives that of xn. Both need
    the persistent kernel (``streams``); ``norm_grad`` also at most 128 columns, a multiple of 16."""
    M, K = x.shape
    N = w.shape[1]
    if w.shape[0] != K or any(t.dtype != torch.float32 for t in (x, w)):
        raise ValueError(f"matmul_tf32x3: fp32 (M, K) @ (K, N) expected, got {tuple(x.shape)} {x.dtype} @ "
                         f"{tuple(w.shape)} {w.dtype}")
    if out is None:
        if accumulate:
            raise ValueError("matmul_tf32x3: accumulate needs out")
        out = torch.empty(M, N, device=x.device, dtype=torch.float32)
    if max((K - 1) * max(abs(x.stride(1)), abs(w.stride(0))), (N - 1) * max(abs(w.stride(1)), abs(out.stride(1)))) \
            >= 2 ** 31:
        raise ValueError("matmul_tf32x3: offsets along K and N are 32-bit in the kernel; make x, w and out row-major")
    sc, r = residual if residual is not None else (w, out)
    if residual is not None and (sc.numel() != 1 or r.shape != (M, N) or sc.dtype != torch.float32
                                 or r.dtype != torch.float32):
        raise ValueError(f"matmul_tf32x3: residual (s, r) needs a 1-element fp32 s and an fp32 r of shape {(M, N)}, "
                         f"got {tuple(sc.shape)} {sc.dtype} and {tuple(r.shape)} {r.dtype}")
    cfg = _config(K, N, x.device, x.stride(0) == 1 != x.stride(1), out.stride(0) == 1 != out.stride(1), accumulate)
    cfg.update(_TUNING)
    per_sm = cfg.pop("stream", 0)
    flags = dict(HAS_BIAS=bias is not None, ACCUM=accumulate, RESID=residual is not None, PREC="tf32x3")
    if norm is None and norm_grad is None and not per_sm:
        _mm_kernel[(triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))](
            x, w, bias if bias is not None else w, out, r, sc, M, N, K, *x.stride(), *w.stride(), *out.stride(),
            *r.stride(), **flags, **cfg)
        return out
    xn, mu, rs, eps, inv_n = out, out, out, 0.0, 1.0
    if norm is not None or norm_grad is not None:
        if norm is not None and norm_grad is not None or residual is not None or not per_sm:
            raise ValueError("matmul_tf32x3: norm and norm_grad exclude each other and a residual, and need the "
                             "persistent kernel (streams(K, N))")
        mu, rs = (norm if norm is not None else norm_grad[1:])[:2]
        if mu.shape != (M,) or rs.shape != (M,) or mu.stride(0) != 1 or rs.stride(0) != 1 or \
                mu.dtype != torch.float32 or rs.dtype != torch.float32:
            raise ValueError(f"matmul_tf32x3: the LayerNorm statistics must be contiguous fp32 ({M},) tensors")
        if norm is not None:
            eps, inv_n = float(norm[2]), 1.0 / K
        else:
            xn, inv_n = norm_grad[0], 1.0 / N
            if xn.shape != (M, N) or cfg["BN2"] or cfg["BN"] < N:
                raise ValueError(f"matmul_tf32x3: norm_grad needs the LayerNorm's input of shape {(M, N)} and at "
                                 f"most 128 output columns, a multiple of 16; got {tuple(xn.shape)}, N = {N}")
    col_tiles = 1 if cfg["BN2"] else triton.cdiv(N, cfg["BN"])
    grid = (min(triton.cdiv(M, cfg["BM"]), triton.cdiv(per_sm * sm_count(x.device, 4), col_tiles)), col_tiles)
    cfg["STAGES"] = cfg.pop("num_stages")
    _mm_stream_kernel[grid](x, w, bias if bias is not None else w, out, r, sc, xn, mu, rs, M, N, K, *x.stride(),
                            *w.stride(), *out.stride(), *r.stride(), *xn.stride(), eps, inv_n,
                            NORM=norm is not None, NORM_BWD=norm_grad is not None, KSTEPS=triton.cdiv(K, cfg["BK"]),
                            **flags, **cfg)
    return out


@cached_launch
@triton.jit
def _wgrad_kernel(g_ptr, x_ptr, p_ptr, mu_ptr, rs_ptr, q_ptr, L, N, K, CH, SPLITS, s_gb, s_gl, s_gn, s_xb, s_xl, s_xk,
                  NORM: tl.constexpr, BL: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    """Program (b * SPLITS + s, n tile, k tile): the partial sum over tokens s*CH .. s*CH + CH - 1 of batch element
    b of g^T x, an (N, K) tile stored at p[b * SPLITS + s]. NORM: of g^T xhat instead, xhat = (x - mean) rstd with
    the (B, L) statistics mu, rs, and the k tile 0 programs store the partial sum of g over their tokens at q."""
    pid = tl.program_id(0)
    b = (pid // SPLITS).to(tl.int64)
    l0 = (pid % SPLITS) * CH
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rk = tl.program_id(2) * BK + tl.arange(0, BK)
    nm, km = rn < N, rk < K
    g_base = g_ptr + b * s_gb + rn[:, None] * s_gn
    x_base = x_ptr + b * s_xb + rk[None, :] * s_xk
    acc = tl.zeros((BN, BK), tl.float32)
    if NORM:
        gsum = tl.zeros((BN, BL), tl.float32)
    for l in range(l0, tl.minimum(l0 + CH, L), BL):
        rl = (l + tl.arange(0, BL)).to(tl.int64)  # L x token stride can pass 2**31 elements
        lm = rl < L
        gt = tl.load(g_base + rl[None, :] * s_gl, mask=nm[:, None] & lm[None, :], other=0.0)  # (BN, BL)
        xt = tl.load(x_base + rl[:, None] * s_xl, mask=lm[:, None] & km[None, :], other=0.0)  # (BL, BK)
        if NORM:
            mu = tl.load(mu_ptr + b * L + rl, mask=lm, other=0.0)
            rs = tl.load(rs_ptr + b * L + rl, mask=lm, other=0.0)
            xt = tl.where(lm[:, None] & km[None, :], (xt - mu[:, None]) * rs[:, None], 0.0)
            gsum += gt
        acc = tl.dot(gt, xt, acc, input_precision=PREC)
    tl.store(p_ptr + pid * N * K + rn[:, None] * K + rk[None, :], acc, mask=nm[:, None] & km[None, :])
    if NORM:
        if tl.program_id(2) == 0:
            tl.store(q_ptr + pid * N + rn, tl.sum(gsum, axis=1), mask=nm)


def _wgrad_config(N, K):
    """Tile sizes and launch shape of the weight gradient, from the sweep of kernels/bench_linear.py --wgrad on the
    H200 (session 13: 64-token steps, 4 warps, 3 stages were the best at every size)."""
    return dict(BL=64, BN=min(64, max(16, triton.next_power_of_2(N))), BK=min(64, max(16, triton.next_power_of_2(K))),
                num_warps=4, num_stages=3)


def weight_grad_tf32x3(g: torch.Tensor, x: torch.Tensor, out: torch.Tensor | None = None,
                       norm: tuple[torch.Tensor, torch.Tensor] | None = None, **config):
    """``sum_b g[b]^T @ x[b]`` for fp32 g (B, L, N) and x (B, L, K) (any strides: a channels-first gradient is
    ``g.transpose(1, 2)``), as a new (N, K) tensor or written into ``out``. ``config`` overrides the tiles and
    ``splits`` (the token ranges per batch element; default: about eight programs per SM, the best of 2, 4 and 8 in
    two of the four shapes the sweep found faster than cuBLAS).

    ``norm`` = (mean, rstd), contiguous fp32 (B, L): the weight gradient of a Linear applied to the LayerNorm of x
    (without its affine, as matmul_tf32x3's ``norm``), ``sum_b g[b]^T xhat[b]``; returns it with the sum of g over
    the tokens, (N,), from the same pass."""
    if g.dim() != 3 or x.dim() != 3 or g.shape[:2] != x.shape[:2] or g.dtype != torch.float32 \
            or x.dtype != torch.float32:
        raise ValueError(f"weight_grad_tf32x3: fp32 g (B, L, N) and x (B, L, K) expected, got {tuple(g.shape)} "
                         f"{g.dtype} and {tuple(x.shape)} {x.dtype}")
    (B, L, N), K = g.shape, x.shape[2]
    if norm is not None and any(t.shape != (B, L) or not t.is_contiguous() or t.dtype != torch.float32 for t in norm):
        raise ValueError(f"weight_grad_tf32x3: the LayerNorm statistics must be contiguous fp32 {(B, L)} tensors")
    cfg = {**_wgrad_config(N, K), **config}
    tiles = triton.cdiv(N, cfg["BN"]) * triton.cdiv(K, cfg["BK"])
    splits = cfg.pop("splits", None)
    if splits is None:
        splits = max(1, 8 * sm_count(g.device, 4) // (B * tiles))
    # whole BL blocks per program; fewer programs where the tokens run out
    ch = triton.cdiv(triton.cdiv(L, splits), cfg["BL"]) * cfg["BL"]
    splits = triton.cdiv(L, ch)
    if max((N - 1) * abs(g.stride(2)), (K - 1) * abs(x.stride(2))) >= 2 ** 31:
        raise ValueError("weight_grad_tf32x3: offsets along N and K are 32-bit in the kernel")
    partial = torch.empty(B * splits, N, K, device=g.device, dtype=torch.float32)
    mu, rs = norm if norm is not None else (partial, partial)
    q = torch.empty(B * splits, N, device=g.device, dtype=torch.float32) if norm is not None else partial
    _wgrad_kernel[(B * splits, triton.cdiv(N, cfg["BN"]), triton.cdiv(K, cfg["BK"]))](
        g, x, partial, mu, rs, q, L, N, K, ch, splits, *g.stride(), *x.stride(), NORM=norm is not None,
        PREC="tf32x3", **cfg)
    dw = torch.sum(partial, 0, out=out)
    return (dw, q.sum(0)) if norm is not None else dw
