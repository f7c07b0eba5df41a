"""Kernel tests run compiled on a CUDA machine and through Triton's interpreter on a CPU-only one.

``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is first imported: Triton's own library
functions (``tl.zeros``, ``tl.sum``, ``tl.sigmoid``, ...) are ``@triton.jit`` functions decorated when
``triton.language`` is imported, and the decorator picks compiled or interpreted mode at that moment. Setting it from
here would depend on import order and leak into the rest of the suite, so on a machine without CUDA the kernel test
files (``test_scan_*.py``, ``test_kernel_*.py``) are not collected in the main pytest process: ``test_interpreted.py``
runs each of them in a child pytest process with ``TRITON_INTERPRET=1`` (and ``CUDA_VISIBLE_DEVICES=``) set from the
start.
"""
import os

import pytest
import torch

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not ON_GPU and not INTERPRETED:
    collect_ignore_glob = ["test_scan_*.py", "test_kernel_*.py"]  # run by test_interpreted.py in child processes


@pytest.fixture(scope="session")
def tk():
    """The kernel module (compiled on CUDA, interpreted on CPU in the child process)."""
    from nnunet_mamba.kernels import selective_scan_triton as mod
    return mod


@pytest.fixture(scope="session")
def dev():
    return torch.device("cuda" if ON_GPU else "cpu")


@pytest.fixture
def tuning(tk):
    """Set plan overrides for one test; reset afterwards."""
    yield tk.set_tuning
    tk.set_tuning()
