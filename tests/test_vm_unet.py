"""VM-UNet (specs/vm_unet.md): upstream parameter counts, names, init, plan factors, shapes, AMP, pretrained, trainers."""
import math

import pytest
import torch

from helpers import check_cycle, n_params, with_strides
from nnunet_mamba.networks.pretrained import ENV_PRETRAINED, load_vmunet_pretrained, read_checkpoint
from nnunet_mamba.networks.vm_unet import VMUNet
from nnunet_mamba.trainers.base import CosineLRScheduler
from nnunet_mamba.trainers.vm_unet import (VM_UNET_RECIPE, build_vm_unet, nnUNetTrainerVMUNet,
                                           nnUNetTrainerVMUNet_nnUNetRecipe, nnUNetTrainerVMUNetPretrained)
from vmamba_helpers import make_trainer, perturbed, save_checkpoint

# anisotropic 3D: no downsampling of axis 0 in steps 1, 3 and 5 -> total factors (4, 32, 32)
ANISO_3D = [(1, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2)]


# --------------------------------------------------------------------------------------------------------------
# Parameter counts (acceptance targets, spec §3 and §7)

@pytest.mark.parametrize("c_in, k, depths, expected", [
    (1, 9, None, 27_427_761),  # Synapse config: 1 channel repeated to 3, 9 classes
    (1, 1, None, 27_427_561),  # ISIC config
    (3, 1, ((2, 2, 9, 2), (2, 9, 2, 2)), 44_273_833),  # class defaults
])
def test_parameter_counts_2d(c_in, k, depths, expected):
    kw = {} if depths is None else dict(depths=depths[0], depths_decoder=depths[1])
    assert n_params(VMUNet(c_in, k, **kw)) == expected


def test_per_module_counts_and_general_formula():
    v = VMUNet(1, 9).vmunet
    counts = {name: n_params(getattr(v, name)) for name in ("patch_embed", "layers", "layers_up", "final_up",
                                                             "final_conv")}
    assert counts == {"patch_embed": 4_896, "layers": 13_747_584, "layers_up": 13_638_144, "final_up": 36_912,
                      "final_conv": 225}
    ssm = sum(n_params(m) for n, m in v.named_modules() if n.endswith("self_attention"))
    assert ssm == 24_271_104
    net = VMUNet(2, 4)  # other channel counts are not repeated: C_pe = C_in
    assert n_params(net) == 27_422_928 + 1_536 * 2 + 25 * 4 and not net.repeat_to_rgb


def test_parameter_count_3d():
    assert n_params(VMUNet(1, 3, spatial_dims=3)) == 33_540_507


def test_counts_through_build_network_architecture(plans_2d, plans_3d):
    pm, cm = plans_2d
    assert len(cm.network_arch_init_kwargs["strides"]) - 1 >= 5
    net = nnUNetTrainerVMUNet.build_network_architecture(pm, cm, 1, 9, False)
    assert n_params(net) == 27_427_761
    pm, cm = plans_3d
    assert n_params(build_vm_unet(pm, cm, 1, 3, True)) == 33_540_507


# --------------------------------------------------------------------------------------------------------------
# Structure, names, initialisation

def test_upstream_state_dict_names():
    sd = VMUNet(1, 9).state_dict()
    for key in ["vmunet.patch_embed.proj.weight", "vmunet.patch_embed.norm.bias",
                "vmunet.layers.0.blocks.1.ln_1.weight", "vmunet.layers.0.blocks.0.self_attention.in_proj.weight",
                "vmunet.layers.2.blocks.0.self_attention.x_proj_weight", "vmunet.layers.3.blocks.1.self_attention.Ds",
                "vmunet.layers.1.downsample.reduction.weight", "vmunet.layers.2.downsample.norm.weight",
                "vmunet.layers_up.1.upsample.expand.weight", "vmunet.layers_up.3.blocks.0.self_attention.A_logs",
                "vmunet.final_up.expand.weight", "vmunet.final_up.norm.weight", "vmunet.final_conv.weight"]:
        assert key in sd, key
    assert "vmunet.layers.3.downsample.reduction.weight" not in sd and "vmunet.layers_up.0.upsample" not in str(sd)
    assert len([k for k in sd if k.startswith("vmunet.layers_up.3.blocks.") and k.endswith(".Ds")]) == 1
    assert sd["vmunet.layers_up.1.upsample.expand.weight"].shape == (4 * 384, 768)
    assert sd["vmunet.final_up.expand.weight"].shape == (384, 96)


def test_initialisation_and_drop_path():
    torch.manual_seed(0)
    v = VMUNet(1, 9).vmunet
    w = v.layers[1].blocks[0].self_attention.in_proj.weight
    assert abs(w.std().item() - 0.02) < 2e-3 and w.abs().max() < 0.1  # trunc-normal(0.02), not torch default
    assert torch.all(v.layers_up[2].upsample.norm.weight == 1) and torch.all(v.patch_embed.norm.bias == 0)
    conv = v.final_conv.weight  # torch default conv init: U(+-1/sqrt(fan_in)), fan_in 24
    assert conv.abs().max() <= 24 ** -0.5 and conv.std() > 0.05
    enc = [b.drop_path.drop_prob for layer in v.layers for b in layer.blocks]
    dec = [b.drop_path.drop_prob for layer in v.layers_up for b in layer.blocks]
    torch.testing.assert_close(torch.tensor(enc), torch.linspace(0, 0.2, 8))
    torch.testing.assert_close(torch.tensor(dec), torch.linspace(0, 0.2, 7).flip(0))


# --------------------------------------------------------------------------------------------------------------
# Forward / backward, shapes on plans, errors, AMP

def test_forward_backward_2d_logits():
    torch.manual_seed(0)
    net = VMUNet(1, 1)  # one output channel: upstream applied a sigmoid, we return logits
    x = torch.randn(2, 1, 32, 32)
    y = net(x)
    assert y.shape == (2, 1, 32, 32) and y.min() < 0
    y.square().mean().backward()
    grads = [p.grad for p in net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_forward_backward_3d_anisotropic():
    torch.manual_seed(0)
    net = VMUNet(1, 3, spatial_dims=3, factors=ANISO_3D)
    v = net.vmunet
    assert v.patch_embed.proj.kernel_size == (2, 4, 4) == v.patch_embed.proj.stride
    assert v.layers[0].downsample.norm.normalized_shape == (4 * 96,)  # factor (1, 2, 2): 4 neighbours
    assert v.layers[1].downsample.norm.normalized_shape == (8 * 192,)
    assert v.final_up.expand.weight.shape == (24 * 32, 96)
    x = torch.randn(2, 1, 4, 32, 32)
    y = net(x)
    assert y.shape == (2, 3, 4, 32, 32)
    y.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_anisotropic_plan_through_trainer_builder(plans_2d):
    pm, cm = plans_2d
    strides = [[1, 1], [1, 2], [2, 2], [2, 1], [2, 2], [2, 2]]
    net = build_vm_unet(pm, with_strides(cm, strides, patch_size=(32, 16)), 1, 2)
    assert net.vmunet.factors == [tuple(s) for s in strides[1:]]
    assert net.vmunet.patch_embed.proj.stride == (2, 4)
    with torch.no_grad():
        assert net.eval()(torch.randn(1, 1, 32, 16)).shape == (1, 2, 32, 16)


@pytest.mark.parametrize("strides, match", [
    ([[1, 1]] + [[2, 2]] * 4, "needs 5 downsampling steps"),
    ([[1, 1], [2, 2], [3, 3], [2, 2], [2, 2], [2, 2]], "factors of 1 or 2"),
    ([[2, 2]] + [[2, 2]] * 5, "first plan stage"),
])
def test_plan_errors(plans_2d, strides, match):
    pm, cm = plans_2d
    with pytest.raises(ValueError, match=match) as e:
        build_vm_unet(pm, with_strides(cm, strides), 1, 3)
    assert "VM-UNet" in str(e.value)


def test_bf16_autocast_finite():
    torch.manual_seed(0)
    net = VMUNet(1, 3)
    x = torch.randn(2, 1, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(x)
    assert torch.isfinite(y.float()).all()
    y.float().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


# --------------------------------------------------------------------------------------------------------------
# Pretrained VMamba-S v0 checkpoint (upstream key layout, made here)

def vmamba_s_checkpoint(path):
    """VMamba-S v0 layout: encoder keys of VM-UNet's VSSM, deeper layers.2 (27 blocks upstream; 4 here),
    the classifier (norm, head). Random values."""
    enc = {k: v for k, v in VMUNet(3, 9).vmunet.state_dict().items() if k.startswith(("patch_embed.", "layers."))}
    for j in (2, 3):  # blocks that the configured depth-2 stage does not have
        enc.update({k.replace("layers.2.blocks.0.", f"layers.2.blocks.{j}."): v for k, v in enc.items()
                    if k.startswith("layers.2.blocks.0.")})
    sd = perturbed(enc)
    sd.update({"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768), "head.weight": torch.zeros(1000, 768),
               "head.bias": torch.zeros(1000)})
    save_checkpoint(path, sd, with_config=True)
    return sd


def test_pretrained_encoder_and_mirrored_decoder(tmp_path):
    path = tmp_path / "vmamba_small_e238_ema.pth"
    ck = vmamba_s_checkpoint(path)
    net = VMUNet(1, 9)
    before = {k: v.clone() for k, v in net.vmunet.state_dict().items()}
    report = load_vmunet_pretrained(net, str(path))
    sd = net.vmunet.state_dict()
    # encoder: same names
    for k in ("patch_embed.proj.weight", "layers.0.blocks.1.self_attention.A_logs", "layers.2.downsample.reduction.weight"):
        assert torch.equal(sd[k], ck[k]) and not torch.equal(before[k], ck[k])
    # decoder: layers.i -> layers_up.(3 - i)
    for up, enc in (("layers_up.0.blocks.1.self_attention.x_proj_weight", "layers.3.blocks.1.self_attention.x_proj_weight"),
                    ("layers_up.3.blocks.0.ln_1.weight", "layers.0.blocks.0.ln_1.weight"),
                    ("layers_up.1.blocks.0.self_attention.conv2d.weight", "layers.2.blocks.0.self_attention.conv2d.weight")):
        assert torch.equal(sd[up], ck[enc])
    assert torch.equal(sd["final_conv.weight"], before["final_conv.weight"])
    # the report: nothing silently ignored
    assert not report.mismatched
    assert set(report.skipped) == {"norm.weight", "norm.bias", "head.weight", "head.bias"}
    assert report.unexpected and all(k.startswith(("layers.2.blocks.2.", "layers.2.blocks.3.")) for k in report.unexpected)
    missing_modules = {k.rsplit(".", 1)[0] for k in report.missing}
    assert missing_modules == {"layers_up.1.upsample.expand", "layers_up.2.upsample.expand",
                               "layers_up.3.upsample.expand", "layers_up.1.upsample.norm", "layers_up.2.upsample.norm",
                               "layers_up.3.upsample.norm", "final_up.expand", "final_up.norm", "final_conv"}
    text = report.summary()
    assert "missing" in text and "unexpected" in text and "layers.2.blocks.2.* (" in text


def test_pretrained_shape_mismatch_reported(tmp_path):
    path = tmp_path / "ckpt.pth"
    ck = vmamba_s_checkpoint(path)
    net = VMUNet(2, 3)  # 2 input channels: the 3-channel ImageNet patch embedding does not fit
    report = load_vmunet_pretrained(net, str(path))
    assert [m[:2] for m in report.mismatched] == [("patch_embed.proj.weight", "patch_embed.proj.weight")]
    assert "patch_embed.proj.weight" in report.missing and "checkpoint (96, 3, 4, 4) vs model (96, 2, 4, 4)" in str(report)
    assert torch.equal(net.vmunet.state_dict()["patch_embed.proj.bias"], ck["patch_embed.proj.bias"])


def test_pretrained_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=ENV_PRETRAINED):
        read_checkpoint(None)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_checkpoint(str(tmp_path / "nope.pth"))
    torch.save({"optimizer": {"lr": 1}}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a VMamba checkpoint"):
        read_checkpoint(str(tmp_path / "bad.pth"))


# --------------------------------------------------------------------------------------------------------------
# Trainers

def test_recipe_and_loss(plans_2d, tmp_path, monkeypatch):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

    t = make_trainer(nnUNetTrainerVMUNet, plans_2d, tmp_path, monkeypatch)
    assert (t.initial_lr, t.weight_decay, t.num_epochs, t.enable_deep_supervision) == (1e-3, 1e-2, 300, False)
    assert t.grad_scaler is None and not VM_UNET_RECIPE.amp and not VM_UNET_RECIPE.grad_clip
    t.network = torch.nn.Linear(2, 2)
    opt, sched = t.configure_optimizers()
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["amsgrad"]) == (1e-3, (0.9, 0.999), 1e-8, 1e-2, False)
    assert isinstance(sched, CosineLRScheduler)
    lrs = {}
    for e in (0, 50, 100, 150, 200, 299):
        sched.step(e)
        lrs[e] = g["lr"]
    assert lrs[0] == 1e-3 and math.isclose(lrs[100], 1e-5) and math.isclose(lrs[200], 1e-3)  # periodic past T_max
    assert math.isclose(lrs[50], (1e-3 + 1e-5) / 2) and math.isclose(lrs[150], lrs[50])
    loss = t._build_loss()
    assert isinstance(loss, DC_and_CE_loss) and (loss.weight_ce, loss.weight_dice) == (1.0, 1.0)
    assert loss.dc.do_bg and loss.dc.batch_dice
    logits, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 1, 8, 8)).float()
    assert torch.isfinite(loss(logits, target))
    t.set_deep_supervision_enabled(True)  # no-op for a network without deep supervision
    assert not t._do_i_compile()


def test_nnunet_recipe_variant(plans_2d, tmp_path, monkeypatch):
    r = make_trainer(nnUNetTrainerVMUNet_nnUNetRecipe, plans_2d, tmp_path, monkeypatch)
    assert (r.initial_lr, r.num_epochs, r.enable_deep_supervision, r.recipe.amp) == (1e-2, 1000, False, True)
    loss = r._build_loss()
    assert (loss.weight_ce, loss.weight_dice, loss.dc.do_bg) == (1, 1, False)  # nnU-Net's default DC+CE


def test_pretrained_trainer_needs_a_file(plans_2d, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_PRETRAINED, raising=False)
    with pytest.raises(RuntimeError, match=f"{ENV_PRETRAINED}=/path/to"):
        make_trainer(nnUNetTrainerVMUNetPretrained, plans_2d, tmp_path, monkeypatch)
    monkeypatch.setenv(ENV_PRETRAINED, str(tmp_path / "missing.pth"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        make_trainer(nnUNetTrainerVMUNetPretrained, plans_2d, tmp_path, monkeypatch)


def test_pretrained_trainer_loads_in_initialize(plans_2d, tmp_path, monkeypatch):
    """initialize() = nnU-Net's initialize (network, optimizer), then the checkpoint, reported to the log."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    path = tmp_path / "vmamba_small_e238_ema.pth"
    ck = vmamba_s_checkpoint(path)
    monkeypatch.setenv(ENV_PRETRAINED, str(path))
    t = make_trainer(nnUNetTrainerVMUNetPretrained, plans_2d, tmp_path, monkeypatch)

    def fake_initialize(self):  # nnU-Net's initialize without the preprocessed dataset
        self.network = self.build_network_architecture(self.plans_manager, self.configuration_manager, 1, 3, False)
        self.was_initialized = True

    monkeypatch.setattr(nnUNetTrainer, "initialize", fake_initialize)
    t.initialize()
    sd = t.network.vmunet.state_dict()
    assert torch.equal(sd["layers_up.2.blocks.1.self_attention.dt_projs_bias"],
                       ck["layers.1.blocks.1.self_attention.dt_projs_bias"])
    assert t.pretrained_report.loaded
    with open(t.log_file) as f:
        assert "pretrained weights from" in f.read()


# --------------------------------------------------------------------------------------------------------------
# Command line end to end (nnUNetv2_plan_and_preprocess -> train -> predict -> evaluate)

@pytest.mark.slow
def test_end_to_end_vm_unet_2d(tmp_path):
    from nnunet_mamba.demo import run_cycle

    # 128^2 images: nnU-Net plans 5 downsampling steps, the number VM-UNet needs (CPU: ~20 s per iteration)
    r = run_cycle(str(tmp_path), trainer="nnUNetTrainerVMUNet", dim=2, shape=(128, 128), n_train=8, n_test=2,
                  dataset_id=941, iterations=3, val_iterations=1, verbose=False)
    assert r.configuration == "2d"
    check_cycle(r, 3, weight_key="vmunet.layers.0.blocks.0.self_attention.x_proj_weight")
