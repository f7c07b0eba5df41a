"""The examples run."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_build_from_plans_example_builds_and_runs_every_network():
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "build_from_plans.py"),
                        os.path.join(ROOT, "benchmarks", "plans", "2d", "nnUNetPlans.json"), "2d", "--classes", "2",
                        "--patch", "64", "64"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("nnUNetTrainer")]
    # the specs' closed forms for 1 input channel (repeated to 3 by VM-UNet / MSVM-UNet) and K = 2
    expected = {"nnUNetTrainerLightMUNet": f"{5_011_576 + 41 + 33 * 2:,}",
                "nnUNetTrainerVMUNet": f"{27_422_928 + 1_536 * 3 + 25 * 2:,}",
                "nnUNetTrainerMSVMUNet": f"{35_923_344 + 432 * 3 + 97 * 2:,}"}
    for name, count in expected.items():
        line = next(ln for ln in lines if ln.split()[0] == name)
        assert count in line and "-> [(1, 2, 64, 64)]" in line, line
    assert len(lines) == 5
