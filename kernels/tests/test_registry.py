"""The "triton" backend's registration: lazy import, actionable unavailability, measured per-shape auto choice."""
import subprocess
import sys

import pytest
import torch

from nnunet_mamba import ops
from nnunet_mamba.ops import BackendUnavailable, selective_scan
from nnunet_mamba.ops import scan as scan_mod
from nnunet_mamba.kernels import autochoose


def test_importing_ops_does_not_import_triton():
    code = ("import sys, nnunet_mamba.ops as o, torch; o.available_backends('cpu'); "
            "print('triton' in sys.modules, 'nnunet_mamba.kernels.selective_scan_triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_triton_backend_unavailable_on_cpu_says_what_to_do():
    assert "triton" in scan_mod._BACKENDS
    assert "triton" not in ops.available_backends("cpu")
    u = torch.randn(1, 2, 8)
    with pytest.raises(BackendUnavailable, match="CUDA tensors only.*backend='torch'"):
        selective_scan(u, u, -torch.ones(2, 2), torch.randn(1, 2, 8), torch.randn(1, 2, 8), backend="triton")


TABLE = {"entries": [
    dict(kind="scan", b=2, d=64, L=262144, dtype="fp32", triton_ms=1.0, mamba_ssm_ms=9.0),
    dict(kind="scan", b=2, d=640, L=4096, dtype="fp32", triton_ms=1.2, mamba_ssm_ms=0.9),
    dict(kind="scan", b=2, d=640, L=4096, dtype="bf16", triton_ms=0.5, mamba_ssm_ms=0.7),
    dict(kind="cross", b=32, d=384, L=4096, dtype="fp32", triton_ms=8.0, mamba_ssm_ms=30.0),
]}


def test_prefer_triton_uses_nearest_measured_shape():
    f32 = lambda *s: torch.empty(*s)
    assert autochoose.prefer_triton(f32(2, 64, 100000), None, TABLE)  # near (2, 64, 64^3): triton won
    assert not autochoose.prefer_triton(f32(2, 512, 4096), None, TABLE)  # near (2, 640, 4096) fp32: mamba won
    assert autochoose.prefer_triton(f32(2, 512, 4096).bfloat16(), None, TABLE)  # bf16 row: triton won
    assert autochoose.prefer_triton(f32(16, 384, 64, 64), None, TABLE)  # a map: the cross entry
    assert not autochoose.prefer_triton(f32(2, 64, 100), None, {"entries": []})  # nothing measured: no preference


def test_prefer_triton_matches_the_input_layout():
    table = {"entries": [
        dict(kind="scan", b=2, d=64, L=262144, dtype="fp32", layout="contiguous", triton_ms=10.0, mamba_ssm_ms=9.0),
        dict(kind="scan", b=2, d=64, L=262144, dtype="fp32", layout="channels-last", triton_ms=7.0, mamba_ssm_ms=9.5),
    ]}
    u = torch.empty(2, 64, 1000)
    assert not autochoose.prefer_triton(u, None, table)  # (b, d, L)-contiguous: mamba-ssm measured faster
    assert autochoose.prefer_triton(u.transpose(1, 2).contiguous().transpose(1, 2), None, table)  # channels-last
    table = {"entries": [  # cross-scan maps: channels-first, or channels-last in memory as SS2D passes them
        dict(kind="cross", b=32, d=384, L=4096, dtype="fp32", layout="contiguous", triton_ms=90.0, mamba_ssm_ms=39.0),
        dict(kind="cross", b=32, d=384, L=4096, dtype="fp32", layout="channels-last", triton_ms=20.0,
             mamba_ssm_ms=39.0),
    ]}
    x = torch.empty(32, 384, 64, 64)
    assert not autochoose.prefer_triton(x, None, table)
    assert autochoose.prefer_triton(x.contiguous(memory_format=torch.channels_last), None, table)


def test_prefer_triton_by_forward_time_without_gradients():
    """Inference (no grad) goes by the measured forward time, training by forward + backward."""
    table = {"entries": [dict(kind="scan", b=2, d=512, L=512, dtype="fp32", layout="contiguous", triton_ms=1.0,
                              mamba_ssm_ms=1.5, triton_fwd_ms=0.13, mamba_ssm_fwd_ms=0.05)]}
    u = torch.empty(2, 512, 512)
    assert autochoose.prefer_triton(u, None, table)
    with torch.no_grad():
        assert not autochoose.prefer_triton(u, None, table)


def test_auto_resolves_by_measurement(monkeypatch):
    """With both GPU backends usable, "auto" takes triton exactly where the table says it was faster."""
    monkeypatch.setattr(autochoose, "load_table", lambda *a: TABLE)
    for name in ("triton", "mamba_ssm"):
        monkeypatch.setattr(scan_mod._BACKENDS[name], "why_unavailable", lambda dev: None)
    assert scan_mod._resolve("auto", torch.empty(2, 64, 200000), None).name == "triton"
    assert scan_mod._resolve("auto", torch.empty(2, 640, 4096), None).name == "mamba_ssm"
    monkeypatch.setattr(scan_mod._BACKENDS["mamba_ssm"], "why_unavailable", lambda dev: "absent")
    # without mamba-ssm, triton still only where measured faster; elsewhere the torch backend (no unmeasured
    # fallback to triton)
    assert scan_mod._resolve("auto", torch.empty(2, 640, 4096), None).name == "torch"
    assert scan_mod._resolve("auto", torch.empty(2, 64, 200000), None).name == "triton"


def test_committed_table_is_sane():
    table = autochoose.load_table()
    if not table["entries"]:
        pytest.skip("no measured table committed yet (run kernels/bench_scan.py on a GPU)")
    assert table.get("gpu") and table.get("date")
    for e in table["entries"]:
        assert e["kind"] in ("scan", "cross") and e["triton_ms"] > 0
