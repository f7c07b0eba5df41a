"""The project's own selective-scan GPU kernels (installed as ``nnunet_mamba.kernels``)."""
