"""Benchmark: LightM-UNet's fp32 projections, tall-skinny GEMMs (M = tokens, K and N = 32-256), in cuBLAS's SGEMM
against the project's Triton tile GEMM (kernels/linear_triton.py) with fp32 FMA ("ieee") and with 3xTF32 ("tf32x3":
each fp32 operand split into a TF32 part and a TF32 remainder, three tensor-core products, fp32 accumulation), each
at the best of a small tile sweep (its results chose linear_triton's tiles).

    python kernels/bench_linear.py

Prints each time, the memory-traffic floor (one read of x, one write of y at 4.8 TB/s) and the largest error
against a float64 product, relative to the result's largest value. Latest results: docs/kernels.md, "Projections".
"""
import itertools
import pathlib
import sys

import torch
import triton
from triton.testing import do_bench

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nnunet_mamba.kernels.linear_triton import _mm_kernel  # noqa: E402

torch.backends.cuda.matmul.allow_tf32 = False  # SGEMM, as the fp32 recipes run it


def tri(x, w, prec, BM, BN, BK, nw, ns):
    """x (M, K) @ w.T for a Linear weight w (N, K) on the project's kernel with the given tile and precision."""
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x.device)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _mm_kernel[grid](x, w, w, y, M, N, K, *x.stride(), w.stride(1), w.stride(0), *y.stride(), HAS_BIAS=False,
                     ACCUM=False, BM=BM, BN=BN, BK=BK, PREC=prec, num_warps=nw, num_stages=ns)
    return y


SHAPES = [("in_proj fwd 128^3", 2 * 128**3, 32, 128), ("in_proj dgrad 128^3", 2 * 128**3, 128, 32),
          ("x_proj fwd 128^3", 2 * 128**3, 64, 34), ("out_proj fwd 128^3", 2 * 128**3, 64, 32),
          ("in_proj fwd 64^3", 2 * 64**3, 64, 256), ("in_proj dgrad 64^3", 2 * 64**3, 256, 64)]


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    for name, M, K, N in SHAPES:
        row(name, M, K, N)


def row(name, M, K, N):
    x = torch.randn(M, K, device="cuda")
    w = torch.randn(N, K, device="cuda") / K ** 0.5
    ref = (x.double() @ w.double().t())
    scale = ref.abs().max().item()
    t_cub = do_bench(lambda: torch.nn.functional.linear(x, w))
    e_cub = ((torch.nn.functional.linear(x, w).double() - ref).abs().max().item()) / scale
    traffic = (M * K + M * N) * 4 / 4.8e12 * 1e3
    line = f"{name}: M={M} K={K} N={N} | cuBLAS {t_cub:.3f} ms err {e_cub:.1e} | roofline {traffic:.3f} ms"
    for prec in ("ieee", "tf32x3"):
        best = None
        BNs = [triton.next_power_of_2(N)] if N <= 128 else [64, 128]
        for BM, BN, BK, nw, ns in itertools.product([64, 128, 256], BNs, [min(32, K), min(64, K)], [4, 8], [2, 3]):
            if BM * BN > 256 * 128:
                continue
            try:
                t = do_bench(lambda: tri(x, w, prec, BM, BN, BK, nw, ns), warmup=5, rep=20)
            except triton.runtime.errors.OutOfResources:
                continue
            if best is None or t < best[0]:
                best = (t, (BM, BN, BK, nw, ns))
        y = tri(x, w, prec, *best[1])
        err = ((y.double() - ref).abs().max().item()) / scale
        line += f" | {prec} {best[0]:.3f} ms {best[1]} err {err:.1e}"
    print(line, flush=True)


if __name__ == "__main__":
    main()
