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


def fastest(u, table):
    times = autochoose.measured_times(u, table)
    return min(times, key=times.get) if times else None


def test_measured_times_use_nearest_measured_shape():
    f32 = lambda *s: torch.empty(*s)
    assert autochoose.measured_times(f32(2, 64, 100000), TABLE) == {"triton": 1.0, "mamba_ssm": 9.0}  # (2, 64, 64^3)
    assert fastest(f32(2, 512, 4096), TABLE) == "mamba_ssm"  # near (2, 640, 4096) fp32
    assert fastest(f32(2, 512, 4096).bfloat16(), TABLE) == "triton"  # the bf16 row
    assert fastest(f32(16, 384, 64, 64), TABLE) == "triton"  # a map: the cross entry
    assert autochoose.measured_times(f32(2, 64, 100), {"entries": []}) == {}  # nothing measured: no preference


def test_measured_times_match_the_input_layout():
    table = {"entries": [
        dict(kind="scan", b=2, d=64, L=262144, dtype="fp32", layout="contiguous", triton_ms=10.0, mamba_ssm_ms=9.0),
        dict(kind="scan", b=2, d=64, L=262144, dtype="fp32", layout="channels-last", triton_ms=7.0, mamba_ssm_ms=9.5),
    ]}
    u = torch.empty(2, 64, 1000)
    assert fastest(u, table) == "mamba_ssm"  # (b, d, L)-contiguous
    assert fastest(u.transpose(1, 2).contiguous().transpose(1, 2), table) == "triton"  # channels-last
    table = {"entries": [  # cross-scan maps: channels-first, or channels-last in memory as SS2D passes them
        dict(kind="cross", b=32, d=384, L=4096, dtype="fp32", layout="contiguous", triton_ms=90.0, mamba_ssm_ms=39.0),
        dict(kind="cross", b=32, d=384, L=4096, dtype="fp32", layout="channels-last", triton_ms=20.0,
             mamba_ssm_ms=39.0),
    ]}
    x = torch.empty(32, 384, 64, 64)
    assert fastest(x, table) == "mamba_ssm"
    assert fastest(x.contiguous(memory_format=torch.channels_last), table) == "triton"


def test_measured_times_by_forward_time_without_gradients():
    """Inference (no grad) goes by the measured forward times, training by forward + backward."""
    table = {"entries": [dict(kind="scan", b=2, d=512, L=512, dtype="fp32", layout="contiguous", triton_ms=1.0,
                              mamba_ssm_ms=1.5, torch_ms=30.0, triton_fwd_ms=0.13, mamba_ssm_fwd_ms=0.05,
                              torch_fwd_ms=5.0)]}
    u = torch.empty(2, 512, 512)
    assert autochoose.measured_times(u, table) == {"triton": 1.0, "mamba_ssm": 1.5, "torch": 30.0}
    with torch.no_grad():
        assert autochoose.measured_times(u, table) == {"triton": 0.13, "mamba_ssm": 0.05, "torch": 5.0}


def test_auto_resolves_to_the_fastest_usable_backend(monkeypatch):
    """"auto" runs the measured-fastest of the usable backends: with mamba-ssm, triton exactly where it was faster;
    without mamba-ssm, triton (before session 8 the shapes where mamba-ssm wins went to the torch backend then, and
    LightM-UNet's step took 3.9 s instead of 0.38 s)."""
    table = {"entries": [dict(e) for e in TABLE["entries"]]}
    monkeypatch.setattr(autochoose, "load_table", lambda *a: table)
    for name in ("triton", "mamba_ssm"):
        monkeypatch.setattr(scan_mod._BACKENDS[name], "why_unavailable", lambda dev: None)
    assert scan_mod._choose("auto", torch.empty(2, 64, 200000), None).name == "triton"
    assert scan_mod._choose("auto", torch.empty(2, 640, 4096), None).name == "mamba_ssm"
    monkeypatch.setattr(scan_mod._BACKENDS["mamba_ssm"], "why_unavailable", lambda dev: "absent")
    assert scan_mod._choose("auto", torch.empty(2, 640, 4096), None).name == "triton"
    assert scan_mod._choose("auto", torch.empty(2, 64, 200000), None).name == "triton"
    table["entries"][1]["torch_ms"] = 1.0  # a backend with a measured time takes part: fastest there, it runs
    assert scan_mod._choose("auto", torch.empty(2, 640, 4096), None).name == "torch"
    monkeypatch.setattr(autochoose, "load_table", lambda *a: {"entries": []})  # nothing measured: priority order
    assert scan_mod._choose("auto", torch.empty(2, 640, 4096), None).name == "triton"
    monkeypatch.setattr(scan_mod._BACKENDS["mamba_ssm"], "why_unavailable", lambda dev: None)
    assert scan_mod._choose("auto", torch.empty(2, 640, 4096), None).name == "mamba_ssm"


def test_auto_choice_is_made_once_per_kind_of_call(monkeypatch):
    """_resolve keeps each kind of call's choice (the host time of resolving it again was ~0.1-0.4 ms per scan): the
    same kind resolves once; another shape, dtype, layout, gradient mode or backend name resolves anew; registering a
    backend forgets every choice."""
    monkeypatch.setattr(scan_mod, "_CHOICES", {})
    asked = []
    monkeypatch.setattr(scan_mod, "_choose", lambda backend, u, B: asked.append(backend) or scan_mod._BACKENDS["torch"])
    u = torch.empty(2, 64, 100)
    for _ in range(3):
        assert scan_mod._resolve("auto", u, u).name == "torch"
    assert len(asked) == 1
    scan_mod._resolve("auto", torch.empty(2, 64, 101), u)
    scan_mod._resolve("auto", u.double(), u)
    scan_mod._resolve("auto", u.transpose(1, 2).contiguous().transpose(1, 2), u)  # channels-last
    with torch.no_grad():
        scan_mod._resolve("auto", u, u)
    scan_mod._resolve("auto", u, torch.empty(64, 16))  # constant B
    scan_mod._resolve("torch", u, u)
    assert len(asked) == 7
    monkeypatch.setenv(scan_mod.ENV_BACKEND, "torch")  # the environment's backend is part of the kind
    scan_mod._resolve("auto", u, u)
    assert len(asked) == 7  # "torch" with these tensors was asked for above
    monkeypatch.setitem(scan_mod._BACKENDS, "torch", scan_mod._BACKENDS["torch"])
    scan_mod.register_backend("torch", *[getattr(scan_mod._BACKENDS["torch"], f) for f in ("fn", "why_unavailable")])
    scan_mod._resolve("auto", u, u)
    assert len(asked) == 8


def test_committed_table_is_sane():
    table = autochoose.load_table()
    if not table["entries"]:
        pytest.skip("no measured table committed yet (run kernels/bench_scan.py on a GPU)")
    assert table.get("gpu") and table.get("date")
    for e in table["entries"]:
        assert e["kind"] in ("scan", "cross") and e["triton_ms"] > 0
