"""Cost table of every plugin trainer beside nnU-Net's PlainConvUNet and ResEnc M on the reference plans.

    python benchmarks/h100_cost.py --out DIR [--settings 3d 2d] [--repeats 10] [--warmup 3] [-tr SPEC ...]
    python benchmarks/h100_cost.py --make-plans      # (re)build benchmarks/plans/ with nnU-Net's planners

Reference settings (reference-numbers.md): a synthetic isotropic dataset, 1 input channel, 3 classes
(background + 2), planned by nnU-Net 2.8.1's default planner and ``nnUNetPlannerResEncM``:

* ``3d``: 3 cases of 128^3 at 1 mm -> '3d_fullres' (patch 128^3, batch 2),
* ``2d``: 4 cases of 80 x 512^2 at 5 x 1 x 1 mm -> '2d' (patch 512^2; 320 slices, so that the batch size is set by
  nnU-Net's memory target, as for a real CT dataset, and not capped by the dataset's size).

The plans are committed in ``benchmarks/plans/<setting>/`` (nnUNetPlans.json, nnUNetResEncUNetMPlans.json,
dataset.json) so that the GPU machine needs no planning; ``--replan`` plans there instead (needs SimpleITK and
nnU-Net's planner, i.e. the same nnU-Net install the trainers need anyway). Writes ``<out>/<setting>/cost.*`` via
``nnunet-mamba benchmark cost`` (nnunet_mamba.benchmark.cost), rewritten after every trainer, so a call that runs
out of time keeps what it measured. torch.compile is off for every trainer by default (like-for-like: the plugin's
trainers cannot compile); ``--compile`` lets nnU-Net compile its own trainers as nnUNetv2_train does on CUDA.
See benchmarks/h100_cost.sh for running it on the lent H100 machine.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PLANS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "plans")
SETTINGS = {  # name: (dataset id, image shape, spacing, number of cases, configuration)
    "3d": (981, (128, 128, 128), (1.0, 1.0, 1.0), 3, "3d_fullres"),
    "2d": (982, (80, 512, 512), (5.0, 1.0, 1.0), 4, "2d"),
}
PLANS_FILES = ("nnUNetPlans.json", "nnUNetResEncUNetMPlans.json", "dataset.json")


def make_plans(settings, target_dir=PLANS_DIR):
    """Plan the synthetic reference datasets with nnU-Net's planners; copy the plans into ``target_dir``."""
    from nnunet_mamba.benchmark.plans import plan_synthetic

    with tempfile.TemporaryDirectory(prefix="nnunet_mamba_plans_") as tmp:
        for k in ("nnUNet_raw", "nnUNet_preprocessed"):
            os.environ[k] = os.path.join(tmp, k)
            os.makedirs(os.environ[k])
        os.environ.setdefault("nnUNet_def_n_proc", "1")
        for name in settings:
            did, shape, spacing, n_cases, _ = SETTINGS[name]
            print(f"[h100_cost] planning {name}: synthetic dataset {did}, {n_cases} cases of "
                  f"{'x'.join(map(str, shape))}", flush=True)
            folder = plan_synthetic(did, shape, f"Reference{name.upper()}", n_cases=n_cases, n_classes=3,
                                    spacing=spacing)
            dest = os.path.join(target_dir, name)
            os.makedirs(dest, exist_ok=True)
            for f in PLANS_FILES:
                shutil.copy(os.path.join(folder, f), dest)
            print(f"[h100_cost] plans for {name} in {dest}", flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"), help="default: $OUT")
    p.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["3d", "2d"])
    p.add_argument("-tr", "--trainers", nargs="+", default=["plugin", "baselines"])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="let nnU-Net compile its own trainers (plugin: never)")
    p.add_argument("--replan", action="store_true", help="plan here with nnU-Net instead of using benchmarks/plans")
    p.add_argument("--make-plans", action="store_true", help="only (re)build benchmarks/plans/ and exit")
    args = p.parse_args(argv)
    if args.make_plans:
        make_plans(args.settings)
        return 0

    import torch

    from nnunet_mamba.benchmark.cost import print_table, run_cost
    from nnunet_mamba.benchmark.selection import expand_specs, plans_from_file

    if not torch.cuda.is_available():
        print("[h100_cost] warning: no CUDA device - measuring on the CPU (slow; not the H100 table)", flush=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    plans_dir = PLANS_DIR
    if args.replan:
        plans_dir = tempfile.mkdtemp(prefix="nnunet_mamba_replan_")
        make_plans(args.settings, plans_dir)
    status = 0
    for name in args.settings:
        _, shape, _, _, configuration = SETTINGS[name]
        plans_file = os.path.join(plans_dir, name, "nnUNetPlans.json")
        if not os.path.isfile(plans_file):
            raise SystemExit(f"{plans_file} is missing: run `python benchmarks/h100_cost.py --make-plans` (CPU, "
                             f"with nnU-Net) or pass --replan")
        source = plans_from_file(plans_file)
        notes: list = []
        specs = expand_specs(args.trainers, source, notes)
        for n in notes:
            print(f"[h100_cost] note: {n}", flush=True)
        out = os.path.join(os.path.abspath(args.out), name)
        print(f"[h100_cost] {name}: {len(specs)} trainers on the {configuration} plans of the synthetic "
              f"{'x'.join(map(str, shape))} dataset, {device}; results in {out}", flush=True)
        result = run_cost(specs, source, configuration, device, out, warmup=args.warmup, repeats=args.repeats,
                          compile_networks=args.compile, notes=notes)
        print_table(result)
        status |= any(r["status"] != "ok" for r in result["rows"])
    return int(status)


if __name__ == "__main__":
    sys.exit(main())
