"""MSVM-UNet trainers (specs/msvm_unet.md §4, §6; specs/recipes.md).

Upstream (Lightning, Synapse settings): AdamW lr 5e-4, betas (0.9, 0.999), eps 1e-8, weight decay 1e-3;
CosineAnnealingLR(T_max 300, eta_min 1e-6) per epoch; 300 epochs; fp32; no clipping; no deep supervision;
0.4 CE + 0.6 Dice (Dice over all classes incl. background, whole batch); with ImageNet weights the whole encoder
(stem included) is frozen for epochs 0-9. Early stopping on the training loss is not reproduced. An nnU-Net epoch
is 250 iterations (documented deviation; ``NNUNET_MAMBA_DATA_PASS_EPOCHS=1`` gives one pass over the data).
"""
from __future__ import annotations

from typing import ClassVar

from ..networks.msvm_unet import N_STEPS, MSVMUNet
from ..networks.plan import plan_step_factors
from ..networks.pretrained import load_msvmunet_pretrained
from .base import NNUNET_DEFAULT, Recipe, plan_topology
from .vmamba_common import DiceCEWeights, PretrainedMixin, nnUNetTrainerVMambaBase

MSVM_UNET_RECIPE = Recipe(optimizer="adamw", initial_lr=5e-4, weight_decay=1e-3, betas=(0.9, 0.999), eps=1e-8,
                          schedule="cosine", cosine_t_max=300, cosine_eta_min=1e-6, num_epochs=300, amp=False,
                          deep_supervision=False, grad_clip=False)
MSVM_UNET_LOSS = DiceCEWeights(weight_ce=0.4, weight_dice=0.6, do_bg=True, batch_dice=True)


def build_msvm_unet(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                    enable_deep_supervision=True):
    """MSVM-UNet on the plan's first 5 per-axis step factors (stem convs f1, f2; downsamplings f3..f5)."""
    nd, strides, where = plan_topology(configuration_manager)
    factors = plan_step_factors(strides, N_STEPS, "MSVM-UNet (2 stem convs + 3 downsamplings)", where)
    return MSVMUNet(in_channels=num_input_channels, num_classes=num_output_channels, spatial_dims=nd,
                    factors=factors)


class nnUNetTrainerMSVMUNet(nnUNetTrainerVMambaBase):
    """MSVM-UNet from scratch with the upstream recipe (AdamW 5e-4, cosine T_max 300, 300 epochs, fp32, 0.4 CE +
    0.6 Dice). No freeze (upstream freezes only pretrained encoders)."""

    recipe = MSVM_UNET_RECIPE
    loss_weights = MSVM_UNET_LOSS
    build_network_architecture = staticmethod(build_msvm_unet)


class nnUNetTrainerMSVMUNet_nnUNetRecipe(nnUNetTrainerMSVMUNet):
    """MSVM-UNet with nnU-Net's default recipe (SGD 1e-2, poly, 1000 epochs, AMP with fp32 SS2D core, DC+CE)."""

    recipe = NNUNET_DEFAULT.but(deep_supervision=False)
    loss_weights = None


class nnUNetTrainerMSVMUNetPretrained(PretrainedMixin, nnUNetTrainerMSVMUNet):
    """MSVM-UNet with the upstream recipe, encoder from VMamba-T v2 ImageNet weights
    (``vssm1_tiny_0230s_ckpt_epoch_264.pth``, file in ``NNUNET_MAMBA_PRETRAINED``), encoder frozen for epochs 0-9."""

    pretrained_loader = staticmethod(load_msvmunet_pretrained)
    pretrained_name = "VMamba-T v2 ImageNet (vssm1_tiny_0230s_ckpt_epoch_264.pth)"
    scratch_trainer = "nnUNetTrainerMSVMUNet"
    freeze_encoder_epochs: ClassVar[int] = 10

    def on_train_epoch_start(self):
        net, frozen = self._unwrapped_network(), self.current_epoch < self.freeze_encoder_epochs
        net.freeze_encoder() if frozen else net.unfreeze_encoder()
        if self.current_epoch in (0, self.freeze_encoder_epochs):
            self.print_to_log_file(f"encoder (incl. stem) {'frozen' if frozen else 'trainable'} from epoch "
                                   f"{self.current_epoch}")
        super().on_train_epoch_start()
