"""One nnU-Net cycle (plan -> train briefly -> predict -> evaluate) with any plugin trainer on synthetic data.

    python examples/synthetic_cycle.py nnUNetTrainerVMUNet --dim 2 --shape 128 128 --workdir /tmp/vmunet_demo

VM-UNet and MSVM-UNet need 5 downsampling steps (2D images of at least 128^2); nnMamba needs 4.
"""
import argparse

from nnunet_mamba.demo import print_result, run_cycle

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trainer")
    p.add_argument("--dim", type=int, default=2, choices=(2, 3))
    p.add_argument("--shape", type=int, nargs="*")
    p.add_argument("--workdir", default="synthetic_cycle")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--device", default=None)
    a = p.parse_args()
    print_result(run_cycle(a.workdir, trainer=a.trainer, dim=a.dim, shape=a.shape, epochs=a.epochs,
                           iterations=a.iterations, device=a.device, dataset_id=950))
