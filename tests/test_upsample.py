"""``ops.upsample_linear`` and ``modules.common.Upsample`` on CPU: the torch fallback is ``F.interpolate`` /
``nn.Upsample`` exactly, the module only dispatches the configurations the kernel computes, "auto" picks the kernel
by output size and layout, and LightM-UNet's decoder uses the module with an unchanged state dict and output. The
Triton kernel itself is tested in kernels/tests/test_kernel_upsample.py (interpreted on CPU)."""
import copy
import sys
import types

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from nnunet_mamba import ops
from nnunet_mamba.modules import common
from nnunet_mamba.modules.common import Upsample
from nnunet_mamba.networks.lightm_unet import LightMUNet
from nnunet_mamba.ops import token_ops


@pytest.fixture
def op_calls(monkeypatch):
    """Records the factors of every ``upsample_linear`` call the module makes (then runs the real op)."""
    calls = []
    real = common.upsample_linear
    monkeypatch.setattr(common, "upsample_linear", lambda x, f: calls.append(f) or real(x, f))
    return calls


@pytest.mark.parametrize("factors, shape", [((2, 2, 2), (2, 3, 3, 4, 5)), ((1, 2, 2), (1, 2, 4, 3, 2)),
                                            ((2, 1), (2, 3, 5, 4)), ((2, 2), (1, 1, 1, 1))])
def test_torch_backend_is_interpolate(factors, shape):
    x = torch.randn(shape, dtype=torch.float64)
    mode = "trilinear" if len(shape) == 5 else "bilinear"
    y0 = F.interpolate(x, scale_factor=tuple(float(f) for f in factors), mode=mode, align_corners=False)
    for backend in ("torch", "auto"):  # auto: torch on CPU
        assert torch.equal(ops.upsample_linear(x, factors, backend=backend), y0)


def test_triton_backend_refused_on_cpu():
    with pytest.raises(ops.BackendUnavailable, match="CUDA"):
        ops.upsample_linear(torch.randn(1, 2, 3, 4), (2, 2), backend="triton")
    with pytest.raises(ValueError, match="unknown upsample backend"):
        ops.upsample_linear(torch.randn(1, 2, 3, 4), (2, 2), backend="cuda")


def test_auto_picks_the_kernel_by_output_size_and_layout(monkeypatch):
    """With Triton usable (patched) "auto" takes the kernel from ``TRITON_FROM["upsample"]`` OUTPUT elements, for
    contiguous maps only (a stand-in kernel module: no triton import in this process)."""
    calls = []
    fake = types.SimpleNamespace(upsample_linear_triton=lambda x, f: calls.append((tuple(x.shape), f)) or x)
    monkeypatch.setitem(sys.modules, "nnunet_mamba.kernels.upsample_triton", fake)
    monkeypatch.setattr(token_ops, "_triton_unavailable", lambda device: None)
    monkeypatch.delenv(token_ops.ENV_BACKEND, raising=False)
    monkeypatch.setitem(token_ops.TRITON_FROM, "upsample", 2 * 4 * 8 ** 3)
    x = torch.randn(2, 4, 4, 4, 4)  # 2 * 4 * 8^3 outputs at factor 2
    ops.upsample_linear(x, (2, 2, 2))
    ops.upsample_linear(x, (1, 2, 2))  # half of it: torch
    ops.upsample_linear(x.to(memory_format=torch.channels_last_3d), (2, 2, 2))  # channels-last: torch
    assert calls == [((2, 4, 4, 4, 4), (2, 2, 2))]


@pytest.mark.parametrize("kwargs, nd", [(dict(scale_factor=2.0, mode="trilinear"), 3),
                                        (dict(scale_factor=(1.0, 2.0, 2.0), mode="trilinear", align_corners=False), 3),
                                        (dict(scale_factor=(2, 1), mode="bilinear", align_corners=False), 2),
                                        (dict(scale_factor=3.0, mode="bilinear"), 2)])
def test_module_dispatches_integer_linear_upsampling(op_calls, kwargs, nd):
    """Same output and gradient as nn.Upsample (float64), through ``ops.upsample_linear``; no parameters, no
    state."""
    ours, ref = Upsample(**kwargs), nn.Upsample(**kwargs)
    assert isinstance(ours, nn.Upsample) and not ours.state_dict() and repr(ours) == repr(ref)
    x = torch.randn(2, 3, *(3, 4, 5)[:nd], dtype=torch.float64, requires_grad=True)
    x0 = x.detach().clone().requires_grad_()
    y, y0 = ours(x), ref(x0)
    assert torch.equal(y, y0)
    gy = torch.randn_like(y)
    y.backward(gy)
    y0.backward(gy)
    assert torch.equal(x.grad, x0.grad)
    sf = kwargs["scale_factor"]
    assert op_calls == [tuple(int(f) for f in (sf if isinstance(sf, tuple) else (sf,) * nd))]


@pytest.mark.parametrize("kwargs, nd", [(dict(scale_factor=1.5, mode="bilinear"), 2),
                                        (dict(scale_factor=(2.0, 2.5, 2.0), mode="trilinear"), 3),
                                        (dict(scale_factor=2.0, mode="bilinear", align_corners=True), 2),
                                        (dict(scale_factor=2.0, mode="trilinear", recompute_scale_factor=True), 3),
                                        (dict(size=(6, 8), mode="bilinear"), 2),
                                        (dict(scale_factor=2.0, mode="nearest"), 3),
                                        (dict(scale_factor=2.0, mode="bicubic"), 2),
                                        (dict(scale_factor=2.0, mode="linear"), 1)])
def test_module_falls_back_to_nn_upsample(op_calls, kwargs, nd):
    x = torch.randn(2, 3, *(3, 4, 5)[:nd], dtype=torch.float64)
    assert torch.equal(Upsample(**kwargs)(x), nn.Upsample(**kwargs)(x))
    assert op_calls == []


def _with_nn_upsample(net):
    """A copy of a LightMUNet whose decoder upsamples with plain nn.Upsample modules (the previous code)."""
    ref = copy.deepcopy(net)
    for seq in ref.up_samples:
        m = seq[1]
        seq[1] = nn.Upsample(scale_factor=m.scale_factor, mode=m.mode, align_corners=m.align_corners)
    return ref


@pytest.mark.parametrize("nd, strides, shape", [
    (3, None, (1, 1, 16, 16, 16)),
    (3, [(1, 2, 2), (1, 2, 2), (2, 2, 2)], (1, 1, 4, 16, 16)),
    (2, [(2, 1), (2, 2), (2, 2)], (2, 1, 16, 8)),
])
def test_lightm_unet_uses_the_module_with_unchanged_output(op_calls, nd, strides, shape):
    """The decoder's up-sampling modules are ``Upsample`` with the plan's factors; state dict keys and the network's
    output (torch fallback on CPU, eval mode) are those of the same network with ``nn.Upsample``."""
    torch.manual_seed(0)
    net = LightMUNet(nd, 32, 1, 3, strides=strides).eval()
    ups = [seq[1] for seq in net.up_samples]
    assert all(type(m) is Upsample for m in ups)
    factors = [tuple(int(f) for f in s) for s in (strides or [(2,) * nd] * 3)]
    assert [m._integer_factors(nd) for m in ups] == factors[::-1]
    ref = _with_nn_upsample(net)
    assert list(net.state_dict()) == list(ref.state_dict())
    x = torch.randn(shape)
    with torch.no_grad():
        y, y0 = net(x), ref(x)
    assert torch.equal(y, y0)
    assert op_calls == factors[::-1]
