"""Mamba mixer: mamba-ssm 2.x names, shapes, initialisation, parameter formula, causality."""
import math

import pytest
import torch
import torch.nn.functional as F

from helpers import n_params
from nnunet_mamba.modules.mamba import Mamba


@pytest.mark.parametrize("d,expected", [(16, 3_360), (32, 9_920), (64, 32_640), (128, 116_480), (256, 437_760),
                                        (320, 675_200)])
def test_parameter_count(d, expected):
    m = Mamba(d)
    R = math.ceil(d / 16)
    assert n_params(m) == expected == 6 * d * d + 4 * d * R + 110 * d


def test_names_shapes_and_init():
    torch.manual_seed(0)
    m = Mamba(64, d_state=16, d_conv=4, expand=2)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4), "conv1d.bias": (128,),
                      "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4), "dt_proj.bias": (128,),
                      "A_log": (128, 16), "D": (128,), "out_proj.weight": (64, 128)}
    assert torch.allclose(m.A_log, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    assert torch.equal(m.D, torch.ones(128))
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 - 1e-7 and dt.max() <= 0.1 + 1e-6
    assert m.dt_proj.weight.abs().max() <= 4 ** -0.5
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit


def test_causal_and_deterministic():
    torch.manual_seed(0)
    m = Mamba(32)
    x = torch.randn(2, 50, 32)
    y = m(x)
    x2 = x.clone()
    x2[:, 30:] = torch.randn(2, 20, 32)
    y2 = m(x2)
    torch.testing.assert_close(y[:, :30], y2[:, :30])
    assert not torch.allclose(y[:, 30:], y2[:, 30:])


def test_state_dict_roundtrip():
    a, b = Mamba(48), Mamba(48)
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 20, 48)
    torch.testing.assert_close(a(x), b(x))


def test_channels_first_output_is_the_token_output():
    torch.manual_seed(0)
    m = Mamba(24)
    x = torch.randn(2, 30, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y, y2 = m(x), m(x2, channels_first=True)
    assert y2.shape == (2, 24, 30) and y2.is_contiguous()
    torch.testing.assert_close(y2, y.transpose(1, 2))
    gy = torch.randn_like(y)
    grads = [torch.autograd.grad((out * g).sum(), [inp, *m.parameters()])
             for out, inp, g in ((y, x, gy), (y2, x2, gy.transpose(1, 2)))]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
