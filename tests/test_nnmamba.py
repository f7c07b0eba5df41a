"""nnMamba (specs/nnmamba.md): upstream parameter counts, names, shapes on nnU-Net plans, fp32 core, DS loss."""

import numpy as np
import pytest
import torch

from helpers import check_cycle, make_plans, make_trainer, managers, n_params
from nnunet_mamba.networks.nnmamba import MambaLayer, nnMambaSeg
from nnunet_mamba.networks.plan import cumulative_scales
from nnunet_mamba.trainers.nnmamba import (NNMAMBA_RECIPE, build_nnmamba, build_nnmamba_css, nnmamba_ds_weights,
                                           nnUNetTrainerNnMamba, nnUNetTrainerNnMamba_nnUNetRecipe,
                                           nnUNetTrainerNnMambaCSS, nnUNetTrainerNnMambaCSS_nnUNetRecipe)


# --------------------------------------------------------------------------------------------------------------
# Plans: real nnU-Net plans of synthetic isotropic datasets (conftest: plans_3d with 5 x2 steps, plans_2d with 6),
# and hand-made plans for small patches, anisotropic and too-short plans.

ISO_3D = make_plans((64, 64, 64), [[1, 1, 1]] + [[2, 2, 2]] * 5)


@pytest.fixture
def real_plans(request):
    """nd -> (plans_manager, configuration_manager) of conftest's real nnU-Net plans."""
    return lambda nd: request.getfixturevalue({2: "plans_2d", 3: "plans_3d"}[nd])


# --------------------------------------------------------------------------------------------------------------
# Parameter counts (acceptance targets, spec §3 and §7)

@pytest.mark.parametrize("nd, css, ds_heads, k, expected", [
    (3, False, None, 3, 15_855_388),
    (3, False, None, 6, 15_859_408),
    (3, False, None, 16, 15_876_318),
    (3, True, False, 3, 15_941_619),  # upstream root file: no DS heads
    (3, True, False, 16, 15_959_598),
    (3, True, True, 3, 15_942_300),  # the project's css with DS heads
    (2, False, None, 3, 5_770_618),
    (2, True, False, 3, 5_856_849),
    (2, True, True, 3, 5_857_530),
])
def test_parameter_counts(nd, css, ds_heads, k, expected):
    net = nnMambaSeg(in_ch=1, number_classes=k, spatial_dims=nd, css=css, ds_heads=ds_heads,
                     deep_supervision=bool(ds_heads) if css else True)
    assert n_params(net) == expected


def test_per_module_counts_and_ssm_share():
    default, css = nnMambaSeg(1, number_classes=3), nnMambaSeg(1, number_classes=3, css=True, deep_supervision=False)
    both = {"in_conv": 28_704, "att1": 162, "att2": 580, "att3": 2_184, "conv5": 1_770_240, "conv6": 442_752,
            "conv7": 110_784, "conv8": 2_853}
    for name, n in {**both, "layer1": 648_064, "layer2": 2_576_128, "layer3": 10_272_256, "ds1_cls_conv": 99,
                    "ds2_cls_conv": 195, "ds3_cls_conv": 387}.items():
        assert n_params(getattr(default, name)) == n, name
    for name, n in {**both, "layer1": 652_288, "layer2": 2_592_768, "layer3": 10_338_304}.items():
        assert n_params(getattr(css, name)) == n, name
    assert not hasattr(css, "ds1_cls_conv")
    for net in (default, css):  # SSM cores: P(64) + P(128) + P(256)
        assert sum(n_params(getattr(net, f"layer{i}")[1].mamba_layer.mamba) for i in (1, 2, 3)) == 586_880


def test_shared_mamba_layer_registered_twice_counted_once():
    net = nnMambaSeg(1, number_classes=3)
    for i in (1, 2, 3):
        layer = getattr(net, f"layer{i}")
        assert layer[0].mamba_layer is None and layer[0].downsample is not None
        assert layer[1].mamba_layer is layer[2].mamba_layer and layer[1].downsample is None
    sd = net.state_dict()
    assert torch.equal(sd["layer1.1.mamba_layer.mamba.in_proj.weight"], sd["layer1.2.mamba_layer.mamba.in_proj.weight"])
    trainable_in_sd = sum(v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                               "num_batches_tracked")))
    shared = sum(n_params(getattr(net, f"layer{i}")[1].mamba_layer) for i in (1, 2, 3))
    assert trainable_in_sd == n_params(net) + shared  # duplicates in the state dict, not in the parameters
    # the shared layer runs in both blocks
    calls = []
    net.layer1[1].mamba_layer.mamba.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        net.eval()(torch.randn(1, 1, 16, 16, 16))
    assert len(calls) == 2


def test_upstream_state_dict_names():
    sd = nnMambaSeg(1, number_classes=3).state_dict()
    upstream = ["in_conv.conv.0.weight", "in_conv.conv.0.bias", "in_conv.conv.1.running_mean", "in_conv.conv.4.weight",
                "att1.layer1.weight", "att1.layer2.bias", "layer1.0.conv1.weight", "layer1.0.bn1.weight",
                "layer1.0.conv2.weight", "layer1.0.bn2.bias", "layer1.0.downsample.0.weight",
                "layer1.0.downsample.1.running_var", "layer1.1.mamba_layer.nin.weight",
                "layer1.1.mamba_layer.norm.weight", "layer1.1.mamba_layer.mamba.in_proj.weight",
                "layer1.2.mamba_layer.mamba.in_proj.weight", "layer3.2.mamba_layer.mamba.A_log",
                "layer3.2.mamba_layer.mamba.dt_proj.bias", "layer2.1.mamba_layer.mamba.conv1d.weight",
                "conv5.conv.0.weight", "conv8.conv.4.bias", "ds1_cls_conv.weight", "ds2_cls_conv.bias",
                "ds3_cls_conv.weight"]
    missing = [k for k in upstream if k not in sd]
    assert not missing
    no_bias = ["layer1.0.conv1.bias", "layer1.0.conv2.bias", "layer1.0.downsample.0.bias",
               "layer1.1.mamba_layer.nin.bias", "layer1.1.mamba_layer.mamba.in_proj.bias"]
    assert not [k for k in no_bias if k in sd]
    assert sd["ds3_cls_conv.weight"].shape == (3, 128, 1, 1, 1)
    css = nnMambaSeg(1, number_classes=3, css=True, deep_supervision=False).state_dict()
    assert {"layer3.1.mamba_layer.nin2.weight", "layer3.2.mamba_layer.norm2.running_mean"} <= set(css)
    assert not any(k.startswith("ds") for k in css)
    # an upstream default checkpoint (same keys) loads strictly into a freshly built network
    nnMambaSeg(1, number_classes=3).load_state_dict(sd, strict=True)


def test_css_layer_matches_spec_formula():
    torch.manual_seed(0)
    layer = MambaLayer(3, 8, css=True).eval()
    with torch.no_grad():
        for bn in (layer.norm, layer.norm2):
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 1.5)
        x = torch.randn(2, 8, 3, 4, 5)
        a = torch.relu(layer.norm(layer.nin(x)))
        t = a.reshape(2, 8, -1).transpose(1, 2)  # (B, L, C), raster order
        m = layer.mamba
        rev_l, rev_c = (lambda s: s.flip(1)), (lambda s: s.flip(2))
        y = (m(t) + rev_l(m(rev_l(t))) + rev_c(m(rev_c(t))) + rev_l(rev_c(m(rev_l(rev_c(t)))))) / 4
        out = y.transpose(1, 2).reshape(a.shape) + a
        expected = torch.relu(layer.norm2(layer.nin2(out)))
        torch.testing.assert_close(layer(x), expected)
        # and the four scans differ (the reversals are not no-ops on this input)
        assert (m(t) - rev_l(m(rev_l(t)))).abs().max() > 1e-4


def test_headless_css_state_dict_loads_into_trainer_css_network():
    upstream_css = nnMambaSeg(1, number_classes=3, css=True, deep_supervision=False).state_dict()
    result = nnMambaSeg(1, number_classes=3, css=True, ds_heads=True).load_state_dict(upstream_css, strict=False)
    assert sorted(result.missing_keys) == [f"ds{i}_cls_conv.{p}" for i in (1, 2, 3) for p in ("bias", "weight")]
    assert result.unexpected_keys == []


def test_ds_without_heads_is_an_error():
    with pytest.raises(ValueError, match="ds_heads=True"):
        nnMambaSeg(1, number_classes=3, css=True)
    net = nnMambaSeg(1, number_classes=3, css=True, deep_supervision=False)
    net.deep_supervision = True
    with pytest.raises(RuntimeError, match="ds_heads"):
        net(torch.randn(2, 1, 16, 16, 16))


# --------------------------------------------------------------------------------------------------------------
# Through the trainers and nnU-Net plans

@pytest.mark.parametrize("nd, builder, expected", [(3, build_nnmamba, 15_855_388), (3, build_nnmamba_css, 15_942_300),
                                                   (2, build_nnmamba, 5_770_618), (2, build_nnmamba_css, 5_857_530)])
def test_counts_through_build_network_architecture(real_plans, nd, builder, expected):
    pm, cm = real_plans(nd)
    assert all(list(s) == [2] * nd for s in cm.network_arch_init_kwargs["strides"][1:5])  # isotropic prefix
    for ds in (True, False):  # inference builds without DS: same parameters (heads always built)
        net = builder(pm, cm, 1, 3, enable_deep_supervision=ds)
        assert n_params(net) == expected and net.deep_supervision is ds


@pytest.mark.parametrize("nd", [2, 3])
def test_trainer_on_real_plans(real_plans, nd, tmp_path, monkeypatch):
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    pm, cm = real_plans(nd)
    n_steps = len(cm.network_arch_init_kwargs["strides"]) - 1
    assert n_steps >= 5  # the plan has more stages than nnMamba uses
    trainer = make_trainer(nnUNetTrainerNnMamba, pm.plans, tmp_path, monkeypatch,
                           name="2d" if nd == 2 else "3d_fullres")
    assert trainer._get_deep_supervision_scales() == cumulative_scales([[2] * nd] * 4)  # 4, not n_steps
    loss = trainer._build_loss()
    assert isinstance(loss, DeepSupervisionWrapper)
    np.testing.assert_allclose(loss.weight_factors, np.array([1, .5, .25, .125]) / 1.875)


def test_trainer_classes_use_their_builders():
    assert nnUNetTrainerNnMamba.build_network_architecture is build_nnmamba
    assert nnUNetTrainerNnMamba_nnUNetRecipe.build_network_architecture is build_nnmamba
    assert nnUNetTrainerNnMambaCSS.build_network_architecture is build_nnmamba_css
    assert nnUNetTrainerNnMambaCSS_nnUNetRecipe.build_network_architecture is build_nnmamba_css
    import nnunet_mamba.trainers as t
    for name in ("nnUNetTrainerNnMamba", "nnUNetTrainerNnMambaCSS", "nnUNetTrainerNnMamba_nnUNetRecipe",
                 "nnUNetTrainerNnMambaCSS_nnUNetRecipe"):
        assert name in t.__all__ and getattr(t, name).__name__ == name


def _check_outputs(out, patch, scales, k, ds):
    if not ds:
        assert torch.is_tensor(out) and out.shape[1:] == (k, *patch)
        return
    assert isinstance(out, list) and len(out) == len(scales) == 4
    for o, s in zip(out, scales):
        assert o.shape[1:] == (k, *[round(p * f) for p, f in zip(patch, s)])


@pytest.mark.parametrize("nd, css, n_steps", [(3, False, 4), (2, False, 5), (2, True, 5)])
def test_train_step_on_plan(nd, css, n_steps, tmp_path, monkeypatch):
    """One nnU-Net train_step (fp32 recipe, DS targets at the reported scales), then DS off for inference."""
    patch = (16, 16, 16) if nd == 3 else (32, 32)
    plans = make_plans(patch, [[1] * nd] + [[2] * nd] * n_steps, name="3d_fullres" if nd == 3 else "2d")
    cls = nnUNetTrainerNnMambaCSS if css else nnUNetTrainerNnMamba
    trainer = make_trainer(cls, plans, tmp_path, monkeypatch)
    scales = trainer._get_deep_supervision_scales()
    assert scales == cumulative_scales([[2] * nd] * 4)
    torch.manual_seed(0)
    net = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3, True)
    trainer.network = net
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    x = torch.randn(2, 1, *patch)
    _check_outputs(net(x), patch, scales, 3, ds=True)
    target = torch.randint(0, 3, (2, 1, *patch)).float()
    targets = [torch.nn.functional.interpolate(target, scale_factor=tuple(s), mode="nearest") for s in scales]
    before = net.layer1[1].mamba_layer.mamba.in_proj.weight.detach().clone()
    result = trainer.train_step({"data": x, "target": targets})
    assert np.isfinite(result["loss"])
    assert not torch.equal(before, net.layer1[1].mamba_layer.mamba.in_proj.weight)  # the shared mixer trains
    no_grad = {n for n, p in net.named_parameters() if p.grad is None}
    # with exactly 4 plan steps the last output has weight 0 (upstream v1), so its head gets no gradient
    assert no_grad == ({"ds3_cls_conv.weight", "ds3_cls_conv.bias"} if n_steps == 4 else set())
    trainer.set_deep_supervision_enabled(False)
    assert net.deep_supervision is False
    with torch.no_grad():
        _check_outputs(net.eval()(x), patch, scales, 3, ds=False)
    trainer.set_deep_supervision_enabled(True)
    assert net.deep_supervision is True


def test_anisotropic_plan_shapes(tmp_path, monkeypatch):
    strides = [[1, 1, 1], [1, 2, 2], [2, 2, 2], [1, 2, 2], [2, 2, 2], [1, 2, 2]]
    patch = (8, 64, 64)
    trainer = make_trainer(nnUNetTrainerNnMamba, make_plans(patch, strides), tmp_path, monkeypatch)
    scales = trainer._get_deep_supervision_scales()
    assert scales == [[1, 1, 1], [1, 0.5, 0.5], [0.5, 0.25, 0.25], [0.5, 0.125, 0.125]]
    net = nnUNetTrainerNnMamba.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                          2, 4, True)
    assert net.strides == [(1, 2, 2), (2, 2, 2), (1, 2, 2), (2, 2, 2)]
    assert net.in_conv.conv[0].stride == (1, 2, 2) and net.layer3[0].downsample[0].stride == (2, 2, 2)
    assert net.up8.scale_factor == (1.0, 2.0, 2.0)
    assert n_params(net) == 15_850_990 + 864 * 2 + 27 * 16 + 1_097 * 4  # parameters independent of factors
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 2, *patch))
    _check_outputs(out, patch, scales, 4, ds=True)


@pytest.mark.parametrize("strides, match", [
    ([[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]], r"nnMamba.*needs 4 downsampling steps.*provides 3"),
    ([[1, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]], r"nnMamba.*strides\[0\] all ones"),
    ([[1, 1, 1], [2, 2, 2], [3, 3, 3], [2, 2, 2], [2, 2, 2]], r"nnMamba.*factors of 1 or 2"),
])
def test_plan_errors(strides, match):
    pm, cm = managers(make_plans((48, 48, 48), strides))
    with pytest.raises(ValueError, match=match) as err:
        build_nnmamba(pm, cm, 1, 3)
    assert str(strides) in str(err.value)  # names the plan values


# --------------------------------------------------------------------------------------------------------------
# Precision: Mamba layers in fp32 under autocast

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_keeps_mamba_fp32(dtype):
    torch.manual_seed(0)
    net = nnMambaSeg(1, channels=16, number_classes=3, spatial_dims=2)
    seen = {}

    def record(name):
        def hook(mod, inp, out):
            seen.setdefault(name, (inp[0].dtype, out.dtype))  # returns None: the output is kept
        return hook

    net.layer2[1].mamba_layer.nin.register_forward_hook(record("nin"))
    net.layer2[1].mamba_layer.mamba.register_forward_hook(record("mixer"))
    net.layer2[1].mamba_layer.mamba.out_proj.register_forward_hook(record("out_proj"))
    net.layer2[1].conv1.register_forward_hook(record("block_conv"))
    with torch.autocast("cpu", dtype=dtype):
        out = net(torch.randn(2, 1, 32, 32))
    assert all(torch.isfinite(o).all() for o in out)
    assert seen["nin"] == seen["mixer"] == seen["out_proj"] == (torch.float32, torch.float32)
    assert seen["block_conv"][1] == dtype  # the convolutions outside the core do run in low precision


# --------------------------------------------------------------------------------------------------------------
# Recipe and deep-supervision loss

def test_ds_weights():
    np.testing.assert_allclose(nnmamba_ds_weights(5), np.array([1, .5, .25, .125]) / 1.875)
    np.testing.assert_allclose(nnmamba_ds_weights(6), np.array([1, .5, .25, .125]) / 1.875)
    np.testing.assert_allclose(nnmamba_ds_weights(4), np.array([1, .5, .25, 0]) / 1.75)
    w = nnmamba_ds_weights(4, zero_last=False)
    np.testing.assert_allclose(w, np.array([1, .5, .25, 1e-6]) / (1.75 + 1e-6))
    assert w[-1] > 0


@pytest.mark.parametrize("cls, n_steps, expected", [
    (nnUNetTrainerNnMamba, 5, [1, .5, .25, .125]),
    (nnUNetTrainerNnMamba, 4, [1, .5, .25, 0]),
    (nnUNetTrainerNnMambaCSS, 6, [1, .5, .25, .125]),
    (nnUNetTrainerNnMamba_nnUNetRecipe, 5, [1, .5, .25, 0]),  # nnU-Net's default weighting over the 4 outputs
    (nnUNetTrainerNnMambaCSS_nnUNetRecipe, 4, [1, .5, .25, 0]),
])
def test_trainer_loss_and_scales(cls, n_steps, expected, tmp_path, monkeypatch):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

    plans = make_plans((32,) * 3 if n_steps == 4 else (64,) * 3, [[1, 1, 1]] + [[2, 2, 2]] * n_steps)
    trainer = make_trainer(cls, plans, tmp_path, monkeypatch)
    assert len(trainer._get_deep_supervision_scales()) == 4
    loss = trainer._build_loss()
    assert isinstance(loss, DeepSupervisionWrapper) and isinstance(loss.loss, DC_and_CE_loss)
    np.testing.assert_allclose(loss.weight_factors, np.array(expected) / sum(expected))
    # the loss runs on the network's 4 outputs against targets at the reported scales
    patch = trainer.configuration_manager.patch_size
    scales = trainer._get_deep_supervision_scales()
    outs = [torch.randn(2, 3, *[int(p * f) for p, f in zip(patch, s)]) for s in scales]
    targets = [torch.randint(0, 3, (2, 1, *o.shape[2:])).float() for o in outs]
    assert torch.isfinite(loss(outs, targets))


def test_recipes(tmp_path, monkeypatch):
    t = make_trainer(nnUNetTrainerNnMamba, ISO_3D, tmp_path, monkeypatch)
    assert (t.initial_lr, t.weight_decay, t.num_epochs, t.enable_deep_supervision) == (1e-4, 3e-5, 1000, True)
    assert t.grad_scaler is None and NNMAMBA_RECIPE.amp is False and NNMAMBA_RECIPE.grad_clip
    t.network = nnMambaSeg(1, channels=16, number_classes=3)
    opt, sched = t.configure_optimizers()
    assert isinstance(opt, torch.optim.SGD)
    g = opt.param_groups[0]
    assert (g["lr"], g["momentum"], g["nesterov"], g["weight_decay"]) == (1e-4, 0.99, True, 3e-5)
    assert type(sched).__name__ == "PolyLRScheduler"
    assert not t._do_i_compile()
    r = make_trainer(nnUNetTrainerNnMamba_nnUNetRecipe, ISO_3D, tmp_path, monkeypatch)
    assert (r.initial_lr, r.num_epochs) == (1e-2, 1000) and r.recipe.amp is True


# --------------------------------------------------------------------------------------------------------------
# Command line end to end (nnUNetv2_plan_and_preprocess -> train -> predict with mirroring -> evaluate)

@pytest.mark.slow
def test_end_to_end_nnmamba_2d(tmp_path):
    from nnunet_mamba.demo import run_cycle

    r = run_cycle(str(tmp_path), trainer="nnUNetTrainerNnMamba", dim=2, shape=(64, 64), n_train=8, n_test=2,
                  dataset_id=931, verbose=False)
    assert r.configuration == "2d"
    # the plan of a 64x64 dataset has exactly the 4 steps nnMamba needs
    check_cycle(r, 3, weight_key="layer1.2.mamba_layer.mamba.in_proj.weight")
