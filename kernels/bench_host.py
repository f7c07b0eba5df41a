"""Host (CPU) cost of the pieces a scan call is made of, on the machine it runs on: a CUDA allocation, a small
reduction, a view, an autograd.Function round trip, a Triton launch through Triton and through the cached launcher
(kernels/launch.py), and one whole scan forward + backward at a shape whose GPU work is negligible. Short calls are
bound by these (kernels/BENCHMARK.md); run with ``python kernels/bench_host.py``.
"""
from __future__ import annotations

import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from nnunet_mamba.kernels import launch  # noqa: E402
from nnunet_mamba.kernels.bench_scan import fwd_bwd, scan_call, triton_scan  # noqa: E402


@triton.jit
def _k1(x_ptr, n):
    pass


@triton.jit
def _k60(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20, a21,
         i0, i1, i2, i3, i4, i5, i6, i7, i8, i9, i10, i11, i12, i13, i14, i15, i16, i17, i18, i19, i20, i21, i22,
         i23, i24, i25, i26, i27, i28, i29, i30, i31, i32, i33, i34, i35, i36, i37,
         F1: tl.constexpr, F2: tl.constexpr, F3: tl.constexpr, F4: tl.constexpr, F5: tl.constexpr):
    pass


def per_call_us(fn, n=2000):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n
    torch.cuda.synchronize()
    return 1e6 * t


class _Id(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g


def main():
    x = torch.randn(64, 32, device="cuda")
    xg = torch.randn(64, 32, device="cuda", requires_grad=True)
    ptrs = [torch.empty(16, device="cuda") for _ in range(22)]
    ints = list(range(7, 45))
    flags = dict(F1=True, F2=False, F3=4, F4=16, F5=True)
    c1, c60 = launch.cached_launch(_k1), launch.cached_launch(_k60)
    rows = [
        ("torch.empty (CUDA, 4 KiB)", lambda: torch.empty(1024, device="cuda")),
        ("x.sum(0) of (64, 32)", lambda: x.sum(0)),
        ("x.t() (a view)", lambda: x.t()),
        ("x.float() (no-op)", lambda: x.float()),
        ("autograd.Function forward + backward", lambda: _Id.apply(xg).backward(x)),
        ("Triton launch, 2 arguments", lambda: _k1[(1,)](x, 5)),
        ("cached launch, 2 arguments", lambda: c1[(1,)](x, 5)),
        ("Triton launch, 65 arguments", lambda: _k60[(1, 1, 1)](*ptrs, *ints, **flags)),
        ("cached launch, 65 arguments", lambda: c60[(1, 1, 1)](*ptrs, *ints, **flags)),
    ]
    b, d, L = 2, 512, 512
    x_scan, gy, scan = scan_call(triton_scan, b, d, L, 1)  # fp32, channels-last, as bench_scan.py --parts
    rows.append((f"scan forward, no grad ({b}, {d}, {L})", torch.no_grad()(scan)))
    rows.append((f"scan forward + backward ({b}, {d}, {L})", fwd_bwd(x_scan, gy, scan)))
    print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}, triton {triton.__version__}")
    for name, fn in rows:
        n = 200 if name.startswith("scan") else 2000
        us = per_call_us(fn, n)
        print(f"| {name} | {us:.1f} us |")


if __name__ == "__main__":
    main()
