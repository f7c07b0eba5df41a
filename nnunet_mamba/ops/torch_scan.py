"""Pure-PyTorch selective scan: the CPU path and the fallback on any device.

Semantics are those of mamba-ssm's ``selective_scan_fn`` (see ``nnunet_mamba.ops.selective_scan``).
The linear recurrence ``h_t = dA_t * h_{t-1} + x_t`` is evaluated as a *chunked* scan: the sequence is cut
into ``n_chunks`` chunks of length ``T ~ sqrt(L)``; a Python loop of ``T`` steps scans all chunks at once,
a loop of ``n_chunks`` steps carries the state between chunks. All state arithmetic is fp32.

The backward pass is written by hand (a reverse scan of the same form) and recomputes the states from the
saved inputs, so nothing of size ``(b, d, L, N)`` is kept between forward and backward. Channels are processed
in blocks so that transient ``(b, d_block, L, N)`` tensors stay within ``_BLOCK_BYTES``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_BLOCK_BYTES = 64 * 2**20


def _chunk_len(L: int) -> int:
    return int(min(256, max(8, 2 ** round(math.log2(max(1.0, math.sqrt(L)))))))


def _linear_scan(dA: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """h_t = dA_t * h_{t-1} + x_t along dim -2 (h_{-1} = 0). dA, x: (..., L, N) fp32."""
    L, N = x.shape[-2:]
    T = _chunk_len(L)
    nc = -(-L // T)
    pad = nc * T - L
    if pad:
        dA = F.pad(dA, (0, 0, 0, pad), value=1.0)
        x = F.pad(x, (0, 0, 0, pad), value=0.0)
    lead = x.shape[:-2]
    dA = dA.reshape(*lead, nc, T, N)
    h = x.reshape(*lead, nc, T, N).clone()
    for t in range(1, T):  # local scans of all chunks at once, zero initial state
        h[..., t, :].addcmul_(dA[..., t, :], h[..., t - 1, :])
    if nc > 1:
        decay = torch.cumprod(dA, dim=-2)  # prod_{s<=t} dA_s inside each chunk
        carry = torch.zeros_like(h[..., 0, :])  # (..., nc, N): state entering each chunk
        for c in range(1, nc):
            carry[..., c, :] = decay[..., c - 1, -1, :] * carry[..., c - 1, :] + h[..., c - 1, -1, :]
        h.addcmul_(decay, carry.unsqueeze(-2))
    h = h.reshape(*lead, nc * T, N)
    return h[..., :L, :] if pad else h


def _blocks(u: torch.Tensor, n_state: int):
    """Slices over (groups, channels-per-group) that keep (b, block, L, N) fp32 tensors small."""
    b, G, dg, L = u.shape
    per_channel = b * L * n_state * 4 * 6  # ~6 live tensors of (b, ., L, N)
    cb = max(1, min(dg, _BLOCK_BYTES // max(1, per_channel)))
    gb = max(1, min(G, _BLOCK_BYTES // max(1, per_channel * cb))) if cb == dg else 1
    for g0 in range(0, G, gb):
        for c0 in range(0, dg, cb):
            yield slice(g0, g0 + gb), slice(c0, c0 + cb)


class _ScanCore(torch.autograd.Function):
    """y_t = sum_n C_t h_t for h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t.

    Shapes (grouped view): u, delta (b, G, dg, L); A (G, dg, N); B, C (bB, G, 1, N, LB) where bB in {1, b} and
    LB in {1, L} (time-constant B/C of shape (d, N) use LB = 1). All fp32.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        y = torch.empty_like(u)
        last = u.new_empty(*u.shape[:-1], A.shape[-1])
        for gs, cs in _blocks(u, A.shape[-1]):
            h, _ = _states(u[:, gs, cs], delta[:, gs, cs], A[gs, cs], B[:, gs], C[:, gs])
            y[:, gs, cs] = torch.einsum("bgclN,bgcNl->bgcl", h, _bc(C[:, gs], h.shape[-2]))
            last[:, gs, cs] = h[..., -1, :]
        ctx.save_for_backward(u, delta, A, B, C)
        return y, last

    @staticmethod
    def backward(ctx, gy, glast):
        u, delta, A, B, C = ctx.saved_tensors
        gu, gdelta = torch.zeros_like(u), torch.zeros_like(u)
        gA = torch.zeros_like(A)
        L = u.shape[-1]
        gB, gC = torch.zeros_like(B), torch.zeros_like(C)
        gy = gy.contiguous()
        for gs, cs in _blocks(u, A.shape[-1]):
            ub, db, Ab = u[:, gs, cs], delta[:, gs, cs], A[gs, cs]
            Bb, Cb = _bc(B[:, gs], L), _bc(C[:, gs], L)  # (bB, g, 1, N, L)
            h, dA = _states(ub, db, Ab, B[:, gs], C[:, gs])
            q = gy[:, gs, cs].unsqueeze(-1) * Cb.transpose(-1, -2)  # dy/dh_t contributions (b, g, c, L, N)
            if glast is not None:
                q[..., -1, :] += glast[:, gs, cs]
            # reverse scan: gh_t = q_t + dA_{t+1} gh_{t+1}
            dA_next = torch.cat([dA[..., 1:, :], torch.ones_like(dA[..., :1, :])], dim=-2)
            gh = _linear_scan(dA_next.flip(-2), q.flip(-2)).flip(-2)
            h_prev = torch.cat([torch.zeros_like(h[..., :1, :]), h[..., :-1, :]], dim=-2)
            g_dA = gh * h_prev * dA  # d/d(delta*A) of exp(delta*A)
            gA[gs, cs] += torch.einsum("bgclN,bgcl->gcN", g_dA, db)
            Bt = Bb.transpose(-1, -2)  # (bB, g, 1, L, N)
            ghB = (gh * Bt).sum(-1)  # (b, g, c, L)
            gdelta[:, gs, cs] = torch.einsum("bgclN,gcN->bgcl", g_dA, Ab) + ghB * ub
            gu[:, gs, cs] = ghB * db
            gB[:, gs] += _to_bc(torch.einsum("bgclN,bgcl->bglN", gh, db * ub), B[:, gs].shape)
            gC[:, gs] += _to_bc(torch.einsum("bgclN,bgcl->bglN", h, gy[:, gs, cs]), C[:, gs].shape)
        return gu, gdelta, gA, gB, gC


def _to_bc(g: torch.Tensor, shape) -> torch.Tensor:
    """(b, g, L, N) gradient -> the (possibly broadcast) B/C layout (bB, g, 1, N, LB)."""
    return g.transpose(-1, -2).unsqueeze(2).sum_to_size(shape)


def _bc(X: torch.Tensor, L: int) -> torch.Tensor:
    return X.expand(*X.shape[:-1], L)


def _states(u, delta, A, B, C):
    """All states h (b, g, c, L, N) and the decay factors dA = exp(delta * A)."""
    L = u.shape[-1]
    dA = torch.exp(delta.unsqueeze(-1) * A.unsqueeze(-2))  # (b, g, c, L, N)
    x = (delta * u).unsqueeze(-1) * _bc(B, L).transpose(-1, -2)
    return _linear_scan(dA, x), dA


def selective_scan_torch(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """Vectorised PyTorch implementation of ``selective_scan_fn`` (fp32 state, hand-written backward)."""
    out_dtype = u.dtype
    b, d, L = u.shape
    N = A.shape[-1]
    f32 = torch.float32
    u32, delta32 = u.to(f32), delta.to(f32)
    if delta_bias is not None:
        delta32 = delta32 + delta_bias.to(f32).view(d, 1)
    if delta_softplus:
        delta32 = torch.where(delta32 > 20, delta32, torch.log1p(torch.exp(torch.clamp(delta32, max=20))))

    def grouped(X):
        if X.dim() == 2:  # (d, N): time-constant, per channel -> G = d
            return X.to(f32).view(1, d, 1, N, 1)
        if X.dim() == 3:  # (b, N, L): one group
            X = X.unsqueeze(1)
        return X.to(f32).unsqueeze(2)  # (b, G, 1, N, L)

    Bg, Cg = grouped(B), grouped(C)
    G = Bg.shape[1]
    if d % G:
        raise ValueError(f"selective_scan: dim {d} is not divisible by the number of B/C groups {G}")
    y, last = _ScanCore.apply(u32.view(b, G, d // G, L), delta32.view(b, G, d // G, L),
                              A.to(f32).view(G, d // G, N), Bg, Cg)
    y = y.view(b, d, L)
    if D is not None:
        y = y + D.to(f32).view(d, 1) * u32
    if z is not None:
        y = y * F.silu(z.to(f32))
    y = y.to(out_dtype)
    return (y, last.view(b, d, N)) if return_last_state else y
