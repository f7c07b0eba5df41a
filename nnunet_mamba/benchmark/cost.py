"""Cost benchmark: parameters, FLOPs, training-step time, peak memory and inference time of nnU-Net trainers.

Each trainer is built exactly as ``nnUNetv2_train`` builds it (its constructor and ``initialize()``: network,
optimiser, loss, deep supervision, AMP or fp32 recipe, ``torch.compile`` where the trainer compiles), on the
plans given; no data is read (``initialize()`` is told there is no dataset class to infer). Then:

1. FLOPs of one inference forward pass at batch 1 (deep supervision off, ``flops.count_flops``).
2. Inference: forward of one patch at batch 1 as nnU-Net's predictor runs it (no gradients, autocast on CUDA,
   deep supervision off); time and peak memory.
3. Training: ``trainer.train_step`` - the trainer's own step (forward, loss, backward, gradient clipping,
   optimiser step, with its GradScaler/autocast or fp32 setting) - on a random batch of the plan's batch size
   and patch size already on the device (data loading and augmentation are not included); time and peak memory.

A trainer that cannot be built or run is reported with its error.
"""
from __future__ import annotations

import contextlib
import gc
import io
import os
import platform
import tempfile
import traceback
from datetime import datetime, timezone
from typing import Callable, Optional, Sequence
from unittest import mock

import torch
import torch.nn.functional as F

from ..ops import available_backends
from ..ops.scan import record_scans
from .flops import count_flops
from .measure import MEMORY_KIND, PeakMemory, time_calls
from .report import Column, fmt_millions, fmt_num, scatter_plot, write_outputs
from .selection import PlansSource, TrainerSpec, find_trainer_class

COLUMNS = [
    Column("label", "trainer"),
    Column("network", "network"),
    Column("params", "params (M)", fmt_millions),
    Column("gflops", "GFLOPs conv+matmul", fmt_num(1)),
    Column("scan_gflops", "GFLOPs scan (analytic)", fmt_num(2)),
    Column("patch_size", "patch", lambda v: "x".join(str(x) for x in v)),
    Column("batch_size", "batch"),
    Column("precision", "precision"),
    Column("train_step_ms", "train step (ms)", fmt_num(1)),
    Column("train_peak_mb", "train peak mem (MiB)", fmt_num(0)),
    Column("infer_ms", "inference (ms/patch)", fmt_num(1)),
    Column("infer_peak_mb", "inference peak mem (MiB)", fmt_num(0)),
    Column("scan_backend", "scan backend"),
    Column("error", "error", lambda v: v if len(v) <= 160 else v[:157] + "..."),
]

NOTES = """\
GFLOPs: one forward pass at batch 1 (inference network, deep supervision off), convolutions and matrix products
counted by torch.utils.flop_counter at 2 FLOPs per multiply-add; the selective scan is excluded there and given
analytically in its own column (9*b*d*L*N + b*d*L per D term + b*d*L per z gate, forward). Train step: the
trainer's own train_step (forward, loss, backward, clipping, optimiser step) at the plan's batch size, median of
the timed steps after warm-up, data already on the device. Inference: one patch at batch 1, no gradients,
autocast on CUDA (as nnU-Net's predictor), median. Peak memory: see the memory column's kind in cost.json."""


def _print(msg: str):
    print(f"[benchmark] {msg}", flush=True)


@contextlib.contextmanager
def _trainer_environment(results_dir: str, compile_networks: bool):
    """Trainer logs into a scratch nnUNet_results; no dataset class inferred; nnUNet_compile set if compile is off."""
    saved = {k: os.environ.get(k) for k in ("nnUNet_results", "nnUNet_compile")}
    os.environ["nnUNet_results"] = results_dir
    if not compile_networks:
        os.environ["nnUNet_compile"] = "false"
    try:
        with mock.patch("nnunetv2.training.nnUNetTrainer.nnUNetTrainer.infer_dataset_class", lambda folder: None):
            yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def build_trainer(cls, plans: dict, configuration: str, dataset_json: dict, device: torch.device):
    """Construct and initialise a trainer as nnUNetv2_train does (fold 0); its console output is swallowed."""
    plans = dict(plans, continue_training=False)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        trainer = cls(plans=plans, configuration=configuration, fold=0, dataset_json=dataset_json, device=device)
        trainer.initialize()
    return trainer


def _unwrap(network: torch.nn.Module) -> torch.nn.Module:
    return getattr(network, "_orig_mod", network)


def random_batch(trainer, batch_size: int, patch_size: Sequence[int], device: torch.device) -> dict:
    """A batch shaped as nnU-Net's data loader delivers it to ``train_step`` (deep-supervision targets included)."""
    lm = trainer.label_manager
    data = torch.randn(batch_size, trainer.num_input_channels, *patch_size, device=device)
    if lm.has_regions:
        seg = (torch.rand(batch_size, len(lm.foreground_regions), *patch_size, device=device) > 0.5).float()
    else:
        seg = torch.randint(0, lm.num_segmentation_heads, (batch_size, 1, *patch_size), device=device).float()
    if not trainer.enable_deep_supervision:
        return {"data": data, "target": seg}
    scales = trainer._get_deep_supervision_scales()
    targets = []
    for s in scales:
        size = [int(round(p * f)) for p, f in zip(patch_size, s)]
        targets.append(seg if list(size) == list(patch_size) else F.interpolate(seg, size=size, mode="nearest"))
    return {"data": data, "target": targets}


def _precision(trainer, device: torch.device) -> str:
    if device.type != "cuda":
        return "fp32"  # nnU-Net never autocasts on the CPU
    recipe = getattr(type(trainer), "recipe", None)
    amp = recipe.amp if recipe is not None else trainer.grad_scaler is not None
    return "AMP (fp16)" if amp else "fp32"


def _short_error(e: BaseException) -> str:
    msg = f"{type(e).__name__}: {e}".strip()
    if isinstance(e, torch.cuda.OutOfMemoryError):
        msg = "CUDA out of memory (compare at a smaller batch with --batch-size)"
    lines = msg.splitlines()
    return lines[0][:400] + (" ..." if len(lines) > 1 or len(lines[0]) > 400 else "")


def measure_trainer(spec: TrainerSpec, source: PlansSource, configuration: str, device: torch.device,
                    batch_size: Optional[int] = None, warmup: int = 3, repeats: int = 10,
                    compile_networks: bool = True, progress: Callable[[str], None] = _print,
                    log: Optional[io.TextIOBase] = None) -> dict:
    """One row of the cost table (``status`` 'ok' or 'error' with ``error``)."""
    row: dict = {"label": spec.label, "trainer": spec.trainer, "plans": spec.plans, "configuration": configuration,
                 "device": str(device), "status": "error", "error": None}
    phase = "lookup"
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net's lookup narrates its search
            cls = find_trainer_class(spec.trainer)
        phase = "plans"
        plans = source.load_plans(spec.plans)
        if configuration not in plans.get("configurations", {}):
            raise KeyError(f"configuration {configuration!r} is not in {spec.plans} "
                           f"(has: {', '.join(plans.get('configurations', {}))})")
        phase = "build"
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory(prefix="nnunet_mamba_bench_") as scratch, \
                _trainer_environment(scratch, compile_networks):
            trainer = build_trainer(cls, plans, configuration, source.dataset_json, device)
        net = _unwrap(trainer.network)
        patch = [int(p) for p in trainer.configuration_manager.patch_size]
        bs = batch_size or trainer.batch_size
        row.update(network=type(net).__name__, params=sum(p.numel() for p in net.parameters()),
                   patch_size=patch, batch_size=bs, precision=_precision(trainer, device),
                   compiled=net is not trainer.network, deep_supervision=bool(trainer.enable_deep_supervision))
        progress(f"{spec.label}: built {row['network']}, {row['params'] / 1e6:.2f} M parameters, patch "
                 f"{'x'.join(map(str, patch))}, batch {bs}, {row['precision']}"
                 + (", torch.compile" if row["compiled"] else ""))

        phase = "FLOP count"
        trainer.set_deep_supervision_enabled(False)
        net.eval()
        x1 = torch.randn(1, trainer.num_input_channels, *patch, device=device)
        fc = count_flops(net, x1)
        row.update(gflops=fc.conv_matmul / 1e9, scan_gflops=fc.scan / 1e9, scan_calls=len(fc.scan_calls))
        progress(f"{spec.label}: {row['gflops']:.2f} GFLOPs conv+matmul, {row['scan_gflops']:.3f} GFLOPs scan "
                 f"({len(fc.scan_calls)} scan calls)")

        phase = "inference"
        autocast = (lambda: torch.autocast("cuda")) if device.type == "cuda" else contextlib.nullcontext

        def infer():
            with torch.no_grad(), autocast():
                return net(x1)

        backends = set(fc.backends)
        with record_scans() as calls, PeakMemory(device) as mem:
            t = time_calls(infer, device, warmup, repeats)
        backends |= {c.backend for c in calls}
        row.update(infer_ms=t.median_ms, infer_ms_min=t.min_ms, infer_peak_mb=mem.mb)
        progress(f"{spec.label}: inference {t.median_ms:.1f} ms/patch (median of {repeats})")

        phase = "training step"
        trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
        trainer.network.train()
        batch = random_batch(trainer, bs, patch, device)
        with record_scans() as calls, PeakMemory(device) as mem:
            t = time_calls(lambda: trainer.train_step(batch), device, warmup, repeats)
        backends |= {c.backend for c in calls}
        row.update(train_step_ms=t.median_ms, train_step_ms_min=t.min_ms, train_peak_mb=mem.mb,
                   repeats=repeats, warmup=warmup)
        progress(f"{spec.label}: training step {t.median_ms:.1f} ms (median of {repeats}), peak memory "
                 + (f"{mem.mb:,.0f} MiB" if mem.mb is not None else "n/a"))
        row["scan_backend"] = "+".join(sorted(backends)) if backends else "none"
        row["status"] = "ok"
    except Exception as e:  # reported in the table, the benchmark goes on
        row["error"] = f"{phase}: {_short_error(e)}"
        progress(f"{spec.label}: FAILED at {phase} - {row['error']}")
        if log is not None:
            log.write(f"=== {spec.label} ({phase})\n{traceback.format_exc()}\n")
    return row


def _free(device: torch.device):
    """Release what the last trainer held (called after ``measure_trainer`` returned, its frame gone)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def environment_info(device: torch.device) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def v(pkg):
        try:
            return version(pkg)
        except PackageNotFoundError:
            return None

    info = {"device": str(device), "torch": torch.__version__, "nnunetv2": v("nnunetv2"),
            "mamba_ssm": v("mamba-ssm"), "triton": v("triton"), "python": platform.python_version(),
            "host": platform.node(), "cpu_count": os.cpu_count(),
            "scan_backends_available": available_backends(device),
            "memory_kind": MEMORY_KIND[device.type if device.type in MEMORY_KIND else "cpu"],
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    return info


def run_cost(specs: Sequence[TrainerSpec], source: PlansSource, configuration: str, device: torch.device,
             out_dir: str, batch_size: Optional[int] = None, warmup: int = 3, repeats: int = 10,
             compile_networks: bool = True, notes: Sequence[str] = (), plot: bool = True) -> dict:
    """Measure every spec; writes cost.{md,csv,json,png} (tables rewritten after each trainer); returns the JSON."""
    os.makedirs(out_dir, exist_ok=True)
    if device.type == "cuda":  # as nnUNetv2_train and nnUNetv2_predict do: cuDNN picks its algorithms by timing
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.deterministic = False
    meta = {"benchmark": "cost", "plans_source": source.description, "dataset": source.dataset_name,
            "configuration": configuration, "batch_size_override": batch_size, "warmup": warmup,
            "repeats": repeats, "compile": "as the trainer does (nnUNet_compile honoured)" if compile_networks
            else "off (nnUNet_compile=false)", "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "notes": list(notes), **environment_info(device)}
    if not specs:
        raise ValueError("no trainers to benchmark")
    rows: list[dict] = []
    log_path = os.path.join(out_dir, "cost_errors.log")
    with open(log_path, "w") as log:
        for i, spec in enumerate(specs, 1):
            _print(f"({i}/{len(specs)}) {spec.label} on {spec.plans} {configuration}, {device}")
            rows.append(measure_trainer(spec, source, configuration, device, batch_size, warmup, repeats,
                                        compile_networks, log=log))
            _free(device)
            paths = write_outputs(out_dir, "cost", rows, COLUMNS, meta, NOTES)
    if plot:
        pts = [dict(r, params_m=r["params"] / 1e6) for r in rows if r["status"] == "ok"]
        png = scatter_plot(os.path.join(out_dir, "cost.png"), pts, "params_m", "train_step_ms",
                           "parameters (M)", "training step (ms)",
                           f"{source.dataset_name} {configuration} on {meta.get('gpu', device)}",
                           size="train_peak_mb", size_label="training peak memory", logx=True, logy=True)
        if png:
            paths["png"] = png
    if not any(r["status"] == "error" for r in rows):
        os.remove(log_path)
    else:
        paths["errors"] = log_path
    return {"meta": meta, "rows": rows, "paths": paths}


def print_table(result: dict):
    from .report import markdown_table

    print()
    print(markdown_table(result["rows"], COLUMNS))
    print()
    for k, p in result["paths"].items():
        print(f"{k}: {p}")


def load_cost_rows(path: str) -> dict:
    """{(trainer, plans): row} of a cost.json, for the accuracy table."""
    import json

    with open(path) as f:
        data = json.load(f)
    if data.get("meta", {}).get("benchmark") != "cost":
        raise ValueError(f"{path} is not a cost benchmark JSON (meta.benchmark != 'cost')")
    return {(r["trainer"], r["plans"]): r for r in data["rows"]}
