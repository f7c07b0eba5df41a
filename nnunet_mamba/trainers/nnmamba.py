"""nnMamba trainers (specs/nnmamba.md §4, specs/recipes.md).

Deep supervision: the network has 4 outputs at full resolution, /f1, /f1f2, /f1f2f3 (the plan's first 4 scales),
whatever the number of plan stages; ``_get_deep_supervision_scales`` reports exactly these. The upstream trainers
weight them ``[1, 1/2, 1/4, 1/8]`` normalised, with the last weight 0 only when the plan has exactly 4 steps
(nnU-Net v1 masked the outputs beyond the last-but-one pooling step). The ``_nnUNetRecipe`` variants use
nnU-Net 2.8.1's default weighting over the same 4 outputs (``2^-i``, last 0).

The CSS trainers build the paper's MICCSS network *with* the three DS heads (upstream's root file has none, so
its parameter count is 15,941,619 + 227·K) and train it with the same deep supervision as the default network,
so that the two variants differ only in the Mamba layer.
"""
from __future__ import annotations

from typing import ClassVar

import numpy as np

from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper

from ..networks.nnmamba import nnMambaSeg
from ..networks.plan import cumulative_scales, plan_step_factors
from .base import NNUNET_DEFAULT, Recipe, nnUNetTrainerMambaBase, plan_topology

N_STEPS = nnMambaSeg.n_steps  # stem + 3 residual layers

# Upstream (nnU-Net v1): SGD Nesterov lr 1e-4, momentum 0.99, wd 3e-5, poly 0.9 per epoch, 1000 epochs (GIL),
# DC+CE with DS over 4 outputs, gradient clipping 12, fp32.
NNMAMBA_RECIPE = Recipe(optimizer="sgd", initial_lr=1e-4, weight_decay=3e-5, momentum=0.99, num_epochs=1000,
                        amp=False, deep_supervision=True)


def nnmamba_factors(configuration_manager) -> list[tuple[int, ...]]:
    """The plan's first 4 per-axis step factors; ValueError naming the plan when it has fewer steps."""
    _, strides, where = plan_topology(configuration_manager)
    return plan_step_factors(strides, N_STEPS, "nnMamba (stem + 3 residual layers)", where)


def _build(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision, css):
    nd = len(configuration_manager.patch_size)
    return nnMambaSeg(in_ch=num_input_channels, channels=32, blocks=3, number_classes=num_output_channels,
                      spatial_dims=nd, strides=nnmamba_factors(configuration_manager), css=css, ds_heads=True,
                      deep_supervision=enable_deep_supervision)


def build_nnmamba(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                  enable_deep_supervision=True):
    """Default nnMamba (upstream nnU-Net-v1 network) on the plan's first 4 steps. Torch-default init, as upstream."""
    return _build(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision, False)


def build_nnmamba_css(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                      enable_deep_supervision=True):
    """nnMamba with the paper's MICCSS layers, plus the DS heads of the default network."""
    return _build(configuration_manager, num_input_channels, num_output_channels, enable_deep_supervision, True)


def nnmamba_ds_weights(n_plan_steps: int, zero_last: bool = True) -> np.ndarray:
    """Upstream loss weights of the 4 outputs: ``[1, 1/2, 1/4, 1/8]`` normalised to sum 1.

    The last weight is 0 (``zero_last``) or 1e-6 (DDP without compile, where a 0 weight leaves the ``ds3`` head
    without gradients and DDP fails) only when the plan has exactly 4 downsampling steps.
    """
    w = np.array([1 / 2 ** i for i in range(N_STEPS)])
    if n_plan_steps == N_STEPS:
        w[-1] = 0.0 if zero_last else 1e-6
    return w / w.sum()


class nnUNetTrainerNnMamba(nnUNetTrainerMambaBase):
    """nnMamba (default network) with the upstream recipe: SGD 1e-4, 1000 epochs, fp32, upstream DS weights."""

    recipe = NNMAMBA_RECIPE
    upstream_ds_weights: ClassVar[bool] = True
    build_network_architecture = staticmethod(build_nnmamba)

    def _get_deep_supervision_scales(self):
        if not self.enable_deep_supervision:
            return None
        return cumulative_scales(nnmamba_factors(self.configuration_manager))

    def _build_loss(self):
        loss = super()._build_loss()  # nnU-Net's DC+CE (or DC+BCE for regions), DS-wrapped over our 4 scales
        if not (self.enable_deep_supervision and self.upstream_ds_weights):
            return loss
        n_plan_steps = len(self.configuration_manager.network_arch_init_kwargs["strides"]) - 1
        zero_last = not (self.is_ddp and not self._do_i_compile())
        return DeepSupervisionWrapper(loss.loss, nnmamba_ds_weights(n_plan_steps, zero_last))


class nnUNetTrainerNnMambaCSS(nnUNetTrainerNnMamba):
    """nnMamba with the paper's MICCSS layers (opt-in) and the upstream recipe; DS as the default network."""

    build_network_architecture = staticmethod(build_nnmamba_css)


class nnUNetTrainerNnMamba_nnUNetRecipe(nnUNetTrainerNnMamba):
    """nnMamba with nnU-Net's default recipe (SGD 1e-2, 1000 epochs, AMP with fp32 Mamba core, nnU-Net DS weights)."""

    recipe = NNUNET_DEFAULT
    upstream_ds_weights = False


class nnUNetTrainerNnMambaCSS_nnUNetRecipe(nnUNetTrainerNnMambaCSS):
    """nnMamba-CSS with nnU-Net's default recipe."""

    recipe = NNUNET_DEFAULT
    upstream_ds_weights = False
