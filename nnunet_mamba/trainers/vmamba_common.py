"""What the VM-UNet and MSVM-UNet trainers share: the upstream CE + Dice weighting, VMamba ImageNet weights from a
local file, and the optional "epoch = one pass over the training cases" length (specs/recipes.md)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch

from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

from ..networks.pretrained import ENV_PRETRAINED
from .base import ENV_ITERATIONS, nnUNetTrainerMambaBase

# "1": set num_iterations_per_epoch to ceil(training cases / batch size) - upstream's epoch = one data pass
ENV_DATA_PASS_EPOCHS = "NNUNET_MAMBA_DATA_PASS_EPOCHS"


@dataclass(frozen=True)
class DiceCEWeights:
    """Upstream CE + soft-Dice loss as nnU-Net's DC_and_CE_loss settings.

    VM-UNet (Synapse) and MSVM-UNet compute the Dice per class over the whole batch, background included, and
    average over classes: ``batch_dice=True, do_bg=True``. nnU-Net's Dice uses sum(p) + sum(g) in the denominator
    where upstream uses sum(p^2) + sum(g^2) (documented deviation).
    """

    weight_ce: float = 1.0
    weight_dice: float = 1.0
    do_bg: bool = True
    batch_dice: bool = True


class nnUNetTrainerVMambaBase(nnUNetTrainerMambaBase):
    """Loss weights as data (``loss_weights``; None = nnU-Net's default DC+CE) and the data-pass epoch option."""

    loss_weights: ClassVar[Optional[DiceCEWeights]] = None

    def _build_loss(self):
        w = self.loss_weights
        if w is None or self.enable_deep_supervision:
            return super()._build_loss()
        dice_kwargs = {"batch_dice": w.batch_dice, "smooth": 1e-5, "do_bg": w.do_bg, "ddp": self.is_ddp}
        if self.label_manager.has_regions:
            return DC_and_BCE_loss({}, dice_kwargs, weight_ce=w.weight_ce, weight_dice=w.weight_dice,
                                   use_ignore_label=self.label_manager.ignore_label is not None,
                                   dice_class=MemoryEfficientSoftDiceLoss)
        return DC_and_CE_loss(dice_kwargs, {}, weight_ce=w.weight_ce, weight_dice=w.weight_dice,
                              ignore_label=self.label_manager.ignore_label, dice_class=MemoryEfficientSoftDiceLoss)

    def on_train_start(self):
        super().on_train_start()
        if os.environ.get(ENV_DATA_PASS_EPOCHS, "0") not in ("", "0") and not os.environ.get(ENV_ITERATIONS):
            n_train = len(self.do_split()[0])
            self.num_iterations_per_epoch = max(1, math.ceil(n_train / self.batch_size))
            self.print_to_log_file(f"{ENV_DATA_PASS_EPOCHS}: an epoch is one pass over the {n_train} training cases "
                                   f"({self.num_iterations_per_epoch} iterations of batch {self.batch_size})")


class PretrainedMixin:
    """Starts from VMamba ImageNet weights read from the local file named by ``NNUNET_MAMBA_PRETRAINED``.

    Mixed in before a from-scratch trainer class; sets ``pretrained_loader = staticmethod(f)`` with
    ``f(network, path) -> LoadReport``. The report (loaded / missing / unexpected / shape mismatches) goes to the
    training log; a checkpoint from which nothing loads is an error.
    """

    pretrained_loader: ClassVar[Callable]
    pretrained_name: ClassVar[str] = "VMamba ImageNet"
    scratch_trainer: ClassVar[str] = "the from-scratch trainer"

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.pretrained_path = os.environ.get(ENV_PRETRAINED, "")
        if not self.pretrained_path:
            raise RuntimeError(
                f"{type(self).__name__} starts from {self.pretrained_name} weights: set the environment variable "
                f"{ENV_PRETRAINED}=/path/to/checkpoint.pth (a local file; nothing is downloaded), or train the "
                f"from-scratch trainer {self.scratch_trainer} instead")
        if not os.path.isfile(self.pretrained_path):
            raise FileNotFoundError(f"{ENV_PRETRAINED}={self.pretrained_path!r}: no such file")

    def initialize(self):
        fresh = not self.was_initialized
        super().initialize()
        if fresh:
            report = self.pretrained_loader(self._unwrapped_network(), self.pretrained_path)
            self.print_to_log_file(report.summary())
            if not report.loaded:
                raise RuntimeError(f"no tensor of {self.pretrained_path!r} fits the network; is it a "
                                   f"{self.pretrained_name} checkpoint?\n{report.summary()}")
            self.pretrained_report = report
