"""Benchmarks of the plugin's trainers against nnU-Net's baselines on the same plans (docs/benchmarking.md).

* ``cost``     - parameters, FLOPs (conv/matmul counted, selective scan analytic), training-step time, peak
  memory, inference time and scan backend per trainer (``nnunet-mamba benchmark cost``);
* ``accuracy`` - training through ``nnUNetv2_train`` and nnU-Net's own validation Dice per class and fold
  (``nnunet-mamba benchmark accuracy``).

``flops``, ``measure`` and ``report`` are plain PyTorch / Python; ``selection``, ``cost``, ``accuracy`` and ``cli``
are the trainer layer (nnU-Net).
"""
