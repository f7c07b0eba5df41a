"""Chunk-parallel selective scan in Triton: forward and backward, plain and fused multi-direction (cross) forms.

Math (mamba-ssm ``selective_scan_fn`` semantics, specs/mamba_block.md §4), per batch ``b``, channel ``c``, state ``n``:

    dt_t   = softplus(delta_t + bias)                    (or delta_t + bias without softplus)
    a_t    = exp(dt_t * A[c, n])        x_t = dt_t * B_t[n] * u_t
    h_t    = a_t * h_{t-1} + x_t        (h_{-1} = 0, fp32)
    y_t    = sum_n C_t[n] h_t[n] + D u_t ;   out_t = y_t * silu(z_t)

Work decomposition (see docs/kernels.md):

* The sequence is cut into **chunks** of ``T`` steps. A program holds a ``(BD, BN, T)`` tile (``BD`` channels, the
  ``N`` states padded to ``BN``, ``T`` steps) and scans it along ``T`` with ``tl.associative_scan`` over pairs
  ``(a, x)`` with the combine ``(a1, x1) o (a2, x2) = (a1 a2, a2 x1 + x2)``; the state entering the chunk is applied
  afterwards: ``h_t = P_t h_in + X_t``. This never forms ``exp(-cumsum)`` and cannot overflow.
* A program walks the chunks of one **segment** (``cps`` consecutive chunks) in order, for ``CPB`` channel sub-tiles
  (chunk loop outside, sub-tile loop inside, so the B/C tile of a chunk is loaded once and the B/C gradients of
  the ``CPB*BD`` channels are summed in registers). The state entering each chunk lives in a small fp32 buffer
  (the chunk-start states, kept for the backward pass), not in registers.
* Segments run in parallel. When there is more than one, a first kernel reduces every segment to its local end state
  ``sum_s exp(A (S_end - S_s)) x_s`` (no scan, only decays ``<= 1`` for ``A < 0``) and its summed ``dt``; each
  program of the main kernel then folds the preceding segments' summaries into its entering state (O(#segments)).
* The backward pass recomputes ``a_t`` and the states of each chunk from the saved chunk-start states (b, d, chunks,
  N), runs the reverse scan ``g_t = C_t gy_t + a_{t+1} g_{t+1}`` (``a_{t+1}`` from a shifted load of ``delta``) walking
  the chunks backwards, and carries the gradient state across segments the same way (a reduction kernel per
  segment, then an O(#segments) fold per program). The A-terms use ``a_t h_{t-1} = h_t - x_t`` so no shift of the
  state is needed. Nothing of size (b, d, L, N) is ever stored.
* The **cross** (multi-direction) form launches the same kernels once per scan order with index arithmetic that maps
  sequence position ``l`` to its spatial offset (axis permutation + reversal); outputs (and the gradient of the map)
  are accumulated into one spatial-layout fp32 tensor in direction order, so no transposed/flipped copy is made
  and the sum is deterministic.

All state and accumulation is fp32; inputs may be fp32, bf16 or fp16.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


# ------------------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _combine(a1, x1, a2, x2):
    return a1 * a2, a2 * x1 + x2


@triton.jit
def _softplus(x):
    """x for x > 20, else log1p(exp(x)) (log1p evaluated accurately: log(w) * e / (w - 1), w = 1 + e)."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _pos(l, L, Q1, Q2, R0, R1, R2, HAS_MAP: tl.constexpr, FLIP: tl.constexpr):
    """Sequence position -> element offset along the position axis (identity, or a permuted/flipped raster)."""
    if HAS_MAP:
        if FLIP:
            l = L - 1 - l
        l = tl.maximum(l, 0)  # masked lanes only
        i2 = l % Q2
        r = l // Q2
        return (r // Q1) * R0 + (r % Q1) * R1 + i2 * R2
    else:
        return l


@triton.jit
def _load_dt(ptrs, mask, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    raw = tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw = raw + bias[:, None]
    if SOFTPLUS:
        dt = _softplus(raw)
    else:
        dt = raw
    return tl.where(mask, dt, 0.0), raw


# ------------------------------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_seg_kernel(u_ptr, dt_ptr, A_ptr, bias_ptr, B_ptr, segh_ptr, segs_ptr,
                    L, d, dg, N, n_chunks, cps, n_seg, cbg,
                    s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_Bb, s_Bg, s_Bn, s_Bl,
                    Q1, Q2, R0, R1, R2,
                    HAS_MAP: tl.constexpr, FLIP: tl.constexpr, B_VAR: tl.constexpr, HAS_BIAS: tl.constexpr,
                    SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr,
                    CPB: tl.constexpr):
    """Per segment (all but the last): local end state (zero entering state) and the segment's summed dt."""
    seg = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = cb // cbg
    cbi = cb % cbg
    rd = tl.arange(0, BD)
    rn = tl.arange(0, BN)
    rt = tl.arange(0, T)
    nm = rn < N
    j0 = seg * cps
    j1 = tl.minimum(j0 + cps, n_chunks)
    for s in range(CPB):
        cl = cbi * (CPB * BD) + s * BD + rd
        cm = cl < dg
        c = g * dg + cl
        m2 = cm[:, None] & nm[None, :]
        A2 = tl.load(A_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0) * LOG2E
        bias = tl.load(bias_ptr + c, mask=cm, other=0.0) if HAS_BIAS else None
        H = tl.zeros((BD, BN), tl.float32)
        ssum = tl.zeros((BD,), tl.float32)
        for j in range(j0, j1):
            l = j * T + rt
            lm = l < L
            off = _pos(l, L, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
            mt = cm[:, None] & lm[None, :]
            u = tl.load(u_ptr + b * s_ub + c[:, None] * s_ud + off[None, :] * s_ul, mask=mt, other=0.0).to(tl.float32)
            dt, _ = _load_dt(dt_ptr + b * s_db + c[:, None] * s_dd + off[None, :] * s_dl, mt, bias, HAS_BIAS,
                             SOFTPLUS)
            if B_VAR:
                Bx = tl.load(B_ptr + b * s_Bb + g * s_Bg + rn[:, None] * s_Bn + off[None, :] * s_Bl,
                             mask=nm[:, None] & lm[None, :], other=0.0).to(tl.float32)[None, :, :]
            else:
                Bx = tl.load(B_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
            tot = tl.sum(dt, axis=1)
            rest = tot[:, None] - tl.cumsum(dt, axis=1)  # sum of dt over (s, end]
            w = tl.exp2(A2[:, :, None] * rest[:, None, :])
            H = tl.exp2(A2 * tot[:, None]) * H + tl.sum(w * ((dt * u)[:, None, :] * Bx), axis=2)
            ssum += tot
        tl.store(segh_ptr + ((b * d + c[:, None]) * n_seg + seg) * N + rn[None, :], H, mask=m2)
        tl.store(segs_ptr + (b * d + c) * n_seg + seg, ssum, mask=cm)


@triton.jit
def _fwd_kernel(u_ptr, dt_ptr, z_ptr, out_ptr, A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr,
                hs_ptr, last_ptr, segh_ptr, segs_ptr,
                L, d, dg, N, n_chunks, cps, n_seg, cbg, hs_rows,
                s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
                s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
                Q1, Q2, R0, R1, R2,
                HAS_MAP: tl.constexpr, FLIP: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                ACCUM: tl.constexpr, ALL_STATES: tl.constexpr, SAVE_LAST: tl.constexpr,
                BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, CPB: tl.constexpr):
    seg = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = cb // cbg
    cbi = cb % cbg
    rd = tl.arange(0, BD)
    rn = tl.arange(0, BN)
    rt = tl.arange(0, T)
    nm = rn < N
    j0 = seg * cps
    j1 = tl.minimum(j0 + cps, n_chunks)
    # state entering the segment: fold the summaries of the preceding segments
    for s in range(CPB):
        cl = cbi * (CPB * BD) + s * BD + rd
        cm = cl < dg
        c = g * dg + cl
        m2 = cm[:, None] & nm[None, :]
        A2 = tl.load(A_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0) * LOG2E
        H = tl.zeros((BD, BN), tl.float32)
        for sp in range(0, seg):
            hl = tl.load(segh_ptr + ((b * d + c[:, None]) * n_seg + sp) * N + rn[None, :], mask=m2, other=0.0)
            sd = tl.load(segs_ptr + (b * d + c) * n_seg + sp, mask=cm, other=0.0)
            H = tl.exp2(A2 * sd[:, None]) * H + hl
        row = j0 if ALL_STATES else seg
        tl.store(hs_ptr + ((b * d + c[:, None]) * hs_rows + row) * N + rn[None, :], H, mask=m2)
    tl.debug_barrier()
    for j in range(j0, j1):
        l = j * T + rt
        lm = l < L
        off = _pos(l, L, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
        if B_VAR:
            Bt = tl.load(B_ptr + b * s_Bb + g * s_Bg + rn[:, None] * s_Bn + off[None, :] * s_Bl,
                         mask=nm[:, None] & lm[None, :], other=0.0).to(tl.float32)[None, :, :]
        if C_VAR:
            Ct = tl.load(C_ptr + b * s_Cb + g * s_Cg + rn[:, None] * s_Cn + off[None, :] * s_Cl,
                         mask=nm[:, None] & lm[None, :], other=0.0).to(tl.float32)[None, :, :]
        row = j if ALL_STATES else seg
        for s in range(CPB):
            cl = cbi * (CPB * BD) + s * BD + rd
            cm = cl < dg
            c = g * dg + cl
            m2 = cm[:, None] & nm[None, :]
            mt = cm[:, None] & lm[None, :]
            A2 = tl.load(A_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0) * LOG2E
            bias = tl.load(bias_ptr + c, mask=cm, other=0.0) if HAS_BIAS else None
            u = tl.load(u_ptr + b * s_ub + c[:, None] * s_ud + off[None, :] * s_ul, mask=mt, other=0.0).to(tl.float32)
            dt, _ = _load_dt(dt_ptr + b * s_db + c[:, None] * s_dd + off[None, :] * s_dl, mt, bias, HAS_BIAS,
                             SOFTPLUS)
            if B_VAR:
                Bx = Bt
            else:
                Bx = tl.load(B_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
            if C_VAR:
                Cx = Ct
            else:
                Cx = tl.load(C_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
            a = tl.exp2(dt[:, None, :] * A2[:, :, None])
            x = (dt * u)[:, None, :] * Bx
            P, X = tl.associative_scan((a, x), axis=2, combine_fn=_combine)
            sptr = hs_ptr + ((b * d + c[:, None]) * hs_rows + row) * N + rn[None, :]
            h0 = tl.load(sptr, mask=m2, other=0.0)
            h = P * h0[:, :, None] + X
            y = tl.sum(h * Cx, axis=1)
            if HAS_D:
                y += tl.load(D_ptr + c, mask=cm, other=0.0)[:, None] * u
            if HAS_Z:
                zz = tl.load(z_ptr + b * s_zb + c[:, None] * s_zd + off[None, :] * s_zl, mask=mt,
                             other=0.0).to(tl.float32)
                y = y * (zz * tl.sigmoid(zz))
            optr = out_ptr + b * s_ob + c[:, None] * s_od + off[None, :] * s_ol
            if ACCUM:
                y += tl.load(optr, mask=mt, other=0.0).to(tl.float32)
            tl.store(optr, y, mask=mt)
            hend = tl.sum(tl.where(rt[None, None, :] == T - 1, h, 0.0), axis=2)
            nxt = j + 1
            if ALL_STATES:
                tl.store(sptr + N, hend, mask=m2 & (nxt < j1))
            else:
                tl.store(sptr, hend, mask=m2 & (nxt < j1))
            if SAVE_LAST:
                tl.store(last_ptr + (b * d + c[:, None]) * N + rn[None, :], hend, mask=m2 & (nxt == n_chunks))
        tl.debug_barrier()


# ------------------------------------------------------------------------------------------------------------------
# backward


@triton.jit
def _bwd_seg_kernel(dt_ptr, z_ptr, g_ptr, A_ptr, bias_ptr, C_ptr, segg_ptr, segd_ptr,
                    L, d, dg, N, n_chunks, cps, n_seg, cbg,
                    s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_Cb, s_Cg, s_Cn, s_Cl,
                    Q1, Q2, R0, R1, R2,
                    HAS_MAP: tl.constexpr, FLIP: tl.constexpr, C_VAR: tl.constexpr, HAS_Z: tl.constexpr,
                    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                    T: tl.constexpr, CPB: tl.constexpr):
    """Per segment (all but the first): the gradient state at its start from its own outputs only (zero entering
    from the right), and the summed dt over (segment start, next segment start]."""
    seg = tl.program_id(0) + 1
    cb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = cb // cbg
    cbi = cb % cbg
    rd = tl.arange(0, BD)
    rn = tl.arange(0, BN)
    rt = tl.arange(0, T)
    nm = rn < N
    j0 = seg * cps
    j1 = tl.minimum(j0 + cps, n_chunks)
    for s in range(CPB):
        cl = cbi * (CPB * BD) + s * BD + rd
        cm = cl < dg
        c = g * dg + cl
        m2 = cm[:, None] & nm[None, :]
        A2 = tl.load(A_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0) * LOG2E
        bias = tl.load(bias_ptr + c, mask=cm, other=0.0) if HAS_BIAS else None
        E = tl.zeros((BD, BN), tl.float32)
        dec = tl.zeros((BD,), tl.float32)
        for jj in range(0, j1 - j0):
            j = j1 - 1 - jj
            l = j * T + rt
            lm = l < L
            off = _pos(l, L, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
            mt = cm[:, None] & lm[None, :]
            dt, _ = _load_dt(dt_ptr + b * s_db + c[:, None] * s_dd + off[None, :] * s_dl, mt, bias, HAS_BIAS,
                             SOFTPLUS)
            ln = j * T + T
            offn = _pos(ln, L, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
            mn = cm & (ln < L)
            dn, _ = _load_dt((dt_ptr + b * s_db + c * s_dd + offn * s_dl)[:, None], mn[:, None], bias, HAS_BIAS,
                             SOFTPLUS)
            dn = tl.sum(dn, axis=1)
            gy = tl.load(g_ptr + b * s_gb + c[:, None] * s_gd + off[None, :] * s_gl, mask=mt, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + b * s_zb + c[:, None] * s_zd + off[None, :] * s_zl, mask=mt,
                             other=0.0).to(tl.float32)
                gy = gy * (zz * tl.sigmoid(zz))
            if C_VAR:
                Cx = tl.load(C_ptr + b * s_Cb + g * s_Cg + rn[:, None] * s_Cn + off[None, :] * s_Cl,
                             mask=nm[:, None] & lm[None, :], other=0.0).to(tl.float32)[None, :, :]
            else:
                Cx = tl.load(C_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
            d0 = tl.sum(tl.where(rt[None, :] == 0, dt, 0.0), axis=1)
            S = tl.cumsum(dt, axis=1) - d0[:, None]  # sum of dt over (chunk start, t]
            w = tl.exp2(A2[:, :, None] * S[:, None, :])
            span = tl.sum(dt, axis=1) - d0 + dn  # sum of dt over (chunk start, next chunk start]
            E = tl.sum(w * (gy[:, None, :] * Cx), axis=2) + tl.exp2(A2 * span[:, None]) * E
            dec += span
        tl.store(segg_ptr + ((b * d + c[:, None]) * n_seg + seg) * N + rn[None, :], E, mask=m2)
        tl.store(segd_ptr + (b * d + c) * n_seg + seg, dec, mask=cm)


@triton.jit
def _bwd_kernel(u_ptr, dt_ptr, z_ptr, g_ptr, A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr,
                hs_ptr, glast_ptr, segg_ptr, segd_ptr, escr_ptr,
                gu_ptr, gdt_ptr, gz_ptr, gBp_ptr, gCp_ptr, gAp_ptr, gDp_ptr, gbp_ptr,
                L, d, dg, N, n_chunks, cps, n_seg, cbg,
                s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
                s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl,
                s_pc, s_pb, s_pg, s_pn,
                Q1, Q2, R0, R1, R2,
                HAS_MAP: tl.constexpr, FLIP: tl.constexpr, B_VAR: tl.constexpr, C_VAR: tl.constexpr,
                HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
                HAS_GLAST: tl.constexpr, GU_ACCUM: tl.constexpr,
                BD: tl.constexpr, BN: tl.constexpr, T: tl.constexpr, CPB: tl.constexpr):
    seg = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = cb // cbg
    cbi = cb % cbg
    prow = b * n_seg + seg  # row of the per-program partial sums (gA, gD, gbias, constant gB/gC)
    rd = tl.arange(0, BD)
    rn = tl.arange(0, BN)
    rt = tl.arange(0, T)
    nm = rn < N
    j0 = seg * cps
    j1 = tl.minimum(j0 + cps, n_chunks)
    # gradient state entering the segment from the right: fold the later segments' summaries
    for s in range(CPB):
        cl = cbi * (CPB * BD) + s * BD + rd
        cm = cl < dg
        c = g * dg + cl
        m2 = cm[:, None] & nm[None, :]
        A2 = tl.load(A_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0) * LOG2E
        if HAS_GLAST:
            E = tl.load(glast_ptr + (b * d + c[:, None]) * N + rn[None, :], mask=m2, other=0.0)
        else:
            E = tl.zeros((BD, BN), tl.float32)
        for i in range(0, n_seg - 1 - seg):
            sp = n_seg - 1 - i
            sd = tl.load(segd_ptr + (b * d + c) * n_seg + sp, mask=cm, other=0.0)
            E = tl.exp2(A2 * sd[:, None]) * E + tl.load(segg_ptr + ((b * d + c[:, None]) * n_seg + sp) * N
                                                        + rn[None, :], mask=m2, other=0.0)
        tl.store(escr_ptr + ((b * d + c[:, None]) * n_seg + seg) * N + rn[None, :], E, mask=m2)
    tl.debug_barrier()
    for jj in range(0, j1 - j0):
        j = j1 - 1 - jj
        l = j * T + rt
        lm = l < L
        off = _pos(l, L, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
        lnx = l + 1
        lnm = lnx < L
        offn = _pos(lnx, L, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
        if B_VAR:
            Bt = tl.load(B_ptr + b * s_Bb + g * s_Bg + rn[:, None] * s_Bn + off[None, :] * s_Bl,
                         mask=nm[:, None] & lm[None, :], other=0.0).to(tl.float32)[None, :, :]
            gBacc = tl.zeros((1, BN, T), tl.float32)
        if C_VAR:
            Ct = tl.load(C_ptr + b * s_Cb + g * s_Cg + rn[:, None] * s_Cn + off[None, :] * s_Cl,
                         mask=nm[:, None] & lm[None, :], other=0.0).to(tl.float32)[None, :, :]
            gCacc = tl.zeros((1, BN, T), tl.float32)
        for s in range(CPB):
            cl = cbi * (CPB * BD) + s * BD + rd
            cm = cl < dg
            c = g * dg + cl
            m2 = cm[:, None] & nm[None, :]
            mt = cm[:, None] & lm[None, :]
            Af = tl.load(A_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0)
            A2 = Af * LOG2E
            bias = tl.load(bias_ptr + c, mask=cm, other=0.0) if HAS_BIAS else None
            u = tl.load(u_ptr + b * s_ub + c[:, None] * s_ud + off[None, :] * s_ul, mask=mt, other=0.0).to(tl.float32)
            dt, raw = _load_dt(dt_ptr + b * s_db + c[:, None] * s_dd + off[None, :] * s_dl, mt, bias, HAS_BIAS,
                               SOFTPLUS)
            dtn, _ = _load_dt(dt_ptr + b * s_db + c[:, None] * s_dd + offn[None, :] * s_dl, cm[:, None] & lnm[None, :],
                              bias, HAS_BIAS, SOFTPLUS)
            go = tl.load(g_ptr + b * s_gb + c[:, None] * s_gd + off[None, :] * s_gl, mask=mt, other=0.0).to(tl.float32)
            if B_VAR:
                Bx = Bt
            else:
                Bx = tl.load(B_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
            if C_VAR:
                Cx = Ct
            else:
                Cx = tl.load(C_ptr + c[:, None] * N + rn[None, :], mask=m2, other=0.0).to(tl.float32)[:, :, None]
            # recompute the chunk's states from the saved chunk-start state
            a = tl.exp2(dt[:, None, :] * A2[:, :, None])
            du = dt * u
            x = du[:, None, :] * Bx
            P, X = tl.associative_scan((a, x), axis=2, combine_fn=_combine)
            h0 = tl.load(hs_ptr + ((b * d + c[:, None]) * n_chunks + j) * N + rn[None, :], mask=m2, other=0.0)
            h = P * h0[:, :, None] + X
            if HAS_D:
                Dv = tl.load(D_ptr + c, mask=cm, other=0.0)
            if HAS_Z:
                zz = tl.load(z_ptr + b * s_zb + c[:, None] * s_zd + off[None, :] * s_zl, mask=mt,
                             other=0.0).to(tl.float32)
                y = tl.sum(h * Cx, axis=1)
                if HAS_D:
                    y += Dv[:, None] * u
                sg = tl.sigmoid(zz)
                gy = go * (zz * sg)
                gz = go * y * sg * (1.0 + zz * (1.0 - sg))
                tl.store(gz_ptr + b * s_zb + c[:, None] * s_zd + off[None, :] * s_zl, gz, mask=mt)
            else:
                gy = go
            # reverse scan for the state gradient: g_t = C_t gy_t + a_{t+1} g_{t+1}
            an = tl.exp2(dtn[:, None, :] * A2[:, :, None])
            q = gy[:, None, :] * Cx
            Pr, G = tl.associative_scan((an, q), axis=2, combine_fn=_combine, reverse=True)
            eptr = escr_ptr + ((b * d + c[:, None]) * n_seg + seg) * N + rn[None, :]
            E = tl.load(eptr, mask=m2, other=0.0)
            gh = Pr * E[:, :, None] + G
            tl.store(eptr, tl.sum(tl.where(rt[None, None, :] == 0, gh, 0.0), axis=2), mask=m2)
            ghB = tl.sum(gh * Bx, axis=1)
            ghx = gh * (h - x)  # = g_t * a_t * h_{t-1}
            gdt = u * ghB + tl.sum(ghx * Af[:, :, None], axis=1)
            gu = dt * ghB
            if HAS_D:
                gu += Dv[:, None] * gy
            if SOFTPLUS:
                gdt = gdt * tl.where(raw > 20.0, 1.0, tl.sigmoid(raw))
            gdt = tl.where(mt, gdt, 0.0)
            uptr = gu_ptr + b * s_ub + c[:, None] * s_ud + off[None, :] * s_ul
            if GU_ACCUM:
                gu += tl.load(uptr, mask=mt, other=0.0).to(tl.float32)
            tl.store(uptr, gu, mask=mt)
            tl.store(gdt_ptr + b * s_db + c[:, None] * s_dd + off[None, :] * s_dl, gdt, mask=mt)
            pptr = gAp_ptr + (prow * d + c[:, None]) * N + rn[None, :]
            tl.store(pptr, tl.load(pptr, mask=m2, other=0.0) + tl.sum(ghx * dt[:, None, :], axis=2), mask=m2)
            if HAS_D:
                dptr = gDp_ptr + prow * d + c
                tl.store(dptr, tl.load(dptr, mask=cm, other=0.0) + tl.sum(gy * u, axis=1), mask=cm)
            if HAS_BIAS:
                bptr = gbp_ptr + prow * d + c
                tl.store(bptr, tl.load(bptr, mask=cm, other=0.0) + tl.sum(gdt, axis=1), mask=cm)
            if B_VAR:
                gBacc += tl.sum(gh * du[:, None, :], axis=0, keep_dims=True)
            else:
                pptr = gBp_ptr + (prow * d + c[:, None]) * N + rn[None, :]
                tl.store(pptr, tl.load(pptr, mask=m2, other=0.0) + tl.sum(gh * du[:, None, :], axis=2), mask=m2)
            if C_VAR:
                gCacc += tl.sum(h * gy[:, None, :], axis=0, keep_dims=True)
            else:
                pptr = gCp_ptr + (prow * d + c[:, None]) * N + rn[None, :]
                tl.store(pptr, tl.load(pptr, mask=m2, other=0.0) + tl.sum(h * gy[:, None, :], axis=2), mask=m2)
        pm = (nm[:, None] & lm[None, :])[None, :, :]
        pofs = cbi * s_pc + b * s_pb + g * s_pg + rn[None, :, None] * s_pn + off[None, None, :]
        if B_VAR:
            tl.store(gBp_ptr + pofs, gBacc, mask=pm)
        if C_VAR:
            tl.store(gCp_ptr + pofs, gCacc, mask=pm)
        tl.debug_barrier()


# ------------------------------------------------------------------------------------------------------------------
# host side: launch planning


@dataclass
class Plan:
    T: int  # chunk length
    BD: int  # channels per register tile
    CPB: int  # channel sub-tiles per program
    cbg: int  # channel blocks (programs) per group
    n_chunks: int
    cps: int  # chunks per segment
    n_seg: int
    num_warps: int


def _pow2(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _n_sm(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: any small number


# Tuning overrides (benchmark sweeps / tests): a dict merged into the plan's choices.
_OVERRIDE: dict = {}


def set_tuning(**kw):
    """Override plan choices (T, BD, CPB_fwd, CPB_bwd, n_seg_fwd, n_seg_bwd, num_warps, programs). Empty resets."""
    _OVERRIDE.clear()
    _OVERRIDE.update({k: v for k, v in kw.items() if v is not None})


def make_plan(b, G, dg, L, N, device, backward: bool) -> Plan:
    """Chunk length, tile and work split for a (b, G groups of dg channels, L, N) scan.

    The machine is filled with ``target`` programs. Forward: one register tile of channels per program and as many
    segments as needed. Backward: a program loops over ``CPB`` channel sub-tiles so that the B/C gradients are summed
    in registers; at most ``cbg_max`` channel blocks per group (their B/C partial sums are added afterwards), then
    segments to fill the machine (each costs a reduction pass)."""
    o = _OVERRIDE
    BN = _pow2(N)
    # defaults = the best of the launch-plan sweep on an H100 (kernels/BENCHMARK.md): T=32, BD=4, 4 warps
    T = o.get("T") or (32 if BN <= 16 else 16)
    T = max(16, min(T, _pow2(L)))
    BD = o.get("BD") or max(1, min(8, 2048 // (BN * T)))
    BD = max(1, min(BD, _pow2(dg)))
    n_sub = -(-dg // BD)
    n_chunks = -(-L // T)
    target = o.get("programs") or 8 * _n_sm(device)
    if backward:
        CPB = o.get("CPB_bwd")
        if CPB is None:
            cbg = max(1, min(-(-target // (b * G)), n_sub, o.get("cbg_max", 8)))
            CPB = -(-n_sub // cbg)
    else:
        CPB = o.get("CPB_fwd") or 1
    CPB = max(1, min(CPB, n_sub))
    cbg = -(-n_sub // CPB)
    n_seg = o.get("n_seg_bwd" if backward else "n_seg_fwd")
    if n_seg is None:
        n_seg = -(-target // (b * G * cbg))
    n_seg = max(1, min(n_seg, n_chunks))
    cps = -(-n_chunks // n_seg)
    n_seg = -(-n_chunks // cps)
    nw = o.get("num_warps") or (4 if BD * BN * T <= 2048 else 8)
    return Plan(T, BD, CPB, cbg, n_chunks, cps, n_seg, nw)


# ------------------------------------------------------------------------------------------------------------------
# host side: one scan pass over (b, d, L) tensors, optionally through a position map


@dataclass
class _Order:
    """Position map: sequence position l -> element offset; None = identity."""
    Q1: int = 1
    Q2: int = 1
    R0: int = 0
    R1: int = 0
    R2: int = 0
    flip: bool = False
    has_map: bool = False


_IDENTITY = _Order()


def _order_for(spatial: Sequence[int], perm: Sequence[int], flip: bool) -> _Order:
    nd = len(spatial)
    if nd > 3:
        raise ValueError(f"fused cross scan supports 1-3 spatial dims, got {nd}; use backend='torch' for more")
    sp = [1] * (3 - nd) + list(spatial)
    pm = list(range(3 - nd)) + [3 - nd + p for p in perm]
    strides = [sp[1] * sp[2], sp[2], 1]
    Q = [sp[p] for p in pm]
    R = [strides[p] for p in pm]
    return _Order(Q[1], Q[2], R[0], R[1], R[2], bool(flip), True)


def _bc_strides(X, is_var):
    """Strides (b, g, n, l) of a varying B/C viewed as (b, G, N, L); zeros for the constant layout."""
    if not is_var:
        return 0, 0, 0, 0
    return X.stride(0), X.stride(1), X.stride(2), X.stride(3)


def _fwd(u, dt, A, B, C, D, z, bias, softplus, out, G, order, accum, all_states, want_last, plan):
    """One forward launch sequence. u, dt, z, out: (b, d, L)-strided; B, C: (b, G, N, L) views or (d, N)."""
    b, d, L = u.shape
    N = A.shape[1]
    dg = d // G
    BN = _pow2(N)
    dev = u.device
    B_VAR, C_VAR = B.dim() == 4, C.dim() == 4
    hs_rows = plan.n_chunks if all_states else plan.n_seg
    hs = torch.empty(b, d, hs_rows, N, device=dev, dtype=torch.float32)
    last = torch.empty(b, d, N, device=dev, dtype=torch.float32) if want_last else hs
    grid = (plan.n_seg, G * plan.cbg, b)
    dummy = hs
    if plan.n_seg > 1:
        segh = torch.empty(b, d, plan.n_seg, N, device=dev, dtype=torch.float32)
        segs = torch.empty(b, d, plan.n_seg, device=dev, dtype=torch.float32)
        _fwd_seg_kernel[(plan.n_seg - 1, G * plan.cbg, b)](
            u, dt, A, bias if bias is not None else dummy, B, segh, segs,
            L, d, dg, N, plan.n_chunks, plan.cps, plan.n_seg, plan.cbg,
            u.stride(0), u.stride(1), u.stride(2), dt.stride(0), dt.stride(1), dt.stride(2), *_bc_strides(B, B_VAR),
            order.Q1, order.Q2, order.R0, order.R1, order.R2,
            HAS_MAP=order.has_map, FLIP=order.flip, B_VAR=B_VAR, HAS_BIAS=bias is not None, SOFTPLUS=softplus,
            BD=plan.BD, BN=BN, T=plan.T, CPB=plan.CPB, num_warps=plan.num_warps)
    else:
        segh = segs = dummy
    zz = z if z is not None else u
    _fwd_kernel[grid](
        u, dt, zz, out, A, D if D is not None else dummy, bias if bias is not None else dummy, B, C,
        hs, last, segh, segs,
        L, d, dg, N, plan.n_chunks, plan.cps, plan.n_seg, plan.cbg, hs_rows,
        u.stride(0), u.stride(1), u.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
        zz.stride(0), zz.stride(1), zz.stride(2), out.stride(0), out.stride(1), out.stride(2),
        *_bc_strides(B, B_VAR), *_bc_strides(C, C_VAR),
        order.Q1, order.Q2, order.R0, order.R1, order.R2,
        HAS_MAP=order.has_map, FLIP=order.flip, B_VAR=B_VAR, C_VAR=C_VAR, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=bias is not None, SOFTPLUS=softplus, ACCUM=accum, ALL_STATES=all_states, SAVE_LAST=want_last,
        BD=plan.BD, BN=BN, T=plan.T, CPB=plan.CPB, num_warps=plan.num_warps)
    return hs, (last if want_last else None)


def _bwd(u, dt, z, gout, A, D, B, C, bias, softplus, hs, glast, G, order, gu, gdt, gz, gu_accum, plan, T):
    """One backward launch sequence. Returns fp32 (gA, gB, gC, gD, gbias) partial sums reduced to their shapes
    (gB/gC varying: (b, G, N, L-positions) in the position layout of ``order``)."""
    b, d, L = u.shape
    N = A.shape[1]
    dg = d // G
    BN = _pow2(N)
    dev = u.device
    f32 = torch.float32
    B_VAR, C_VAR = B.dim() == 4, C.dim() == 4
    assert plan.T == T and plan.n_chunks == hs.shape[2]
    rows = b * plan.n_seg
    gAp = torch.zeros(rows, d, N, device=dev, dtype=f32)
    gDp = torch.zeros(rows, d, device=dev, dtype=f32) if D is not None else gAp
    gbp = torch.zeros(rows, d, device=dev, dtype=f32) if bias is not None else gAp
    Lpos = B.shape[3] if B_VAR else (C.shape[3] if C_VAR else L)
    # B/C partials over channel blocks; position layout = that of the map (identity: contiguous L)
    npos = L if not order.has_map else Lpos
    gBp = (torch.empty(plan.cbg, b, G, N, npos, device=dev, dtype=f32) if B_VAR
           else torch.zeros(rows, d, N, device=dev, dtype=f32))
    gCp = (torch.empty(plan.cbg, b, G, N, npos, device=dev, dtype=f32) if C_VAR
           else torch.zeros(rows, d, N, device=dev, dtype=f32))
    if B_VAR or C_VAR:
        ref = gBp if B_VAR else gCp
        s_p = (ref.stride(0), ref.stride(1), ref.stride(2), ref.stride(3))
    else:
        s_p = (0, 0, 0, 0)
    dummy = gAp
    if plan.n_seg > 1:
        segg = torch.empty(b, d, plan.n_seg, N, device=dev, dtype=f32)
        segd = torch.empty(b, d, plan.n_seg, device=dev, dtype=f32)
        zz = z if z is not None else dt
        _bwd_seg_kernel[(plan.n_seg - 1, G * plan.cbg, b)](
            dt, zz, gout, A, bias if bias is not None else dummy, C, segg, segd,
            L, d, dg, N, plan.n_chunks, plan.cps, plan.n_seg, plan.cbg,
            dt.stride(0), dt.stride(1), dt.stride(2), zz.stride(0), zz.stride(1), zz.stride(2),
            gout.stride(0), gout.stride(1), gout.stride(2), *_bc_strides(C, C_VAR),
            order.Q1, order.Q2, order.R0, order.R1, order.R2,
            HAS_MAP=order.has_map, FLIP=order.flip, C_VAR=C_VAR, HAS_Z=z is not None, HAS_BIAS=bias is not None,
            SOFTPLUS=softplus, BD=plan.BD, BN=BN, T=plan.T, CPB=plan.CPB, num_warps=plan.num_warps)
    else:
        segg = segd = dummy
    escr = torch.empty(b, d, plan.n_seg, N, device=dev, dtype=f32)
    zz = z if z is not None else u
    gzz = gz if gz is not None else gu
    _bwd_kernel[(plan.n_seg, G * plan.cbg, b)](
        u, dt, zz, gout, A, D if D is not None else dummy, bias if bias is not None else dummy, B, C,
        hs, glast if glast is not None else dummy, segg, segd, escr,
        gu, gdt, gzz, gBp, gCp, gAp, gDp, gbp,
        L, d, dg, N, plan.n_chunks, plan.cps, plan.n_seg, plan.cbg,
        u.stride(0), u.stride(1), u.stride(2), dt.stride(0), dt.stride(1), dt.stride(2),
        zz.stride(0), zz.stride(1), zz.stride(2), gout.stride(0), gout.stride(1), gout.stride(2),
        *_bc_strides(B, B_VAR), *_bc_strides(C, C_VAR), *s_p,
        order.Q1, order.Q2, order.R0, order.R1, order.R2,
        HAS_MAP=order.has_map, FLIP=order.flip, B_VAR=B_VAR, C_VAR=C_VAR, HAS_D=D is not None, HAS_Z=z is not None,
        HAS_BIAS=bias is not None, SOFTPLUS=softplus, HAS_GLAST=glast is not None, GU_ACCUM=gu_accum,
        BD=plan.BD, BN=BN, T=plan.T, CPB=plan.CPB, num_warps=plan.num_warps)
    gA = gAp.sum(0)
    gD = gDp.sum(0) if D is not None else None
    gbias = gbp.sum(0) if bias is not None else None
    gB = gBp.sum(0) if B_VAR else gBp.sum(0)
    gC = gCp.sum(0) if C_VAR else gCp.sum(0)
    return gA, gB, gC, gD, gbias


# ------------------------------------------------------------------------------------------------------------------
# autograd: plain selective scan


def _contig(t):
    return t if t is None else t.contiguous()


def _grouped_bc(X, b, d, L):
    """(d, N) stays 2-D (constant); (b, N, L) -> (b, 1, N, L) view; (b, G, N, L) as is."""
    if X.dim() == 2:
        return X.float().contiguous()
    if X.dim() == 3:
        return X.unsqueeze(1)
    return X


class _ScanFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, want_last):
        b, d, L = u.shape
        N = A.shape[1]
        Bg, Cg = _grouped_bc(B, b, d, L), _grouped_bc(C, b, d, L)
        G = Bg.shape[1] if Bg.dim() == 4 else (Cg.shape[1] if Cg.dim() == 4 else 1)
        if Bg.dim() == 4 and Cg.dim() == 4 and Bg.shape[1] != Cg.shape[1]:
            raise ValueError(f"selective_scan: B has {Bg.shape[1]} groups but C has {Cg.shape[1]}")
        if d % G:
            raise ValueError(f"selective_scan: dim {d} is not divisible by the number of B/C groups {G}")
        Af = A.float().contiguous()
        Df = D.float().contiguous() if D is not None else None
        bf = delta_bias.float().contiguous() if delta_bias is not None else None
        out = torch.empty(b, d, L, device=u.device, dtype=u.dtype)
        need_grad = any(ctx.needs_input_grad)
        fplan = make_plan(b, G, d // G, L, N, u.device, backward=False)
        hs, last = _fwd(u, delta, Af, Bg, Cg, Df, z, bf, softplus, out, G, _IDENTITY, False, need_grad, True, fplan)
        ctx.save_for_backward(u, delta, Af, B, C, Df, z, bf, hs)
        ctx.cfg = (softplus, G, fplan.T)
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, Af, B, C, Df, z, bf, hs = ctx.saved_tensors
        softplus, G, T = ctx.cfg
        b, d, L = u.shape
        N = Af.shape[1]
        Bg, Cg = _grouped_bc(B, b, d, L), _grouped_bc(C, b, d, L)
        gout = gout.contiguous() if gout is not None else torch.zeros_like(u)
        gu = torch.empty_like(u)
        gdt = torch.empty_like(delta)
        gz = torch.empty_like(z) if z is not None else None
        bplan = make_plan(b, G, d // G, L, N, u.device, backward=True)
        bplan = _with_T(bplan, T, L)
        gA, gB, gC, gD, gbias = _bwd(u, delta, z, gout, Af, Df, Bg, Cg, bf, softplus, hs,
                                     glast.contiguous() if glast is not None else None, G, _IDENTITY,
                                     gu, gdt, gz, False, bplan, T)
        gB = gB.view(B.shape).to(B.dtype)
        gC = gC.view(C.shape).to(C.dtype)
        return (gu, gdt, gA, gB, gC, gD, gz, gbias, None, None)


def _with_T(plan: Plan, T: int, L: int) -> Plan:
    """The backward must use the forward's chunk length (the saved states are per chunk)."""
    if plan.T == T:
        return plan
    n_chunks = -(-L // T)
    n_seg = max(1, min(plan.n_seg, n_chunks))
    cps = -(-n_chunks // n_seg)
    return Plan(T, plan.BD, plan.CPB, plan.cbg, n_chunks, cps, -(-n_chunks // cps), plan.num_warps)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """mamba-ssm ``selective_scan_fn`` semantics on the Triton kernels (see module docstring)."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got {tuple(u.shape)}")
    if A.is_complex():
        raise NotImplementedError("selective_scan (triton): complex A is not supported; use backend='torch'")
    u, delta, z = _contig(u), _contig(delta), _contig(z)
    if delta.shape != u.shape or (z is not None and z.shape != u.shape):
        raise ValueError("selective_scan: u, delta (and z) must have the same (batch, dim, L) shape")
    out, last = _ScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(return_last_state))
    return (out, last) if return_last_state else out


# ------------------------------------------------------------------------------------------------------------------
# autograd: fused multi-direction (cross) scan


class _CrossFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, delta_bias, softplus, orders):
        b, d = x.shape[:2]
        spatial = tuple(x.shape[2:])
        L = math.prod(spatial)
        K = len(orders)
        N = A.shape[1]
        xs = x.reshape(b, d, L)
        ds = delta.reshape(b, K, d, L)
        Bs = B.reshape(b, K, N, L)
        Cs = C.reshape(b, K, N, L)
        Af = A.float().contiguous()
        Df = D.float().contiguous() if D is not None else None
        bf = delta_bias.float().contiguous() if delta_bias is not None else None
        out = torch.empty(b, d, L, device=x.device, dtype=torch.float32)
        need_grad = any(ctx.needs_input_grad)
        plan = make_plan(b, 1, d, L, N, x.device, backward=False)
        states = []
        for k, (perm, flip) in enumerate(orders):
            o = _order_for(spatial, perm, flip)
            hs, _ = _fwd(xs, ds[:, k], Af[k * d:(k + 1) * d], Bs[:, k:k + 1], Cs[:, k:k + 1],
                         Df[k * d:(k + 1) * d] if Df is not None else None, None,
                         bf[k * d:(k + 1) * d] if bf is not None else None, softplus, out, 1, o, k > 0, need_grad,
                         False, plan)
            states.append(hs)
        ctx.save_for_backward(x, delta, Af, B, C, Df, bf, *states)
        ctx.cfg = (softplus, list(orders), plan.T)
        return out.view(b, d, *spatial)

    @staticmethod
    def backward(ctx, gout):
        x, delta, Af, B, C, Df, bf, *states = ctx.saved_tensors
        softplus, orders, T = ctx.cfg
        b, d = x.shape[:2]
        spatial = tuple(x.shape[2:])
        L = math.prod(spatial)
        K = len(orders)
        N = Af.shape[1]
        f32 = torch.float32
        xs = x.reshape(b, d, L)
        ds = delta.reshape(b, K, d, L)
        Bs = B.reshape(b, K, N, L)
        Cs = C.reshape(b, K, N, L)
        go = gout.reshape(b, d, L).contiguous()
        gx = torch.empty(b, d, L, device=x.device, dtype=f32)
        gdelta = torch.empty(b, K, d, L, device=x.device, dtype=f32)
        gA = torch.empty_like(Af)
        gB = torch.empty(b, K, N, L, device=x.device, dtype=f32)
        gC = torch.empty(b, K, N, L, device=x.device, dtype=f32)
        gD = torch.empty_like(Df) if Df is not None else None
        gbias = torch.empty_like(bf) if bf is not None else None
        plan = _with_T(make_plan(b, 1, d, L, N, x.device, backward=True), T, L)
        for k, (perm, flip) in enumerate(orders):
            o = _order_for(spatial, perm, flip)
            rows = slice(k * d, (k + 1) * d)
            gAk, gBk, gCk, gDk, gbk = _bwd(
                xs, ds[:, k], None, go, Af[rows], Df[rows] if Df is not None else None, Bs[:, k:k + 1],
                Cs[:, k:k + 1], bf[rows] if bf is not None else None, softplus, states[k], None, 1, o,
                gx, gdelta[:, k], None, k > 0, plan, T)
            gA[rows] = gAk
            gB[:, k] = gBk[:, 0]
            gC[:, k] = gCk[:, 0]
            if gD is not None:
                gD[rows] = gDk
            if gbias is not None:
                gbias[rows] = gbk
        return (gx.view(x.shape).to(x.dtype), gdelta.view(delta.shape).to(delta.dtype), gA,
                gB.view(B.shape).to(B.dtype), gC.view(C.shape).to(C.dtype), gD, gbias, None, None)


def cross_selective_scan_triton(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, orders=None):
    """Fused multi-direction scan (``nnunet_mamba.ops.cross_selective_scan`` semantics): reads the map ``x``
    (b, d, *S) and the per-direction ``delta`` (b, K, d, *S), ``B``/``C`` (b, K, N, *S) in every scan order by index
    arithmetic and returns the fp32 sum over directions, (b, d, *S). No re-ordered copies are made."""
    if orders is None:
        raise ValueError("cross_selective_scan_triton needs the scan orders (nnunet_mamba.ops.cross_scan_orders)")
    orders = [(tuple(p), bool(f)) for p, f in orders]
    K = len(orders)
    b, d = x.shape[:2]
    spatial = tuple(x.shape[2:])
    N = A.shape[1]
    if delta.shape != (b, K, d, *spatial) or B.shape != (b, K, N, *spatial) or C.shape != B.shape:
        raise ValueError(f"cross_selective_scan: expected delta {(b, K, d, *spatial)} and B/C {(b, K, N, *spatial)}, "
                         f"got {tuple(delta.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")
    if A.shape != (K * d, N):
        raise ValueError(f"cross_selective_scan: A must be (K*d, N) = {(K * d, N)}, got {tuple(A.shape)}")
    # the spatial block of each tensor must be contiguous (batch/direction/channel strides are free)
    x = x.contiguous()
    delta = delta.contiguous()
    B = B if _spatial_contig(B) else B.contiguous()
    C = C if _spatial_contig(C) else C.contiguous()
    return _CrossFn.apply(x, delta, A, B, C, D, delta_bias, bool(delta_softplus), orders)


def _spatial_contig(X):
    """True when the trailing spatial block of a (b, K, N, *S) tensor is dense (row-major)."""
    step = 1
    for size, stride in zip(reversed(X.shape[3:]), reversed(X.stride()[3:])):
        if size != 1 and stride != step:
            return False
        step *= size
    return True
