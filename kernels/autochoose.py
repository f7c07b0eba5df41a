"""Measured per-shape choice between the Triton kernels and mamba-ssm for ``backend="auto"``.

``kernels/bench_scan.py`` times both backends (forward + backward) on the anchor and network shapes and writes
``kernels/auto_table.json``. A call is matched to the nearest measured shape of the same kind (plain scan or fused
cross-scan), precision class and input layout ((b, d, L)-contiguous or channels-last), by distance in
(log2(batch * channels), log2(L)); the backend that was faster there is chosen (forward + backward with gradients
on, the forward alone under ``torch.no_grad``). Without a measured entry of that kind, precision class and layout
no preference is expressed (the registry then falls back to backend priority).
Importing this module does not import triton.
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
    rows = [e for e in table.get("entries", []) if e.get("kind") == kind
            and e.get("triton_ms") is not None and e.get("mamba_ssm_ms") is not None]
    rows = [e for e in rows if (e.get("dtype") != "fp32") == half and e.get("layout", "contiguous") == layout]
    if not rows:
        return None
    _, x, y = _key(kind, batch_channels, L)
    return min(rows, key=lambda e: (math.log2(e["b"] * e["d"]) - x) ** 2 + (math.log2(e["L"]) - y) ** 2)


def prefer_triton(u, B, table: Optional[dict] = None) -> bool:
    """u: (b, d, L) for a plain scan, or the map (b, d, *S) of a cross-scan. True when Triton measured faster on the
    nearest measured shape of the same kind, precision class and layout of u (channels-last: channel stride 1, as
    a Linear's output or SS2D's map):
    forward + backward time when gradients are on (training), forward time alone when they are off (inference)."""
    import torch

    kind = "cross" if u.dim() > 3 else "scan"
    L = math.prod(u.shape[2:])
    layout = "channels-last" if u.stride(1) == 1 and u.shape[1] > 1 else "contiguous"
    e = nearest_entry(kind, u.shape[0] * u.shape[1], L, u.dtype != torch.float32, table, layout)
    if e is None:
        return False
    if not torch.is_grad_enabled() and e.get("triton_fwd_ms") is not None and e.get("mamba_ssm_fwd_ms") is not None:
        return e["triton_fwd_ms"] <= e["mamba_ssm_fwd_ms"]
    return e["triton_ms"] <= e["mamba_ssm_ms"]
