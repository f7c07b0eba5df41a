"""Helpers of the VM-UNet / MSVM-UNet tests: trainers on real plans, fake VMamba checkpoints in upstream layout."""
import argparse

import torch

import helpers

def make_trainer(cls, plans_and_config, tmp_path, monkeypatch):
    """An instance of trainer ``cls`` on the plans of a (plans_manager, configuration_manager) fixture."""
    pm, cm = plans_and_config
    name = next(n for n, c in pm.plans["configurations"].items() if c.get("patch_size") == list(cm.patch_size))
    return helpers.make_trainer(cls, pm.plans, tmp_path, monkeypatch, name)


def perturbed(sd: dict, seed: int = 123) -> dict:
    """A state dict of random tensors of the same shapes (so a load visibly changes the weights)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in sd.items()}


def save_checkpoint(path, model_sd: dict, with_config: bool = False):
    """A VMamba-style checkpoint file: weights under 'model', plus training state (and a pickled config object)."""
    ckpt = {"model": model_sd, "epoch": 238, "max_accuracy": 83.5}
    if with_config:  # like VMamba's pickled yacs config: not loadable with weights_only=True
        ckpt["config"] = argparse.Namespace(MODEL="vssm")
    torch.save(ckpt, path)
