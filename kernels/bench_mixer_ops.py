"""Benchmark: the Mamba layers' non-scan ops (project kernels) against PyTorch, in one process on one GPU.

    python kernels/bench_mixer_ops.py [--out DIR] [--only OP,...]

* causal depthwise conv (K = 4) + SiLU on (b, L, C) tokens: ``kernels/causal_conv1d_triton.py`` against what the
  mixer ran before, PyTorch's ``conv1d`` on the (b, C, L) transpose + SiLU (``ops/token_ops.py``, backend "torch");
* LayerNorm over C of (b, L, C) tokens, and of the token view of a channels-first (b, C, L) map:
  ``kernels/layer_norm_triton.py`` against ``F.layer_norm``;
* GroupNorm(8) of the (b, C, *S) maps around LightM-UNet's Mamba layers: ``kernels/group_norm_triton.py`` and
  the session-4 form (statistics from ``torch.var_mean``, ATen's backward) against ``F.group_norm``, and followed
  by a ReLU (separate, or fused into the kernel) against ``F.relu(F.group_norm(...))``;
* depthwise k^nd convs of LightM-UNet (ResUpBlock, and its one-channel convInit), MSVM-UNet (MS-MLP, SS3D) and
  VM-UNet (SS2D): ``kernels/depthwise_conv_triton.py`` against PyTorch's ``conv3d`` / ``conv2d`` with ``groups=C``,
  on the memory format the network passes (channels-first, or channels-last as SS2D/SS3D pass their maps);
* LightM-UNet's 1x1x1 convs at full resolution with 1 input or 3 output channels (convInit, conv_final): the Triton
  GEMM (``ops.pointwise_conv``'s autograd function) against cuDNN;
* LightM-UNet's decoder up-sampling (x2, trilinear) plus the skip connection: ``kernels/upsample_triton.py`` against
  ``F.interpolate`` and an add;
* LightM-UNet's LayerNorm + Linear pairs (``in_proj`` C -> 4C as one block, ``proj`` C -> 2C channels-first) on
  the channels-first token view: the LayerNorm folded into the Triton GEMMs (``ops.linear_split`` /
  ``ops.linear_channels_first`` with ``norm=``) against the project's unfused path (the LayerNorm kernel, then the
  same ops without ``norm``); in these rows the "PyTorch" columns hold that unfused path.

Shapes: LightM-UNet 3D at 128^3 batch 2 (the Mamba layers' token counts and widths per stage), and the depthwise
convs' maps of the networks' reference configurations. fp32, forward + backward with every input requiring grad,
CUDA-event medians (``triton.testing.do_bench``: wall time of an isolated call) and GPU kernel time (profiler).
Writes ``BENCHMARK_mixer_ops.md`` (GPU, date) to --out (default:
this folder).
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import sys
import types

import torch
import torch.nn.functional as F

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from triton.testing import do_bench  # noqa: E402

from nnunet_mamba.kernels.causal_conv1d_triton import causal_conv1d_silu_triton  # noqa: E402
from nnunet_mamba.kernels.depthwise_conv_triton import depthwise_conv_triton  # noqa: E402
from nnunet_mamba.kernels.group_norm_triton import group_norm_triton  # noqa: E402
from nnunet_mamba.kernels.layer_norm_triton import layer_norm_triton  # noqa: E402
from nnunet_mamba.ops.linear import _PointwiseConvFn, linear_channels_first, linear_split  # noqa: E402
from nnunet_mamba.ops.token_ops import _GroupNormFn, _UpsampleFn, _conv_torch  # noqa: E402

# (label, tokens per batch element, conv channels d_inner, LayerNorm channels d_model); batch 2
SHAPES = [("stage 1 (128^3)", 128 ** 3, 64, 32), ("stage 2 (64^3)", 64 ** 3, 128, 64),
          ("stage 3 (32^3)", 32 ** 3, 256, 128), ("stage 4 (16^3)", 16 ** 3, 512, 256)]
# depthwise convs: (label, map shape, kernel size, channels-last)
DW_SHAPES = [("LightM-UNet ResUpBlock (128^3)", (2, 32, 128, 128, 128), 3, False),
             ("LightM-UNet ResUpBlock (64^3)", (2, 64, 64, 64, 64), 3, False),
             ("LightM-UNet ResUpBlock (32^3)", (2, 128, 32, 32, 32), 3, False),
             ("LightM-UNet convInit (128^3)", (2, 1, 128, 128, 128), 3, False),
             ("MSVM-UNet 3D MS-MLP (32^3)", (2, 384, 32, 32, 32), 3, False),
             ("MSVM-UNet 3D MS-MLP (32^3)", (2, 384, 32, 32, 32), 5, False),
             ("MSVM-UNet 3D SS3D conv (32^3)", (2, 96, 32, 32, 32), 3, True),
             ("MSVM-UNet 3D MS-MLP (16^3)", (2, 768, 16, 16, 16), 5, False),
             ("VM-UNet SS2D conv (64^2)", (32, 192, 64, 64), 3, True),
             ("MSVM-UNet 2D MS-MLP (56^2)", (32, 384, 56, 56), 5, False)]
# LightM-UNet's up-sampling inputs (x2 trilinear, the skip connection added)
UP_SHAPES = [("LightM-UNet decoder (to 128^3)", (2, 32, 64, 64, 64)),
             ("LightM-UNet decoder (to 64^3)", (2, 64, 32, 32, 32)),
             ("LightM-UNet decoder (to 32^3)", (2, 128, 16, 16, 16))]
# 1x1x1 convs with narrow widths: (where, map shape, out channels, bias)
PW_SHAPES = [("LightM-UNet convInit 1 -> 32 (128^3)", (2, 1, 128, 128, 128), 32, False),
             ("LightM-UNet conv_final 32 -> 3 (128^3)", (2, 32, 128, 128, 128), 3, True)]


def fwd_bwd_ms(fn, *shape_and_params, channels_last=False):
    x = torch.randn(*shape_and_params[0], device="cuda")
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    x.requires_grad_()
    params = [p.cuda().requires_grad_() for p in shape_and_params[1:]]
    gy = torch.randn_like(fn(x, *params))

    def run():
        fn(x, *params).backward(gy)
    return do_bench(run, warmup=5, rep=40), gpu_ms(run)


def gpu_ms(run, n=5):
    """GPU kernel time of one run() (torch.profiler, summed over the kernels): what the op costs inside a GPU-bound
    training step, where the host's launch work overlaps earlier kernels. do_bench's wall time of an isolated call
    is the host's issue time instead wherever that is longer."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            run()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA) / (1e3 * n)


def cases():
    """(where, tensor shape, PyTorch fn, [(op, project fn), ...], parameters, channels-last input) per measurement;
    the PyTorch time is measured once per case."""
    for label, L, d, c in SHAPES:
        ln_w, ln_b = torch.randn(c), torch.randn(c)
        yield label, (2, L, d), _conv_torch, [("conv1d(K=4) + SiLU", causal_conv1d_silu_triton)], \
            (0.5 * torch.randn(d, 1, 4), torch.randn(d)), False
        yield label, (2, L, c), lambda x, g, b, c=c: F.layer_norm(x, (c,), g, b), \
            [("LayerNorm", lambda x, g, b: layer_norm_triton(x, g, b, 1e-5))], (ln_w, ln_b), False
        # the token view of a channels-first (b, C, L) map, as LightM-UNet's Mamba layers read it
        yield label, (2, c, L), lambda x, g, b, c=c: F.layer_norm(x.transpose(1, 2), (c,), g, b), \
            [("LayerNorm, channels-first tokens", lambda x, g, b: layer_norm_triton(x.transpose(1, 2), g, b, 1e-5))], \
            (ln_w, ln_b), False
        yield label, (2, c) + (round(L ** (1 / 3)),) * 3, lambda x, g, b: F.group_norm(x, 8, g, b), \
            [("GroupNorm(8), var_mean statistics", lambda x, g, b: _GroupNormFn.apply(x, g, b, 8, 1e-5)),
             ("GroupNorm(8), Triton", lambda x, g, b: group_norm_triton(x, g, b, 8, 1e-5))], (ln_w, ln_b), False
        yield label, (2, c) + (round(L ** (1 / 3)),) * 3, lambda x, g, b: F.relu(F.group_norm(x, 8, g, b)), \
            [("GroupNorm(8) + ReLU, Triton, ReLU separate", lambda x, g, b: F.relu(group_norm_triton(x, g, b, 8))),
             ("GroupNorm(8) + ReLU, Triton, fused", lambda x, g, b: group_norm_triton(x, g, b, 8, relu=True))], \
            (ln_w, ln_b), False
    for label, L, d, c in SHAPES[:2]:  # where the LayerNorm folds (16-128 channels; the GEMMs' persistent form)
        def ln(g, b, c=c):
            return types.SimpleNamespace(weight=g, bias=b, eps=1e-5, normalized_shape=(c,))
        ln_w, ln_b, w_in, w_proj, b_proj = torch.randn(c), torch.randn(c), torch.randn(4 * c, c) / c ** 0.5, \
            torch.randn(2 * c, c) / c ** 0.5, torch.randn(2 * c)
        yield label, (2, c, L), lambda x, g, b, w: linear_split(layer_norm_triton(x.transpose(1, 2), g, b), w, None,
                                                                (w.shape[0],))[0], \
            [("LayerNorm + in_proj, folded", lambda x, g, b, w: linear_split(x.transpose(1, 2), w, None, (w.shape[0],),
                                                                          norm=ln(g, b))[0])], (ln_w, ln_b, w_in), False
        yield label, (2, c, L), lambda x, g, b, w, wb: linear_channels_first(layer_norm_triton(x.transpose(1, 2), g, b),
                                                                             w, wb), \
            [("LayerNorm + proj (channels-first), folded",
              lambda x, g, b, w, wb: linear_channels_first(x.transpose(1, 2), w, wb, norm=ln(g, b)))], \
            (ln_w, ln_b, w_proj, b_proj), False
    for where, shape, k, cl in DW_SHAPES:
        conv = F.conv3d if len(shape) == 5 else F.conv2d
        yield where, shape, lambda x, w, conv=conv, k=k: conv(x, w, None, 1, k // 2, 1, x.shape[1]), \
            [(f"depthwise conv k={k}{', channels-last' if cl else ''}", depthwise_conv_triton)], \
            (0.1 * torch.randn(shape[1], 1, *(k,) * (len(shape) - 2)),), cl
    for where, shape, cout, bias in PW_SHAPES:
        params = (0.1 * torch.randn(cout, shape[1], 1, 1, 1),) + ((torch.randn(cout),) if bias else ())
        yield where, shape, lambda x, w, b=None: F.conv3d(x, w, b), \
            [("1x1x1 conv, Triton GEMM", lambda x, w, b=None: _PointwiseConvFn.apply(x, w, b))], params, False
    for where, shape in UP_SHAPES:
        skip = torch.randn(*shape[:2], *(2 * v for v in shape[2:]))
        yield where, shape, lambda x, s: F.interpolate(x, None, 2.0, "trilinear", False) + s, \
            [("x2 trilinear up-sampling + skip, Triton", lambda x, s: _UpsampleFn.apply(x, s, (2, 2, 2)))], \
            (skip,), False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(pathlib.Path(__file__).resolve().parent))
    ap.add_argument("--only", default="", help="comma-separated words: only the ops whose name contains one")
    args = ap.parse_args()
    only = [w for w in args.only.split(",") if w]
    gpu = torch.cuda.get_device_name()
    lines = ["# Mamba-layer and feature-map ops: project kernels vs PyTorch (fp32, forward + backward)", "",
             f"GPU: {gpu}; torch {torch.__version__}; {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC. Produced by "
             "`python kernels/bench_mixer_ops.py`.", "",
             "| op | where | tensor | PyTorch (ms) | project (ms) | speed-up | PyTorch GPU (ms) | project GPU (ms) "
             "| GPU speed-up |", "|---|---|---|---|---|---|---|---|---|"]
    for where, shape, torch_fn, projects, params, cl in cases():
        if only and not any(w in op + " " + where for op, _ in projects for w in only):
            continue
        t0, k0 = fwd_bwd_ms(torch_fn, shape, *params, channels_last=cl)
        for op, project_fn in projects:
            t1, k1 = fwd_bwd_ms(project_fn, shape, *params, channels_last=cl)
            row = (f"| {op} | {where} | {'x'.join(map(str, shape))} | {t0:.3f} | {t1:.3f} | {t0 / t1:.2f}x "
                   f"| {k0:.3f} | {k1:.3f} | {k0 / k1:.2f}x |")
            print(row, flush=True)
            lines.append(row)
    out = pathlib.Path(args.out) / "BENCHMARK_mixer_ops.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
