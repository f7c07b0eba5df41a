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


def _patch_language_once():
    """Interpreted runs: patch Triton's language once per kernel launch instead of once per device-function call.

    The interpreter swaps ``triton.language`` for its numpy versions at the start of a kernel launch and puts it back
    at the end (``_patch_lang``, ``scope.restore()``); it also calls ``_patch_lang`` at every call of a ``@triton.jit``
    device function from inside the kernel, which walks the language's members again (~1.7 ms each) and whose scope is
    dropped unrestored, so it changes nothing while the launch's own patch is in place. The scan kernels make about
    a thousand such calls per launch even at L = 1: skipping the repeats for a function of a module whose language is
    already patched takes ~40 % off the interpreted scan tests. Nothing else changes; with a Triton without
    ``_patch_lang`` the tests run as they are, only slower.
    """
    import warnings

    import triton.runtime.interpreter as interpreter

    patch = getattr(interpreter, "_patch_lang", None)
    if patch is None:
        warnings.warn("Triton's interpreter has no _patch_lang: the interpreted kernel tests run without the speed-up")
        return
    patched = set()  # the globals of the modules whose language the running launch has patched

    class _Unchanged:
        def restore(self):
            pass

    def patch_once(fn):
        key = id(fn.__globals__)
        if key in patched:
            return _Unchanged()
        scope = patch(fn)
        patched.add(key)
        restore = scope.restore

        def restore_and_forget():  # the language is shared: restored, no module's is patched any more (a device
            patched.clear()  # function of another module called from the kernel added that module's key)
            restore()
        scope.restore = restore_and_forget
        return scope

    interpreter._patch_lang = patch_once


if INTERPRETED:
    _patch_language_once()


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


class _Recorded:
    """Stands in for a kernel module attribute: each launch ``kernel[grid](*args, **meta)`` runs the kernel and
    appends (label, meta) to ``log``."""

    def __init__(self, kernel, label, log):
        self.kernel, self.label, self.log = kernel, label, log

    def __getitem__(self, grid):
        return lambda *args, **meta: (self.log.append((self.label, meta)), self.kernel[grid](*args, **meta))[1]


@pytest.fixture
def record_launches(tk, monkeypatch):
    """record_launches({kernel attribute: label}) -> log: from then on (for this test), every launch of those scan
    kernels runs the kernel and appends (label, its launch keywords) to log."""
    log = []

    def record(labels):
        for attr, label in labels.items():
            monkeypatch.setattr(tk, attr, _Recorded(getattr(tk, attr), label, log))
        return log
    return record
