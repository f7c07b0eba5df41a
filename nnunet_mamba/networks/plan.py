"""How fixed-topology networks follow an nnU-Net plan (specs/README.md §5.2). No nnunetv2 import here."""
from __future__ import annotations

from typing import Sequence


def plan_step_factors(strides: Sequence[Sequence[int]], n_steps: int, network: str,
                      configuration: str = "this configuration") -> list[tuple[int, ...]]:
    """The per-axis factors f_1..f_M of the plan's first ``n_steps`` downsampling steps.

    Raises ValueError naming the network, the constraint and the plan values when the plan cannot be followed.
    """
    strides = [tuple(int(v) for v in s) for s in strides]
    where = f"the plan for {configuration} has strides={[list(s) for s in strides]}"
    if not strides or any(v != 1 for v in strides[0]):
        raise ValueError(f"{network} needs the first plan stage not to downsample (strides[0] all ones), but "
                         f"{where}. Use a plan made by nnU-Net's default planner.")
    if len(strides) - 1 < n_steps:
        raise ValueError(f"{network} needs {n_steps} downsampling steps but {where}, which provides "
                         f"{len(strides) - 1}. Use a configuration with a larger patch size (more stages), e.g. "
                         f"re-plan with `nnUNetv2_plan_experiment -d ID -overwrite_target_spacing` or edit "
                         f"'patch_size' in the plans so that nnU-Net creates at least {n_steps + 1} stages.")
    factors = strides[1:n_steps + 1]
    bad = [f for f in factors if any(v not in (1, 2) for v in f)]
    if bad:
        raise ValueError(f"{network} supports per-axis downsampling factors of 1 or 2 only, but {where} "
                         f"(steps {bad}). Use a plan whose first {n_steps} pooling steps are 1 or 2 on every axis.")
    return factors


def cumulative_scales(factors: Sequence[Sequence[int]]) -> list[list[float]]:
    """Deep-supervision scales for outputs at full resolution, /f1, /f1f2, ... (one entry per output)."""
    scales, cur = [[1.0] * len(factors[0])], [1.0] * len(factors[0])
    for f in factors[:-1]:
        cur = [c / v for c, v in zip(cur, f)]
        scales.append(list(cur))
    return scales
