"""Measured per-shape choice among the selective-scan backends for ``backend="auto"``.

``kernels/bench_scan.py`` times the GPU backends (Triton and mamba-ssm; forward + backward and forward alone) on the
anchor and network shapes and writes ``kernels/auto_table.json``. A call is matched to the nearest
measured shape of the same kind (plain scan or fused cross-scan), precision class and input layout ((b, d, L)-
contiguous or channels-last), by distance in (log2(batch * channels), log2(L)); ``measured_times`` returns each
backend's time there (forward + backward with gradients on, the forward alone under ``torch.no_grad``), and the
registry runs the fastest usable one. Without a measured entry of that kind, precision class and layout nothing is
returned (the registry then falls back to backend priority). Importing this module does not import triton.
"""
from __future__ import annotations

import json
import math
import pathlib
from functools import lru_cache
from typing import Optional

TABLE = pathlib.Path(__file__).resolve().parent / "auto_table.json"


@lru_cache(maxsize=4)
def load_table(path: str = str(TABLE)) -> dict:
    p = pathlib.Path(path)
    if not p.exists():
        return {"entries": []}
    return json.loads(p.read_text())


def _key(kind: str, bd: int, L: int):
    return kind, math.log2(max(1, bd)), math.log2(max(1, L))


def nearest_entry(kind: str, batch_channels: int, L: int, half: bool, table: Optional[dict] = None,
                  layout: str = "contiguous"):
    table = load_table() if table is None else table
    rows = [e for e in table.get("entries", []) if e.get("kind") == kind and e.get("triton_ms") is not None]
    rows = [e for e in rows if (e.get("dtype") != "fp32") == half and e.get("layout", "contiguous") == layout]
    if not rows:
        return None
    _, x, y = _key(kind, batch_channels, L)
    return min(rows, key=lambda e: (math.log2(e["b"] * e["d"]) - x) ** 2 + (math.log2(e["L"]) - y) ** 2)


def measured_times(u, table: Optional[dict] = None) -> dict:
    """{backend: ms} on the nearest measured shape of the same kind, precision class and layout of u (u: (b, d, L)
    for a plain scan, or the map (b, d, *S) of a cross-scan; channels-last: channel stride 1, as a Linear's output
    or SS2D's map): forward + backward times when gradients are on (training), forward times when they are off
    (inference). Backends the entry has no time for are left out; {} without a matching entry."""
    import torch

    kind = "cross" if u.dim() > 3 else "scan"
    L = math.prod(u.shape[2:])
    layout = "channels-last" if u.stride(1) == 1 and u.shape[1] > 1 else "contiguous"
    e = nearest_entry(kind, u.shape[0] * u.shape[1], L, u.dtype != torch.float32, table, layout)
    if e is None:
        return {}
    forward_only = not torch.is_grad_enabled() and e.get("triton_fwd_ms") is not None
    times = {}
    for k, v in e.items():
        if v is not None and k.endswith("_ms") and k.endswith("_fwd_ms") == forward_only:
            times[k[:-len("_fwd_ms" if forward_only else "_ms")]] = v
    return times
