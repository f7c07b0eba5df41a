"""Kernel tests run compiled on a CUDA machine and through Triton's interpreter on a CPU-only one.

``TRITON_INTERPRET=1`` must be in the environment before ``triton`` is first imported: Triton's own library
functions (``tl.zeros``, ``tl.sum``, ``tl.sigmoid``, ...) are ``@triton.jit`` functions decorated when
``triton.language`` is imported, and the decorator picks compiled or interpreted mode at that moment. Setting it from
here would depend on import order and leak into the rest of the suite, so on a machine without CUDA the kernel test
files (``test_scan_*.py``) are not collected in the main pytest process: ``test_interpreted.py`` runs each of them in
a child pytest process with ``TRITON_INTERPRET=1`` (and ``CUDA_VISIBLE_DEVICES=``) set from the start.

In interpreted runs the interpreter's generic ``associative_scan`` (one Python call of the combine function per
element) is replaced by the same left-to-right sequential combine applied to whole slices along the scan axis: the
same values in the same order, vectorised over the other axes (about 100x faster).
"""
import os

import numpy as np
import pytest
import torch

ON_GPU = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

if not ON_GPU and not INTERPRETED:
    collect_ignore_glob = ["test_scan_*.py"]  # run by test_interpreted.py in a child process


def _vectorised_generic_scan(self, input):
    data = [np.moveaxis(arg.handle.data, self.axis, 0) for arg in input]
    out = [np.empty_like(x) for x in data]
    acc = [self.to_tensor(x[0].copy(), arg.dtype) for x, arg in zip(data, input)]
    for o, a in zip(out, acc):
        o[0] = a.handle.data
    for i in range(1, data[0].shape[0]):
        cur = [self.to_tensor(x[i].copy(), arg.dtype) for x, arg in zip(data, input)]
        ret = self.combine_fn.fn(*acc, *cur)
        acc = list(ret) if isinstance(ret, tuple) else [ret]
        for o, a in zip(out, acc):
            o[i] = a.handle.data
    return [self.to_tensor(np.ascontiguousarray(np.moveaxis(o, 0, self.axis)), arg.dtype)
            for o, arg in zip(out, input)]


if INTERPRETED:
    from triton.runtime import interpreter

    interpreter.ScanOps.generic_scan = _vectorised_generic_scan


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
