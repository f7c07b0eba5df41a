"""On a machine without CUDA: run the kernel test files through Triton's interpreter in a child pytest process.

``TRITON_INTERPRET=1`` has to be set before ``triton`` is imported (conftest.py explains why), so the kernel tests
cannot share this process with the rest of the suite. Each file runs in its own child process; its output is shown
when it fails. On a CUDA machine the files are collected directly and these wrappers skip.
"""
import os
import pathlib
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
FILES = sorted(p.name for pattern in ("test_scan_*.py", "test_kernel_*.py") for p in HERE.glob(pattern))


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="kernel tests are collected directly here")
@pytest.mark.parametrize("name", FILES)
def test_kernel_file_interpreted(name):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda",
                           str(HERE / name)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    tail = (proc.stdout + proc.stderr)[-6000:]
    print(tail)
    assert proc.returncode == 0, f"interpreted kernel tests failed in {name}:\n{tail}"
