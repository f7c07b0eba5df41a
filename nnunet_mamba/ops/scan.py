"""Backend registry and dispatch for the selective scan (see the package docstring)."""
from __future__ import annotations

import functools
import importlib.util
import itertools
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from . import recompute
from .torch_scan import selective_scan_torch


class BackendUnavailable(RuntimeError):
    """A selective-scan backend was requested that cannot run here; the message says how to get it."""


@dataclass
class _Backend:
    name: str
    fn: Callable  # same signature as selective_scan (without backend)
    why_unavailable: Callable[[Optional[torch.device]], Optional[str]]  # None = usable; else how to fix
    priority: int  # higher wins in "auto" when no measured choice exists
    cross_fn: Optional[Callable] = None  # fused multi-direction scan (cross_selective_scan semantics)
    timings: Optional[Callable] = None  # u -> {backend name: ms}: measured times of backends for this shape
    unsupported: Optional[Callable] = None  # (B) -> None, or why this backend cannot take that B/C layout
    fuses_delta_proj: bool = False  # fn takes delta_proj_weight (a low-rank delta) and delta_in_kernels itself
    reuses_buffers: bool = False  # fn takes reuse_buffers
    keeps_chunk_states: bool = False  # fn takes chunk_states (an ops.recompute slot)


_BACKENDS: dict[str, _Backend] = {}
_ANNOUNCED: set = set()


def register_backend(name, fn, why_unavailable, priority=0, cross_fn=None, timings=None, unsupported=None,
                     fuses_delta_proj=False, reuses_buffers=False, keeps_chunk_states=False):
    """Add a backend. ``why_unavailable(device)`` returns None when usable, otherwise an install hint."""
    _BACKENDS[name] = _Backend(name, fn, why_unavailable, priority, cross_fn, timings, unsupported, fuses_delta_proj,
                               reuses_buffers, keeps_chunk_states)
    _CHOICES.clear()


def available_backends(device: Optional[torch.device | str] = None) -> list[str]:
    """Names of the backends usable here (for ``device``, default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    return [b.name for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)
            if b.why_unavailable(device) is None]


ENV_BACKEND = "NNUNET_MAMBA_SCAN_BACKEND"  # forces the backend that "auto" would choose (benchmarks, debugging)


# The backend each kind of call resolved to, by everything the choice depends on (the backend asked for, u's device,
# dtype, shape and layout, whether gradients are on, B's layout): a network repeats a few kinds of call every step,
# and resolving one anew (availability checks, the measured table's nearest entry) cost ~0.1-0.4 ms of host time per
# scan on the H200 machine. Emptied when a backend is registered.
_CHOICES: dict = {}


def _resolve(backend: str, u: torch.Tensor, B: torch.Tensor) -> _Backend:
    if backend == "auto" and os.environ.get(ENV_BACKEND):
        backend = os.environ[ENV_BACKEND]
    key = (backend, u.device, u.dtype, u.shape, u.stride(1) == 1, torch.is_grad_enabled(),
           None if B is None else B.dim())
    be = _CHOICES.get(key)
    if be is None:
        be = _CHOICES[key] = _choose(backend, u, B)
    return be


def _choose(backend: str, u: torch.Tensor, B: torch.Tensor) -> _Backend:
    if backend != "auto":
        if backend not in _BACKENDS:
            raise ValueError(f"unknown selective-scan backend {backend!r}; known: {sorted(_BACKENDS)}")
        be = _BACKENDS[backend]
        why = be.why_unavailable(u.device) or (be.unsupported and be.unsupported(B))
        if why:
            raise BackendUnavailable(f"selective-scan backend {backend!r} is not usable on {u.device}: {why}")
        return be
    usable = [b for b in sorted(_BACKENDS.values(), key=lambda b: -b.priority)
              if b.why_unavailable(u.device) is None and not (b.unsupported and b.unsupported(B))]
    # the fastest usable backend by measurement where one exists for this shape, else the highest priority (the
    # measured table times the GPU backends; the PyTorch one, far slower on a GPU, is the last resort there)
    measured = {}
    for b in usable:
        if b.timings is not None:
            measured.update(b.timings(u))
    timed = [b for b in usable if b.name in measured]
    chosen = min(timed, key=lambda b: measured[b.name]) if timed else usable[0]
    key = (u.device.type, chosen.name)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        print(f"nnunet_mamba: selective scan on {u.device.type} uses the {chosen.name!r} backend "
              f"(available: {', '.join(b.name for b in usable)})", file=sys.stderr)
    return chosen


@dataclass(frozen=True)
class ScanCall:
    """One selective scan run through this boundary: the backend that ran it and its sizes (all directions of a
    cross scan together: ``channels`` = K*d)."""

    backend: str
    batch: int
    channels: int
    length: int
    state: int
    with_D: bool
    with_z: bool


_RECORDERS: list[list] = []


@contextmanager
def record_scans():
    """Collect a ``ScanCall`` for every (forward) selective scan run inside the block; yields the list.

    Tells which backend "auto" picked for the real tensors (it can differ per shape) and gives the sizes for an
    analytic FLOP count (benchmarks)."""
    calls: list = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


def _record(backend: str, u: torch.Tensor, A: torch.Tensor, D, z):
    call = ScanCall(backend, u.shape[0], A.shape[0], math.prod(u.shape[2:]), A.shape[1], D is not None,
                    z is not None)
    for calls in _RECORDERS:
        calls.append(call)


# Memory mode: NNUNET_MAMBA_FUSED_DELTA=1 lets a backend that can (Triton) form a low-rank delta inside the scan
# kernels. Off by default: on the H200 (2026-11-26, docs/kernels.md "Low-rank delta") it took 1.9 / 2.4 / 1.3 GiB
# off the peak of LightM-UNet / VM-UNet / MSVM-UNet 2D steps but made them 1.24x / 1.22x / 1.16x slower.
ENV_FUSED_DELTA = "NNUNET_MAMBA_FUSED_DELTA"


def _fuse_delta_proj(be: _Backend) -> bool:
    mode = os.environ.get(ENV_FUSED_DELTA, "0")
    if mode not in ("0", "1"):
        raise ValueError(f"{ENV_FUSED_DELTA}={mode!r}: use 1 (least memory, slower) or 0 (default)")
    return be.fuses_delta_proj and mode == "1"


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend="auto", delta_proj_weight=None, reuse_buffers=False,
                   x_proj_weight=None):
    """mamba-ssm ``selective_scan_fn`` semantics; see docs/ops.md.

    u, delta, z: (b, d, L); A: (d, N) fp32; B, C: (d, N), (b, N, L) or grouped (b, G, N, L);
    D, delta_bias: (d,) fp32. Returns y (b, d, L) in u's dtype [, last state (b, d, N) fp32].
    All arithmetic is fp32 whatever the input dtype.

    ``delta_proj_weight`` W (d, R): delta is given low-rank, (b, R, L), and the scan uses W @ delta (the Mamba
    mixer's dt_proj, its bias being delta_bias). A backend that takes it (Triton) forms each step's delta in the
    kernels and never stores the (b, d, L) delta or its gradient when ``NNUNET_MAMBA_FUSED_DELTA=1`` (less memory,
    slower), and otherwise multiplies it out into a buffer of its own that its backward overwrites with d(delta);
    for the other backends it is multiplied out here.

    ``reuse_buffers``: a promise that z is not read after the backward pass and that the output's gradient is not
    read after this op's backward (the Mamba mixer: z is a view of its own in_proj output, and the output feeds
    out_proj alone). A backend that can (Triton) then writes dz and du over them: two (b, d, L) buffers less at the
    backward's memory peak. Other backends ignore it.

    Inside a recomputed region (``ops.recompute``) a backend that can (Triton) keeps the states entering its chunks
    from the forward pass, and the recomputation starts at its output pass.

    ``x_proj_weight`` Wx (R + 2N, d), with ``delta_proj_weight`` (R columns) and delta, B, C None: they are the
    column blocks (R, N, N) of ``F.linear(u's (b, L, d) tokens, Wx)`` (the Mamba mixer's x_proj, no bias). A backend
    that can (Triton, fp32 outside autocast) computes that product in its forward and x_proj's backward in its own,
    with x_proj's input gradient added into du in the GEMM's pass (no separate sum of the two gradients of u); the
    others get delta, B and C from ``ops.linear_split`` here.
    """
    if x_proj_weight is not None:
        if delta is not None or B is not None or C is not None or delta_proj_weight is None:
            raise ValueError("selective_scan: with x_proj_weight, delta, B and C come from it (pass None) and "
                             "delta_proj_weight is needed (the low-rank delta's R columns)")
        sizes = (delta_proj_weight.shape[1], A.shape[1], A.shape[1])
        if x_proj_weight.shape != (sum(sizes), u.shape[1]):
            raise ValueError(f"selective_scan: x_proj_weight must be (R + 2N, dim) = {(sum(sizes), u.shape[1])}, "
                             f"got {tuple(x_proj_weight.shape)}")
    be = _resolve(backend, u, B)
    if _RECORDERS:
        _record(be.name, u, A, D, z)
    kw = dict(D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus, return_last_state=return_last_state)
    if be.reuses_buffers:
        kw["reuse_buffers"] = reuse_buffers
    if be.keeps_chunk_states:
        kw["chunk_states"] = recompute.slot()
    if x_proj_weight is not None:
        from .linear import _product, linear_grads_into, linear_split  # (ops.linear imports this module)
        if be.fuses_delta_proj and u.dtype == x_proj_weight.dtype == torch.float32 and \
                not torch.is_autocast_enabled(u.device.type):
            kw["x_proj"] = (x_proj_weight, _product, linear_grads_into)
        else:
            delta, B, C = (t.transpose(1, 2) for t in linear_split(u.transpose(1, 2), x_proj_weight, None, sizes))
    if delta_proj_weight is not None:
        if be.fuses_delta_proj:
            kw.update(delta_proj_weight=delta_proj_weight, delta_in_kernels=_fuse_delta_proj(be))
        else:  # token-major product viewed as (b, d, L): the layout a Linear gives (what the mixer passed before).
            # x @ (a row-major W^T) rather than F.linear: the weight's gradient is then the GEMM
            # (R x tokens) @ (tokens x d), not F.linear's (d x tokens) @ (tokens x R), which cuBLAS runs slowly for
            # R = 2 (LightM-UNet's 2 x 128^3 tokens, H200: 1.5 ms per call)
            Wt = delta_proj_weight.t()
            delta = (delta.transpose(1, 2) @ (Wt.contiguous() if torch.is_grad_enabled() else Wt)).transpose(1, 2)
    return be.fn(u, delta, A, B, C, **kw)


# ----------------------------------------------------------------------------------------------------------
# Multi-direction (cross) scans of SS2D / SS3D


def cross_scan_orders(nd: int, k: int | None = None) -> list[tuple[tuple[int, ...], bool]]:
    """Scan orders as data: a list of (axis permutation, reversed).

    2D, K=4: HW, WH, reversed HW, reversed WH (VMamba). 3D, K=6 (default): the three cyclic shifts of the axes,
    then their reverses. 3D, K=12: all six permutations (lexicographic), then their reverses (specs/ss2d.md §5).
    """
    if k is None:
        k = 4 if nd == 2 else 6
    if k == 2 * nd:
        perms = [tuple((i + s) % nd for i in range(nd)) for s in range(nd)]
    elif nd == 3 and k == 12:
        perms = list(itertools.permutations(range(3)))
    else:
        raise ValueError(f"unsupported number of scan directions K={k} for {nd}D (use {2 * nd}"
                         + (" or 12" if nd == 3 else "") + ")")
    return [(p, False) for p in perms] + [(p, True) for p in perms]


def _to_sequence(x: torch.Tensor, perm: Sequence[int], flip: bool) -> torch.Tensor:
    """(b, c, *S) -> (b, c, L) in the given scan order."""
    s = x.permute(0, 1, *[2 + p for p in perm]).reshape(*x.shape[:2], -1)
    return s.flip(-1) if flip else s


def _from_sequence(s: torch.Tensor, perm: Sequence[int], flip: bool, spatial: Sequence[int]) -> torch.Tensor:
    """Inverse of _to_sequence: (b, c, L) -> (b, c, *S)."""
    if flip:
        s = s.flip(-1)
    s = s.reshape(*s.shape[:2], *[spatial[p] for p in perm])
    inv = [perm.index(i) for i in range(len(perm))]
    return s.permute(0, 1, *[2 + i for i in inv])


def cross_selective_scan_reference(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True,
                                   orders=None, backend="auto"):
    """cross_selective_scan by materialising the K re-ordered copies and one grouped selective_scan call."""
    b, d = x.shape[:2]
    spatial = x.shape[2:]
    K = len(orders)
    xs = torch.stack([_to_sequence(x, p, f) for p, f in orders], 1)  # (b, K, d, L)
    ds = torch.stack([_to_sequence(delta[:, k], p, f) for k, (p, f) in enumerate(orders)], 1)
    Bs = torch.stack([_to_sequence(B[:, k], p, f) for k, (p, f) in enumerate(orders)], 1)  # (b, K, N, L)
    Cs = torch.stack([_to_sequence(C[:, k], p, f) for k, (p, f) in enumerate(orders)], 1)
    ys = selective_scan(xs.flatten(1, 2), ds.flatten(1, 2), A, Bs, Cs, D=D, delta_bias=delta_bias,
                        delta_softplus=delta_softplus, backend=backend).view(b, K, d, -1)
    return sum(_from_sequence(ys[:, k], p, f, spatial) for k, (p, f) in enumerate(orders))


def cross_selective_scan(x, delta, A, B, C, D=None, delta_bias=None, delta_softplus=True, orders=None,
                         backend="auto", delta_proj_weight=None):
    """Selective scan of a feature map along K scan orders, merged by summation (SS2D / SS3D core).

    x: (b, d, *S) - the map, read in every order; delta: (b, K, d, *S); B, C: (b, K, N, *S) - per-direction
    inputs in the map's own (spatial) layout; A: (K*d, N); D, delta_bias: (K*d,) - direction k uses rows
    [k*d, (k+1)*d). orders: list of (permutation, reversed) (``cross_scan_orders``). Returns y (b, d, *S) fp32:
    the sum over directions of each direction's scan output mapped back to its spatial position.
    Inputs are cast to fp32. Backends with a fused form read the map in each order without copies.
    ``delta_proj_weight`` W (K, d, R): delta is given low-rank, (b, K, R, *S), and direction k uses W[k] @ delta[:, k]
    (SS2D's dt_projs); the fused Triton form computes it in the kernels (as for ``selective_scan``), otherwise it is
    multiplied out here.
    """
    if orders is None:
        orders = cross_scan_orders(x.dim() - 2)
    args = [t.float() if t is not None else None for t in (x, delta, B, C)]
    W = delta_proj_weight.float() if delta_proj_weight is not None else None
    be = None
    if backend == "auto" or (backend in _BACKENDS and _BACKENDS[backend].cross_fn is not None):
        be = _resolve(backend, x, B)
        if be.cross_fn is None:
            backend, be = be.name, None
    kw = {}
    if W is not None:
        if be is not None and _fuse_delta_proj(be):
            kw["delta_proj_weight"] = W
        else:  # token-major product, (b, *S, K, d) in memory, viewed as (b, K, d, *S); fp32 also under autocast
            args[1] = torch.einsum("...kr,kdr->...kd", args[1].movedim((1, 2), (-2, -1)), W).float().movedim(
                (-2, -1), (1, 2))
    if be is not None:
        if _RECORDERS:
            _record(be.name, x, A, D, None)
        return be.cross_fn(*args[:2], A, *args[2:], D=D, delta_bias=delta_bias, delta_softplus=delta_softplus,
                           orders=orders, **kw)
    return cross_selective_scan_reference(*args[:2], A, *args[2:], D=D, delta_bias=delta_bias,
                                          delta_softplus=delta_softplus, orders=orders, backend=backend)


# ----------------------------------------------------------------------------------------------------------
# Built-in backends

def _torch_unavailable(device):
    return None


def _mamba_ssm_unavailable(device):
    if device is not None and device.type != "cuda":
        return "mamba-ssm's kernel runs on CUDA tensors only (use backend='torch' on the CPU)"
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    if importlib.util.find_spec("selective_scan_cuda") is None:
        return ("mamba-ssm's CUDA extension is not installed. Install it with "
                "`MAMBA_FORCE_BUILD=TRUE pip install --no-build-isolation 'nnunet-mamba[cuda]'` "
                "(needs nvcc matching torch's CUDA; see docs/installation.md)")
    return None


def _selective_scan_mamba_ssm(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                              return_last_state=False):
    if B.dim() == 2 or C.dim() == 2:
        raise BackendUnavailable(f"selective-scan backend 'mamba_ssm': {_CONSTANT_BC}")
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # lazy: CUDA extension

    def c(t):
        return None if t is None else (t if t.stride(-1) == 1 else t.contiguous())

    return selective_scan_fn(c(u), c(delta), A.float(), c(B), c(C), None if D is None else D.float(), c(z),
                             None if delta_bias is None else delta_bias.float(), delta_softplus,
                             return_last_state)


register_backend("torch", selective_scan_torch, _torch_unavailable, priority=0)
_CONSTANT_BC = ("time-constant B/C of shape (d, N) are not supported (on the H100 mamba-ssm's path for them gave "
                "another last state than the oracle and refused bf16); backend='auto' uses the torch backend for them")


def _mamba_ssm_unsupported(B):
    return _CONSTANT_BC if B is not None and B.dim() == 2 else None


register_backend("mamba_ssm", _selective_scan_mamba_ssm, _mamba_ssm_unavailable, priority=10,
                 unsupported=_mamba_ssm_unsupported)


# ----------------------------------------------------------------------------------------------------------
# The project's Triton kernels (kernels/selective_scan_triton.py). Triton is imported only when the backend is
# used; checking availability looks for the package without importing it. "auto" prefers it per shape class from
# the measured table committed with the benchmark (kernels/auto_table.json, kernels/bench_scan.py).

@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    """Looked up once: ``find_spec`` costs ~0.1 ms, and the token ops and projections ask on every large call."""
    return importlib.util.find_spec("triton") is not None


def _triton_unavailable(device):
    if device is not None and device.type != "cuda":
        return ("the Triton kernels run on CUDA tensors only (use backend='torch' on the CPU; the kernel tests run "
                "them on the CPU through Triton's interpreter, TRITON_INTERPRET=1)")
    if not torch.cuda.is_available():
        return "no CUDA device is available (the Triton backend needs a CUDA build of PyTorch and an NVIDIA GPU)"
    if not _triton_installed():
        return "Triton is not installed: `pip install triton` (PyTorch's Linux CUDA wheels ship a matching one)"
    return None


def _selective_scan_triton(*args, **kwargs):
    from ..kernels.selective_scan_triton import selective_scan_triton
    return selective_scan_triton(*args, **kwargs)


def _cross_selective_scan_triton(*args, **kwargs):
    from ..kernels.selective_scan_triton import cross_selective_scan_triton
    return cross_selective_scan_triton(*args, **kwargs)


def _triton_timings(u):
    from ..kernels.autochoose import measured_times
    return measured_times(u)


# "auto" takes the Triton kernel where its measured table (kernels/auto_table.json: Triton and mamba-ssm timed on the
# same tensors) says it is the faster of the usable backends for that shape, precision and input layout. Where
# nothing of that kind is measured, priority decides: mamba-ssm, then Triton, then the PyTorch backend, which on the
# H200 measured 16x to 3200x slower than the Triton kernel on every benchmark shape it ran (session 8,
# benchmarks/results/logs/session8_h200.log), so on CUDA it runs only when no GPU backend is usable.
# NNUNET_MAMBA_SCAN_BACKEND=triton or backend="triton" selects it explicitly.
register_backend("triton", _selective_scan_triton, _triton_unavailable, priority=5,
                 cross_fn=_cross_selective_scan_triton, timings=_triton_timings, fuses_delta_proj=True,
                 reuses_buffers=True, keeps_chunk_states=True)
