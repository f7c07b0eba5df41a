"""Test helpers shared by several test files."""
import copy
import json
import os

import torch


def make_plans(patch, strides, name="3d_fullres"):
    """A minimal nnU-Net plans dict (small patches, any strides) for unit tests; real plans: conftest."""
    nd = len(patch)
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": len(strides), "features_per_stage": [32 * 2 ** i for i in range(len(strides))],
                            "kernel_sizes": [[3] * nd] * len(strides), "strides": [list(s) for s in strides],
                            "n_conv_per_stage": [2] * len(strides),
                            "n_conv_per_stage_decoder": [2] * (len(strides) - 1)},
            "_kw_requires_import": []}
    return {"dataset_name": "Dataset990_nnMambaTest", "plans_name": "nnUNetPlans",
            "configurations": {name: {"data_identifier": f"nnUNetPlans_{name}", "batch_size": 2,
                                      "patch_size": list(patch), "spacing": [1.0] * nd, "batch_dice": True,
                                      "architecture": arch}},
            "transpose_forward": list(range(nd)), "transpose_backward": list(range(nd))}


DATASET_JSON = {"channel_names": {"0": "synthetic"}, "labels": {"background": 0, "a": 1, "b": 2},
                "numTraining": 8, "file_ending": ".nii.gz"}


def managers(plans, name=None):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(copy.deepcopy(plans))
    return pm, pm.get_configuration(name or next(iter(plans["configurations"])))


def make_trainer(cls, plans, tmp_path, monkeypatch, name=None):
    """A trainer instance on CPU for ``plans`` (not initialised: no preprocessed data needed)."""
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    plans = copy.deepcopy(plans)
    plans["continue_training"] = False
    return cls(plans, name or next(iter(plans["configurations"])), 0, DATASET_JSON, torch.device("cpu"))


def with_strides(configuration_manager, strides, patch_size=None):
    """A copy of a real configuration with other strides (and patch size): for anisotropic / too-short plans."""
    from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager

    cfg = copy.deepcopy(configuration_manager.configuration)
    kw = cfg["architecture"]["arch_kwargs"]
    n = len(strides)
    kw["strides"] = [list(s) for s in strides]
    for key in ("features_per_stage", "kernel_sizes", "n_conv_per_stage", "n_blocks_per_stage"):
        if key in kw:
            kw[key] = kw[key][:n] + [kw[key][-1]] * max(0, n - len(kw[key]))
    if "n_conv_per_stage_decoder" in kw:
        kw["n_conv_per_stage_decoder"] = kw["n_conv_per_stage_decoder"][:n - 1]
    kw["n_stages"] = n
    if patch_size is not None:
        cfg["patch_size"] = list(patch_size)
    return ConfigurationManager(cfg)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def check_cycle(r, n_classes=3, weight_key=None):
    """What every end-to-end run (nnunet_mamba.demo.run_cycle) must have produced: a non-empty prediction for every
    test case, Dice for every foreground class in [0, 1], nnU-Net's per-case summary, the final checkpoint naming
    the trainer (holding ``weight_key``), and nnU-Net's own validation summary of the fold."""
    assert r.predictions == [f"case_{i:03d}.nii.gz" for i in range(8, 8 + r.n_test_cases)]
    assert sorted(r.dice) == [str(c) for c in range(1, n_classes)]
    assert all(0.0 <= v <= 1.0 for v in r.dice.values())
    with open(r.summary_file) as f:
        assert len(json.load(f)["metric_per_case"]) == r.n_test_cases
    folder = os.path.dirname(r.summary_file)
    assert not [p for p in r.predictions if not os.path.getsize(os.path.join(folder, p))]
    fold = os.path.join(os.path.dirname(folder), "nnUNet_results", r.dataset_name,
                        f"{r.trainer}__nnUNetPlans__{r.configuration}", "fold_0")
    ckpt = torch.load(os.path.join(fold, "checkpoint_final.pth"), map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == r.trainer
    if weight_key is not None:
        assert weight_key in ckpt["network_weights"]
    assert os.path.isfile(os.path.join(fold, "validation", "summary.json"))
