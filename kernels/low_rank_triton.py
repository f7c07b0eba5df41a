"""The Mamba mixer's low-rank delta in Triton: delta = v W^T and its gradients, in fp32 multiply-adds.

    y = v @ Wt                        v (M, R), Wt (R, N) -> y (M, N)
    gv = g @ Wt^T,  gWt = v^T @ g     g (M, N) -> gv (M, R), gWt (R, N), from one read of g

``dt_proj`` maps the R = ceil(d_model / 16) values of a token to its d channels (LightM-UNet's full resolution:
R = 2, d = 64, M = 2 x 128^3 tokens). As a GEMM this is all memory traffic (R multiply-adds per output element), and
cuBLAS's SGEMM ran the product at 2.4x its memory floor and the weight gradient, a reduction over all M tokens, at
2.5x (H200, session 13 profile). Here the product is a streaming kernel: each program writes a (BM, BN) tile from R
loaded columns of v and R rows of Wt. The gradients share one read of g (the scan's d(delta), the largest tensor):
a program walks a range of tokens, writes gv for them and keeps a partial (R, N) sum of gWt; the partials are summed
in a fixed order afterwards (no atomics: bitwise repeatable). Both are plain fp32 products and sums (no TF32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import cached_launch
from .tuning import sm_count


@cached_launch
@triton.jit
def _product_kernel(v_ptr, w_ptr, y_ptr, M, N, s_vm, s_vr, s_wr, s_wn, s_ym, s_yn,
                    R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    mm, nm = rm < M, rn < N
    rows = rm.to(tl.int64)  # M x row stride can pass 2**31 elements
    acc = tl.zeros((BM, BN), tl.float32)
    for r in tl.static_range(R):
        vr = tl.load(v_ptr + rows * s_vm + r * s_vr, mask=mm, other=0.0).to(tl.float32)
        wr = tl.load(w_ptr + r * s_wr + rn * s_wn, mask=nm, other=0.0).to(tl.float32)
        acc += vr[:, None] * wr[None, :]
    tl.store(y_ptr + rows[:, None] * s_ym + rn[None, :] * s_yn, acc, mask=mm[:, None] & nm[None, :])


@cached_launch
@triton.jit
def _grads_kernel(g_ptr, v_ptr, w_ptr, gv_ptr, p_ptr, M, N, CH, s_gm, s_gn, s_vm, s_vr, s_wr, s_wn, s_om, s_or,
                  R: tl.constexpr, BR: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    # program s: tokens [s * CH, (s + 1) * CH); BN >= N (whole rows of g)
    s = tl.program_id(0)
    rn = tl.arange(0, BN)
    nm = rn < N
    rr = tl.arange(0, BR)
    acc = tl.zeros((BR, BN), tl.float32)
    for i in range(0, CH, BM):
        ri = i + tl.arange(0, BM)
        rm = s * CH + ri
        mm = (rm < M) & (ri < CH)
        rows = rm.to(tl.int64)
        g = tl.load(g_ptr + rows[:, None] * s_gm + rn[None, :] * s_gn, mask=mm[:, None] & nm[None, :],
                    other=0.0).to(tl.float32)
        for r in tl.static_range(R):
            wr = tl.load(w_ptr + r * s_wr + rn * s_wn, mask=nm, other=0.0).to(tl.float32)
            tl.store(gv_ptr + rows * s_om + r * s_or, tl.sum(g * wr[None, :], axis=1), mask=mm)
            vr = tl.load(v_ptr + rows * s_vm + r * s_vr, mask=mm, other=0.0).to(tl.float32)
            acc += tl.where(rr[:, None] == r, tl.sum(vr[:, None] * g, axis=0)[None, :], 0.0)
    tl.store(p_ptr + (s * R + rr[:, None]) * N + rn[None, :], acc, mask=(rr[:, None] < R) & nm[None, :])


def _check(name, v, Wt):
    if v.dim() != 2 or Wt.dim() != 2 or v.shape[1] != Wt.shape[0]:
        raise ValueError(f"{name}: v (M, R) and Wt (R, N) expected, got {tuple(v.shape)} and {tuple(Wt.shape)}")


def low_rank_product(v: torch.Tensor, Wt: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``v @ Wt`` in fp32: v (M, R) of any float dtype and strides, Wt (R, N); into ``out`` (M, N) fp32 (a new
    row-major tensor by default)."""
    _check("low_rank_product", v, Wt)
    M, R = v.shape
    N = Wt.shape[1]
    if out is None:
        out = torch.empty(M, N, device=v.device, dtype=torch.float32)
    BN = min(64, triton.next_power_of_2(N))
    BM = max(16, 8192 // BN)
    _product_kernel[(triton.cdiv(M, BM), triton.cdiv(N, BN))](
        v, Wt, out, M, N, *v.stride(), *Wt.stride(), *out.stride(), R=R, BM=BM, BN=BN, num_warps=4)
    return out


def low_rank_grads(g: torch.Tensor, v: torch.Tensor, Wt: torch.Tensor,
                   gv_out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of y = v @ Wt for the output gradient g (M, N): ``(g @ Wt^T, v^T @ g)``, fp32 (M, R) and
    (R, N), from one read of g; the first written into ``gv_out`` (M, R), any strides, if given. N at most 256 (a
    program holds whole rows)."""
    _check("low_rank_grads", v, Wt)
    M, R = v.shape
    N = Wt.shape[1]
    if g.shape != (M, N):
        raise ValueError(f"low_rank_grads: g must be (M, N) = {(M, N)}, got {tuple(g.shape)}")
    if N > 256:
        raise ValueError(f"low_rank_grads: at most 256 output channels per row, got {N}")
    BN = max(16, triton.next_power_of_2(N))
    BM = max(16, 4096 // BN)
    splits = max(1, min(triton.cdiv(M, BM), 4 * sm_count(g.device, 4)))
    CH = triton.cdiv(triton.cdiv(M, splits), BM) * BM
    splits = triton.cdiv(M, CH)
    gv = torch.empty(M, R, device=g.device, dtype=torch.float32) if gv_out is None else gv_out
    if gv.shape != (M, R) or gv.dtype != torch.float32:
        raise ValueError(f"low_rank_grads: gv_out must be fp32 (M, R) = {(M, R)}, got {tuple(gv.shape)} {gv.dtype}")
    partial = torch.empty(splits, R, N, device=g.device, dtype=torch.float32)
    _grads_kernel[(splits,)](g, v, Wt, gv, partial, M, N, CH, *g.stride(), *v.stride(), *Wt.stride(), *gv.stride(),
                             R=R, BR=triton.next_power_of_2(R), BM=BM, BN=BN, num_warps=4)
    return gv, partial.sum(0)
