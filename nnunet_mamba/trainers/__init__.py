"""The plugin's nnU-Net trainers. Class names are public: checkpoints store them."""
from .base import NNUNET_DEFAULT, Recipe, nnUNetTrainerMambaBase
from .lightm_unet import nnUNetTrainerLightMUNet, nnUNetTrainerLightMUNet_nnUNetRecipe
from .msvm_unet import (nnUNetTrainerMSVMUNet, nnUNetTrainerMSVMUNet_nnUNetRecipe,
                        nnUNetTrainerMSVMUNetPretrained)
from .nnmamba import (nnUNetTrainerNnMamba, nnUNetTrainerNnMamba_nnUNetRecipe, nnUNetTrainerNnMambaCSS,
                      nnUNetTrainerNnMambaCSS_nnUNetRecipe)
from .vm_unet import nnUNetTrainerVMUNet, nnUNetTrainerVMUNet_nnUNetRecipe, nnUNetTrainerVMUNetPretrained

__all__ = [
    "NNUNET_DEFAULT",
    "Recipe",
    "nnUNetTrainerMambaBase",
    "nnUNetTrainerLightMUNet",
    "nnUNetTrainerLightMUNet_nnUNetRecipe",
    "nnUNetTrainerNnMamba",
    "nnUNetTrainerNnMambaCSS",
    "nnUNetTrainerNnMamba_nnUNetRecipe",
    "nnUNetTrainerNnMambaCSS_nnUNetRecipe",
    "nnUNetTrainerVMUNet",
    "nnUNetTrainerVMUNet_nnUNetRecipe",
    "nnUNetTrainerVMUNetPretrained",
    "nnUNetTrainerMSVMUNet",
    "nnUNetTrainerMSVMUNet_nnUNetRecipe",
    "nnUNetTrainerMSVMUNetPretrained",
]
