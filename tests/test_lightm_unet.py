"""LightM-UNet: exact upstream parameter counts from real plans, shapes, plan handling, training, precision."""
import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import n_params, with_strides
from nnunet_mamba.networks.lightm_unet import LightMUNet, MambaLayer
from oracle import rel_err
from nnunet_mamba.trainers import nnUNetTrainerLightMUNet, nnUNetTrainerLightMUNet_nnUNetRecipe


def test_parameter_count_3d_from_real_plans(plans_3d):
    pm, cm = plans_3d
    net = nnUNetTrainerLightMUNet.build_network_architecture(pm, cm, 1, 3, True)
    assert n_params(net) == 5_015_766


def test_parameter_count_2d_from_real_plans(plans_2d):
    pm, cm = plans_2d
    assert n_params(nnUNetTrainerLightMUNet.build_network_architecture(pm, cm, 1, 2, False)) == 5_011_683
    assert n_params(nnUNetTrainerLightMUNet_nnUNetRecipe.build_network_architecture(pm, cm, 3, 2)) == 5_011_765


@pytest.mark.parametrize("nd,c_in,k", [(3, 2, 4), (2, 4, 5)])
def test_parameter_formula(nd, c_in, k):
    """specs/lightm_unet.md §3: 3D = 5,015,608 + 59 C_in + 33 K; 2D = 5,011,576 + 41 C_in + 33 K."""
    expected = (5_015_608 + 59 * c_in if nd == 3 else 5_011_576 + 41 * c_in) + 33 * k
    assert n_params(LightMUNet(nd, 32, c_in, k)) == expected


def test_upstream_state_dict_keys():
    keys = set(LightMUNet(3, 32, 1, 3).state_dict())
    for k in ["convInit.0.conv.weight", "convInit.1.conv.weight", "down_layers.1.0.0.mamba.A_log",
              "down_layers.1.0.0.skip_scale", "down_layers.3.4.conv2.mamba.dt_proj.bias",
              "up_samples.0.0.conv.weight", "up_layers.2.0.conv.1.conv.weight", "conv_final.2.1.conv.bias"]:
        assert k in keys, k


def test_anisotropic_plan_shapes(plans_3d):
    pm, cm = plans_3d
    cm = with_strides(cm, [[1, 1, 1], [1, 2, 2], [1, 2, 2], [2, 2, 2]], patch_size=[8, 16, 16])
    net = nnUNetTrainerLightMUNet.build_network_architecture(pm, cm, 1, 3, False)
    assert [m.kernel_size for m in net.modules() if isinstance(m, torch.nn.MaxPool3d)] == [
        (1, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert n_params(net) == 5_015_766  # pooling / interpolation factors carry no parameters
    x = torch.randn(1, 1, 8, 16, 16)
    assert net(x).shape == (1, 3, 8, 16, 16)


def test_plan_too_short_is_refused_with_the_constraint(plans_3d):
    pm, cm = plans_3d
    short = with_strides(cm, [[1, 1, 1], [2, 2, 2], [2, 2, 2]])
    with pytest.raises(ValueError, match=r"LightM-UNet needs 3 downsampling steps .* provides 2"):
        nnUNetTrainerLightMUNet.build_network_architecture(pm, short, 1, 3)
    bad = with_strides(cm, [[1, 1, 1], [2, 2, 2], [3, 3, 3], [2, 2, 2]])
    with pytest.raises(ValueError, match="factors of 1 or 2"):
        nnUNetTrainerLightMUNet.build_network_architecture(pm, bad, 1, 3)
    first = with_strides(cm, [[2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]])
    with pytest.raises(ValueError, match="first plan stage"):
        nnUNetTrainerLightMUNet.build_network_architecture(pm, first, 1, 3)


@pytest.mark.parametrize("nd,shape", [(2, (2, 1, 32, 32)), (3, (2, 1, 16, 16, 16))])
def test_train_step_reduces_loss(nd, shape):
    """A few Adam steps (the upstream recipe) on a fixed batch lower nnU-Net's DC+CE loss; every param learns."""
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    torch.manual_seed(0)
    net = LightMUNet(nd, 32, 1, 3)
    loss_fn = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {}, weight_ce=1, weight_dice=1,
                             ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)
    x = torch.randn(shape)
    target = (x > 0.5).long() + (x > 1.5).long()
    r = nnUNetTrainerLightMUNet.recipe
    opt = torch.optim.Adam(net.parameters(), 1e-3, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay)
    losses = []
    for step in range(4):
        opt.zero_grad()
        loss = loss_fn(net(x), target)
        loss.backward()
        if step == 0:
            missing = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
            assert not missing, missing
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_mamba_core_fp32(dtype):
    net = LightMUNet(2, 32, 1, 2).eval()
    seen = []
    net.down_layers[1][0][0].mamba.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o.dtype)))
    x = torch.randn(1, 1, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=dtype):
        y = net(x)
    assert torch.isfinite(y).all()
    assert seen == [(torch.float32, torch.float32)]


def test_recipes_as_specified():
    r = nnUNetTrainerLightMUNet.recipe
    assert (r.optimizer, r.initial_lr, r.weight_decay, r.eps, r.num_epochs, r.amp, r.deep_supervision) == (
        "adam", 1e-4, 1e-5, 1e-5, 100, False, False)
    n = nnUNetTrainerLightMUNet_nnUNetRecipe.recipe
    assert (n.optimizer, n.initial_lr, n.weight_decay, n.num_epochs, n.amp) == ("sgd", 1e-2, 3e-5, 1000, True)


def test_recomputation_gives_identical_gradients():
    """Recomputing the Mamba layers in backward (the GPU default, to save memory) changes nothing numerically."""
    torch.manual_seed(0)
    net = LightMUNet(2, 32, 1, 2)
    x = torch.randn(1, 1, 16, 16)
    grads = []
    for recompute in (False, True):
        for m in net.modules():
            if hasattr(m, "recompute"):
                m.recompute = recompute
        net.zero_grad()
        net(x).square().mean().backward()
        grads.append([p.grad.clone() for p in net.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_recomputation_hands_each_scan_its_forward_slot(monkeypatch):
    """A recomputed Mamba layer gives its scan an ops.recompute slot through the op boundary (backends registered
    with keeps_chunk_states): a new empty one in the forward pass, the same one, as the forward left it, in the
    recomputation; none when the layer is not recomputed. The backend here records the slots and runs the PyTorch
    scan."""
    import nnunet_mamba.ops.scan as scan_mod
    from nnunet_mamba.ops import register_backend
    from nnunet_mamba.ops.torch_scan import selective_scan_torch

    seen = []

    def recording(u, delta, A, B, C, chunk_states=None, **kw):
        seen.append((chunk_states, None if chunk_states is None else chunk_states.value))
        if chunk_states is not None and chunk_states.value is None:
            chunk_states.value = f"states of scan {len(seen)}"
        return selective_scan_torch(u, delta, A, B, C, **kw)

    monkeypatch.setattr(scan_mod, "_BACKENDS", dict(scan_mod._BACKENDS))
    register_backend("recording", recording, lambda dev: None, keeps_chunk_states=True)
    torch.manual_seed(0)
    layer = MambaLayer(8, 8, recompute=True)
    layer.mamba.scan_backend = "recording"
    layer(torch.randn(1, 8, 4, 5, requires_grad=True)).sum().backward()
    assert len(seen) == 2 and seen[0][0] is seen[1][0]
    assert seen[0][1] is None and seen[1][1] == "states of scan 1"
    seen.clear()
    layer.recompute = False
    layer(torch.randn(1, 8, 4, 5, requires_grad=True)).sum().backward()
    assert [s for s, _ in seen] == [None]


def test_mamba_layer_is_the_spec_formula():
    """The layer computes channels-first (no layout copies); the spec's token formula, evaluated in float64 with
    plain modules, is the oracle for its output and every gradient: t = tokens(x), u = mamba(LN(t)) + s t,
    v = proj(LN(u))."""
    torch.manual_seed(0)
    layer = MambaLayer(12, 20, recompute=False)
    with torch.no_grad():
        layer.skip_scale.fill_(0.7)
        layer.norm.weight.uniform_(0.5, 1.5)
        layer.norm.bias.uniform_(-0.3, 0.3)
    ref = copy.deepcopy(layer).double()
    x = torch.randn(2, 12, 5, 6, 7, requires_grad=True)
    xr = x.detach().double().requires_grad_(True)
    y = layer(x)

    def ln(t):
        return F.layer_norm(t, (12,), ref.norm.weight, ref.norm.bias, ref.norm.eps)

    t = xr.flatten(2).transpose(1, 2)
    u = ref.mamba(ln(t)) + ref.skip_scale * t
    yr = ref.proj(ln(u)).transpose(1, 2).reshape(2, 20, 5, 6, 7)
    assert y.shape == yr.shape and y.is_contiguous()
    assert rel_err(y, yr) < 1e-5
    gy = torch.randn_like(yr)
    (y.double() * gy).sum().backward()
    (yr * gy).sum().backward()
    assert rel_err(x.grad, xr.grad) < 1e-5
    for (name, p), pr in zip(layer.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, pr.grad) < 1e-4, name  # skip_scale: a sum over 2.5k products


def test_blocks_are_the_spec_formulas():
    """ResMambaBlock, ResUpBlock and the output head (fused GroupNorm + ReLU, recomputed regions, addcmul) against
    the spec's formulas in plain PyTorch, the Mamba layers as black boxes (tested above)."""
    torch.manual_seed(0)
    net = LightMUNet(3, 8, 1, 3, blocks_down=(1, 1), blocks_up=(1,), num_groups=2)
    for p in net.parameters():  # away from the init values (GroupNorm affine 1/0, skip scales 1)
        p.data.add_(0.1 * torch.randn_like(p))

    def gn_relu(norm, t):
        return F.relu(F.group_norm(t, norm.num_groups, norm.weight, norm.bias, norm.eps))

    x = torch.randn(2, 8, 6, 5, 4)
    res = net.down_layers[0][1]
    ref = res.conv2(gn_relu(res.norm2, res.conv1(gn_relu(res.norm1, x)))) + x
    torch.testing.assert_close(res(x), ref)
    up = net.up_layers[0][0]
    y = up.conv(gn_relu(up.norm1, x)) + up.skip_scale * x
    torch.testing.assert_close(up(x), gn_relu(up.norm2, y))
    net_x = torch.randn(1, 1, 8, 8, 8)
    h = net.convInit(net_x)
    s0 = net.down_layers[0](h)
    h = net.up_layers[0](net.up_samples[0](net.down_layers[1](s0)) + s0)
    norm, act, conv = net.conv_final
    torch.testing.assert_close(net(net_x), conv(act(norm(h))))
