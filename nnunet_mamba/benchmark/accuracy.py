"""Accuracy benchmark: train trainers through ``nnUNetv2_train`` and collect nnU-Net's own validation summaries.

For every trainer spec and fold the fold folder in ``nnUNet_results`` decides what runs:

* ``checkpoint_final.pth`` and ``validation/summary.json`` exist -> done, skipped;
* ``checkpoint_final.pth`` without the summary                  -> ``nnUNetv2_train ... --val`` (validation only);
* ``checkpoint_latest.pth`` or ``checkpoint_best.pth``          -> ``nnUNetv2_train ... --c`` (resume);
* nothing                                                        -> ``nnUNetv2_train`` (fresh).

Training length: ``epochs`` / ``iterations`` / ``val_iterations`` reach the plugin's trainers through the
environment variables NNUNET_MAMBA_EPOCHS / _ITERATIONS / _VAL_ITERATIONS (the trainer class stays the same).
nnU-Net's own ``nnUNetTrainer`` is replaced by its fixed-length variant ``nnUNetTrainer_<E>epochs`` (E in 1, 5, 10,
20, 50, 100, 250, 500, 750, 2000, 4000, 8000; 1000 = ``nnUNetTrainer``); those always run nnU-Net's 250 training
and 50 validation iterations per epoch, so ``iterations`` does not apply to them. The epochs and iterations each
fold really ran are read back from the fold's ``debug.json`` and shown in the table.

Dice values are nnU-Net's own: ``fold_X/validation/summary.json`` (``mean[class]["Dice"]`` and
``foreground_mean["Dice"]``) on the fold's validation cases.
"""
from __future__ import annotations

import json
import os
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from ..demo import _bin, _run
from .report import Column, fmt_millions, fmt_num, scatter_plot, write_outputs
from .selection import BASELINE_TRAINER, PlansSource, TrainerSpec, find_trainer_class

ENV_KEYS = ("NNUNET_MAMBA_EPOCHS", "NNUNET_MAMBA_ITERATIONS", "NNUNET_MAMBA_VAL_ITERATIONS")
NNUNET_EPOCH_VARIANTS = (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000)


@dataclass
class RunPlan:
    spec: TrainerSpec
    run_trainer: str  # the class nnUNetv2_train gets
    env: dict  # environment overrides (None value = remove)
    note: str = ""


def plan_run(spec: TrainerSpec, epochs: Optional[int], iterations: Optional[int],
             val_iterations: Optional[int]) -> RunPlan:
    """Which trainer class and environment give ``spec`` the requested length (ValueError if none can)."""
    from ..trainers.base import nnUNetTrainerMambaBase

    cls = find_trainer_class(spec.trainer)
    if issubclass(cls, nnUNetTrainerMambaBase):
        env = dict(zip(ENV_KEYS, (epochs, iterations, val_iterations)))
        return RunPlan(spec, spec.trainer, {k: (str(v) if v is not None else None) for k, v in env.items()})
    clear = dict.fromkeys(ENV_KEYS)
    note = "nnU-Net's own trainer: 250 training / 50 validation iterations per epoch" if iterations else ""
    if epochs is None or (spec.trainer == BASELINE_TRAINER and epochs == 1000):
        return RunPlan(spec, spec.trainer, clear, note)
    if spec.trainer != BASELINE_TRAINER:
        raise ValueError(f"{spec.trainer} is not a plugin trainer, so --epochs cannot change its length; name a "
                         f"trainer class with the length you want and leave --epochs out")
    if epochs not in NNUNET_EPOCH_VARIANTS:
        raise ValueError(f"nnU-Net has no nnUNetTrainer variant with {epochs} epochs; choose --epochs from "
                         f"{', '.join(map(str, NNUNET_EPOCH_VARIANTS))} or 1000 so that the baselines train as long "
                         f"as the plugin trainers")
    name = f"{BASELINE_TRAINER}_{epochs}epoch{'s' if epochs > 1 else ''}"
    find_trainer_class(name)
    return RunPlan(spec, name, clear, note)


def fold_folder(source: PlansSource, run_trainer: str, plans: str, configuration: str, fold) -> str:
    results = os.environ.get("nnUNet_results")
    if not results:
        raise RuntimeError("nnUNet_results is not set: set nnU-Net's three folders (nnUNet_raw, nnUNet_preprocessed, "
                           "nnUNet_results) as for nnUNetv2_train")
    return os.path.join(results, source.dataset_name, f"{run_trainer}__{plans}__{configuration}", f"fold_{fold}")


def fold_state(folder: str) -> str:
    """'done', 'validate', 'resume' or 'train' (see the module docstring)."""
    final = os.path.isfile(os.path.join(folder, "checkpoint_final.pth"))
    summary = os.path.isfile(os.path.join(folder, "validation", "summary.json"))
    if final:
        return "done" if summary else "validate"
    if any(os.path.isfile(os.path.join(folder, f)) for f in ("checkpoint_latest.pth", "checkpoint_best.pth")):
        return "resume"
    return "train"


def _label_names(dataset_json: dict) -> dict:
    return {str(v): k for k, v in dataset_json.get("labels", {}).items() if isinstance(v, int)}


def read_summary(folder: str, label_names: dict) -> dict:
    """Dice per class and foreground mean from a fold's validation/summary.json, plus its training length."""
    with open(os.path.join(folder, "validation", "summary.json")) as f:
        s = json.load(f)
    row = {f"dice_{label_names.get(k, k)}": float(v["Dice"]) for k, v in s["mean"].items()}
    row["mean_dice"] = float(s["foreground_mean"]["Dice"])
    row["n_validation_cases"] = len(s.get("metric_per_case", []))
    row["summary_file"] = os.path.join(folder, "validation", "summary.json")
    debug = os.path.join(folder, "debug.json")
    if os.path.isfile(debug):
        with open(debug) as f:
            d = json.load(f)
        for key, name in (("num_epochs", "epochs"), ("num_iterations_per_epoch", "iterations_per_epoch")):
            if key in d:
                row[name] = int(d[key])
    return row


def average_folds(rows: Sequence[dict]) -> dict:
    """Mean over the finished folds of every Dice column (per class and mean); min/max of the mean Dice."""
    ok = [r for r in rows if r.get("status") == "ok"]
    out = {"fold": "mean", "n_folds": len(ok)}
    if not ok:
        return out
    for key in [k for k in ok[0] if k.startswith("dice_") or k == "mean_dice"]:
        vals = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        out[key] = statistics.fmean(vals) if vals else None
    out["mean_dice_min"] = min(r["mean_dice"] for r in ok)
    out["mean_dice_max"] = max(r["mean_dice"] for r in ok)
    return out


COST_KEYS = ("params", "gflops", "scan_gflops", "train_step_ms", "train_peak_mb", "infer_ms")


def run_accuracy(specs: Sequence[TrainerSpec], source: PlansSource, configuration: str, folds: Sequence,
                 out_dir: str, epochs: Optional[int] = None, iterations: Optional[int] = None,
                 val_iterations: Optional[int] = None, device: Optional[str] = None,
                 cost_rows: Optional[dict] = None, train: bool = True, plot: bool = True) -> dict:
    """Train what is missing, collect every fold's summary; writes accuracy.{md,csv,json,png}; returns the JSON."""
    os.makedirs(out_dir, exist_ok=True)
    log_dir = os.path.join(out_dir, "logs")
    os.makedirs(log_dir, exist_ok=True)
    names = _label_names(source.dataset_json)
    rows: list[dict] = []
    for i, spec in enumerate(specs, 1):
        base = {"label": spec.label, "trainer": spec.trainer, "plans": spec.plans, "configuration": configuration}
        try:
            plan = plan_run(spec, epochs, iterations, val_iterations)
        except (ValueError, LookupError) as e:
            print(f"[benchmark] ({i}/{len(specs)}) {spec.label}: cannot run - {e}", flush=True)
            rows.append(dict(base, fold="all", status="error", error=str(e)))
            continue
        fold_rows = []
        for fold in folds:
            row = dict(base, run_trainer=plan.run_trainer, fold=fold, status="error", error=None, note=plan.note)
            folder = fold_folder(source, plan.run_trainer, spec.plans, configuration, fold)
            state = fold_state(folder)
            tag = f"[benchmark] ({i}/{len(specs)}) {plan.run_trainer} {spec.plans} {configuration} fold {fold}"
            try:
                if state != "done" and train:
                    action = {"train": "training", "resume": "resuming (--c)", "validate": "validating (--val)"}
                    print(f"{tag}: {action[state]}, log in {log_dir}", flush=True)
                    cmd = [_bin("nnUNetv2_train"), source.dataset_name, configuration, str(fold), "-tr",
                           plan.run_trainer, "-p", spec.plans]
                    cmd += {"resume": ["--c"], "validate": ["--val"]}.get(state, [])
                    if device:
                        cmd += ["-device", device]
                    env = dict(os.environ)
                    for k, v in plan.env.items():
                        if v is None:
                            env.pop(k, None)
                        else:
                            env[k] = v
                    seconds: dict = {}
                    _run(f"{plan.run_trainer}__{spec.plans}__{configuration}__fold_{fold}", cmd, env, log_dir,
                         seconds, verbose=False)
                    row["train_seconds"] = next(iter(seconds.values()))
                    state = fold_state(folder)
                elif state == "done":
                    print(f"{tag}: finished earlier, collecting {folder}", flush=True)
                if state != "done":
                    raise RuntimeError(f"no finished training in {folder} (state: {state})"
                                       + ("" if train else "; run without --collect-only to train it"))
                row.update(read_summary(folder, names), status="ok")
                if epochs is not None and row.get("epochs") not in (None, epochs):
                    row["note"] = (row["note"] + "; " if row["note"] else "") + (
                        f"trained earlier with {row['epochs']} epochs, not {epochs} (delete {folder} to retrain)")
                    print(f"{tag}: note - {row['note']}", flush=True)
                print(f"{tag}: mean Dice {row['mean_dice']:.4f}", flush=True)
            except Exception as e:  # a failed fold is a row, the benchmark goes on
                msg = str(e)
                row["error"] = msg.splitlines()[0][:400]
                print(f"{tag}: FAILED - {msg}", flush=True)
            fold_rows.append(row)
        rows += fold_rows
        if len(folds) > 1:
            rows.append(dict(base, run_trainer=plan.run_trainer, status="ok" if any(
                r["status"] == "ok" for r in fold_rows) else "error", **average_folds(fold_rows)))
    for r in rows:
        cost = (cost_rows or {}).get((r["trainer"], r["plans"]))
        if cost and cost.get("status") == "ok":
            r.update({k: cost.get(k) for k in COST_KEYS})
    dice_keys = []
    for r in rows:
        dice_keys += [k for k in r if k.startswith("dice_") and k not in dice_keys]
    columns = ([Column("label", "trainer"), Column("run_trainer", "trained as"), Column("fold", "fold")]
               + [Column(k, f"Dice {k[5:]}", fmt_num(4)) for k in dice_keys]
               + [Column("mean_dice", "mean Dice", fmt_num(4)), Column("epochs", "epochs"),
                  Column("iterations_per_epoch", "iter/epoch")])
    if cost_rows:
        columns += [Column("params", "params (M)", fmt_millions), Column("gflops", "GFLOPs", fmt_num(1)),
                    Column("train_step_ms", "train step (ms)", fmt_num(1)),
                    Column("train_peak_mb", "train peak mem (MiB)", fmt_num(0))]
    columns += [Column("error", "error", lambda v: v if len(v) <= 160 else v[:157] + "...")]
    meta = {"benchmark": "accuracy", "plans_source": source.description, "dataset": source.dataset_name,
            "configuration": configuration, "folds": list(folds), "epochs": epochs, "iterations": iterations,
            "val_iterations": val_iterations, "device": device, "columns": [c.key for c in columns]}
    notes = ("Dice: nnU-Net's fold_X/validation/summary.json (validation cases of that fold); 'mean' rows average "
             "the finished folds. Cost columns, where shown, come from a cost benchmark JSON on the same plans.")
    paths = write_outputs(out_dir, "accuracy", rows, columns, meta, notes)
    if plot:
        summary = [r for r in rows if r.get("status") == "ok" and (r["fold"] == "mean" or len(folds) == 1)]
        pts = [dict(r, label=r["label"]) for r in summary]
        with_cost = any(isinstance(r.get("train_step_ms"), (int, float)) for r in pts)
        x, xlabel, logx = ("train_step_ms", "training step (ms)", True) if with_cost else (
            "rank", "trainer (by mean Dice)", False)
        if x == "rank":
            for k, p in enumerate(sorted(pts, key=lambda p: p["mean_dice"])):
                p["rank"] = k
        png = scatter_plot(os.path.join(out_dir, "accuracy.png"), pts, x, "mean_dice", xlabel,
                           "mean Dice (foreground)", f"{source.dataset_name} {configuration}, folds "
                           f"{', '.join(map(str, folds))}", size="train_peak_mb" if x != "rank" else None,
                           size_label="training peak memory",
                           yerr=("mean_dice_min", "mean_dice_max") if len(folds) > 1 else None, logx=logx)
        if png:
            paths["png"] = png
    return {"meta": meta, "rows": rows, "columns": columns, "paths": paths}
