"""One full nnU-Net cycle with a plugin trainer, through nnU-Net's own command-line tools.

synthetic dataset -> ``nnUNetv2_plan_and_preprocess`` -> ``nnUNetv2_train`` (short) -> ``nnUNetv2_predict``
(test-time mirroring on) -> ``nnUNetv2_evaluate_folder`` -> Dice per class.
Used by ``nnunet-mamba demo`` and by the end-to-end tests.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

from .synthetic import make_dataset

CONFIG_FOR_DIM = {2: "2d", 3: "3d_fullres"}


@dataclass
class CycleResult:
    trainer: str
    configuration: str
    dataset_name: str
    dice: dict  # class label -> Dice on the held-out test cases
    mean_dice: float
    n_test_cases: int
    predictions: list
    summary_file: str
    seconds: dict = field(default_factory=dict)


def nnunet_environment(workdir: str, quick: bool = True, epochs: int = 2, iterations: int = 5,
                       val_iterations: int = 2) -> dict:
    """Environment for nnU-Net's commands: its three folders under ``workdir``, few workers, short training."""
    env = dict(os.environ)
    for key, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                     ("nnUNet_results", "nnUNet_results")):
        env[key] = os.path.join(workdir, sub)
        os.makedirs(env[key], exist_ok=True)
    env.setdefault("nnUNet_def_n_proc", "1")
    env.setdefault("nnUNet_n_proc_DA", "2")
    if quick:
        env["NNUNET_MAMBA_EPOCHS"] = str(epochs)
        env["NNUNET_MAMBA_ITERATIONS"] = str(iterations)
        env["NNUNET_MAMBA_VAL_ITERATIONS"] = str(val_iterations)
    return env


def _run(step: str, cmd: Sequence[str], env: dict, log_dir: str, seconds: dict, verbose: bool):
    log = os.path.join(log_dir, f"{step}.log")
    if verbose:
        print(f"[nnunet-mamba] {step}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(list(cmd), env=env, stdout=f, stderr=subprocess.STDOUT)
    seconds[step] = round(time.time() - t0, 1)
    if proc.returncode != 0:
        with open(log) as f:
            tail = "".join(f.readlines()[-40:])
        raise RuntimeError(f"{step} failed (exit {proc.returncode}); full log: {log}\n{tail}")
    if verbose:
        print(f"[nnunet-mamba] {step} done in {seconds[step]} s (log: {log})", flush=True)


def _bin(name: str) -> str:
    exe = os.path.join(os.path.dirname(sys.executable), name)
    return exe if os.path.exists(exe) else name


def run_cycle(workdir: str, trainer: str = "nnUNetTrainerLightMUNet", dim: int = 3,
              shape: Optional[Sequence[int]] = None, n_train: int = 8, n_test: int = 2, n_classes: int = 3,
              dataset_id: int = 901, fold: int = 0, device: Optional[str] = None, epochs: int = 2,
              iterations: int = 5, val_iterations: int = 2, verbose: bool = True) -> CycleResult:
    """Run the whole cycle in ``workdir``; returns Dice per class on the test cases."""
    import torch

    shape = tuple(shape) if shape is not None else ((32, 32, 32) if dim == 3 else (64, 64))
    if len(shape) != dim:
        raise ValueError(f"shape {shape} does not have {dim} dimensions")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    configuration = CONFIG_FOR_DIM[dim]
    env = nnunet_environment(workdir, epochs=epochs, iterations=iterations, val_iterations=val_iterations)
    log_dir = os.path.join(workdir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    name = f"Synthetic{dim}D"
    folder = make_dataset(env["nnUNet_raw"], dataset_id, shape, n_train, n_test, n_classes, name=name)
    dataset_name = os.path.basename(folder)
    seconds: dict = {}
    did = str(dataset_id)
    _run("plan_and_preprocess", [_bin("nnUNetv2_plan_and_preprocess"), "-d", did, "-c", configuration,
                                 "-np", "1", "--verify_dataset_integrity"], env, log_dir, seconds, verbose)
    _run("train", [_bin("nnUNetv2_train"), did, configuration, str(fold), "-tr", trainer, "-device", device],
         env, log_dir, seconds, verbose)
    pred_dir = os.path.join(workdir, f"predictions_{trainer}_{configuration}")
    _run("predict", [_bin("nnUNetv2_predict"), "-i", os.path.join(folder, "imagesTs"), "-o", pred_dir, "-d", did,
                     "-c", configuration, "-f", str(fold), "-tr", trainer, "-device", device,
                     "-npp", "1", "-nps", "1", "--disable_progress_bar"], env, log_dir, seconds, verbose)
    results = os.path.join(env["nnUNet_results"], dataset_name, f"{trainer}__nnUNetPlans__{configuration}")
    summary = os.path.join(pred_dir, "summary.json")
    _run("evaluate", [_bin("nnUNetv2_evaluate_folder"), os.path.join(folder, "labelsTs"), pred_dir,
                      "-djfile", os.path.join(results, "dataset.json"), "-pfile", os.path.join(results, "plans.json"),
                      "-o", summary, "-np", "1"], env, log_dir, seconds, verbose)
    with open(summary) as f:
        s = json.load(f)
    dice = {str(k): float(v["Dice"]) for k, v in s["mean"].items()}
    predictions = sorted(p for p in os.listdir(pred_dir) if p.endswith(".nii.gz"))
    return CycleResult(trainer, configuration, dataset_name, dice, float(s["foreground_mean"]["Dice"]), n_test,
                       predictions, summary, seconds)


def print_result(r: CycleResult):
    print(f"\n{r.trainer} on {r.dataset_name} ({r.configuration}), {r.n_test_cases} test cases")
    print("| class | Dice |\n|---|---|")
    for k, v in r.dice.items():
        print(f"| {k} | {v:.4f} |")
    print(f"| mean (foreground) | {r.mean_dice:.4f} |")
    print("time per step (s): " + ", ".join(f"{k} {v}" for k, v in r.seconds.items()))
