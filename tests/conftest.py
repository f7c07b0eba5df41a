"""Shared fixtures: real nnU-Net plans of synthetic datasets, made by nnU-Net's own planner."""
import os
import subprocess
import sys

import pytest
import torch

from nnunet_mamba.synthetic import make_dataset


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the GPU machine: docs/gpu.md)")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def _nnunet_bin(name):
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return exe if os.path.exists(exe) else name


@pytest.fixture(scope="session")
def nnunet_dirs(tmp_path_factory):
    """nnU-Net's three folders for this test session (also set in os.environ for in-process use)."""
    root = tmp_path_factory.mktemp("nnunet")
    env = {k: str(root / k) for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    for v in env.values():
        os.makedirs(v, exist_ok=True)
    os.environ.update(env)
    os.environ.setdefault("nnUNet_def_n_proc", "1")
    return env


def _plan(nnunet_dirs, dataset_id, shape, configuration):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    make_dataset(nnunet_dirs["nnUNet_raw"], dataset_id, shape, n_train=3, n_test=0, name=f"Plans{len(shape)}D")
    env = {**os.environ, **nnunet_dirs, "nnUNet_def_n_proc": "1"}
    for cmd in (["nnUNetv2_extract_fingerprint", "-d", str(dataset_id), "-np", "1"],
                ["nnUNetv2_plan_experiment", "-d", str(dataset_id)]):
        subprocess.run([_nnunet_bin(cmd[0]), *cmd[1:]], env=env, check=True, capture_output=True)
    folder = os.path.join(nnunet_dirs["nnUNet_preprocessed"], f"Dataset{dataset_id:03d}_Plans{len(shape)}D")
    pm = PlansManager(os.path.join(folder, "nnUNetPlans.json"))
    return pm, pm.get_configuration(configuration)


@pytest.fixture(scope="session")
def plans_3d(nnunet_dirs):
    """(PlansManager, ConfigurationManager) of '3d_fullres' for an isotropic 128^3 dataset (5 x2 steps)."""
    return _plan(nnunet_dirs, 991, (128, 128, 128), "3d_fullres")


@pytest.fixture(scope="session")
def plans_2d(nnunet_dirs):
    """(PlansManager, ConfigurationManager) of '2d' for an isotropic 256^2 dataset (6 x2 steps)."""
    return _plan(nnunet_dirs, 992, (256, 256), "2d")
