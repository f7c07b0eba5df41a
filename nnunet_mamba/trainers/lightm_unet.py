"""LightM-UNet trainers (specs/lightm_unet.md §4, specs/recipes.md)."""
from ..networks.lightm_unet import LightMUNet
from ..networks.plan import plan_step_factors
from .base import NNUNET_DEFAULT, Recipe, nnUNetTrainerMambaBase, plan_topology

# Upstream: Adam (coupled L2) lr 1e-4, wd 1e-5, eps 1e-5, poly 0.9 per epoch, 100 epochs, no DS, fp32.
LIGHTM_UNET_RECIPE = Recipe(optimizer="adam", initial_lr=1e-4, weight_decay=1e-5, eps=1e-5, num_epochs=100,
                            amp=False, deep_supervision=False)


def build_lightm_unet(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                      enable_deep_supervision=True):
    nd, strides, where = plan_topology(configuration_manager)
    factors = plan_step_factors(strides, 3, "LightM-UNet", where)
    return LightMUNet(spatial_dims=nd, init_filters=32, in_channels=num_input_channels,
                      out_channels=num_output_channels, strides=factors)


class nnUNetTrainerLightMUNet(nnUNetTrainerMambaBase):
    """LightM-UNet with the upstream recipe (fp32, Adam 1e-4, 100 epochs)."""

    recipe = LIGHTM_UNET_RECIPE
    build_network_architecture = staticmethod(build_lightm_unet)


class nnUNetTrainerLightMUNet_nnUNetRecipe(nnUNetTrainerLightMUNet):
    """LightM-UNet with nnU-Net's default recipe (SGD 1e-2, 1000 epochs, AMP with fp32 Mamba core)."""

    recipe = NNUNET_DEFAULT.but(deep_supervision=False)
