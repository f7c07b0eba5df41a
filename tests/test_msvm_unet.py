"""MSVM-UNet (specs/msvm_unet.md): upstream counts, names, init, plan factors, shapes, AMP, pretrained, freeze, trainers."""
import math

import pytest
import torch

from helpers import check_cycle, n_params, with_strides
from nnunet_mamba.networks.msvm_unet import MSVMUNet
from nnunet_mamba.networks.pretrained import ENV_PRETRAINED, load_msvmunet_pretrained
from nnunet_mamba.trainers.base import CosineLRScheduler
from nnunet_mamba.trainers.msvm_unet import (MSVM_UNET_RECIPE, build_msvm_unet, nnUNetTrainerMSVMUNet,
                                             nnUNetTrainerMSVMUNet_nnUNetRecipe, nnUNetTrainerMSVMUNetPretrained)
from vmamba_helpers import make_trainer, perturbed, save_checkpoint

ANISO_3D = [(1, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2), (1, 2, 2)]


# --------------------------------------------------------------------------------------------------------------
# Parameter counts (spec §3, §7)

def test_parameter_counts_2d_and_breakdown():
    net = MSVMUNet(1, 9)  # 1 channel repeated to 3, 9 classes (Synapse)
    e, d = net.encoder, net.decoder
    assert n_params(net) == 35_925_513
    assert (n_params(e), n_params(d)) == (29_478_528, 6_446_985)
    assert [n_params(m) for m in (e.layer0, e.layer1, e.layers, e.downsamples)] == [1_440, 41_760, 25_947_648,
                                                                                  3_487_680]
    assert [n_params(m) for m in d.layers] == [4_730_496, 1_222_464, 325_536] and n_params(d.out_layers) == 168_489
    up0 = d.layers[0]
    assert [n_params(m) for m in (up0.up, up0.concat_layer, up0.vss_layer)] == [1_200_384, 295_296, 3_234_816]
    assert [n_params(e.layers[i].blocks[0]) for i in range(4)] == [100_608, 394_752, 1_563_648, 6_223_872]
    assert [n_params(d.layers[2 - i].vss_layer.blocks[0]) for i in range(3)] == [114_048, 421_632, 1_617_408]
    ssm = sum(n_params(m) for n, m in net.named_modules() if n.endswith(".op"))
    assert ssm == 7_298_688
    other = MSVMUNet(2, 4)  # C_pe = C_in when not repeated
    assert n_params(other) == 35_923_344 + 432 * 2 + 97 * 4 and not other.repeat_to_rgb


def test_parameter_count_3d():
    assert n_params(MSVMUNet(1, 3, spatial_dims=3)) == 46_794_819


def test_counts_through_build_network_architecture(plans_2d, plans_3d):
    pm, cm = plans_2d
    assert n_params(nnUNetTrainerMSVMUNet.build_network_architecture(pm, cm, 1, 9, False)) == 35_925_513
    pm, cm = plans_3d
    assert n_params(build_msvm_unet(pm, cm, 1, 3, True)) == 46_794_819


# --------------------------------------------------------------------------------------------------------------
# Names, init, drop path

def test_upstream_state_dict_names_and_shapes():
    sd = MSVMUNet(1, 9).state_dict()
    shapes = {"encoder.layer0.0.weight": (48, 3, 3, 3), "encoder.layer0.2.weight": (48,),
              "encoder.layer1.0.weight": (96, 48, 3, 3), "encoder.layer1.2.bias": (96,),
              "encoder.layers.2.blocks.7.op.x_proj_weight": (4, 24 + 2, 384),
              "encoder.layers.0.blocks.0.op.A_logs": (384, 1), "encoder.layers.0.blocks.1.mlp.fc1.weight": (384, 96),
              "encoder.layers.3.blocks.1.norm2.weight": (768,), "encoder.downsamples.0.1.weight": (192, 96, 3, 3),
              "encoder.downsamples.2.3.weight": (768,), "decoder.layers.0.up.expand.0.weight": (1536, 768, 1, 1),
              "decoder.layers.0.up.expand.1.running_mean": (1536,), "decoder.layers.0.up.expand.3.weight":
                  (1536, 1, 3, 3), "decoder.layers.0.up.norm.weight": (384,),
              "decoder.layers.0.concat_layer.weight": (384, 768),
              "decoder.layers.2.vss_layer.blocks.1.mlp.multiscale_conv.dw_convs.2.weight": (384, 1, 5, 5),
              "decoder.layers.1.vss_layer.blocks.0.op.conv2d.weight": (192, 1, 3, 3),
              "decoder.out_layers.0.expand.0.weight": (1536, 96, 1, 1), "decoder.out_layers.0.norm.weight": (96,),
              "decoder.out_layers.0.out.weight": (9, 96, 1, 1)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert "encoder.layers.0.blocks.0.op.conv2d.bias" not in sd and "encoder.downsamples.3.weight" not in sd


def test_initialisation_and_drop_path():
    torch.manual_seed(0)
    net = MSVMUNet(1, 9)
    enc_w = net.encoder.layers[1].blocks[0].mlp.fc1.weight
    assert abs(enc_w.std().item() - 0.02) < 2e-3  # VMamba init over the encoder
    dec_w = net.decoder.layers[2].concat_layer.weight  # decoder: torch default Linear init U(+-1/sqrt(192))
    assert dec_w.abs().max() <= 192 ** -0.5 and abs(dec_w.std().item() - 192 ** -0.5 / math.sqrt(3)) < 3e-3
    op = net.encoder.layers[0].blocks[0].op
    assert torch.all(op.A_logs == 0) and torch.all(op.Ds == 1)
    enc = [b.drop_path.drop_prob for layer in net.encoder.layers for b in layer.blocks]
    dec = [b.drop_path.drop_prob for up in net.decoder.layers for b in up.vss_layer.blocks]
    torch.testing.assert_close(torch.tensor(enc), torch.linspace(0, 0.2, 14))
    torch.testing.assert_close(torch.tensor(dec), torch.linspace(0.2, 0, 6))


# --------------------------------------------------------------------------------------------------------------
# Shapes on plans, errors, AMP

def test_forward_backward_3d_anisotropic():
    torch.manual_seed(0)
    net = MSVMUNet(1, 3, spatial_dims=3, factors=ANISO_3D)
    assert net.encoder.layer0[0].stride == (1, 2, 2) and net.encoder.downsamples[1][1].stride == (2, 2, 2)
    assert [u.up.expand[0].out_channels for u in net.decoder.layers] == [384 * 4, 192 * 8, 96 * 4]  # f5, f4, f3
    assert net.decoder.out_layers[0].expand[0].out_channels == 96 * 2 * 4 * 4  # f1*f2 = (2, 4, 4)
    x = torch.randn(2, 1, 4, 32, 32)
    y = net(x)
    assert y.shape == (2, 3, 4, 32, 32)
    y.mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_plan_errors(plans_3d):
    pm, cm = plans_3d
    with pytest.raises(ValueError, match="MSVM-UNet.*needs 5 downsampling steps"):
        build_msvm_unet(pm, with_strides(cm, [[1, 1, 1]] + [[2, 2, 2]] * 3), 1, 3)
    with pytest.raises(ValueError, match="factors of 1 or 2"):
        build_msvm_unet(pm, with_strides(cm, [[1, 1, 1], [4, 4, 4]] + [[2, 2, 2]] * 4), 1, 3)


def test_bf16_autocast_finite():
    torch.manual_seed(0)
    net = MSVMUNet(1, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = net(torch.randn(2, 1, 32, 32))
    assert y.shape == (2, 3, 32, 32) and torch.isfinite(y.float()).all()


# --------------------------------------------------------------------------------------------------------------
# Pretrained VMamba-T v2 checkpoint (upstream key layout, made here)

def vmamba_t_v2_checkpoint(path):
    """vssm1_tiny_0230s layout: ``patch_embed.0-7``, ``layers.i.blocks.j.{norm,op,norm2,mlp}``,
    ``layers.i.downsample.{1,3}``, ``classifier.{norm,head}``. Stage 0 uses the older ``ln_1`` /
    ``self_attention`` names and conv-shaped (out, in, 1, 1) Linear2d weights, which upstream also accepts."""
    enc = MSVMUNet(3, 9).encoder.state_dict()
    sd = {}
    for k, v in perturbed(enc).items():
        if k.startswith("layer0."):
            k = "patch_embed." + k[len("layer0."):]
        elif k.startswith("layer1."):
            j, rest = k[len("layer1."):].split(".", 1)
            k = f"patch_embed.{int(j) + 5}.{rest}"
        elif k.startswith("downsamples."):
            i, rest = k[len("downsamples."):].split(".", 1)
            k = f"layers.{i}.downsample.{rest}"
        elif k.startswith("layers.0."):
            k = k.replace(".norm.", ".ln_1.").replace(".op.", ".self_attention.")
            if k.endswith(("mlp.fc1.weight", "in_proj.weight")):
                v = v[..., None, None]
        sd[k] = v
    sd.update({"classifier.norm.weight": torch.ones(768), "classifier.norm.bias": torch.zeros(768),
               "classifier.head.weight": torch.zeros(1000, 768), "classifier.head.bias": torch.zeros(1000),
               "layers.2.blocks.8.norm.weight": torch.ones(384)})  # a deeper checkpoint's extra block
    save_checkpoint(path, sd, with_config=True)
    return sd


def test_pretrained_encoder(tmp_path):
    path = tmp_path / "vssm1_tiny_0230s_ckpt_epoch_264.pth"
    ck = vmamba_t_v2_checkpoint(path)
    net = MSVMUNet(1, 9)
    dec_before = {k: v.clone() for k, v in net.decoder.state_dict().items()}
    report = load_msvmunet_pretrained(net, str(path))
    sd = net.state_dict()
    pairs = {"encoder.layer0.0.weight": "patch_embed.0.weight", "encoder.layer0.2.bias": "patch_embed.2.bias",
             "encoder.layer1.0.weight": "patch_embed.5.weight", "encoder.layer1.2.weight": "patch_embed.7.weight",
             "encoder.downsamples.1.1.weight": "layers.1.downsample.1.weight",
             "encoder.layers.2.blocks.7.op.dt_projs_bias": "layers.2.blocks.7.op.dt_projs_bias",
             "encoder.layers.0.blocks.1.norm.weight": "layers.0.blocks.1.ln_1.weight",
             "encoder.layers.0.blocks.0.op.x_proj_weight": "layers.0.blocks.0.self_attention.x_proj_weight"}
    for mk, ckk in pairs.items():
        assert torch.equal(sd[mk], ck[ckk]), mk
    w4 = ck["layers.0.blocks.0.self_attention.in_proj.weight"]
    assert w4.dim() == 4 and torch.equal(sd["encoder.layers.0.blocks.0.op.in_proj.weight"], w4.flatten(1))
    assert all(torch.equal(v, dec_before[k]) for k, v in net.decoder.state_dict().items())
    assert not report.mismatched and report.unexpected == ["layers.2.blocks.8.norm.weight"]
    assert set(report.skipped) == {"classifier.norm.weight", "classifier.norm.bias", "classifier.head.weight",
                                   "classifier.head.bias"}
    assert report.missing and all(k.startswith("decoder.") for k in report.missing)
    assert len(report.loaded) == len(net.encoder.state_dict())


def test_pretrained_shape_mismatch_reported(tmp_path):
    path = tmp_path / "ckpt.pth"
    vmamba_t_v2_checkpoint(path)
    report = load_msvmunet_pretrained(MSVMUNet(2, 3), str(path))
    assert [m[1] for m in report.mismatched] == ["encoder.layer0.0.weight"]
    assert "encoder.layer0.0.weight" in report.missing and "shape mismatches" in str(report)


# --------------------------------------------------------------------------------------------------------------
# Trainers

def test_recipe_and_loss(plans_2d, tmp_path, monkeypatch):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss

    t = make_trainer(nnUNetTrainerMSVMUNet, plans_2d, tmp_path, monkeypatch)
    assert (t.initial_lr, t.weight_decay, t.num_epochs, t.enable_deep_supervision) == (5e-4, 1e-3, 300, False)
    assert t.grad_scaler is None and not MSVM_UNET_RECIPE.amp and not MSVM_UNET_RECIPE.grad_clip
    t.network = torch.nn.Linear(2, 2)
    opt, sched = t.configure_optimizers()
    g = opt.param_groups[0]
    assert isinstance(opt, torch.optim.AdamW) and isinstance(sched, CosineLRScheduler)
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (5e-4, (0.9, 0.999), 1e-8, 1e-3)
    sched.step(150)
    assert math.isclose(g["lr"], (5e-4 + 1e-6) / 2)
    sched.step(300)
    assert math.isclose(g["lr"], 1e-6)
    loss = t._build_loss()
    assert isinstance(loss, DC_and_CE_loss) and (loss.weight_ce, loss.weight_dice) == (0.4, 0.6)
    assert loss.dc.do_bg and loss.dc.batch_dice
    r = make_trainer(nnUNetTrainerMSVMUNet_nnUNetRecipe, plans_2d, tmp_path, monkeypatch)
    assert (r.initial_lr, r.num_epochs, r.recipe.amp, r._build_loss().weight_ce) == (1e-2, 1000, True, 1)


def test_pretrained_trainer_needs_a_file(plans_2d, tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_PRETRAINED, raising=False)
    with pytest.raises(RuntimeError, match=ENV_PRETRAINED):
        make_trainer(nnUNetTrainerMSVMUNetPretrained, plans_2d, tmp_path, monkeypatch)


def test_freeze_schedule_and_train_step(plans_2d, tmp_path, monkeypatch):
    """Pretrained trainer: encoder (incl. stem) frozen in epochs 0-9, trainable from epoch 10; one real nnU-Net
    train_step (2D forward/backward, fp32, no clipping) leaves the frozen encoder unchanged."""
    path = tmp_path / "ckpt.pth"
    vmamba_t_v2_checkpoint(path)
    monkeypatch.setenv(ENV_PRETRAINED, str(path))
    t = make_trainer(nnUNetTrainerMSVMUNetPretrained, plans_2d, tmp_path, monkeypatch)
    torch.manual_seed(0)
    t.network = t.build_network_architecture(t.plans_manager, t.configuration_manager, 1, 3, False)
    load_msvmunet_pretrained(t.network, str(path))
    t.optimizer, t.lr_scheduler = t.configure_optimizers()
    t.loss = t._build_loss()
    enc = list(t.network.encoder.parameters())
    for epoch, frozen in ((0, True), (9, True), (10, False)):
        t.current_epoch = epoch
        t.on_train_epoch_start()
        assert all(p.requires_grad != frozen for p in enc)
        assert all(p.requires_grad for p in t.network.decoder.parameters())
        if epoch == 0:
            enc_before = [p.detach().clone() for p in enc]
            dec_before = [p.detach().clone() for p in t.network.decoder.parameters()]
            batch = {"data": torch.randn(2, 1, 32, 32), "target": torch.randint(0, 3, (2, 1, 32, 32)).float()}
            out = t.train_step(batch)
            assert math.isfinite(out["loss"])
            assert all(torch.equal(a, b) for a, b in zip(enc_before, enc))
            assert not all(torch.equal(a, b) for a, b in zip(dec_before, t.network.decoder.parameters()))
    with open(t.log_file) as f:
        log = f.read()
    assert "encoder (incl. stem) frozen from epoch 0" in log and "trainable from epoch 10" in log


# --------------------------------------------------------------------------------------------------------------
# Command line end to end

@pytest.mark.slow
def test_end_to_end_msvm_unet_2d(tmp_path):
    from nnunet_mamba.demo import run_cycle

    r = run_cycle(str(tmp_path), trainer="nnUNetTrainerMSVMUNet", dim=2, shape=(128, 128), n_train=8, n_test=2,
                  dataset_id=942, iterations=3, val_iterations=1, verbose=False)
    assert r.configuration == "2d"
    check_cycle(r, 3, weight_key="encoder.layers.2.blocks.7.op.A_logs")
