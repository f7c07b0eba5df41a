"""Benchmark (an experiment, not used by the networks): LightM-UNet's fp32 projections, tall-skinny GEMMs
(M = tokens, K and N = 32-256), in cuBLAS's SGEMM against a plain Triton tile GEMM with fp32 FMA ("ieee") and with
3xTF32 ("tf32x3": each fp32 operand split into a TF32 part and a TF32 remainder, three tensor-core products,
fp32 accumulation), each at the best of a small tile sweep.

    python kernels/bench_linear.py

Prints each time, the memory-traffic floor (one read of x, one write of y at 4.8 TB/s) and the largest error
against a float64 product, relative to the result's largest value. Latest results: docs/kernels.md, "Projections".
"""
import itertools

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

torch.backends.cuda.matmul.allow_tf32 = False  # SGEMM, as the fp32 recipes run it

@triton.jit
def _k(x_ptr, w_ptr, y_ptr, M, N, K, sxm, sxk, swn, swk, sym, syn,
       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
    pm = tl.program_id(0)
    pn = tl.program_id(1)
    rm = pm * BM + tl.arange(0, BM)
    rn = pn * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * sxm + rk[None, :] * sxk, mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rn[None, :] * swn + rk[:, None] * swk, mask=(rn[None, :] < N) & (rk[:, None] < K), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=PREC)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * sym + rn[None, :] * syn, acc, mask=(rm[:, None] < M) & (rn[None, :] < N))


def tri(x, w, prec, BM, BN, BK, nw, ns):
    M, K = x.shape
    N = w.shape[0]
    y = torch.empty(M, N, device=x.device)
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN))
    _k[grid](x, w, y, M, N, K, *x.stride(), *w.stride(), *y.stride(), BM=BM, BN=BN, BK=BK, PREC=prec, num_warps=nw, num_stages=ns)
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
