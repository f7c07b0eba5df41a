"""Selective scan in Triton, serial in time inside a thread: forward and backward, plain and fused multi-direction.

Math (mamba-ssm ``selective_scan_fn`` semantics, specs/mamba_block.md §4), per batch ``b``, channel ``c``, state ``n``:

    dt_t   = softplus(delta_t + bias)                    (or delta_t + bias without softplus)
    a_t    = exp(dt_t * A[c, n])        x_t = dt_t * B_t[n] * u_t
    h_t    = a_t * h_{t-1} + x_t        (h_{-1} = 0, fp32)
    y_t    = sum_n C_t[n] h_t[n] + D u_t ;   out_t = y_t * silu(z_t)

Layout (docs/kernels.md): a program owns ``BD`` channels of one batch element and one **chunk** of ``T`` steps, and
holds their ``(BN, BD)`` fp32 state (states x channels). In the forward and ``_bsum_kernel`` it is a channel per lane
(``SPREAD``): a thread holds the states of one channel, every sum over ``n`` stays in the thread, and each step's
B/C column is loaded once per warp and shared through shared memory. ``_bwd_kernel`` keeps the layout Triton
chooses for aligned channels-fastest tiles, 4 channels per thread and the states over 4 lanes, because its per-step
B/C gradients are sums over the channels. It advances the state one step per loop iteration: one exp2 and two FMAs
per element and step, no cross-thread scan; the step loops' loads are software-pipelined. Chunks run in parallel:

* **Forward**: ``_chunk_kernel`` (no output) gives each chunk's end state from a zero entering state and its summed
  dt; ``_carry_kernel`` walks the chunk summaries in order, ``H_{j+1} = exp(A S_j) H_j + h_j`` (b*d*N independent
  recurrences, in parallel; from 64 chunks in groups, the groups' composites first), giving every chunk's entering
  state; ``_chunk_kernel`` (output) runs each chunk again from that state and writes ``y``. The entering states
  (b, d, chunks, N) are kept for the backward pass.
* **Backward**: ``_bsum_kernel`` walks each chunk backwards from a zero carry, ``G_t = C_t dy_t + a_{t+1} G_{t+1}``,
  and ``_carry_kernel`` (reversed) gives the carry entering every chunk from the right (the last chunk gets the
  gradient of the last state). ``_bwd_kernel`` then walks its chunk forward once, writing the state entering every
  segment of ``S`` steps to a scratch buffer, and walks the segments backwards, re-walking each into a per-program
  buffer of its blocks' entering states when ``S > F``, and its blocks backwards: it recomputes a block's ``F``
  states into registers (a tuple) and runs the reverse recurrence over them, writing du, d(delta), dz and the
  per-step B/C gradients (summed over the program's channels; the channel blocks' partials summed in one pass,
  ``_block_sum_kernel``) and accumulating dA, dD, d(bias) (per program, reduced in one pass).
  ``G_t a_t h_{t-1}`` is formed from the stored ``h_{t-1}``, so there is no cancellation. No atomics: results are
  bitwise repeatable.
* **Low-rank delta** (``delta_proj_weight``, constexpr ``DT_LOW``): delta = W v_t formed per step from the step's R
  values v_t (the Mamba mixer's dt_proj); the backward writes the gradient of v (summed over the program's
  channels) and per-program dW partial sums instead of d(delta). Less memory, slower walks (docs/kernels.md).
* **dt kept**: for a full fp32 delta with softplus or a bias, the forward's first pass writes dt = softplus(delta +
  bias) into a buffer of the scan's own (constexpr ``DT_OUT``): the delta itself where the scan owns it (the mixer's
  low-rank delta multiplied out by the op), else a new one (``_dt_buffer``), kept for the backward instead of the
  delta. Every later pass reads it (``DT_DONE``) instead of forming softplus again; the backward takes softplus's
  derivative from dt (``_softplus_grad_of``).
* **Cross (multi-direction) form**: the same kernels with a position map ``l -> spatial offset`` (axis permutation +
  reversal) per scan order; outputs and the gradient of the map are accumulated into one spatial fp32 tensor in
  direction order, so no transposed/flipped copy is made and the sum is deterministic.

Any strides are accepted. Loads and stores along the channels are coalesced when the channel axis is the fastest
one in memory (what a ``Linear`` produces, ``(b, L, d)`` viewed as ``(b, d, L)``), which is the fast case; with
``(b, d, L)``-contiguous tensors every lane reads another row. All state and accumulation is fp32; inputs may be
fp32, bf16 or fp16.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from .launch import cached_launch
from .layout import column_blocks
from .tuning import sm_count, tuning_setter

LOG2E = tl.constexpr(1.4426950408889634)


# ------------------------------------------------------------------------------------------------------------------
# device helpers


@triton.jit
def _softplus(x):
    """x for x > 20, else log1p(exp(x)) (log1p evaluated accurately: log(w) * e / (w - 1), w = 1 + e)."""
    e = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + e
    lp = tl.where(w == 1.0, e, tl.log(w) * (e / (w - 1.0)))
    return tl.where(x > 20.0, x, lp)


@triton.jit
def _softplus_grad_of(dt):
    """sigmoid(x), softplus's derivative, from dt = softplus(x): 1 - exp(-dt), by its Taylor series below 0.5 (no
    cancellation for small dt; the first term left out is below 2.5e-7 of the result; Horner's rule, one FMA per
    term) and 1 - exp(-dt) above. 1 for dt > 20 (dt = x there, as in _softplus). Cheaper than sigmoid(x) from x, and
    needs only dt."""
    k = dt * (1.0 / 5040.0) - (1.0 / 720.0)
    k = dt * k + (1.0 / 120.0)
    k = dt * k - (1.0 / 24.0)
    k = dt * k + (1.0 / 6.0)
    k = dt * k - 0.5
    k = dt * k + 1.0
    return tl.where(dt < 0.5, dt * k, 1.0 - tl.exp2(dt * -1.4426950408889634))


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
def _lane_layout_d(d, one, SPREAD: tl.constexpr):
    """d, with its divisibility hidden from Triton when SPREAD (a channel per lane): a state tile's row offset n * d
    then looks unaligned, so Triton does not vectorise the channels-fastest tile loads and stores 4 channels per
    thread, which (with d a multiple of 16, specialised on the GPU) spreads the states over 4 lanes instead and
    repeats every per-channel computation (softplus, gate, loads) in each of them."""
    if SPREAD:
        return d + (one - 1)
    else:
        return d


@triton.jit
def _program_tile(A_ptr, d, dg, N, cbg, one, BD: tl.constexpr, BN: tl.constexpr):
    """A program's chunk j, batch b, group g, channel block cbi, its channels c (mask cm), the state index rn (and
    rn1 = rn * one: see _chunk_kernel), the (BN, BD) mask m2 and A * log2(e) as a (BN, BD) tile (A given as (N, d))."""
    j = tl.program_id(0)
    cb = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    g = cb // cbg
    cbi = cb % cbg
    cl = cbi * BD + tl.arange(0, BD)
    cm = cl < dg
    c = g * dg + cl
    rn = tl.arange(0, BN)
    rn1 = rn * one
    nm = rn < N
    m2 = nm[:, None] & cm[None, :]
    A2 = tl.load(A_ptr + rn1[:, None] * d + c[None, :], mask=m2, other=0.0) * LOG2E
    return j, b, g, cbi, c, cm, rn, rn1, nm, m2, A2


@triton.jit
def _state_ofs(b, j, n_chunks, N, d, rn1, c):
    """Offsets of a program's (BN, BD) state tile in a (b, chunks, N, d) buffer: channels fastest in memory, so that
    every state tile the kernels load or store is coalesced along the lanes (and Triton lays the tiles out that
    way: the layouts of these loads and stores anchor the layout of the whole loop)."""
    return ((b * n_chunks + j) * N + rn1[:, None]) * d + c[None, :]


@triton.jit
def _dt_operand(dt_ptr, W_ptr, b, c, cm, d, R, one, s_db, s_dd, DT_LOW: tl.constexpr, BR: tl.constexpr):
    """delta for a program: the base pointers of its channels in a full (b, d, L) delta; or, low-rank (delta = W @ v,
    the Mamba mixer's dt_proj inside the scan), the pointers of the R rows of v (b, R, L) and the (BR, BD) tile of
    W given as (R, d). Also the row mask."""
    if DT_LOW:
        rr1 = tl.arange(0, BR) * one  # not contiguous along r to Triton: see _chunk_kernel
        rm = rr1 < R
        Wt = tl.load(W_ptr + rr1[:, None] * d + c[None, :], mask=rm[:, None] & cm[None, :], other=0.0)
        return dt_ptr + b * s_db + rr1 * s_dd, Wt, rm
    else:
        return dt_ptr + b * s_db + c * s_dd, 0.0, cm


@triton.jit
def _step_dt(dt_base, Wt, rm, o, mk, lm, bias, s_dl, DT_LOW: tl.constexpr, HAS_BIAS: tl.constexpr,
             SOFTPLUS: tl.constexpr, DT_DONE: tl.constexpr):
    """One step's dt = softplus(delta + bias) (0 on masked lanes, so a masked step leaves the state alone) and the
    raw delta + bias; delta read, or formed from the step's R low-rank values (_dt_operand). DT_DONE: the operand
    holds dt itself (an earlier pass wrote it over the delta: DT_OUT), returned twice."""
    if DT_LOW:
        raw = tl.sum(Wt * tl.load(dt_base + o * s_dl, mask=rm & lm, other=0.0).to(tl.float32)[:, None], axis=0)
    else:
        raw = tl.load(dt_base + o * s_dl, mask=mk, other=0.0).to(tl.float32)
    if DT_DONE:
        return raw, raw
    if HAS_BIAS:
        raw += bias
    return tl.where(mk, _softplus(raw) if SOFTPLUS else raw, 0.0), raw


@triton.jit
def _bc_operand(X_ptr, b, g, s_b, s_g, c, d, rn1, m2, VAR: tl.constexpr):
    """B or C for a program: the constant (BN, BD) tile of a constant B/C given as (N, d) (0.0 when time-varying) and
    the base pointer of batch b, group g for a time-varying one."""
    const = tl.load(X_ptr + rn1[:, None] * d + c[None, :], mask=m2, other=0.0).to(tl.float32) if not VAR else 0.0
    return const, X_ptr + b * s_b + g * s_g


@triton.jit
def _bc_column(base, const, o, rn, nm, lm, s_n, s_l, VAR: tl.constexpr, SPREAD: tl.constexpr):
    """B_t or C_t: the (BN, 1) column of a time-varying B/C at offset o, or the constant (BN, BD) tile. SPREAD: the
    column is loaded as a (2, BN) tile, the column twice: 2 * BN >= 32 values, at least one per lane, which Triton
    stages through shared memory (one copy per lane, then every lane reads its values with vector loads). A (BN,)
    load has fewer values than lanes, and Triton issues it in every lane that needs the values: BN copies, masks and
    address computations per lane and step with a channel per lane."""
    if VAR:
        if SPREAD:
            rc = tl.arange(0, rn.shape[0])  # visibly contiguous: vector copies where B/C are
            v = tl.load(base + rc[None, :] * s_n + o * s_l + tl.zeros((2, 1), tl.int32), mask=(nm & lm)[None, :],
                        other=0.0).to(tl.float32)
            col, _ = tl.split(tl.trans(v))
            return col[:, None]
        else:
            return tl.load(base + rn * s_n + o * s_l, mask=nm & lm, other=0.0).to(tl.float32)[:, None]
    else:
        return const


@triton.jit
def _step_inputs(u_base, dt_base, Wt, rm, B_base, bias, Bc, o, mk, lm, rn, nm, s_ul, s_dl, s_Bn, s_Bl,
                 DT_LOW: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DT_DONE: tl.constexpr,
                 B_VAR: tl.constexpr, SPREAD: tl.constexpr):
    """One step's u, dt, raw delta + bias (_step_dt) and B (_bc_column)."""
    u = tl.load(u_base + o * s_ul, mask=mk, other=0.0).to(tl.float32)
    dt, raw = _step_dt(dt_base, Wt, rm, o, mk, lm, bias, s_dl, DT_LOW, HAS_BIAS, SOFTPLUS, DT_DONE)
    return u, dt, raw, _bc_column(B_base, Bc, o, rn, nm, lm, s_Bn, s_Bl, B_VAR, SPREAD)


@triton.jit
def _step_at(l, L, cm, Q1, Q2, R0, R1, R2, HAS_MAP: tl.constexpr, FLIP: tl.constexpr):
    """Step l's element offset (_pos), whether it is inside the sequence, and the lane mask."""
    o = _pos(l, L, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
    lm = l < L
    return o, lm, cm & lm


@triton.jit
def _store_channels(ptrs, vals, mask):
    """Store a per-channel vector of _bwd_kernel as a (4, BD) tile whose first row is written: with a channel stride
    of 1 Triton gives that store the register layout of the state tiles (4 channels per thread, the states on 4
    lanes), so a value computed from the tiles' sums over the states is stored without a layout conversion (each
    one a round trip through shared memory behind a barrier). Other strides: a conversion, as a plain store."""
    r = tl.arange(0, 4)[:, None]
    tl.store(ptrs[None, :] + r * 0, tl.broadcast_to(vals[None, :], (4, vals.shape[0])), mask=mask[None, :] & (r == 0))


@triton.jit
def _advance(h, A2, dt, u, Bx):
    """h_t = exp(dt A) h_{t-1} + dt B_t u_t (A2 = A * log2(e))."""
    return tl.exp2(A2 * dt[None, :]) * h + Bx * (dt * u)[None, :]


@triton.jit
def _walk_block(h, l0, L, cm, u_base, dt_base, Wt, rm, B_base, bias, Bc, A2, rn, nm, s_ul, s_dl, s_Bn, s_Bl,
                Q1, Q2, R0, R1, R2, HAS_MAP: tl.constexpr, FLIP: tl.constexpr, DT_LOW: tl.constexpr,
                HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DT_DONE: tl.constexpr, B_VAR: tl.constexpr,
                F: tl.constexpr, SPREAD: tl.constexpr):
    """Walk h over the F steps l0 .. l0+F-1: the F + 1 states (before each step, then after the last) and, per step,
    dt, u, the raw delta + bias and B_t (the backward's block recompute keeps them; its forward walks only need the
    last state)."""
    hs = ()
    dts = ()
    us = ()
    raws = ()
    bxs = ()
    for k in tl.static_range(F):
        o, lm, mk = _step_at(l0 + k, L, cm, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
        u, dt, raw, Bx = _step_inputs(u_base, dt_base, Wt, rm, B_base, bias, Bc, o, mk, lm, rn, nm, s_ul, s_dl,
                                      s_Bn, s_Bl, DT_LOW, HAS_BIAS, SOFTPLUS, DT_DONE, B_VAR, SPREAD)
        hs = hs + (h,)
        h = _advance(h, A2, dt, u, Bx)
        dts = dts + (dt,)
        us = us + (u,)
        raws = raws + (raw,)
        bxs = bxs + (Bx,)
    return hs + (h,), dts, us, raws, bxs


# ------------------------------------------------------------------------------------------------------------------
# kernels


@cached_launch
@triton.jit(do_not_specialize=["one", "T"])
def _chunk_kernel(u_ptr, dt_ptr, dto_ptr, W_ptr, z_ptr, out_ptr, A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr,
                  hin_ptr, hloc_ptr, sloc_ptr, hf_ptr, hf_rs,
                  L, d, dg, N, RK, n_chunks, cbg, one,
                  s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_ob, s_od, s_ol,
                  s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, Q1, Q2, R0, R1, R2,
                  HAS_MAP: tl.constexpr, FLIP: tl.constexpr, ACCUM: tl.constexpr,
                  B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
                  HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DT_DONE: tl.constexpr, DT_OUT: tl.constexpr,
                  OUT: tl.constexpr, SAVE_LAST: tl.constexpr, DT_LOW: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
                  BR: tl.constexpr, T, U: tl.constexpr, STAGES: tl.constexpr, SPREAD: tl.constexpr, SEG: tl.constexpr):
    # SEG > 0 (output pass of a recomputation): also write the state entering every segment of SEG steps to hf, in
    # _bwd_kernel's layout, which then skips its own forward walk. DT_OUT: write each step's dt to dto, a buffer of
    # the scan's own with the delta's strides (the delta itself where the scan owns it); DT_DONE: the delta operand
    # holds dt already.
    # Tiles are (BN, BD): states x channels. Triton derives their register layout from the loads and stores. With
    # SPREAD (N >= 9) it is a channel per lane, so that a thread holds all BN states of its channel, the sums over n
    # stay inside the thread and no per-channel work is repeated: the state tiles are stored channels-fastest
    # (_state_ofs) with rows that look unaligned (_lane_layout_d), the state index is multiplied by the runtime 1
    # `one`, and the B/C columns are shared through shared memory (_bc_column). Otherwise (and in _bwd_kernel,
    # whose B/C gradients are sums over the channels) Triton puts 4 channels in a thread and the states on 4 lanes.
    d = _lane_layout_d(d, one, SPREAD)
    j, b, g, cbi, c, cm, rn, rn1, nm, m2, A2 = _program_tile(A_ptr, d, dg, N, cbg, one, BD, BN)
    bias = tl.load(bias_ptr + c, mask=cm, other=0.0) if HAS_BIAS else 0.0
    if HAS_D:
        Dv = tl.load(D_ptr + c, mask=cm, other=0.0)
    Bc, B_base = _bc_operand(B_ptr, b, g, s_Bb, s_Bg, c, d, rn1, m2, B_VAR)
    Cc, C_base = _bc_operand(C_ptr, b, g, s_Cb, s_Cg, c, d, rn1, m2, C_VAR)
    srow = _state_ofs(b, j, n_chunks, N, d, rn1, c)
    if OUT:
        h = tl.load(hin_ptr + srow, mask=m2, other=0.0)
    else:
        h = tl.zeros((BN, BD), tl.float32)
        ssum = tl.zeros((BD,), tl.float32)
    l0 = j * T
    u_base = u_ptr + b * s_ub + c * s_ud
    dt_base, Wt, rm = _dt_operand(dt_ptr, W_ptr, b, c, cm, d, RK, one, s_db, s_dd, DT_LOW, BR)
    if SEG > 0:
        hf_b = hf_ptr + _state_ofs(b, 0, 1, N, d, rn1, c)
    if DT_OUT:
        dto_base = dto_ptr + b * s_db + c * s_dd
    for t0 in tl.range(0, T, U, num_stages=STAGES):
        for k in tl.static_range(U):
            o, lm, mk = _step_at(l0 + t0 + k, L, cm, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
            u, dt, raw, Bx = _step_inputs(u_base, dt_base, Wt, rm, B_base, bias, Bc, o, mk, lm, rn1, nm, s_ul, s_dl,
                                          s_Bn, s_Bl, DT_LOW, HAS_BIAS, SOFTPLUS, DT_DONE, B_VAR, SPREAD)
            if DT_OUT:  # the later passes read it (DT_DONE)
                tl.store(dto_base + o * s_dl, dt, mask=mk)
            if SEG > 0:
                if k % SEG == 0:  # t0 is a multiple of U: only these k can start a segment
                    tl.store(hf_b + ((l0 + t0 + k) // SEG).to(tl.int64) * hf_rs, h, mask=m2 & ((t0 + k) % SEG == 0))
            h = _advance(h, A2, dt, u, Bx)
            if OUT:
                y = tl.sum(h * _bc_column(C_base, Cc, o, rn1, nm, lm, s_Cn, s_Cl, C_VAR, SPREAD), axis=0)
                if HAS_D:
                    y += Dv * u
                if HAS_Z:
                    zz = tl.load(z_ptr + b * s_zb + c * s_zd + o * s_zl, mask=mk, other=0.0).to(tl.float32)
                    y = y * (zz * tl.sigmoid(zz))
                optr = out_ptr + b * s_ob + c * s_od + o * s_ol
                if ACCUM:
                    y += tl.load(optr, mask=mk, other=0.0).to(tl.float32)
                tl.store(optr, y, mask=mk)
            else:
                ssum += dt
    if OUT:
        if SAVE_LAST:
            tl.store(hloc_ptr + _state_ofs(b, 0, 1, N, d, rn1, c), h, mask=m2 & (j == n_chunks - 1))
    else:
        tl.store(hloc_ptr + srow, h, mask=m2)
        tl.store(sloc_ptr + (b * d + c) * n_chunks + j, ssum, mask=cm)


@cached_launch
@triton.jit
def _carry_kernel(A_ptr, hloc_ptr, sloc_ptr, hin_ptr, init_ptr, gh_ptr, gs_ptr, d, N, n_chunks, KG, n_groups,
                  REV: tl.constexpr, HAS_INIT: tl.constexpr, SUMMARY: tl.constexpr, BD: tl.constexpr,
                  BNC: tl.constexpr, KC: tl.constexpr, STAGES: tl.constexpr):
    """Entering states from the chunk summaries, serial over the chunks. Every (b, n, c) state is its own
    recurrence, so a program takes BNC states x BD channels and the grid covers (groups x channel blocks, b, state
    blocks). Only the multiply-add on the carry is serial: the summaries of KC chunks are loaded (software-pipelined)
    and their exponentials formed before the KC dependent steps.

    Forward (REV=False): hin[j] = H_j, H_{j+1} = exp(A S_j) H_j + hloc[j], H_0 = 0.
    Backward (REV=True): hin[j] = R_j, R_{j-1} = exp(A S_j) R_j + hloc[j], R_{last} = init (grad of the last state).

    The chunks, in walk order, fall into groups of KG (one group: the plain serial walk). SUMMARY: a group's
    program walks its chunks from a zero state and stores the group's composite: its end state (gh) and summed dt
    (gs). Otherwise the program of group g first walks the composites of groups 0 .. g-1 (H = exp(A S_g') H + H_g')
    to its entering state, then its own chunks, storing hin: the serial path is KG + n_groups + KG steps, not
    n_chunks (_carry)."""
    n_cb = tl.cdiv(d, BD)
    grp = tl.program_id(0) // n_cb
    c = (tl.program_id(0) % n_cb) * BD + tl.arange(0, BD)
    b = tl.program_id(1).to(tl.int64)
    rn = tl.program_id(2) * BNC + tl.arange(0, BNC)
    cm = c < d
    m2 = (rn < N)[:, None] & cm[None, :]
    A2 = tl.load(A_ptr + rn[:, None] * d + c[None, :], mask=m2, other=0.0) * LOG2E
    if HAS_INIT and not SUMMARY:
        H = tl.load(init_ptr + (b * d + c[None, :]) * N + rn[:, None], mask=m2, other=0.0)
    else:
        H = tl.zeros((BNC, BD), tl.float32)
    grow = gh_ptr + (b * n_groups * N + rn[:, None]) * d + c[None, :]  # + group * N * d
    gsrow = gs_ptr + (b * d + c) * n_groups  # + group
    if not SUMMARY:
        for gp in range(0, grp):  # the composites of the groups before this one
            Sg = tl.load(gsrow + gp, mask=cm, other=0.0)
            H = tl.exp2(A2 * Sg[None, :]) * H + tl.load(grow + gp * N * d, mask=m2, other=0.0)
    else:
        ssum = tl.zeros((BD,), tl.float32)
    hrow = hloc_ptr + (b * n_chunks * N + rn[:, None]) * d + c[None, :]  # + chunk * N * d
    orow = hin_ptr + (b * n_chunks * N + rn[:, None]) * d + c[None, :]
    srow = sloc_ptr + (b * d + c) * n_chunks  # + chunk
    k1 = tl.minimum(grp * KG + KG, n_chunks)
    for k0 in tl.range(grp * KG, k1, KC, num_stages=STAGES):
        ofs = ()  # per chunk of the step: its offset in hloc / hin, whether it exists, its summaries
        oks = ()
        hs = ()
        ws = ()
        for k in tl.static_range(KC):
            jj = (n_chunks - 1 - (k0 + k)) if REV else (k0 + k)
            ok = k0 + k < k1
            ofs = ofs + (jj.to(tl.int64) * N * d,)
            oks = oks + (ok,)
            hs = hs + (tl.load(hrow + ofs[k], mask=m2 & ok, other=0.0),)
            sj = tl.load(srow + jj, mask=cm & ok, other=0.0)
            if SUMMARY:
                ssum += sj
            ws = ws + (tl.exp2(A2 * sj[None, :]),)
        for k in tl.static_range(KC):
            if not SUMMARY:
                tl.store(orow + ofs[k], H, mask=m2 & oks[k])
            H = ws[k] * H + hs[k]
    if SUMMARY:
        tl.store(grow + grp * N * d, H, mask=m2)
        tl.store(gsrow + grp, ssum, mask=cm)


@cached_launch
@triton.jit(do_not_specialize=["one", "T"])
def _bsum_kernel(dt_ptr, W_ptr, z_ptr, g_ptr, A_ptr, bias_ptr, C_ptr, q_ptr,
                 L, d, dg, N, RK, n_chunks, cbg, one,
                 s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl, s_Cb, s_Cg, s_Cn, s_Cl, Q1, Q2, R0, R1, R2,
                 HAS_MAP: tl.constexpr, FLIP: tl.constexpr, C_VAR: tl.constexpr, HAS_Z: tl.constexpr,
                 HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, DT_DONE: tl.constexpr, DT_LOW: tl.constexpr,
                 BD: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, T, U: tl.constexpr, STAGES: tl.constexpr,
                 SPREAD: tl.constexpr):
    """Backward chunk summary: walking chunk j backwards from a zero carry, G_t = C_t dy_t + a_{t+1} G_{t+1};
    stores q[j] = a_{first} G_{first}, the carry the chunk passes to its left neighbour."""
    d = _lane_layout_d(d, one, SPREAD)
    j, b, g, cbi, c, cm, rn, rn1, nm, m2, A2 = _program_tile(A_ptr, d, dg, N, cbg, one, BD, BN)
    bias = tl.load(bias_ptr + c, mask=cm, other=0.0) if HAS_BIAS else 0.0
    Cc, C_base = _bc_operand(C_ptr, b, g, s_Cb, s_Cg, c, d, rn1, m2, C_VAR)
    dt_base, Wt, rm = _dt_operand(dt_ptr, W_ptr, b, c, cm, d, RK, one, s_db, s_dd, DT_LOW, BR)
    G = tl.zeros((BN, BD), tl.float32)
    an = tl.zeros((BN, BD), tl.float32)
    l1 = j * T + T - 1
    for t0 in tl.range(0, T, U, num_stages=STAGES):
        for k in tl.static_range(U):
            o, lm, mk = _step_at(l1 - t0 - k, L, cm, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
            dt, raw = _step_dt(dt_base, Wt, rm, o, mk, lm, bias, s_dl, DT_LOW, HAS_BIAS, SOFTPLUS, DT_DONE)
            dy = tl.load(g_ptr + b * s_gb + c * s_gd + o * s_gl, mask=mk, other=0.0).to(tl.float32)
            if HAS_Z:
                zz = tl.load(z_ptr + b * s_zb + c * s_zd + o * s_zl, mask=mk, other=0.0).to(tl.float32)
                dy = dy * (zz * tl.sigmoid(zz))
            G = an * G + _bc_column(C_base, Cc, o, rn1, nm, lm, s_Cn, s_Cl, C_VAR, SPREAD) * dy[None, :]
            an = tl.exp2(A2 * dt[None, :])
    tl.store(q_ptr + _state_ofs(b, j, n_chunks, N, d, rn1, c), an * G, mask=m2)


@cached_launch
@triton.jit(do_not_specialize=["one", "T"])
def _bwd_kernel(u_ptr, dt_ptr, W_ptr, z_ptr, g_ptr, A_ptr, D_ptr, bias_ptr, B_ptr, C_ptr,
                hin_ptr, rin_ptr, hf_ptr,
                gu_ptr, gdt_ptr, gz_ptr, gBp_ptr, gCp_ptr, gAp_ptr, gDp_ptr, gbp_ptr, gWp_ptr,
                L, d, dg, N, RK, n_chunks, cbg, one, hf_rs, s_pr,
                s_ub, s_ud, s_ul, s_db, s_dd, s_dl, s_zb, s_zd, s_zl, s_gb, s_gd, s_gl,
                s_gub, s_gud, s_gul, s_gdb, s_gdd, s_gdl, s_gzb, s_gzd, s_gzl,
                s_Bb, s_Bg, s_Bn, s_Bl, s_Cb, s_Cg, s_Cn, s_Cl, s_pc, s_pb, s_pg, s_pl, Q1, Q2, R0, R1, R2,
                HAS_MAP: tl.constexpr, FLIP: tl.constexpr, GU_ACCUM: tl.constexpr, B_VAR: tl.constexpr,
                C_VAR: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
                SOFTPLUS: tl.constexpr, DT_DONE: tl.constexpr, DT_LOW: tl.constexpr,
                BD: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, T, F: tl.constexpr, SF: tl.constexpr,
                STAGES: tl.constexpr, OUTER_STAGES: tl.constexpr, SPREAD: tl.constexpr, WALKED: tl.constexpr):
    """Gradients of chunk j. (1) Walk the chunk forward from its entering state, writing the state entering every
    segment of S = SF * F steps to the scratch hf (WALKED: the forward's output pass wrote them already). (2) Walk the
    segments backwards; in each, (2a) when SF > 1, walk it
    forward from its entering state, writing the state entering each of its SF blocks of F steps to the program's
    own small buffer hb (it stays in L2), and (2b) walk the blocks backwards: recompute a block's F states into
    registers (a tuple), then walk them backwards with the carry R (R_t = a_t G_t; the chunk's last step gets
    rin[j]). hf holds T / S states per chunk, hb SF per program: the segments bound the scratch memory. The loops
    whose loads are software-pipelined are the innermost ones: over the blocks when SF = 1 (the segment loop, whose
    inner loop is then a single block), else the walk (2a) and the block loop (2b)."""
    j, b, g, cbi, c, cm, rn, rn1, nm, m2, A2 = _program_tile(A_ptr, d, dg, N, cbg, one, BD, BN)
    bias = tl.load(bias_ptr + c, mask=cm, other=0.0) if HAS_BIAS else 0.0
    if HAS_D:  # in the layout of the tiles' sums over the states, through a tile load and sum (see _store_channels)
        Dv = tl.sum(tl.load(D_ptr + c[None, :] + rn1[:, None] * 0, mask=m2 & (rn1 == 0)[:, None], other=0.0), axis=0)
    Bc, B_base = _bc_operand(B_ptr, b, g, s_Bb, s_Bg, c, d, rn1, m2, B_VAR)
    if not B_VAR:
        gBc = tl.zeros((BN, BD), tl.float32)
    Cc, C_base = _bc_operand(C_ptr, b, g, s_Cb, s_Cg, c, d, rn1, m2, C_VAR)
    if not C_VAR:
        gCc = tl.zeros((BN, BD), tl.float32)
    u_base = u_ptr + b * s_ub + c * s_ud
    dt_base, Wt, rm = _dt_operand(dt_ptr, W_ptr, b, c, cm, d, RK, one, s_db, s_dd, DT_LOW, BR)
    if DT_LOW:
        gW = tl.zeros((BR, BD), tl.float32)
    S: tl.constexpr = SF * F
    NF = T // F
    NS = T // S
    hf_b = hf_ptr + _state_ofs(b, 0, 1, N, d, rn1, c)  # + (j * NS + s) * hf_rs for segment s, in int64
    if SF > 1:  # the program's SF block states after hf: (b, chunks, SF, N, d), its (b, j) row, its channels
        hb_b = hf_ptr + (NS * n_chunks).to(tl.int64) * hf_rs + _state_ofs(b * n_chunks + j, 0, 1, SF * N, d, rn1, c)
    if not WALKED:  # (1) forward walk: states entering each segment
        h = tl.load(hin_ptr + _state_ofs(b, j, n_chunks, N, d, rn1, c), mask=m2, other=0.0)
        for f in tl.range(NF, num_stages=STAGES):
            tl.store(hf_b + (j * NS + f // SF).to(tl.int64) * hf_rs, h, mask=m2 & (f % SF == 0))
            h = _walk_block(h, j * T + f * F, L, cm, u_base, dt_base, Wt, rm, B_base, bias, Bc, A2, rn1, nm, s_ul,
                            s_dl, s_Bn, s_Bl, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP, DT_LOW, HAS_BIAS, SOFTPLUS, DT_DONE,
                            B_VAR, F, SPREAD)[0][F]
    # (2) backward over the segments and their blocks
    R = tl.load(rin_ptr + _state_ofs(b, j, n_chunks, N, d, rn1, c), mask=m2, other=0.0)
    gA = tl.zeros((BN, BD), tl.float32)
    gD = tl.zeros((BD,), tl.float32)
    gb = tl.zeros((BD,), tl.float32)
    for ss in tl.range(NS, num_stages=OUTER_STAGES):  # pipelined when SF = 1 (the inner loop is one block then)
        s = NS - 1 - ss
        h = tl.load(hf_b + (j * NS + s).to(tl.int64) * hf_rs, mask=m2, other=0.0)
        if SF > 1:  # (2a) the segment's block states into hb
            tl.debug_barrier()  # every thread is done reading the previous segment's hb
            for q in tl.range(SF - 1, num_stages=STAGES):
                tl.store(hb_b + q * N * d, h, mask=m2)
                h = _walk_block(h, j * T + (s * SF + q) * F, L, cm, u_base, dt_base, Wt, rm, B_base, bias, Bc, A2,
                                rn1, nm, s_ul, s_dl, s_Bn, s_Bl, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP, DT_LOW, HAS_BIAS,
                                SOFTPLUS, DT_DONE, B_VAR, F, SPREAD)[0][F]
            tl.store(hb_b + (SF - 1) * N * d, h, mask=m2)
            tl.debug_barrier()  # hb is visible to every thread
        for fb in tl.range(SF, num_stages=STAGES):  # (2b) the segment's blocks, backwards
            f = s * SF + SF - 1 - fb
            if SF > 1:
                hblock = tl.load(hb_b + (SF - 1 - fb) * N * d, mask=m2, other=0.0)
            else:
                hblock = h
            hs, dts, us, raws, bxs = _walk_block(hblock, j * T + f * F, L, cm, u_base, dt_base, Wt, rm, B_base, bias,
                                                 Bc, A2, rn1, nm, s_ul, s_dl, s_Bn, s_Bl, Q1, Q2, R0, R1, R2, HAS_MAP,
                                                 FLIP, DT_LOW, HAS_BIAS, SOFTPLUS, DT_DONE, B_VAR, F, SPREAD)
            for k in tl.static_range(F - 1, -1, -1):
                o, lm, mk = _step_at(j * T + f * F + k, L, cm, Q1, Q2, R0, R1, R2, HAS_MAP, FLIP)
                hp = hs[k]
                dt = dts[k]
                u = us[k]
                Bx = bxs[k]
                Cx = _bc_column(C_base, Cc, o, rn1, nm, lm, s_Cn, s_Cl, C_VAR, SPREAD)
                du = dt * u
                a = tl.exp2(A2 * dt[None, :])
                ht = hs[k + 1]  # h_t
                go = tl.load(g_ptr + b * s_gb + c * s_gd + o * s_gl, mask=mk, other=0.0).to(tl.float32)
                if HAS_Z:
                    zz = tl.load(z_ptr + b * s_zb + c * s_zd + o * s_zl, mask=mk, other=0.0).to(tl.float32)
                    sg = tl.sigmoid(zz)
                    gsg = go * sg
                    dy = gsg * zz
                    y = tl.sum(ht * Cx, axis=0)
                    if HAS_D:
                        y += Dv * u
                    # dz = go y sg (1 + z (1 - sg)), with go sg and dy = go sg z formed once
                    _store_channels(gz_ptr + b * s_gzb + c * s_gzd + o * s_gzl, y * (gsg + dy * (1.0 - sg)), mk)
                else:
                    dy = go
                Gt = R + Cx * dy[None, :]
                R = a * Gt  # the carry into step t-1
                ghx = R * hp  # G_t a_t h_{t-1}
                ghB = tl.sum(Gt * Bx, axis=0)
                gdt = u * ghB + tl.sum(ghx * A2, axis=0) * 0.6931471805599453
                gu = dt * ghB
                if HAS_D:
                    gu += Dv * dy
                    gD += dy * u
                if SOFTPLUS:
                    if DT_DONE:
                        gdt = gdt * _softplus_grad_of(dts[k])
                    else:
                        gdt = gdt * tl.where(raws[k] > 20.0, 1.0, tl.sigmoid(raws[k]))
                gdt = tl.where(mk, gdt, 0.0)
                gb += gdt
                guptr = gu_ptr + b * s_gub + c * s_gud + o * s_gul
                if GU_ACCUM:
                    gu += tl.load(guptr, mask=mk, other=0.0).to(tl.float32)
                _store_channels(guptr, gu, mk)
                if DT_LOW:  # the step's R low-rank values get sum_c W[c, r] gdt_c (a partial over this program's
                    # channels, like B/C, at gdt[channel block, b, position, r]); W gets sum_t v_t gdt_t
                    tl.store(gdt_ptr + (g * cbg + cbi) * s_gdd + b * s_gdb + o * s_gdl + tl.arange(0, BR),
                             tl.sum(Wt * gdt[None, :], axis=1), mask=rm & lm)
                    gW += tl.load(dt_base + o * s_dl, mask=rm & lm, other=0.0).to(tl.float32)[:, None] * gdt[None, :]
                else:
                    _store_channels(gdt_ptr + b * s_gdb + c * s_gdd + o * s_gdl, gdt, mk)
                gA += ghx * dt[None, :]
                pofs = cbi * s_pc + b * s_pb + g * s_pg + o * s_pl + rn1
                if B_VAR:
                    tl.store(gBp_ptr + pofs, tl.sum(Gt * du[None, :], axis=1), mask=nm & lm)
                else:
                    gBc += Gt * du[None, :]
                if C_VAR:
                    tl.store(gCp_ptr + pofs, tl.sum(ht * dy[None, :], axis=1), mask=nm & lm)
                else:
                    gCc += ht * dy[None, :]
    # per-program partial sums: row b * chunks + j of one (rows, s_pr) buffer, in which each sum has its columns
    # (gA, constant gB / gC as (N, d); gD, gbias as (d,); gW as (R, d)); reduced on the host in one pass
    prow = (b * n_chunks + j) * s_pr
    pm = prow + rn1[:, None] * d + c[None, :]
    tl.store(gAp_ptr + pm, gA, mask=m2)
    if HAS_D:
        tl.store(gDp_ptr + prow + c, gD, mask=cm)
    if HAS_BIAS:
        tl.store(gbp_ptr + prow + c, gb, mask=cm)
    if DT_LOW:
        tl.store(gWp_ptr + prow + tl.arange(0, BR)[:, None] * d + c[None, :], gW, mask=rm[:, None] & cm[None, :])
    if not B_VAR:
        tl.store(gBp_ptr + pm, gBc, mask=m2)
    if not C_VAR:
        tl.store(gCp_ptr + pm, gCc, mask=m2)


@cached_launch
@triton.jit
def _block_sum_kernel(p_ptr, out_ptr, rows, P, s_pp, s_or, s_oh, W: tl.constexpr, H: tl.constexpr,
                      WB: tl.constexpr, BR: tl.constexpr):
    """out[r, w] = sum over q < P of p[q, r, w] for p (P, rows, W) contiguous, added in order q = 0, 1, ... (the
    result does not depend on the launch); out's columns in halves of H (B's, C's), s_oh apart, rows s_or apart."""
    r = (tl.program_id(0) * BR + tl.arange(0, BR)).to(tl.int64)
    w = tl.arange(0, WB)
    m = (r < rows)[:, None] & (w < W)[None, :]
    src = p_ptr + r[:, None] * W + w[None, :]
    acc = tl.load(src, mask=m, other=0.0)
    for _ in range(1, P):
        src += s_pp
        acc += tl.load(src, mask=m, other=0.0)
    tl.store(out_ptr + r[:, None] * s_or + ((w // H) * s_oh + w % H)[None, :], acc, mask=m)


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


# ------------------------------------------------------------------------------------------------------------------
# host side


# Tuning overrides (benchmark sweeps, tests): T (chunk), BD (channels per program), F (backward block), S (backward
# segment: the scratch keeps one state per S steps; a multiple of F), U (unroll),
# per_sm (programs per SM the chunk length aims at), warps / bwd_warps (warps per program of the forward and
# _bsum kernels / of _bwd_kernel: beyond BD / 32 they split the states over the warps), stages / bwd_stages
# (software pipelining of the step loops' loads through shared memory, Triton's num_stages; 1 = none), spread
# (SPREAD: B/C columns shared through shared memory, a channel per lane in the forward and _bsum kernels), early_S
# (the segment length of states kept from a recomputation), bwd_maxnreg (a register cap for _bwd_kernel, Triton's
# maxnreg: 248 registers hold it at 8 warps per SM; kernels/inspect_sass.py shows what a cap spills).
# Empty = the defaults of _Plan.
_OVERRIDE: dict = {}
_TUNING_KEYS = ("T", "BD", "F", "S", "U", "per_sm", "warps", "bwd_warps", "stages", "bwd_stages", "spread",
                "early_S", "bwd_maxnreg")


set_tuning = tuning_setter(_OVERRIDE, _TUNING_KEYS)


class _Plan:
    """Launch geometry shared by the forward and backward of one call.

    Defaults = the best plan of the sweeps (kernels/BENCHMARK.md; H100, the segments and later on an H200): 32
    channels per program (one warp), the B/C columns spread over the lanes where a column and its copy are at least
    one value per lane (N >= 9), chunks long enough for ~16 programs per SM (the cross-scan asks for more: see its
    call), the step loops' loads pipelined 3 stages deep (2 in the forward and _bsum until session 7, whose sweep
    measured a 4-6 % faster forward with 3) and 4 in the backward (3 until session 19: 4 measured faster on the
    anchor, the grouped 2D anchor and the cross-scan, session 18), blocks of F = 2 steps in the backward, and
    segments of S = F steps (one stored state per block), or, where that scratch would pass HF_SCRATCH_BYTES,
    segments of 16 steps (or the next longer one that fits): they cost a second forward walk (anchor: 3.30 -> 3.81
    ms) but cut the scratch 8-fold, and 16 measured faster than 4 or 8 steps at LightM-UNet's full resolution and
    on the grouped 2D anchor.
    ``early``: the segment states are written by the forward (the output pass of a recomputation, _early_scratch) and
    live until the backward: segments of EARLY_S = 64 steps (or the chunk, if shorter). LightM-UNet 3D measured as fast
    with 64 as with 16 or 32 steps and a quarter of the 16-step scratch (session 14)."""

    HF_SCRATCH_BYTES = 2 << 30
    EARLY_S = 64

    def __init__(self, b, d, G, L, N, device, per_sm=16, early=False):
        o = _OVERRIDE
        self.dg = d // G
        self.BN = triton.next_power_of_2(N)
        self.BD = min(o.get("BD", 32), triton.next_power_of_2(self.dg))
        self.cbg = triton.cdiv(self.dg, self.BD)
        self.num_warps = o.get("warps", max(1, self.BD // 32))
        self.bwd_warps = o.get("bwd_warps", self.num_warps)
        self.bwd_options = {"maxnreg": o["bwd_maxnreg"]} if "bwd_maxnreg" in o else {}
        self.stages = o.get("stages", 3)
        self.bwd_stages = o.get("bwd_stages", 4)
        self.U = o.get("U", 4)
        self.spread = o.get("spread", 2 * self.BN >= 32 * self.num_warps)
        T = o.get("T")
        if T is None:
            n_sm = sm_count(device, 4)
            chunk = lambda k: triton.next_power_of_2(triton.cdiv(L, max(1, (k * n_sm) // (b * G * self.cbg))))
            T = chunk(o.get("per_sm", 16))
            if T < L and "per_sm" not in o:  # several chunks already (their summary pass is paid): per_sm of them
                T = chunk(per_sm)
        self.F = F = o.get("F", 2)
        S = o.get("S")
        if S is None and early:  # states kept from the forward (a recomputation's output pass): one per EARLY_S steps
            S = min(o.get("early_S", self.EARLY_S), max(T, self.U, F))
        if S is None:  # S = F if its scratch fits HF_SCRATCH_BYTES, else 16, 32, ... (at most the chunk) until one fits
            T = max(T, self.U, F)
            S = F
            while S < T and self.scratch_states(b, d, L, T, S) * self.BN * 4 > self.HF_SCRATCH_BYTES:
                S = max(2 * S, 16)
        self.S = S
        self.T = max(T, self.U, S)
        if self.T % self.U or self.T % S or S % F:  # a chunk is walked in groups of U steps, segments of S steps
            raise ValueError(f"selective_scan (triton): chunk length T={self.T} must be a multiple of U={self.U} and "
                             f"of the segment S={S}, and S a multiple of the block F={F} (set_tuning)")
        self.n_chunks = triton.cdiv(L, self.T)
        self.grid = (self.n_chunks, G * self.cbg, b)
        self.carry_BD = min(32, triton.next_power_of_2(d))

    def scratch_states(self, b, d, L, T, S):
        """Size of the backward's state scratch, in states of one channel: T/S segment states per chunk and, when
        S > F, S/F block states per program."""
        return triton.cdiv(L, T) * (T // S + (S // self.F if S > self.F else 0)) * b * d


def _bc(X):
    """Strides (b, g, n, l) of a time-varying B/C viewed as (b, G, N, L); zeros for the constant (d, N) layout."""
    return tuple(X.stride()) if X.dim() == 4 else (0, 0, 0, 0)


def _t(X):
    """A (d, N) parameter (A, constant B/C) as the (N, d) the kernels read (channels fastest)."""
    return X.t().contiguous() if X.dim() == 2 else X


# from this many chunks the carry walks them in groups (_carry)
_CARRY_GROUPS_FROM = 64


def _carry(A, loc, sums, init, rev, plan, b, d, N):
    """Every chunk's entering state from the chunk summaries (_carry_kernel): from _CARRY_GROUPS_FROM chunks in
    groups of ~sqrt(chunks / 2) (their composites first, then each group from its entering state), else one serial
    walk. Anchor (2, 64, 64^3), 512 chunks: 0.081 ms for the two carries of a forward + backward in one walk, 0.036
    ms in groups (H200, session 21)."""
    out = torch.empty_like(loc)
    BNC = min(plan.BN, 4)
    n = plan.n_chunks
    KC = 8
    KG = n if n < _CARRY_GROUPS_FROM else max(KC, KC * round(math.sqrt(n / 2) / KC))
    n_groups = triton.cdiv(n, KG)
    grid = (n_groups * triton.cdiv(d, plan.carry_BD), b, triton.cdiv(N, BNC))
    args = dict(REV=rev, HAS_INIT=init is not None, BD=plan.carry_BD, BNC=BNC, KC=KC, STAGES=3, num_warps=1)
    gh = gs = A  # the groups' composites: end states (b, groups, N, d) and summed dt (b, d, groups)
    if n_groups > 1:
        gh = torch.empty(b, n_groups, N, d, device=A.device, dtype=torch.float32)
        gs = torch.empty(b, d, n_groups, device=A.device, dtype=torch.float32)
        _carry_kernel[grid](A, loc, sums, out, A, gh, gs, d, N, n, KG, n_groups, SUMMARY=True, **args)
    _carry_kernel[grid](A, loc, sums, out, init if init is not None else A, gh, gs, d, N, n, KG, n_groups,
                        SUMMARY=False, **args)
    return out


def _dt_low(W):
    """The rank R and the constexprs of the delta operand: W (R, d) fp32 (delta = W^T v from v (b, R, L)) or None
    (full delta)."""
    if W is None:
        return 1, dict(DT_LOW=False, BR=1)
    return W.shape[0], dict(DT_LOW=True, BR=max(2, triton.next_power_of_2(W.shape[0])))


def _forward(u, dt, A, B, C, D, z, bias, softplus, out, plan, order, accum, want_last, W=None, states=None,
             hf=None, dt_out=None):
    """One forward pass into ``out``. u, z, out: (b, d, L)-strided; dt: (b, d, L), or (b, R, L) with W (R, d) fp32
    (delta = W^T dt); A: (d, N); B, C: (b, G, N, L) views or (d, N). Returns the chunk-entering states
    (b, chunks, N, d), the chunks' dt sums (b, d, chunks) and the last state (b, d, N). ``states``: those two from
    an earlier pass over the same inputs (a recomputation): only the output pass runs. ``hf``: the backward's state
    scratch (``plan.scratch_states``), into which the output pass also writes the segment-entering states.
    ``dt_out``: an fp32 buffer of the scan's own with dt's strides (dt itself where the scan owns dt; full, not
    low-rank): the first pass writes dt = softplus(dt + bias) into it, and the later passes (and
    ``_backward(dt_done=True)``, given it as dt) read that instead of forming it again."""
    b, d, L = u.shape
    N = A.shape[1]
    A, B, C = _t(A), _t(B), _t(C)
    dev = u.device
    f32 = torch.float32
    if states is not None and (states[0].shape, states[1].shape) != ((b, plan.n_chunks, N, d), (b, d, plan.n_chunks)):
        states = None  # not from this kind of call: computed again
    sloc = torch.empty(b, d, plan.n_chunks, device=dev, dtype=f32) if states is None else states[1]
    last = torch.empty(b, N, d, device=dev, dtype=f32) if want_last else sloc
    zt = z if z is not None else u
    R, low = _dt_low(W)
    if dt_out is not None and (W is not None or dt_out.stride() != dt.stride() or dt_out.dtype != f32):
        raise ValueError("selective_scan (triton): dt_out must be fp32 with the full delta's strides")
    dto = dt_out if dt_out is not None else dt
    common = (L, d, plan.dg, N, R, plan.n_chunks, plan.cbg, 1, *u.stride(), *dt.stride(), *zt.stride(),
              *out.stride(), *_bc(B), *_bc(C), order.Q1, order.Q2, order.R0, order.R1, order.R2)
    flags = dict(HAS_MAP=order.has_map, FLIP=order.flip, ACCUM=accum, B_VAR=B.dim() == 4, C_VAR=C.dim() == 4,
                 HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus, DT_DONE=False,
                 **low, BD=plan.BD, BN=plan.BN, T=plan.T, U=plan.U, STAGES=plan.stages, SPREAD=plan.spread,
                 num_warps=plan.num_warps)
    Wk = W if W is not None else A
    Dt = D if D is not None else A
    bt = bias if bias is not None else A
    if states is not None:
        hin = states[0]
    elif plan.n_chunks > 1:
        hloc = torch.empty(b, plan.n_chunks, N, d, device=dev, dtype=f32)
        _chunk_kernel[plan.grid](u, dt, dto, Wk, zt, out, A, Dt, bt, B, C, hloc, hloc, sloc, A, 0, *common,
                                 OUT=False, SAVE_LAST=False, SEG=0, DT_OUT=dt_out is not None, **flags)
        if dt_out is not None:  # the output pass reads dt
            dt, flags["DT_DONE"], dt_out = dt_out, True, None
        hin = _carry(A, hloc, sloc, None, False, plan, b, d, N)
        del hloc
    else:
        hin = torch.zeros(b, 1, N, d, device=dev, dtype=f32)
    _chunk_kernel[plan.grid](u, dt, dto, Wk, zt, out, A, Dt, bt, B, C, hin, last, sloc, hf if hf is not None else A,
                             b * d * N, *common, OUT=True, SAVE_LAST=want_last, SEG=plan.S if hf is not None else 0,
                             DT_OUT=dt_out is not None, **flags)
    return hin, sloc, (last.transpose(1, 2) if want_last else None)


def _backward(u, dt, z, gout, A, D, B, C, bias, softplus, hin, sloc, glast, plan, order, gu, gdt, gz, gu_accum,
              W=None, hf=None, bc_out=None, dt_done=False):
    """One backward pass: writes gu (accumulating if gu_accum), gdt, gz; returns fp32 (gA, gB, gC, gD, gbias, gW),
    gB/gC time-varying as (b, G, N, L-positions) in the position layout of ``order``. With a low-rank delta (W, see
    _forward) gdt must be None and the gradient of dt (b, R, L-positions) comes back instead, with gW (d, R).
    ``hf``: the state scratch with the segment-entering states written by the forward (``_forward``). ``bc_out``:
    two (b, G, positions, N) tensors (views) into which the time-varying gB and gC are summed. ``dt_done``: dt holds
    softplus(dt + bias), written by ``_forward(dt_out=...)``."""
    b, d, L = u.shape
    N = A.shape[1]
    G = B.shape[1] if B.dim() == 4 else (C.shape[1] if C.dim() == 4 else 1)
    A, B, C = _t(A), _t(B), _t(C)
    dev = u.device
    f32 = torch.float32
    B_VAR, C_VAR = B.dim() == 4, C.dim() == 4
    zt = z if z is not None else u
    bt = bias if bias is not None else A
    pos = (order.Q1, order.Q2, order.R0, order.R1, order.R2)
    R, low = _dt_low(W)
    Wk = W if W is not None else A
    if plan.n_chunks > 1:  # the carry from the right entering every chunk
        q = torch.empty(b, plan.n_chunks, N, d, device=dev, dtype=f32)
        _bsum_kernel[plan.grid](
            dt, Wk, zt, gout, A, bt, C, q, L, d, plan.dg, N, R, plan.n_chunks, plan.cbg, 1,
            *dt.stride(), *zt.stride(), *gout.stride(), *_bc(C), *pos,
            HAS_MAP=order.has_map, FLIP=order.flip, C_VAR=C_VAR, HAS_Z=z is not None, HAS_BIAS=bias is not None,
            SOFTPLUS=softplus, DT_DONE=dt_done, **low, BD=plan.BD, BN=plan.BN, T=plan.T, U=plan.U, STAGES=plan.stages,
            SPREAD=plan.spread, num_warps=plan.num_warps)
        rin = _carry(A, q, sloc, glast, True, plan, b, d, N)
        del q
    else:
        rin = (glast.transpose(1, 2).reshape(b, 1, N, d).contiguous() if glast is not None
               else torch.zeros(b, 1, N, d, device=dev, dtype=f32))
    # segment-entering states (chunks * T/S, b, N, d), then the programs' block-state buffers (b, chunks, S/F, N, d)
    walked = hf is not None
    if not walked:
        hf = torch.empty(plan.scratch_states(b, d, L, plan.T, plan.S) * N, device=dev, dtype=f32)
    # the per-program partial sums side by side in one (programs' rows, columns) buffer: one reduction for all
    sizes = dict(A=N * d, B=0 if B_VAR else N * d, C=0 if C_VAR else N * d, D=d if D is not None else 0,
                 bias=d if bias is not None else 0, W=R * d if W is not None else 0)
    sums = torch.empty(b * plan.n_chunks, sum(sizes.values()), device=dev, dtype=f32)
    cols = dict(zip(sizes, torch.split(sums, list(sizes.values()), dim=1)))
    gAp = cols["A"]
    npos = B.shape[3] if B_VAR else (C.shape[3] if C_VAR else L)
    # time-varying B/C gradients per channel block side by side as (blocks, b, G, positions, N or 2N): a step's
    # values are contiguous, and one pass sums the blocks of both (_block_sum)
    width = N * (B_VAR + C_VAR)
    bcp = torch.empty(plan.cbg, b, G, npos, width, device=dev, dtype=f32) if width else None
    gBp = bcp[..., :N] if B_VAR else cols["B"]
    gCp = bcp[..., width - N:] if C_VAR else cols["C"]
    s_p = (*bcp.stride()[:3], width) if width else (0, 0, 0, 0)
    if W is not None:  # the low-rank dt's gradient per channel block as (blocks, b, positions, R), and gW per program
        gdt = torch.empty(plan.grid[1], b, L, R, device=dev, dtype=f32)
        s_gdt = (gdt.stride(1), gdt.stride(0), gdt.stride(2))  # (batch, channel block, position) as the kernel reads
    else:
        s_gdt = gdt.stride()
    _bwd_kernel[plan.grid](
        u, dt, Wk, zt, gout, A, D if D is not None else A, bt, B, C, hin, rin, hf,
        gu, gdt, gz if gz is not None else gu, gBp, gCp, gAp, cols["D"], cols["bias"], cols["W"],
        L, d, plan.dg, N, R, plan.n_chunks, plan.cbg, 1, b * d * N, sums.stride(0),
        *u.stride(), *dt.stride(), *zt.stride(), *gout.stride(),
        *gu.stride(), *s_gdt, *(gz if gz is not None else gu).stride(), *_bc(B), *_bc(C), *s_p, *pos,
        HAS_MAP=order.has_map, FLIP=order.flip, GU_ACCUM=gu_accum, B_VAR=B_VAR, C_VAR=C_VAR, HAS_D=D is not None,
        HAS_Z=z is not None, HAS_BIAS=bias is not None, SOFTPLUS=softplus, DT_DONE=dt_done, **low,
        BD=plan.BD, BN=plan.BN, T=plan.T, F=plan.F, SF=plan.S // plan.F, STAGES=plan.bwd_stages,
        OUTER_STAGES=plan.bwd_stages if plan.S == plan.F else 1, SPREAD=plan.spread, WALKED=walked,
        num_warps=plan.bwd_warps, **plan.bwd_options)
    del hf  # back to the caching allocator now (stream-ordered after the kernel): the sums below may reuse it
    bc = _block_sum(bcp, B_VAR + C_VAR, bc_out) if width else ()  # (b, G, positions, N) each: B's first, C's last
    total = dict(zip(sizes, torch.split(sums.sum(0), list(sizes.values()))))
    # time-varying: (b, G, N, positions); constant: (d, N)
    gB = bc[0].transpose(-1, -2) if B_VAR else total["B"].view(N, d).t()
    gC = bc[-1].transpose(-1, -2) if C_VAR else total["C"].view(N, d).t()
    low_grads = (gdt.sum(0).transpose(1, 2), total["W"].view(R, d).t()) if W is not None else (None, None)
    return (total["A"].view(N, d).t(), gB, gC, total["D"] if D is not None else None,
            total["bias"] if bias is not None else None, *low_grads)


def _block_sum(p, k, halves=None):
    """The sum over the first axis of the backward's per-channel-block partials p (blocks, b, G, positions, W) of k
    time-varying gradients side by side (W = k N: B's, then C's), in one pass; returned as k tensors (b, G,
    positions, N): ``halves`` if given (views whose rows are one stride apart, the same for all: the columns of B's
    and C's gradients in x_proj's output gradient), else new contiguous ones (in the layout of the inputs the kernels
    read coalesced, channels-last B/C, so autograd does not copy them). Written into the views of x_proj's gradient,
    PyTorch's strided add had run at a quarter of the memory's pace: 0.39 ms per tensor for LightM-UNet's 128^3 B
    gradients (H200, session 20)."""
    P, W = p.shape[0], p.shape[-1]
    H = W // k
    if halves is None:
        halves = torch.empty(k, *p.shape[1:-1], H, device=p.device, dtype=p.dtype).unbind(0)
    rows = p[0].numel() // W
    o = [h.view(rows, H) for h in halves]  # rows one stride apart (raises otherwise)
    if not p.is_contiguous() or any(x.stride() != o[0].stride() or x.stride(1) != 1 for x in o):
        raise ValueError("selective_scan (triton): block sums need contiguous partials and outputs with the same "
                         "row stride and unit column stride")
    BR = 64
    _block_sum_kernel[(triton.cdiv(rows, BR),)](
        p, o[0], rows, P, rows * W, o[0].stride(0), (o[-1].data_ptr() - o[0].data_ptr()) // p.element_size(),
        W=W, H=H, WB=triton.next_power_of_2(W), BR=BR, num_warps=4)
    return halves


# ------------------------------------------------------------------------------------------------------------------
# autograd: plain selective scan


ENV_EARLY_SCRATCH = "NNUNET_MAMBA_EARLY_SCRATCH"


def _early_scratch() -> bool:
    """A recomputation's output pass also writes the backward's segment-entering states (one per 64 steps,
    ``_Plan.EARLY_S``), and ``_bwd_kernel`` skips its forward walk; the scratch then lives from the recomputation to
    the backward. LightM-UNet 3D (128^3, batch 2): 271.0 -> 264.9 ms per step, 11.47 -> 11.85 GiB (H200, session 14).
    On by default; ``NNUNET_MAMBA_EARLY_SCRATCH=0`` walks in the backward instead (the lower peak)."""
    mode = os.environ.get(ENV_EARLY_SCRATCH, "1")
    if mode not in ("0", "1"):
        raise ValueError(f"{ENV_EARLY_SCRATCH}={mode!r}: use 1 (default: faster) or 0 (less memory)")
    return mode == "1"


def _grouped_bc(X):
    """(d, N) -> fp32 contiguous (constant); (b, N, L) -> (b, 1, N, L) view; (b, G, N, L) as is."""
    if X.dim() == 2:
        return X.float().contiguous()
    return X.unsqueeze(1) if X.dim() == 3 else X


class _ScanFn(torch.autograd.Function):
    """The plain scan. With a low-rank delta (``W``) the (b, d, L) delta is formed by the kernels (``W_in_kernels``)
    or multiplied out here; multiplied out it is this op's own buffer: the forward writes dt = softplus(delta + bias)
    over it, and the backward writes d(delta) over that. A full fp32 delta: the forward writes dt into a new buffer,
    which the backward keeps instead of the delta (_dt_buffer).
    ``reuse``: the caller reads neither z after the backward nor the output's gradient after this op's backward, so
    dz is written over z and du over the output gradient (where their layouts allow). Each saves a (b, d, L) buffer
    at the backward's memory peak (docs/kernels.md, "Memory").
    ``Wx`` with ``x_proj`` = (product, grads_into) (``selective_scan_triton``'s x_proj): delta, B and C are None and
    come from product(u's tokens, Wx); the backward returns Wx's gradient and adds x_proj's input gradient to du."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus, W, W_in_kernels, reuse, slot, Wx, x_proj):
        if Wx is not None:  # x_proj's (b, L, R + 2N) output: the low-rank delta, B and C as its column blocks
            R, N = W.shape[1], A.shape[1]
            x_dbl = x_proj[0](u.transpose(1, 2), Wx)
            delta, B, C = (x_dbl[..., i:j].transpose(1, 2) for i, j in ((0, R), (R, R + N), (R + N, R + 2 * N)))
        b, d, L = u.shape
        Bg, Cg = _grouped_bc(B), _grouped_bc(C)
        G = Bg.shape[1] if Bg.dim() == 4 else (Cg.shape[1] if Cg.dim() == 4 else 1)
        if Bg.dim() == 4 and Cg.dim() == 4 and Bg.shape[1] != Cg.shape[1]:
            raise ValueError(f"selective_scan: B has {Bg.shape[1]} groups but C has {Cg.shape[1]}")
        if d % G:
            raise ValueError(f"selective_scan: dim {d} is not divisible by the number of B/C groups {G}")
        Af = A.float().contiguous()
        Df = D.float().contiguous() if D is not None else None
        bf = delta_bias.float().contiguous() if delta_bias is not None else None
        plan = _Plan(b, d, G, L, A.shape[1], u.device, early=slot is not None and _early_scratch())
        out = _empty_in_order(u)
        Wt = W.float().t().contiguous() if W is not None else None  # (R, d)
        v = None
        if W is not None and not W_in_kernels:
            v, delta = delta, _low_rank_product(delta, Wt)
        # In a recomputed region (an ops.recompute slot) the forward pass keeps the chunk-entering states in the slot;
        # the recomputation, which the backward pass follows, starts from them at the output pass and has that pass
        # also write the backward's segment-entering states (with _early_scratch). The backward runs on the forward
        # pass's ctx (checkpoint recomputes only the saved tensors), so they reach it in a box shared via the slot.
        kept = slot.value if slot is not None else None
        hf = None if kept is None or not _early_scratch() else \
            torch.empty(plan.scratch_states(b, d, L, plan.T, plan.S) * A.shape[1], device=u.device, dtype=torch.float32)
        dt_out, delta = _dt_buffer(delta, (softplus or bf is not None) and not W_in_kernels, owned=v is not None)
        hin, sloc, last = _forward(u, delta, Af, Bg, Cg, Df, z, bf, softplus, out, plan, _IDENTITY, False, True,
                                   Wt if W_in_kernels else None, kept[0] if kept else None, hf, dt_out)
        dt_done = dt_out is not None
        if dt_done:
            delta = dt_out  # the backward keeps dt instead of the delta
        # ctx keeps only the scratch's box: the states stay with the region (freed with it, not with the graph)
        ctx.scratch = kept[1] if kept else [None]
        ctx.scratch[0] = hf
        if slot is not None:
            slot.value = ((hin, sloc), ctx.scratch)
        ctx.save_for_backward(u, delta, Af, B, C, Df, z, bf, hin, sloc, W, Wt, v, Wx)
        ctx.cfg = (softplus, plan, W_in_kernels, reuse, dt_done, x_proj)
        ctx.backward_ran = False
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, gout, glast):
        u, delta, Af, B, C, Df, z, bf, hin, sloc, W, Wt, v, Wx = ctx.saved_tensors
        softplus, plan, W_in_kernels, reuse, dt_done, x_proj = ctx.cfg
        # the recomputation's segment states, taken out of the box: they serve one backward (a second one walks again)
        hf, ctx.scratch[0] = ctx.scratch[0], None
        if ctx.backward_ran and (reuse or v is not None):
            if reuse:
                raise RuntimeError(
                    "selective_scan (triton): a second backward pass through a scan called with reuse_buffers=True "
                    "(retain_graph=True); its first backward wrote the gradients over z. Call it with "
                    "reuse_buffers=False to backpropagate through it more than once.")
            delta = _low_rank_product(v, Wt)  # the first backward wrote d(delta) over the multiplied-out delta
            if dt_done:  # and dt over it again, by the same pass as the first time (an output pass, output unused)
                _forward(u, delta, Af, _grouped_bc(B), _grouped_bc(C), Df, z, bf, softplus, _empty_in_order(u), plan,
                         _IDENTITY, False, False, states=(hin, sloc), dt_out=delta)
        ctx.backward_ran = True
        if gout is None:
            gout, into_gout = torch.zeros_like(u), True
        else:
            into_gout = reuse and gout.dtype == u.dtype and _no_overlap(gout)
        gu = gout if into_gout else _empty_in_order(u)
        gdt = None if W_in_kernels else (delta if v is not None else _empty_in_order(delta))
        gz = None if z is None else (z if reuse and _no_overlap(z) else _empty_in_order(z))
        # the low-rank dt, B and C as side-by-side column blocks of one fp32 tensor (the Mamba mixer's x_proj output):
        # their gradients go side by side into one buffer too, which ops.linear_split's backward takes as it is
        low = v if v is not None else (delta if W_in_kernels else None)
        x_dbl = None if low is None or B.dim() != 3 or C.dim() != 3 or B.dtype != torch.float32 else \
            column_blocks([low.transpose(1, 2), B.transpose(1, 2), C.transpose(1, 2)])
        g_dbl, bc_out = None, None
        if x_dbl is not None:
            g_dbl = torch.empty(x_dbl.shape, device=u.device, dtype=torch.float32)
            R, N = low.shape[1], B.shape[1]
            bc_out = (g_dbl[..., R:R + N].unsqueeze(1), g_dbl[..., R + N:].unsqueeze(1))  # (b, 1, L, N)
        gA, gB, gC, gD, gbias, glow, gW = _backward(
            u, delta, z, gout, Af, Df, _grouped_bc(B), _grouped_bc(C), bf, softplus, hin, sloc,
            glast.contiguous() if glast is not None else None, plan, _IDENTITY, gu, gdt, gz, False,
            Wt if W_in_kernels else None, hf, bc_out, dt_done)
        if W is None:
            gv = gdt
        elif W_in_kernels:
            gv, gW = glow.to(delta.dtype), gW.to(W.dtype)
        else:  # the gradients of the product delta = (v^T Wt)^T; gdt is the dense (b, L, d) delta buffer; gv straight
            # into its columns of x_proj's gradient buffer where there is one
            gv_out = g_dbl[..., :v.shape[1]] if g_dbl is not None else None
            gv, gW = _low_rank_grads(gdt.transpose(1, 2), v, Wt, gv_out)
            gv, gW = gv.to(v.dtype), gW.to(W.dtype)
        if g_dbl is not None and W_in_kernels:
            gv = g_dbl[..., :gv.shape[1]].copy_(gv.transpose(1, 2)).transpose(1, 2)
        if Wx is not None:  # x_proj's backward: its input gradient added into du, its weight's gradient
            gWx = x_proj[1](g_dbl, u.transpose(1, 2), Wx, gu.transpose(1, 2))
            return gu, None, gA, None, None, gD, gz, gbias, None, gW, None, None, None, gWx.to(Wx.dtype), None
        return (gu, gv, gA, gB.reshape(B.shape).to(B.dtype), gC.reshape(C.shape).to(C.dtype), gD, gz, gbias, None,
                gW, None, None, None, None, None)


# from this many elements of the delta (b, L, d), its product and gradients run on kernels/low_rank_triton.py: fp32
# multiply-adds streamed at the memory's pace instead of cuBLAS's SGEMM (measured at 2 x 64^3 x 128 and 2 x 128^3 x 64,
# H200, session 14, kernels/bench_linear.py --low-rank)
_LOW_RANK_TRITON_FROM = 2 * 64 ** 3 * 128


def _low_rank_product(v, Wt):
    """delta = (v^T Wt)^T for v (b, R, L) and Wt (R, d): the dense fp32 (b, L, d) product, returned as its channels-last
    (b, d, L) view."""
    b, R, L = v.shape
    vt = v.transpose(1, 2)
    if b * L * Wt.shape[1] >= _LOW_RANK_TRITON_FROM:
        from .low_rank_triton import low_rank_product
        out = torch.empty(b, L, Wt.shape[1], device=v.device, dtype=torch.float32)
        low_rank_product(vt.reshape(b * L, R), Wt, out=out.view(b * L, -1))
        return out.transpose(1, 2)
    with torch.autocast(v.device.type, enabled=False):
        return (vt.float() @ Wt).transpose(1, 2)


def _low_rank_grads(g_tokens, v, Wt, gv_out=None):
    """The gradients of delta = (v^T Wt)^T for the delta's gradient g_tokens (b, L, d), dense: (gv (b, R, L), the
    transposed view of a (b, L, R) tensor, or of ``gv_out`` (b, L, R) into which it is written; gW (d, R)), fp32.
    From _LOW_RANK_TRITON_FROM elements: with d <= 64 both from one read of g (low_rank_grads: 0.46 against 0.89 ms
    at 2 x 128^3 x 64), else gv on the 3xTF32 GEMM and gW on cuBLAS (the fused kernel measured 0.28 against 0.23 ms
    at 2 x 64^3 x 128; H200, session 14)."""
    b, L, d = g_tokens.shape
    R = v.shape[1]
    vt = v.transpose(1, 2).reshape(b * L, R)
    g = g_tokens.reshape(b * L, d)
    big = g.numel() >= _LOW_RANK_TRITON_FROM
    gv2 = gv_out.view(b * L, R) if gv_out is not None else None  # (b, L) merge in a row-major buffer
    if big and d <= 64:
        from .low_rank_triton import low_rank_grads
        gv, gWt = low_rank_grads(g, vt, Wt, gv_out=gv2)
        return gv.view(b, L, R).transpose(1, 2), gWt.t()
    if big:
        from .linear_triton import matmul_tf32x3
        gv = matmul_tf32x3(g, Wt.t(), out=gv2)
    else:
        gv = torch.mm(g, Wt.t(), out=gv2)
    return gv.view(b, L, R).transpose(1, 2), (vt.t().float() @ g).t()


def _dt_buffer(delta, formed, owned):
    """(buffer, delta to read): where the forward writes dt = softplus(delta + bias), which its later passes and the
    backward read instead of forming it again (and the backward keeps instead of delta), and the full delta the first
    pass reads. The buffer is the delta itself where the scan owns it (``owned``: a product it multiplied out), else a
    new fp32 buffer in delta's layout; a delta with gaps, whose strides the buffer cannot share, is copied into it and
    read from there. (None, delta) where there is nothing to form (``formed``: softplus or a bias, full delta) or
    delta is not fp32 (an fp32 dt would be a larger buffer than a half delta)."""
    if not formed or (not owned and delta.dtype != torch.float32):
        return None, delta
    if owned:
        return delta, delta
    buf = _empty_in_order(delta)
    return buf, (delta if buf.stride() == delta.stride() else buf.copy_(delta))


def _no_overlap(t):
    """True when no two elements of t share memory (a stride-0 expanded gradient does): it can be written in place
    element by element."""
    span = 1
    for stride, size in sorted((st, sz) for st, sz in zip(t.stride(), t.shape) if sz > 1):
        if stride < span:
            return False
        span = stride * size
    return True


def _empty_in_order(t, dtype=None):
    """A new dense tensor shaped like t with its dims laid out in t's stride order (channels-last stays channels-last).
    Not ``empty_like``: t may be a view with gaps (z as the second half of the in_proj output; B as columns of the
    x_proj output), which ``empty_like`` lays out differently; the kernels write through the new tensor's strides."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))
    e = torch.empty([t.shape[i] for i in order], device=t.device, dtype=dtype or t.dtype)
    return e.permute([order.index(i) for i in range(t.dim())])


def channels_last(t):
    """The same (b, d, L) / (b, [G,] N, L) values with the channel (or N) axis fastest in memory; a copy only when it
    is not already so. The kernels' loads along the channels are then coalesced (module docstring)."""
    if t is None or t.dim() < 3 or t.stride(-2) == 1:
        return t
    return t.movedim(-1, -2).contiguous().movedim(-1, -2)


def selective_scan_triton(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False, delta_proj_weight=None, delta_in_kernels=True, reuse_buffers=False,
                          chunk_states=None, x_proj=None):
    """mamba-ssm ``selective_scan_fn`` semantics on the Triton kernels (see module docstring).

    ``delta_proj_weight`` W (d, R): delta is then (b, R, L) and the scan uses W @ delta (the Mamba mixer's dt_proj
    without bias): formed per step inside the kernels (``delta_in_kernels``: the (b, d, L) delta and its gradient are
    never stored; slower), or multiplied out by this op into a buffer of its own, which its backward overwrites with
    d(delta). ``reuse_buffers``: the caller reads neither z after the backward pass nor the output's gradient after
    this op's backward (the Mamba mixer: z is its own view of in_proj's output and the output goes to out_proj
    alone); dz and du are then written over them. A second backward through the same graph is then an error.
    ``chunk_states``: an ``ops.recompute`` slot: an empty one receives the states entering the chunks (and the
    chunks' dt sums); a filled one, from the forward pass of a recomputed region, replaces the summary pass.
    ``x_proj`` = (Wx, product, grads_into), with ``delta_proj_weight`` and delta, B, C None: they are the column
    blocks (R, N, N) of ``product(u's (b, L, d) tokens, Wx)``, a new (b, L, R + 2N) fp32 tensor (the Mamba mixer's
    x_proj, Wx (R + 2N, d)); the backward calls ``grads_into(g, tokens, Wx, du)`` with that output's gradient g,
    which adds x_proj's input gradient into du's tokens and returns Wx's gradient (ops.scan passes ops.linear's GEMMs).
    u, delta, z and time-varying B/C are used channels-last (copied to that layout where they are not; a Linear's
    output viewed as (b, d, L) already is); the output and the input gradients come back in that layout."""
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, L), got {tuple(u.shape)}")
    if A.is_complex():
        raise NotImplementedError("selective_scan (triton): complex A is not supported; use backend='torch'")
    W = delta_proj_weight
    if W is not None and (W.dim() != 2 or W.shape[0] != u.shape[1]):
        raise ValueError(f"selective_scan: delta_proj_weight must be (dim, R) with dim = {u.shape[1]}, "
                         f"got {tuple(W.shape)}")
    Wx = x_proj[0] if x_proj is not None else None
    if Wx is not None and (W is None or delta is not None or B is not None or C is not None or u.dtype != torch.float32
                           or Wx.shape != (W.shape[1] + 2 * A.shape[1], u.shape[1])):
        raise ValueError(f"selective_scan (triton): x_proj needs an fp32 u, delta_proj_weight (R columns), delta, B "
                         f"and C None and an (R + 2N, dim) weight; got {tuple(Wx.shape)}")
    dshape = u.shape if W is None else (u.shape[0], W.shape[1], u.shape[2])
    if (Wx is None and delta.shape != dshape) or (z is not None and z.shape != u.shape):
        raise ValueError(f"selective_scan: delta must be {tuple(dshape)} and z {tuple(u.shape)} (u's shape), got "
                         f"{None if delta is None else tuple(delta.shape)} and {None if z is None else tuple(z.shape)}")
    u, delta, z, B, C = (channels_last(t) for t in (u, delta, z, B, C))
    out, last = _ScanFn.apply(u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), W,
                              W is not None and bool(delta_in_kernels), bool(reuse_buffers), chunk_states, Wx,
                              x_proj[1:] if x_proj is not None else None)
    return (out, last) if return_last_state else out


# ------------------------------------------------------------------------------------------------------------------
# autograd: fused multi-direction (cross) scan


class _CrossFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, delta_bias, softplus, orders, W):
        b, d = x.shape[:2]
        spatial = tuple(x.shape[2:])
        L = math.prod(spatial)
        K = len(orders)
        N = A.shape[1]
        xs, ds = x.reshape(b, d, L), delta.reshape(b, K, delta.shape[2], L)
        Wt = W.float().transpose(1, 2).contiguous() if W is not None else None  # (K, R, d)
        Bs, Cs = B.reshape(b, K, N, L), C.reshape(b, K, N, L)
        Af = A.float().contiguous()
        Df = D.float().contiguous() if D is not None else None
        bf = delta_bias.float().contiguous() if delta_bias is not None else None
        out = _empty_in_order(x, torch.float32).view(b, d, L)  # in the map's layout (channels-last stays so)
        plan = _Plan(b, d, 1, L, N, x.device, per_sm=32)  # one launch per direction: more chunks fill the GPU
        # a full delta: the forward writes every direction's dt into a buffer of the op's own, kept for the backward
        dts, ds = _dt_buffer(ds, (softplus or bf is not None) and W is None, owned=False)
        saved = []
        for k, (perm, flip) in enumerate(orders):
            rows = slice(k * d, (k + 1) * d)
            hin, sloc, _ = _forward(xs, ds[:, k], Af[rows], Bs[:, k:k + 1], Cs[:, k:k + 1],
                                    Df[rows] if Df is not None else None, None, bf[rows] if bf is not None else None,
                                    softplus, out, plan, _order_for(spatial, perm, flip), k > 0, False,
                                    Wt[k] if Wt is not None else None, dt_out=dts[:, k] if dts is not None else None)
            saved += [hin, sloc]
        ctx.save_for_backward(x, dts if dts is not None else delta, Af, B, C, Df, bf, W, Wt, *saved)
        ctx.cfg = (softplus, list(orders), plan, dts is not None, delta.shape, delta.dtype)
        return out.view(b, d, *spatial)

    @staticmethod
    def backward(ctx, gout):
        x, delta, Af, B, C, Df, bf, W, Wt, *saved = ctx.saved_tensors
        softplus, orders, plan, dt_done, dshape, ddtype = ctx.cfg
        b, d = x.shape[:2]
        spatial = tuple(x.shape[2:])
        L = math.prod(spatial)
        K = len(orders)
        N = Af.shape[1]
        f32 = torch.float32
        xs, ds = x.reshape(b, d, L), delta.reshape(b, K, dshape[2], L)  # delta: the dt buffer where dt_done
        Bs, Cs = B.reshape(b, K, N, L), C.reshape(b, K, N, L)
        go = gout.reshape(b, d, L)
        # gradients in their inputs' layouts (so that channels-last inputs get coalesced stores)
        gx = _empty_in_order(x, f32).view(b, d, L)
        gdelta = _empty_in_order(delta, f32).view(b, K, delta.shape[2], L)
        gW = torch.empty(W.shape, device=W.device, dtype=f32) if W is not None else None
        gA = torch.empty_like(Af)
        gB = _empty_in_order(B, f32).view(b, K, N, L)
        gC = _empty_in_order(C, f32).view(b, K, N, L)
        gD = torch.empty_like(Df) if Df is not None else None
        gbias = torch.empty_like(bf) if bf is not None else None
        for k, (perm, flip) in enumerate(orders):
            rows = slice(k * d, (k + 1) * d)
            gAk, gBk, gCk, gDk, gbk, glow, gWk = _backward(
                xs, ds[:, k], None, go, Af[rows], Df[rows] if Df is not None else None, Bs[:, k:k + 1],
                Cs[:, k:k + 1], bf[rows] if bf is not None else None, softplus, saved[2 * k], saved[2 * k + 1], None,
                plan, _order_for(spatial, perm, flip), gx, gdelta[:, k] if W is None else None, None, k > 0,
                Wt[k] if W is not None else None, dt_done=dt_done)
            if W is not None:
                gdelta[:, k] = glow
                gW[k] = gWk
            gA[rows] = gAk
            gB[:, k] = gBk[:, 0]
            gC[:, k] = gCk[:, 0]
            if gD is not None:
                gD[rows] = gDk
            if gbias is not None:
                gbias[rows] = gbk
        return (gx.view(x.shape).to(x.dtype), gdelta.view(dshape).to(ddtype), gA,
                gB.view(B.shape).to(B.dtype), gC.view(C.shape).to(C.dtype), gD, gbias, None, None,
                gW.to(W.dtype) if W is not None else None)


def cross_selective_scan_triton(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, orders=None,
                                delta_proj_weight=None):
    """Fused multi-direction scan (``nnunet_mamba.ops.cross_selective_scan`` semantics): reads the map ``x``
    (b, d, *S) and the per-direction ``delta`` (b, K, d, *S), ``B``/``C`` (b, K, N, *S) in every scan order by index
    arithmetic and returns the fp32 sum over directions, (b, d, *S). No re-ordered copies are made.
    ``delta_proj_weight`` W (K, d, R): delta is (b, K, R, *S) and direction k uses W[k] @ delta[:, k], formed in the
    kernels (SS2D's dt_projs)."""
    if orders is None:
        raise ValueError("cross_selective_scan_triton needs the scan orders (nnunet_mamba.ops.cross_scan_orders)")
    orders = [(tuple(p), bool(f)) for p, f in orders]
    K = len(orders)
    b, d = x.shape[:2]
    spatial = tuple(x.shape[2:])
    N = A.shape[1]
    W = delta_proj_weight
    if W is not None and (W.dim() != 3 or W.shape[:2] != (K, d)):
        raise ValueError(f"cross_selective_scan: delta_proj_weight must be (K, d, R) with (K, d) = {(K, d)}, "
                         f"got {tuple(W.shape)}")
    dc = d if W is None else W.shape[2]
    if delta.shape != (b, K, dc, *spatial) or B.shape != (b, K, N, *spatial) or C.shape != B.shape:
        raise ValueError(f"cross_selective_scan: expected delta {(b, K, dc, *spatial)} and B/C {(b, K, N, *spatial)}, "
                         f"got {tuple(delta.shape)}, {tuple(B.shape)}, {tuple(C.shape)}")
    if A.shape != (K * d, N):
        raise ValueError(f"cross_selective_scan: A must be (K*d, N) = {(K * d, N)}, got {tuple(A.shape)}")
    # the spatial block of each tensor must be row-major with one element stride (dense, or channels-last with the
    # channel count as stride: position p at p * stride); batch/direction/channel strides are free; else a copy
    x = x if _spatial_rowmajor(x, 2) else x.contiguous()
    delta, B, C = (t if _spatial_rowmajor(t, 3) else t.contiguous() for t in (delta, B, C))
    return _CrossFn.apply(x, delta, A, B, C, D, delta_bias, bool(delta_softplus), orders, W)


def _spatial_rowmajor(X, first):
    """True when the spatial dims X.shape[first:] are row-major with one element stride, so that they merge into one
    position axis (a view) and position p sits at p * stride: dense, or channels-last."""
    sizes, strides = X.shape[first:], X.stride()[first:]
    inner = [st for sz, st in zip(sizes, strides) if sz != 1]
    step = inner[-1] if inner else 1
    for size, stride in zip(reversed(sizes), reversed(strides)):
        if size != 1 and stride != step:
            return False
        step *= size
    return True
