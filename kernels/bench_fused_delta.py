"""Per-kernel times of the Triton scan with a low-rank delta (``delta_proj_weight``) three ways, forward + backward, on
token-major views of in_proj / x_proj outputs as the Mamba mixer passes them: multiplied out by the caller (a plain
delta), multiplied out by the op into its own buffer (the mixer's default: the forward writes softplus(delta + bias)
over it, which the later passes read), formed inside the kernels. Results: docs/kernels.md "Low-rank delta"; logs
in benchmarks/results/logs/.

    python kernels/bench_fused_delta.py "2,64,2097152,16,2;2,64,262144,16,2"     # b,d,L,N,R;...
"""
import os
import sys

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from nnunet_mamba.kernels import selective_scan_triton as tk  # noqa: E402


def make(b, d, L, N, R, dev="cuda"):
    xz = torch.randn(b, L, 2 * d, device=dev)
    dbl = torch.randn(b, L, R + 2 * N, device=dev) * 0.5
    return dict(u=xz[..., :d].transpose(1, 2), z=xz[..., d:].transpose(1, 2), v=dbl[..., :R].transpose(1, 2),
                B=dbl[..., R:R + N].transpose(1, 2), C=dbl[..., R + N:].transpose(1, 2),
                W=(torch.randn(d, R, device=dev) / R ** 0.5).requires_grad_(), A=-torch.rand(d, N, device=dev) - 0.5,
                D=torch.ones(d, device=dev), bias=torch.randn(d, device=dev) * .3)


MODES = ("caller", "op", "kernels")  # who multiplies the delta out


def step(t, mode):
    u, v = t["u"].detach().requires_grad_(), t["v"].detach().requires_grad_()
    delta, W = (v, t["W"]) if mode != "caller" else (F.linear(v.transpose(1, 2), t["W"]).transpose(1, 2), None)
    y = tk.selective_scan_triton(u, delta, t["A"], t["B"], t["C"], t["D"], t["z"], t["bias"], True,
                                 delta_proj_weight=W, delta_in_kernels=mode == "kernels")
    y.backward(torch.ones_like(y))


def main(spec):
    print(f"GPU: {torch.cuda.get_device_name()}; torch {torch.__version__}")
    for b, d, L, N, R in [tuple(int(v) for v in s.split(",")) for s in spec.split(";")]:
        t = make(b, d, L, N, R)
        for mode in MODES:
            for _ in range(2):
                step(t, mode)
            e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            e0.record()
            for _ in range(3):
                step(t, mode)
            e1.record()
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as p:
                step(t, mode)
                torch.cuda.synchronize()
            ks = sorted(((ev.key[:40], ev.self_device_time_total / 1000) for ev in p.key_averages()
                         if ev.self_device_time_total), key=lambda kv: -kv[1])[:6]
            print(f"({b}, {d}, {L}, N={N}) R={R} multiplied out by the {mode}: fwd+bwd "
                  f"{e0.elapsed_time(e1) / 3:.2f} ms | " + ", ".join(f"{k} {v:.2f}" for k, v in ks), flush=True)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "2,64,2097152,16,2;2,64,262144,16,2;32,192,4096,16,6")
