"""Build every plugin network from an nnU-Net plans file, as nnUNetv2_train would, and run one patch through it.

    python examples/build_from_plans.py benchmarks/plans/3d/nnUNetPlans.json 3d_fullres --classes 3

Prints parameters, the output shape(s) and the error for networks whose constraints the plan does not meet.
"""
import argparse

import torch
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_mamba import trainers


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("plans")
    p.add_argument("configuration")
    p.add_argument("--classes", type=int, default=3)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--patch", type=int, nargs="*", help="forward this patch size instead of the plan's")
    p.add_argument("--no-forward", action="store_true")
    args = p.parse_args()
    pm = PlansManager(args.plans)
    cm = pm.get_configuration(args.configuration)
    patch = args.patch or list(cm.patch_size)
    names = [n for n in trainers.__all__ if n.startswith("nnUNetTrainer") and "Recipe" not in n
             and "Pretrained" not in n and n != "nnUNetTrainerMambaBase"]
    for name in names:
        trainer = getattr(trainers, name)
        try:
            net = trainer.build_network_architecture(pm, cm, args.channels, args.classes, True)
        except ValueError as e:
            print(f"{name:32s} cannot follow this plan: {e}")
            continue
        n = sum(q.numel() for q in net.parameters())
        line = f"{name:32s} {type(net).__name__:14s} {n:>12,} parameters"
        if not args.no_forward:
            with torch.no_grad():
                out = net.eval()(torch.randn(1, args.channels, *patch))
            shapes = [tuple(o.shape) for o in out] if isinstance(out, (list, tuple)) else [tuple(out.shape)]
            line += f"  patch {patch} -> {shapes}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
