"""GPU tests (run on the GPU machine; skipped on CPU): mamba-ssm's kernel against the torch backend, and the
project's Mamba mixer against mamba_ssm.Mamba with the same state dict."""
import importlib.util

import pytest
import torch

from nnunet_mamba.ops import available_backends, selective_scan
from test_ops import make_inputs, run

pytestmark = pytest.mark.cuda
needs_mamba_ssm = pytest.mark.skipif(importlib.util.find_spec("selective_scan_cuda") is None,
                                     reason="mamba-ssm's CUDA extension is not installed")


def _cuda(inp):
    return {k: v.detach().cuda().requires_grad_(True) for k, v in inp.items()}


@needs_mamba_ssm
@pytest.mark.parametrize("b,d,L,N,layout", [(2, 8, 1, 4, "shared"), (1, 16, 777, 16, "grouped"),
                                            (2, 32, 4096, 16, "shared"), (1, 8, 5000, 8, "grouped")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_ssm_backend_matches_torch_backend(b, d, L, N, layout, dtype):
    assert "mamba_ssm" in available_backends("cuda")
    inp = _cuda(make_inputs(b, d, L, N, layout, dtype=dtype, seed=L))
    ref = _cuda(make_inputs(b, d, L, N, layout, dtype=dtype, seed=L))
    y, last = run(selective_scan, inp, delta_softplus=True, return_last_state=True, backend="mamba_ssm")
    y0, last0 = run(selective_scan, ref, delta_softplus=True, return_last_state=True, backend="torch")
    tol = dict(atol=1e-3, rtol=1e-3) if dtype == torch.float32 else dict(atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(y.float(), y0.float(), **tol)
    torch.testing.assert_close(last, last0, **tol)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y0 * g).sum().backward()
    for k in inp:
        a, r = inp[k].grad.float(), ref[k].grad.float()
        scale = r.abs().max().clamp(min=1.0)
        assert ((a - r).abs().max() / scale) < (2e-3 if dtype == torch.float32 else 5e-2), k


@needs_mamba_ssm
@pytest.mark.parametrize("d,L", [(32, 1000), (64, 4096)])
def test_mixer_state_dict_loads_into_mamba_ssm(d, L):
    from mamba_ssm import Mamba as MambaSSM

    from nnunet_mamba.modules.mamba import Mamba

    torch.manual_seed(0)
    ours = Mamba(d, d_state=16, d_conv=4, expand=2).cuda()
    theirs = MambaSSM(d_model=d, d_state=16, d_conv=4, expand=2).cuda()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    x = torch.randn(2, L, d, device="cuda")
    y_theirs = theirs(x)
    for backend in available_backends("cuda"):
        ours.scan_backend = backend
        torch.testing.assert_close(ours(x), y_theirs, atol=2e-4, rtol=2e-3, msg=lambda m: f"{backend}: {m}")
    ours.load_state_dict(theirs.state_dict())


def test_auto_uses_a_cuda_kernel_when_installed():
    names = available_backends("cuda")
    assert "torch" in names
    if importlib.util.find_spec("selective_scan_cuda") is not None:
        assert names[0] == "mamba_ssm"
