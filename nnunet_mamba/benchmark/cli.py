"""``nnunet-mamba benchmark cost|accuracy`` (docs/benchmarking.md)."""
from __future__ import annotations

import argparse
import os

TRAINERS_HELP = ("trainer specs: TRAINER or TRAINER:PLANS_IDENTIFIER, and the keywords 'plugin' (every trainer of "
                 "this package except the *Pretrained ones) and 'baselines' (nnUNetTrainer on the default plans = "
                 "PlainConvUNet, plus ResEnc M / L where nnUNetResEncUNetMPlans / nnUNetResEncUNetLPlans exist). "
                 "Default: plugin baselines")


def _device(name):
    import torch

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available here (use --device cpu)")
    return torch.device(name)


def _source(args):
    from .selection import plans_from_dataset, plans_from_file

    if getattr(args, "plans_file", None):
        return plans_from_file(args.plans_file, args.dataset_json, args.num_classes, args.num_input_channels)
    return plans_from_dataset(args.dataset, args.plans)


def _specs(args, source, notes):
    from .selection import expand_specs

    specs = expand_specs(args.trainers, source, notes)
    for n in notes:
        print(f"[benchmark] note: {n}", flush=True)
    return specs


def _cost(args):
    from .cost import print_table, run_cost

    device = _device(args.device)
    source = _source(args)
    notes: list = []
    specs = _specs(args, source, notes)
    out = os.path.abspath(args.output)
    print(f"[benchmark] cost of {len(specs)} trainer(s) on {source.description}, configuration "
          f"{args.configuration}, {device}; results in {out}", flush=True)
    result = run_cost(specs, source, args.configuration, device, out, args.batch_size, args.warmup, args.repeats,
                      compile_networks=not args.no_compile, notes=notes, plot=not args.no_plot)
    print_table(result)
    return 0 if all(r["status"] == "ok" for r in result["rows"]) or not args.strict else 1


def _accuracy(args):
    from .accuracy import run_accuracy
    from .cost import load_cost_rows
    from .report import markdown_table

    source = _source(args)
    notes: list = []
    specs = _specs(args, source, notes)
    cost = load_cost_rows(args.cost_json) if args.cost_json else None
    out = os.path.abspath(args.output)
    folds = [int(f) if f.isdigit() else f for f in args.folds]
    print(f"[benchmark] accuracy of {len(specs)} trainer(s) on {source.dataset_name} {args.configuration}, folds "
          f"{', '.join(map(str, folds))}; results in {out}", flush=True)
    result = run_accuracy(specs, source, args.configuration, folds, out, args.epochs, args.iterations,
                          args.val_iterations, args.device, cost, train=not args.collect_only,
                          plot=not args.no_plot)
    print()
    print(markdown_table(result["rows"], result["columns"]))
    print()
    for k, p in result["paths"].items():
        print(f"{k}: {p}")
    return 0 if all(r["status"] == "ok" for r in result["rows"]) or not args.strict else 1


def _common(p, dataset_required: bool):
    src = p.add_argument_group("plans")
    if dataset_required:
        src.add_argument("-d", "--dataset", required=True, help="dataset id or DatasetXXX_Name")
    else:
        one = src.add_mutually_exclusive_group(required=True)
        one.add_argument("-d", "--dataset", help="dataset id or DatasetXXX_Name; plans and dataset.json are read from "
                         "$nnUNet_preprocessed/DatasetXXX_Name/")
        one.add_argument("--plans-file", help="a plans JSON instead of a dataset; its dataset.json is read from "
                         "--dataset-json, from the same folder, or made from --num-classes/--num-input-channels. "
                         "Other plans (TRAINER:PLANS, ResEnc baselines) are looked up in the same folder")
        src.add_argument("--dataset-json", help="dataset.json for --plans-file")
        src.add_argument("--num-classes", type=int, help="with --plans-file and no dataset.json: number of classes, "
                         "background included")
        src.add_argument("--num-input-channels", type=int, help="with --plans-file and no dataset.json")
    src.add_argument("-c", "--configuration", default="3d_fullres", help="plans configuration (default 3d_fullres)")
    src.add_argument("-p", "--plans", default="nnUNetPlans",
                     help="plans identifier for trainers given without :PLANS (default nnUNetPlans)")
    p.add_argument("-tr", "--trainers", nargs="+", default=["plugin", "baselines"], metavar="SPEC", help=TRAINERS_HELP)
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    p.add_argument("--strict", action="store_true", help="exit with status 1 if any row is an error")


def add_parser(subparsers):
    bench = subparsers.add_parser(
        "benchmark", help="compare trainers with nnU-Net baselines: cost (params, FLOPs, time, memory) and accuracy",
        description="Benchmark the plugin's trainers against nnU-Net's baselines on the same plans. See "
                    "docs/benchmarking.md.")
    sub = bench.add_subparsers(dest="benchmark_command", required=True)

    p = sub.add_parser(
        "cost", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="parameters, GFLOPs, training-step time, peak memory, inference time, scan backend per trainer",
        description="""\
For every trainer: build it exactly as nnUNetv2_train does on the given plans (no data needed) and report
  params                 unique trainable parameters of the network
  GFLOPs conv+matmul     one forward pass at batch 1 (inference network), convolutions and matrix products counted by
                         torch.utils.flop_counter, 2 FLOPs per multiply-add; the selective scan is excluded here
  GFLOPs scan            the selective scan, analytic: 9*b*d*L*N (+ b*d*L for D, + b*d*L for the z gate), forward
  train step (ms)        the trainer's own train_step (fwd + loss + bwd + clipping + optimiser step, with its
                         AMP or fp32 recipe) at the plan's batch size: median of --repeats after --warmup steps
  train/inference peak   CUDA: max_memory_allocated; CPU: peak RSS increase (a lower bound), n/a if unavailable
  inference (ms/patch)   one patch at batch 1, no gradients, autocast on CUDA (as nnU-Net's predictor)
  scan backend           the selective-scan backend(s) that actually ran
A trainer that cannot be built or run appears with its error. Writes cost.md, cost.csv, cost.json and cost.png
(step time vs parameters, marker area = training memory) into --output.

examples:
  nnunet-mamba benchmark cost -d 4 -c 3d_fullres
  nnunet-mamba benchmark cost -d 4 -c 2d -tr nnUNetTrainerLightMUNet nnUNetTrainer:nnUNetResEncUNetMPlans
  nnunet-mamba benchmark cost --plans-file plans.json --num-classes 3 --num-input-channels 1 -c 3d_fullres""")
    _common(p, dataset_required=False)
    p.add_argument("--device", choices=("cuda", "cpu"), default=None, help="default: cuda if available")
    p.add_argument("--batch-size", type=int, default=None, help="override the plans' batch size for every trainer")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before timing (default 3)")
    p.add_argument("--repeats", type=int, default=10, help="timed steps; the median is reported (default 10)")
    p.add_argument("--no-compile", action="store_true",
                   help="never torch.compile (nnU-Net compiles its own trainers on CUDA unless nnUNet_compile=false; "
                        "the plugin's trainers never compile)")
    p.add_argument("-o", "--output", default="benchmark_results", help="output folder (default benchmark_results)")
    p.set_defaults(func=_cost)

    p = sub.add_parser(
        "accuracy", formatter_class=argparse.RawDescriptionHelpFormatter,
        help="train trainers through nnUNetv2_train and tabulate nnU-Net's validation Dice (per class, per fold)",
        description="""\
Trains every trainer spec on the chosen folds with nnUNetv2_train (nnU-Net's folders must be set and the dataset
preprocessed for the plans used), resuming interrupted folds (--c), validating trained ones that lack a summary
(--val) and skipping finished ones (checkpoint_final.pth + validation/summary.json). Then collects each fold's
validation/summary.json into one table: Dice per class and mean, per fold and averaged over folds, with the cost
numbers of a cost benchmark (--cost-json) beside them. Writes accuracy.md/.csv/.json/.png into --output.

Length: --epochs/--iterations/--val-iterations reach the plugin's trainers through NNUNET_MAMBA_EPOCHS /
_ITERATIONS / _VAL_ITERATIONS. nnUNetTrainer is run as nnU-Net's nnUNetTrainer_<E>epochs (E in 1 5 10 20 50 100
250 500 750 2000 4000 8000; 1000 = nnUNetTrainer), which always runs 250 iterations per epoch. A finished fold is
not retrained with other settings: delete its folder to retrain.

examples:
  nnunet-mamba benchmark accuracy -d 4 -c 3d_fullres -f 0 1 2 3 4 --cost-json benchmark_results/cost.json
  nnunet-mamba benchmark accuracy -d 4 -c 2d -tr nnUNetTrainerLightMUNet baselines --epochs 100 -f 0""")
    _common(p, dataset_required=True)
    p.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds (default 0); 'all' as nnU-Net allows")
    p.add_argument("--epochs", type=int, default=None, help="training length for every trainer (default: each "
                   "trainer's own recipe, nnUNetTrainer 1000)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations per epoch (plugin trainers)")
    p.add_argument("--val-iterations", type=int, default=None, help="validation iterations per epoch (plugin trainers)")
    p.add_argument("--device", choices=("cuda", "cpu", "mps"), default=None, help="passed to nnUNetv2_train -device")
    p.add_argument("--cost-json", help="cost.json of a cost benchmark on the same plans: its columns go beside Dice")
    p.add_argument("--collect-only", action="store_true", help="train nothing; tabulate the folds already finished")
    p.add_argument("-o", "--output", default="benchmark_results", help="output folder (default benchmark_results)")
    p.set_defaults(func=_accuracy)
