"""nnunet-mamba: Mamba segmentation networks as nnU-Net v2 trainers.

Layers: ``ops`` (the selective-scan op boundary and its backends), ``modules`` (Mamba mixer, SS2D/SS3D, shared
blocks), ``networks`` (one file per network family), ``trainers`` (nnU-Net trainers; the only layer that imports
nnunetv2, together with ``benchmark`` and the command line). Importing this package imports nothing heavy.
"""
__version__ = "0.1.0"
