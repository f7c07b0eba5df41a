"""Test helpers shared by several test files."""
import copy

import torch


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
