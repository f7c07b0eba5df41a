"""VM-UNet trainers (specs/vm_unet.md §4, §6; specs/recipes.md).

Upstream (own loop, Synapse settings for the multi-class case): AdamW lr 1e-3, betas (0.9, 0.999), eps 1e-8,
weight decay 1e-2; CosineAnnealingLR(T_max 100, eta_min 1e-5) stepped per epoch (periodic past epoch 100);
300 epochs; fp32; no gradient clipping; no deep supervision; CE + Dice 1 : 1 (Dice over all classes incl.
background, whole batch). An nnU-Net epoch is 250 iterations (documented deviation; see
``NNUNET_MAMBA_DATA_PASS_EPOCHS`` for upstream's one-pass-over-the-data epochs).
"""
from __future__ import annotations

from ..networks.plan import plan_step_factors
from ..networks.pretrained import load_vmunet_pretrained
from ..networks.vm_unet import N_STEPS, VMUNet
from .base import NNUNET_DEFAULT, Recipe, plan_topology
from .vmamba_common import DiceCEWeights, PretrainedMixin, nnUNetTrainerVMambaBase

VM_UNET_RECIPE = Recipe(optimizer="adamw", initial_lr=1e-3, weight_decay=1e-2, betas=(0.9, 0.999), eps=1e-8,
                        schedule="cosine", cosine_t_max=100, cosine_eta_min=1e-5, num_epochs=300, amp=False,
                        deep_supervision=False, grad_clip=False)
VM_UNET_LOSS = DiceCEWeights(weight_ce=1.0, weight_dice=1.0, do_bg=True, batch_dice=True)


def build_vm_unet(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                  enable_deep_supervision=True):
    """VM-UNet on the plan's first 5 per-axis step factors (patch embedding f1*f2, merges f3..f5)."""
    nd, strides, where = plan_topology(configuration_manager)
    factors = plan_step_factors(strides, N_STEPS, "VM-UNet (patch embedding /4 + 3 patch mergings)", where)
    return VMUNet(input_channels=num_input_channels, num_classes=num_output_channels, depths=(2, 2, 2, 2),
                  depths_decoder=(2, 2, 2, 1), drop_path_rate=0.2, spatial_dims=nd, factors=factors)


class nnUNetTrainerVMUNet(nnUNetTrainerVMambaBase):
    """VM-UNet from scratch with the upstream recipe (AdamW 1e-3, periodic cosine T_max 100, 300 epochs, fp32)."""

    recipe = VM_UNET_RECIPE
    loss_weights = VM_UNET_LOSS
    build_network_architecture = staticmethod(build_vm_unet)


class nnUNetTrainerVMUNet_nnUNetRecipe(nnUNetTrainerVMUNet):
    """VM-UNet with nnU-Net's default recipe (SGD 1e-2, poly, 1000 epochs, AMP with fp32 SS2D core, DC+CE)."""

    recipe = NNUNET_DEFAULT.but(deep_supervision=False)
    loss_weights = None


class nnUNetTrainerVMUNetPretrained(PretrainedMixin, nnUNetTrainerVMUNet):
    """VM-UNet with the upstream recipe, encoder and mirrored decoder initialised from VMamba-S v0 ImageNet weights
    (``vmamba_small_e238_ema.pth``) read from the file in ``NNUNET_MAMBA_PRETRAINED``."""

    pretrained_loader = staticmethod(load_vmunet_pretrained)
    pretrained_name = "VMamba-S v0 ImageNet (vmamba_small_e238_ema.pth)"
    scratch_trainer = "nnUNetTrainerVMUNet"
