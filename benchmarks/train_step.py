"""Training-step time, peak memory and eval time of whole networks (no nnU-Net needed), on one GPU.

    python benchmarks/train_step.py --cases plain3d,lightm3d --out DIR [--steps 20] [--nan-steps 200]

Each case builds a network as its nnU-Net trainer would for the reference plan (3D 128^3 / 2D), runs warm-up
steps, then times `steps` training steps (forward, CE loss on the full-resolution logits, backward, optimizer
step) with CUDA events and reports the median, the peak allocated memory and the eval-mode forward time. With
`--nan-steps N`, each Mamba network also trains N steps under AMP (bf16 and fp16 with GradScaler) on a learnable
synthetic target and reports whether any loss was not finite. With `--cuda-graphs` the networks' forward and
backward replay CUDA graphs captured before the timed steps (NNUNET_MAMBA_CUDA_GRAPHS in the trainers; the
peak then includes the capture). `--profile` also prints the host's issue time of a step and the GPU's idle time
inside it. Baselines are measured in the same call, so
ratios are fair. Writes `train_step.md` and `train_step.json` to --out.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import re
import statistics
import sys
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nnunet_mamba.graphs import graph_for_training  # noqa: E402


def plain_conv_unet(nd, c_in, k, n_stages, max_feat=320):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    conv = nn.Conv3d if nd == 3 else nn.Conv2d
    norm = nn.InstanceNorm3d if nd == 3 else nn.InstanceNorm2d
    return PlainConvUNet(c_in, n_stages, [min(32 * 2 ** i, max_feat) for i in range(n_stages)], conv, 3,
                         [1] + [2] * (n_stages - 1), 2, k, 2, conv_bias=True, norm_op=norm,
                         norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False)


def _net(module, cls, *args, **kwargs):
    return getattr(importlib.import_module(f"nnunet_mamba.networks.{module}"), cls)(*args, **kwargs)


# name: (builder, input shape without batch, batch, classes, precision, optimizer)
CASES = {
    "plain3d": (lambda: plain_conv_unet(3, 1, 3, 6), (1, 128, 128, 128), 2, 3, "amp", "sgd"),
    "lightm3d": (lambda: _net("lightm_unet", "LightMUNet", 3, 32, 1, 3), (1, 128, 128, 128), 2, 3, "fp32", "adam"),
    "lightm3d_amp": (lambda: _net("lightm_unet", "LightMUNet", 3, 32, 1, 3), (1, 128, 128, 128), 2, 3, "amp",
                     "sgd"),
    "nnmamba3d": (lambda: _net("nnmamba", "nnMambaSeg", in_ch=1, number_classes=3, spatial_dims=3, deep_supervision=False),
                  (1, 128, 128, 128), 2, 3, "fp32", "sgd"),
    "nnmamba3d_amp": (lambda: _net("nnmamba", "nnMambaSeg", in_ch=1, number_classes=3, spatial_dims=3, deep_supervision=False),
                      (1, 128, 128, 128), 2, 3, "amp", "sgd"),
    "plain2d_512": (lambda: plain_conv_unet(2, 1, 2, 8, 512), (1, 512, 512), 12, 2, "amp", "sgd"),
    "lightm2d_512": (lambda: _net("lightm_unet", "LightMUNet", 2, 32, 1, 2), (1, 512, 512), 12, 2, "fp32", "adam"),
    "plain2d_256": (lambda: plain_conv_unet(2, 1, 9, 7, 512), (1, 256, 256), 32, 9, "amp", "sgd"),
    "vmunet2d": (lambda: _net("vm_unet", "VMUNet", 1, 9, spatial_dims=2), (1, 256, 256), 32, 9, "fp32", "adamw"),
    "msvmunet2d": (lambda: _net("msvm_unet", "MSVMUNet", 1, 9, spatial_dims=2), (1, 224, 224), 32, 9, "fp32",
                   "adamw"),
    "msvmunet3d": (lambda: _net("msvm_unet", "MSVMUNet", 1, 3, spatial_dims=3), (1, 128, 128, 128), 2, 3, "fp32",
                   "adamw"),
    "msvmunet3d_amp": (lambda: _net("msvm_unet", "MSVMUNet", 1, 3, spatial_dims=3), (1, 128, 128, 128), 2, 3, "amp",
                       "adamw"),
}
MAMBA_NAN_CASES = ["lightm3d", "nnmamba3d", "vmunet2d", "msvmunet2d"]


def _optimizer(kind, params):
    if kind == "sgd":
        return torch.optim.SGD(params, 1e-2, momentum=0.99, nesterov=True, weight_decay=3e-5)
    if kind == "adam":
        return torch.optim.Adam(params, 1e-4, eps=1e-5, weight_decay=1e-5)
    return torch.optim.AdamW(params, 1e-3, weight_decay=1e-2)


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _batch(shape, batch, k, learnable=False):
    x = torch.randn(batch, *shape, device="cuda")
    if learnable:  # classes = intensity bands: a target a network can learn
        y = torch.bucketize(x[:, 0], torch.linspace(-1, 1, k - 1, device="cuda"))
    else:
        y = torch.randint(0, k, (batch, *shape[1:]), device="cuda")
    return x, y


# kernel-name patterns per part of a step, first match wins (profile_step's summary)
KERNEL_CATEGORIES = [("selective scan", r"^_(bwd|chunk|bsum|carry)_kernel$|selective_scan"),
                     ("causal conv / LayerNorm / GroupNorm / depthwise conv (Triton)",
                      r"^_(conv_fwd|conv_bwd|ln_\w+|stats|grad_sums|affine|dw_conv|dw_conv_wgrad)_kernel$"),
                     ("scaled residual's backward (Triton)", r"^_scaled_add_kernel$"),
                     ("depthwise conv (PyTorch)", r"depthwise"),
                     ("cuDNN (convolutions, batch norm)", r"cudnn|implicit_gemm|conv"),
                     ("GEMM (cuBLAS)", r"gemm|gemv"),
                     ("GroupNorm / LayerNorm (PyTorch)", r"GroupNorm|ComputeInternalGradients|GammaBeta|layer_norm"),
                     ("concatenation", r"CatArray"),
                     ("copies", r"copy|Memcpy"),
                     ("reductions", r"reduce_kernel"),
                     ("elementwise", r"elementwise")]


def kernel_category(name: str) -> str:
    return next((cat for cat, rx in KERNEL_CATEGORIES if re.search(rx, name, re.IGNORECASE)), "other")


def profile_step(step, name, top=12, host_top=0):
    """Print the CUDA kernels that take the time of one step (torch.profiler) and their sums per part of the step
    (``KERNEL_CATEGORIES``), to find what to fix."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(f"[profile] {name}: top {top} CUDA kernels of one step")
    events = prof.key_averages()
    print(events.table(sort_by="cuda_time_total", row_limit=top, max_name_column_width=70))
    sums = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CUDA:
            cat = kernel_category(e.key)
            sums[cat] = sums.get(cat, 0.0) + e.self_device_time_total / 1e3
    print(f"[profile] {name}: kernel time per part of the step ({sum(sums.values()):.1f} ms in all)")
    for cat, ms in sorted(sums.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:9.1f} ms  {cat}")
    # cuBLAS's GEMMs by operand shapes (the ATen op that launched them; the Triton GEMMs have none)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        step()
        torch.cuda.synchronize()
    ops = prof.key_averages(group_by_input_shape=True)
    gemm_ops = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm")
    gemms = [e for e in ops if e.key in gemm_ops]
    gemms.sort(key=lambda e: -e.device_time_total)
    print(f"[profile] {name}: cuBLAS GEMMs by operand shapes ({sum(e.device_time_total for e in gemms) / 1e3:.1f} ms "
          f"in all; top {top})")
    for e in gemms[:top]:
        print(f"  {e.device_time_total / 1e3:8.2f} ms {e.count:4d}x  {e.key} {e.input_shapes}")
    # the other ATen ops by the GPU time of the kernels they launched themselves (elementwise ops, reductions, copies)
    others = [e for e in ops if e.key.startswith("aten::") and e.key not in gemm_ops and e.self_device_time_total > 0]
    others.sort(key=lambda e: -e.self_device_time_total)
    total = sum(e.self_device_time_total for e in others) / 1e3
    print(f"[profile] {name}: other ATen ops by operand shapes ({total:.1f} ms in all; top {top})")
    for e in others[:top]:
        print(f"  {e.self_device_time_total / 1e3:8.2f} ms {e.count:4d}x  {e.key} {e.input_shapes}")
    # the GPU's idle time inside the step (gaps between consecutive kernels): where it waited on the host
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    gaps, end = [], kernels[0][1] if kernels else 0
    for start, stop, kname in kernels[1:]:
        if start > end:
            gaps.append((start - end, kname))
        end = max(end, stop)
    if kernels:
        span = (end - kernels[0][0]) / 1e3
        largest = sorted(gaps, reverse=True)[:6]
        print(f"[profile] {name}: first to last kernel {span:.1f} ms, GPU idle {sum(g for g, _ in gaps) / 1e3:.1f} ms "
              f"in {len(gaps)} gaps; largest before: " + ", ".join(f"{k[:40]} {g / 1e3:.2f} ms" for g, k in largest))
    # the host's side: how long it takes to issue a step (no synchronisation; when that is near the step's wall time
    # the GPU waits on Python), and the CUDA runtime calls that can stall the GPU's queue (allocations, syncs)
    issue = []
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        issue.append(1e3 * (time.perf_counter() - t0))
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
        torch.cuda.synchronize()
    calls = [(e.key, e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages() if e.key.startswith("cu")]
    print(f"[profile] {name}: host issue time of a step {statistics.median(issue):.1f} ms; CUDA runtime calls: "
          + ", ".join(f"{k} {n}x {ms:.1f} ms" for k, n, ms in sorted(calls, key=lambda c: -c[2])[:8]))
    if host_top:  # where the host's time goes, by Python function (cProfile)
        import cProfile
        import pstats
        torch.cuda.synchronize()
        prof = cProfile.Profile()
        prof.runcall(step)
        torch.cuda.synchronize()
        for key in ("tottime", "cumulative"):
            pstats.Stats(prof).sort_stats(key).print_stats(host_top)


def measure(name, steps, warmup, profile=0, cuda_graphs=False, host_profile=0):
    build, shape, batch, k, precision, opt_kind = CASES[name]
    torch.manual_seed(0)
    net = build().cuda()
    params = sum(p.numel() for p in net.parameters())
    opt = _optimizer(opt_kind, net.parameters())
    scaler = torch.amp.GradScaler("cuda") if precision == "amp" else None
    x, y = _batch(shape, batch, k)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if cuda_graphs:  # the network's forward and backward captured once, then replayed (nnunet_mamba/graphs.py)
        net = graph_for_training(net, x, autocast_dtype=torch.float16 if precision == "amp" else None)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", enabled=precision == "amp"):
            loss = F.cross_entropy(_first(net(x)), y)
        if scaler:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
            opt.step()

    times = []
    for i in range(warmup + steps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        step()
        t1.record()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(t0.elapsed_time(t1))
    peak = torch.cuda.max_memory_allocated() / 2**30
    if profile:
        profile_step(step, name, profile, host_profile)
    net.eval()
    eval_times = []
    with torch.no_grad(), torch.autocast("cuda", enabled=precision == "amp"):
        for i in range(3 + 5):
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            net(x[:1])
            t1.record()
            torch.cuda.synchronize()
            if i >= 3:
                eval_times.append(t0.elapsed_time(t1))
    del net, opt
    torch.cuda.empty_cache()
    return dict(case=name, params=params, input=f"{batch}x{'x'.join(map(str, shape))}", precision=precision,
                step_ms=statistics.median(times), peak_gib=peak, eval_ms=statistics.median(eval_times))


def nan_check(name, n_steps, dtype):
    build, shape, batch, k, _, opt_kind = CASES[name]
    torch.manual_seed(0)
    net = build().cuda()
    opt = _optimizer(opt_kind, net.parameters())
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    bad, losses = 0, []
    for _ in range(n_steps):
        x, y = _batch(shape, batch, k, learnable=True)
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=dtype):
            loss = F.cross_entropy(_first(net(x)).float(), y)
        bad += int(not torch.isfinite(loss))
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 12)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    del net, opt
    torch.cuda.empty_cache()
    return dict(case=name, dtype=str(dtype).replace("torch.", ""), steps=n_steps, non_finite_losses=bad,
                first_loss=losses[0], last_loss=statistics.mean(losses[-10:]))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="plain3d,lightm3d", help=f"comma-separated, from: {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--nan-steps", type=int, default=0, help="AMP NaN check steps per Mamba case (0: skip)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--profile", type=int, nargs="?", const=12, default=0, metavar="TOP",
                   help="print each case's TOP (12) CUDA kernels by time (one extra step)")
    p.add_argument("--host-profile", type=int, default=0, metavar="TOP",
                   help="with --profile: also the TOP Python functions of one step's host time (cProfile)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="capture each network's forward + backward as CUDA graphs (torch.cuda.make_graphed_callables)")
    args = p.parse_args()
    from nnunet_mamba.ops import available_backends

    torch.backends.cudnn.benchmark = True  # as nnUNetv2_train does
    gpu = torch.cuda.get_device_name()
    rows, nan_rows = [], []
    for name in args.cases.split(","):
        print(f"[bench] {name} ...", flush=True)
        try:
            rows.append(measure(name, args.steps, args.warmup, args.profile, args.cuda_graphs, args.host_profile))
            print(f"[bench] {rows[-1]}", flush=True)
        except Exception as e:  # reported in the table, not skipped
            traceback.print_exc()
            rows.append(dict(case=name, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"))
            torch.cuda.empty_cache()
    for name in args.cases.split(",") if args.nan_steps else []:  # after all timings: a cut run keeps those
        if name in MAMBA_NAN_CASES and not any(r["case"] == name and "error" in r for r in rows):
            for dtype in (torch.bfloat16, torch.float16):
                print(f"[bench] {name} {args.nan_steps} AMP steps in {dtype} ...", flush=True)
                nan_rows.append(nan_check(name, args.nan_steps, dtype))
                print(f"[bench] {nan_rows[-1]}", flush=True)
    head = (f"GPU: {gpu}; torch {torch.__version__}; date {datetime.date.today()}; scan backends on cuda: "
            f"{', '.join(available_backends('cuda'))}; auto/forced: {os.environ.get('NNUNET_MAMBA_SCAN_BACKEND', 'auto')}")
    lines = [head, "", "| case | params | input | precision | train step (ms) | peak memory (GiB) | eval forward (ms) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error']} | | | | | |")
        else:
            lines.append(f"| {r['case']} | {r['params']:,} | {r['input']} | {r['precision']} | {r['step_ms']:.1f} | "
                         f"{r['peak_gib']:.2f} | {r['eval_ms']:.1f} |")
    if nan_rows:
        lines += ["", "| case | AMP dtype | steps | non-finite losses | first loss | mean of last 10 |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['case']} | {r['dtype']} | {r['steps']} | {r['non_finite_losses']} | {r['first_loss']:.4f} | "
                  f"{r['last_loss']:.4f} |" for r in nan_rows]
    text = "\n".join(lines)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "train_step.json"), "w") as f:
        json.dump(dict(gpu=gpu, date=str(datetime.date.today()), rows=rows, nan=nan_rows), f, indent=1)


if __name__ == "__main__":
    main()
