"""Real nnU-Net plans for a synthetic dataset of a given image size, made by nnU-Net's own planners.

Used by the H100 cost script (reference settings 3D 128^3 and 2D 512^2 without any real data) and the tests.
Needs nnU-Net's folders ``nnUNet_raw`` and ``nnUNet_preprocessed`` set in the environment.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

from ..synthetic import make_dataset

DEFAULT_PLANNERS = ("ExperimentPlanner", "nnUNetPlannerResEncM")


def plan_synthetic(dataset_id: int, shape: Sequence[int], name: str, planners: Sequence[str] = DEFAULT_PLANNERS,
                   n_cases: int = 3, n_classes: int = 3, spacing: Optional[Sequence[float]] = None,
                   preprocess_configurations: Sequence[str] = ()) -> str:
    """Write a synthetic raw dataset, extract its fingerprint and plan it with every planner; returns its
    ``nnUNet_preprocessed`` folder (plans: nnUNetPlans.json, nnUNetResEncUNetMPlans.json, ...).

    ``preprocess_configurations``: also preprocess these configurations of the default plans (for training).
    """
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        if not os.environ.get(var):
            raise RuntimeError(f"{var} is not set: point it to a (scratch) folder before planning")
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiments,
                                                                       preprocess)

    folder = make_dataset(os.environ["nnUNet_raw"], dataset_id, shape, n_train=n_cases, n_test=0,
                          n_classes=n_classes, spacing=spacing, name=name)
    extract_fingerprints([dataset_id], num_processes=1, check_dataset_integrity=False, verbose=False,
                         show_progress_bar=False)
    for planner in planners:
        plan_experiments([dataset_id], planner)
    if preprocess_configurations:
        preprocess([dataset_id], "nnUNetPlans", list(preprocess_configurations), [1] * len(preprocess_configurations),
                   show_progress_bar=False)
    return os.path.join(os.environ["nnUNet_preprocessed"], os.path.basename(folder))
