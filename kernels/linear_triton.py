"""fp32 matrix products of the Mamba layers' projections in Triton, with 3xTF32 tensor-core products.

    y = x @ w (+ bias) (+ y)        x (M, K), w (K, N), y (M, N): any strides; bias (N,)

The projections are tall and skinny (M = tokens, up to 2 x 128^3; K, N = 16 to 256). cuBLAS's fp32 GEMM (SGEMM, no
TF32: the fp32 recipes) runs them at 2-3.7x their memory-traffic floor. Here a program owns a (BM, BN) tile of y and
walks K in steps of BK; each step's product is ``tl.dot(..., input_precision="tf32x3")``: every fp32 operand is split
into a TF32 value and a TF32 remainder and three tensor-core products are accumulated in fp32 (the small remainder x
remainder term is dropped), which is as accurate as SGEMM on these shapes: largest error against a float64 product
2-4e-7 of the result's scale, SGEMM 3-8e-7, and 1.29-1.71x faster (H200; kernels/bench_linear.py, docs/kernels.md
"Projections"). With fp32 FMA instead (``PREC="ieee"``) the same kernel is slower than cuBLAS. Under
``TRITON_INTERPRET=1`` the product is numpy's fp32 matmul.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached_launch


@cached_launch
@triton.jit
def _mm_kernel(x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, s_xm, s_xk, s_wk, s_wn, s_ym, s_yn,
               HAS_BIAS: tl.constexpr, ACCUM: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
               PREC: tl.constexpr):
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
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=nm, other=0.0)[None, :]
    y_ptrs = y_ptr + rows * s_ym + rn[None, :] * s_yn
    if ACCUM:
        acc += tl.load(y_ptrs, mask=mm[:, None] & nm[None, :], other=0.0)
    tl.store(y_ptrs, acc, mask=mm[:, None] & nm[None, :])


def _config(K, N):
    """Tile sizes and launch shape, from the tile sweep of kernels/bench_linear.py on the H200 (session 11)."""
    BN = min(128, max(16, triton.next_power_of_2(N)))
    BK = min(32, max(16, triton.next_power_of_2(K)))
    return dict(BM=64 if BN >= 128 else 128, BN=BN, BK=BK, num_warps=8 if BN == 64 else 4,
                num_stages=2 if BN >= 128 else 3)


def matmul_tf32x3(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, out: torch.Tensor | None = None,
                  accumulate: bool = False) -> torch.Tensor:
    """``x @ w (+ bias)`` for fp32 x (M, K), w (K, N), into ``out`` (M, N) (a new row-major tensor by default); with
    ``accumulate`` added to what ``out`` holds. K must be at least 1 (tl.dot tiles are at least 16 wide; masked)."""
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
    cfg = _config(K, N)
    grid = (triton.cdiv(M, cfg["BM"]), triton.cdiv(N, cfg["BN"]))
    _mm_kernel[grid](x, w, bias if bias is not None else w, out, M, N, K, *x.stride(), *w.stride(), *out.stride(),
                     HAS_BIAS=bias is not None, ACCUM=accumulate, PREC="tf32x3", **cfg)
    return out
