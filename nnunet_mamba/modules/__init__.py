"""Network building blocks: the Mamba mixer, SS2D/SS3D and shared layers."""
from .common import DropPath, LayerNormNd, fp32_core
from .mamba import Mamba

__all__ = ["DropPath", "LayerNormNd", "Mamba", "fp32_core"]
