"""``nnunet-mamba`` command line: ``demo``, ``backends`` and ``benchmark``."""
from __future__ import annotations

import argparse
import os
import sys

from .benchmark.cli import add_parser as add_benchmark


def _demo(args):
    from .demo import print_result, run_cycle

    import torch

    on_gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    epochs = args.epochs or (20 if on_gpu else 2)
    iterations = args.iterations or (25 if on_gpu else 5)
    workdir = os.path.abspath(args.workdir)
    print(f"[nnunet-mamba] demo: {args.trainer}, synthetic {args.dim}D dataset, {epochs} epochs x {iterations} "
          f"iterations, work folder {workdir}", flush=True)
    result = run_cycle(workdir, trainer=args.trainer, dim=args.dim, device=args.device, epochs=epochs,
                       iterations=iterations, dataset_id=args.dataset_id)
    print_result(result)


def _backends(args):
    import torch

    from .ops import available_backends
    from .ops.scan import _BACKENDS

    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"{device}: " + ", ".join(available_backends(device)))
        for name, be in _BACKENDS.items():
            why = be.why_unavailable(torch.device(device))
            if why:
                print(f"  {name}: not available - {why}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="nnunet-mamba", description="Mamba segmentation networks as nnU-Net "
                                     "trainers. Train with nnU-Net itself: nnUNetv2_train D CONFIG FOLD -tr "
                                     "nnUNetTrainerLightMUNet")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="synthetic dataset -> plan/preprocess -> short training -> predict -> evaluate")
    p.add_argument("--trainer", default="nnUNetTrainerLightMUNet")
    p.add_argument("--dim", type=int, choices=(2, 3), default=3)
    p.add_argument("--workdir", default="demo_output")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    p.add_argument("--epochs", type=int, default=None, help="default: 2 on CPU, 20 on GPU")
    p.add_argument("--iterations", type=int, default=None, help="per epoch; default: 5 on CPU, 25 on GPU")
    p.add_argument("--dataset-id", type=int, default=901)
    p.set_defaults(func=_demo)
    p = sub.add_parser("backends", help="list the selective-scan backends usable here and how to get the others")
    p.set_defaults(func=_backends)
    add_benchmark(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
