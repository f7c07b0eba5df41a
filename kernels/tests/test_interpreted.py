"""On a machine without CUDA: run the kernel test files through Triton's interpreter in child pytest processes.

``TRITON_INTERPRET=1`` has to be set before ``triton`` is imported (conftest.py explains why), so the kernel tests
cannot share this process with the rest of the suite. Each file runs in its own child process, as many at a time as
the machine has cores (the interpreter runs on one core, and these files are most of the suite's time on a CPU); a
file's output is shown when it fails. On a CUDA machine the files are collected directly and these wrappers skip.
"""
import concurrent.futures
import os
import pathlib
import subprocess
import sys

import pytest
import torch

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# the scan files first: they take longest, so they start first
FILES = [p.name for pattern in ("test_scan_*.py", "test_kernel_*.py") for p in sorted(HERE.glob(pattern))]
TIMEOUT_S = 1800  # per file: a guard against a hang (the slowest file, test_scan_cross.py, takes ~6 min in CI)


def _run(name):
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not cuda",
                           str(HERE / name)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)


@pytest.fixture(scope="module")
def children(request):
    """The child processes of the selected files, started together (a pool of one per core); each test waits for its
    own."""
    selected = {item.callspec.params["name"] for item in request.session.items
                if getattr(item, "originalname", None) == "test_kernel_file_interpreted"}
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(os.sched_getaffinity(0)))) as pool:
        yield {name: pool.submit(_run, name) for name in FILES if name in selected}


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
                    reason="kernel tests are collected directly here")
@pytest.mark.parametrize("name", FILES)
def test_kernel_file_interpreted(children, name):
    proc = children[name].result()
    tail = (proc.stdout + proc.stderr)[-6000:]
    print(tail)
    assert proc.returncode == 0, f"interpreted kernel tests failed in {name}:\n{tail}"
