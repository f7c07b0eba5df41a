"""Compile the scan kernels for a Hopper GPU on any machine and show what the GPU would run.

    python kernels/inspect_sass.py [--kernels chunk,bsum,bwd,carry,linear] [--spread 0|1] [--dt-done 0|1]
                                   [--bwd-maxnreg N] [--out DIR]

Uses the Triton on ``sys.path`` (put the GPU's version first: layouts differ between versions) and its bundled ptxas
and cuobjdump; needs no GPU. The arguments are those of one channels-last fp32 call at (2, 64, 64^3), N = 16,
specialised as Triton specialises them at launch: integers divisible by 16 are marked so, integers equal to 1 become
constants (except the ``do_not_specialize`` ones), pointers are 16-byte aligned. Without that specialisation the
layouts differ (docs/kernels.md, "Layout"). Prints, per kernel: registers and spills, the TTGIR register layouts,
and the SASS instruction mix of its longest loops (the step loops) with their barriers (each layout
conversion through shared memory costs one). Writes TTGIR, PTX and SASS to --out.

``--kernels linear``: the projections' persistent GEMM (kernels/linear_triton.py) in the forms LightM-UNet's 128^3
layers launch (``LINEAR``), with the tiles, warps and stages ``_config`` picks for the H100 / H200's shared memory:
plain, accumulating, with a LayerNorm folded into its prologue or its epilogue. Session 20 found the accumulating
form's spills this way (324 bytes on 4 warps, none on 8).
"""
from __future__ import annotations

import argparse
import collections
import inspect
import os
import pathlib
import re
import subprocess
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from nnunet_mamba.kernels import selective_scan_triton as sst  # noqa: E402

BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
b, d, L, N = 2, 64, 64 ** 3, 16
T = 512
n_chunks = L // T
# one channels-last call: (b, d, L) tensors with the channel axis fastest, B/C (b, N, L) with n fastest
INTS = dict(L=L, d=d, dg=d, N=N, RK=1, n_chunks=n_chunks, cbg=d // 32, one=1, T=T, hf_rs=b * N * d,
            Q1=0, Q2=0, R0=0, R1=0, R2=0, s_pc=b * L * 2 * N, s_pb=L * 2 * N, s_pg=L * 2 * N, s_pl=2 * N,
            s_pr=(N + 2) * d, KG=16, n_groups=n_chunks // 16)
for t in ("u", "d", "z", "o", "g", "gu", "gd", "gz"):
    INTS.update({f"s_{t}b": L * d, f"s_{t}d": 1, f"s_{t}l": d})
for t in ("B", "C"):
    INTS.update({f"s_{t}b": N * L, f"s_{t}g": N * L, f"s_{t}n": 1, f"s_{t}l": N})
FLAGS = dict(HAS_MAP=False, FLIP=False, ACCUM=False, GU_ACCUM=False, B_VAR=True, C_VAR=True, HAS_D=True, HAS_Z=True,
             HAS_BIAS=True, SOFTPLUS=True, DT_DONE=False, DT_OUT=False, DT_LOW=False, BR=1, BD=32, BN=16, U=4)


def loop_mix(sass: str, top: int = 2) -> list[str]:
    """Instruction counts of the `top` longest backward-branch loops of a SASS listing."""
    ins = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loops = []
    for addr, text in ins:
        target = re.search(r"BRA.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            loops.append((int(target.group(1), 16), addr))
    out = []
    for lo, hi in sorted(loops, key=lambda x: x[0] - x[1])[:top]:
        ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0] for a, t in ins if lo <= a <= hi)
        bars = sum(v for k, v in ops.items() if k.startswith("BAR"))  # layout conversions through shared memory
        out.append(f"  loop {lo:#x}-{hi:#x}: {sum(ops.values())} instructions, {bars} barriers; "
                   + ", ".join(f"{k} {v}" for k, v in ops.most_common(14)))
    return out


def compile_kernel(fn, constexprs: dict, num_warps: int, tag: str, out: pathlib.Path, maxnreg: int | None = None,
                   ints: dict | None = None):
    """Compile ``fn`` (under @cached_launch) for sm_90 with these constexprs and integer arguments (default: the
    scan's INTS; float arguments given as floats there), and print its registers, spills, layouts and loop mix."""
    fn = fn.jit  # the @triton.jit function under @cached_launch
    ints = INTS if ints is None else ints
    names = list(inspect.signature(fn.fn).parameters)
    constexprs = {k: v for k, v in constexprs.items() if k in names}
    keep = {names[i] if isinstance(i, int) else i for i in fn.do_not_specialize}
    sig, attrs, consts = {}, {}, dict(constexprs)
    for i, a in enumerate(names):
        if a in constexprs:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a], attrs[(i,)] = "*fp32", [["tt.divisibility", 16]]
        elif isinstance(ints[a], float):
            sig[a] = "fp32"
        elif ints[a] == 1 and a not in keep:
            sig[a], consts[a] = "constexpr", 1
        else:
            sig[a] = "i32"
            if ints[a] % 16 == 0 and a not in keep:
                attrs[(i,)] = [["tt.divisibility", 16]]
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, **({"maxnreg": maxnreg} if maxnreg else {})))
    for ext in ("ttgir", "ptx"):
        (out / f"{tag}.{ext}").write_text(k.asm[ext])
    (out / f"{tag}.cubin").write_bytes(k.asm["cubin"])
    ptxas = subprocess.run([BIN / "ptxas", "-v", "--gpu-name=sm_90a", out / f"{tag}.ptx", "-o", os.devnull],
                           capture_output=True, text=True).stderr
    sass = subprocess.run([BIN / "cuobjdump", "-sass", out / f"{tag}.cubin"], capture_output=True, text=True).stdout
    (out / f"{tag}.sass").write_text(sass)
    regs = re.findall(r"Used (\d+) registers", ptxas)
    spills = re.findall(r"(\d+) bytes spill stores", ptxas)
    print(f"{tag}: {regs[0] if regs else '?'} registers, {spills[0] if spills else '?'} bytes spilled")
    for line in k.asm["ttgir"].splitlines():
        if line.startswith(("#blocked", "#linear")):
            print("  ", line[:150])
    print("\n".join(loop_mix(sass)))


# LightM-UNet's products at 128^3 on the persistent GEMM (kernels/linear_triton.py), as ops.linear launches them per
# batch element (M = 128^3 rows) or over both (2 x 128^3): (tag, M, K, N, x strides, y strides, xn strides, flags)
L1 = 128 ** 3
LINEAR = [
    ("x_proj dgrad (34 -> 64)", 2 * L1, 34, 64, (34, 1), (64, 1), (64, 1), {}),
    ("x_proj dgrad accumulating into du", 2 * L1, 34, 64, (34, 1), (64, 1), (64, 1), dict(ACCUM=True)),
    ("in_proj fwd, LayerNorm folded (channels-first x)", L1, 32, 128, (1, L1), (128, 1), (128, 1), dict(NORM=True)),
    ("in_proj dgrad block, LayerNorm backward", L1, 64, 32, (128, 1), (1, L1), (1, L1), dict(NORM_BWD=True)),
    ("in_proj dgrad block, LayerNorm backward, accumulating", L1, 64, 32, (128, 1), (1, L1), (1, L1),
     dict(NORM_BWD=True, ACCUM=True)),
]
SM90_SMEM = 232448  # shared memory one program may use on the H100 / H200, which _config sizes the pipeline by


def compile_linear(out: pathlib.Path):
    from nnunet_mamba.kernels import linear_triton as lt
    lt.smem_bytes = lambda device, cpu=0: SM90_SMEM  # _config as on the GPU
    for i, (tag, M, K, N, (sxm, sxk), (sym, syn), (snm, snk), flags) in enumerate(LINEAR):
        cfg = lt._config(K, N, torch.device("cpu"), accumulate=flags.get("ACCUM", False))
        warps = cfg.pop("num_warps")
        cfg["STAGES"] = cfg.pop("num_stages")
        cfg.pop("stream")
        consts = dict(HAS_BIAS=flags.get("NORM", False), ACCUM=False, RESID=False, NORM=False, NORM_BWD=False,
                      PREC="tf32x3", KSTEPS=triton.cdiv(K, cfg["BK"]), **cfg)
        consts.update(flags)
        ints = dict(M=M, N=N, K=K, s_xm=sxm, s_xk=sxk, s_wk=N, s_wn=1, s_ym=sym, s_yn=syn, s_rm=sym, s_rn=syn,
                    s_nm=snm, s_nk=snk, eps=1e-5, inv_n=1.0 / K)
        print(f"linear{i}: {tag}: M={M} K={K} N={N}, {warps} warps, tiles {cfg}")
        compile_kernel(lt._mm_stream_kernel, consts, warps, f"linear{i}", out, ints=ints)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernels", default="chunk,bsum,bwd,carry")
    ap.add_argument("--spread", type=int, default=1, help="SPREAD constexpr (1: the default for N >= 9)")
    ap.add_argument("--out", default="/tmp/inspect_sass")
    ap.add_argument("--dt-done", type=int, default=1,
                    help="DT_DONE constexpr of bsum/bwd and the output pass (1: dt read from the scan's own buffer, "
                         "the default for an fp32 delta with softplus; 0: softplus formed in every pass)")
    ap.add_argument("--bwd-maxnreg", type=int, default=None,
                    help="a register cap for _bwd_kernel (set_tuning's bwd_maxnreg): the spills it costs")
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"triton {triton.__version__} from {pathlib.Path(triton.__file__).parent}; sm_90; (b, d, L, N) = "
          f"({b}, {d}, {L}, {N}), chunks of {T}")
    f = dict(FLAGS, SPREAD=bool(args.spread), DT_DONE=bool(args.dt_done))
    for name in args.kernels.split(","):
        if name == "chunk":
            compile_kernel(sst._chunk_kernel, dict(f, OUT=True, SAVE_LAST=False, STAGES=3, SEG=0), 1, "chunk", out)
        elif name == "bsum":
            compile_kernel(sst._bsum_kernel, dict(f, STAGES=3), 1, "bsum", out)
        elif name == "bwd":
            compile_kernel(sst._bwd_kernel, dict(f, F=2, SF=1, STAGES=4, OUTER_STAGES=4, WALKED=False), 1, "bwd",
                           out, args.bwd_maxnreg)
        elif name == "carry":
            for summary in (True, False):  # a group's composite; the walk from the composites
                compile_kernel(sst._carry_kernel, dict(REV=True, HAS_INIT=True, SUMMARY=summary, BD=32, BNC=4, KC=8,
                                                       STAGES=3), 1, f"carry{'_summary' if summary else ''}", out)
        elif name == "linear":
            compile_linear(out)
        else:
            raise SystemExit(f"unknown kernel {name!r}: chunk, bsum, bwd, carry, linear")


if __name__ == "__main__":
    main()
