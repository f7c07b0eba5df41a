"""The plugin's nnU-Net trainers. Class names are public: checkpoints store them."""
from .base import NNUNET_DEFAULT, Recipe, nnUNetTrainerMambaBase
from .lightm_unet import nnUNetTrainerLightMUNet, nnUNetTrainerLightMUNet_nnUNetRecipe

__all__ = [
    "NNUNET_DEFAULT",
    "Recipe",
    "nnUNetTrainerMambaBase",
    "nnUNetTrainerLightMUNet",
    "nnUNetTrainerLightMUNet_nnUNetRecipe",
]
