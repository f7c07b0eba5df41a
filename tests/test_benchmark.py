"""``nnunet-mamba benchmark``: FLOP counting, the cost table and the accuracy table on a tiny synthetic dataset.

The dataset (2D 32^2, 6 cases) is planned by nnU-Net's own planners (default and ResEnc M). Its plan has 3
downsampling steps: LightM-UNet (3 steps) builds, nnMamba (4 steps) cannot - an error row.
"""
import csv
import json
import os

import pytest
import torch
import torch.nn as nn

from helpers import n_params
from nnunet_mamba.benchmark.accuracy import average_folds, fold_state, plan_run, read_summary, run_accuracy
from nnunet_mamba.benchmark.cost import run_cost
from nnunet_mamba.benchmark.flops import count_flops
from nnunet_mamba.benchmark.selection import TrainerSpec, expand_specs, plans_from_dataset
from nnunet_mamba.cli import main as cli_main

DATASET_ID = 993
CONFIG = "2d"


# ---------------------------------------------------------------------------------------------------------------
# FLOP counting (no nnU-Net)

def test_conv3d_flops_match_the_closed_form():
    conv = nn.Conv3d(2, 4, 3, padding=1)
    fc = count_flops(conv, torch.randn(1, 2, 6, 7, 8))
    assert fc.conv_matmul == 2 * 2 * 4 * 27 * (6 * 7 * 8)
    assert fc.scan == 0 and fc.scan_calls == []


def test_scan_is_excluded_from_the_counted_flops_and_counted_analytically(monkeypatch):
    from nnunet_mamba.modules.mamba import Mamba
    from nnunet_mamba.ops import token_ops

    torch.manual_seed(0)
    m = Mamba(16, d_state=8)
    b, L, dm, di, R, N, k = 2, 20, 16, m.d_inner, m.dt_rank, 8, 4
    fc = count_flops(m, torch.randn(b, L, dm))
    # in_proj, depthwise conv1d (output length L + k - 1), x_proj, dt_proj, out_proj - and nothing of the scan
    expected = b * (2 * L * dm * 2 * di + 2 * di * k * (L + k - 1) + 2 * L * di * (R + 2 * N) + 2 * L * R * di
                    + 2 * L * di * dm)
    assert fc.conv_matmul == expected
    assert fc.scan == 9 * b * di * L * N + b * di * L + b * di * L  # with the D skip and the z gate
    assert fc.backends == ["torch"] and len(fc.scan_calls) == 1
    # the conv is counted on its PyTorch backend even where another one is forced (Triton: invisible to the counter)
    monkeypatch.setenv(token_ops.ENV_BACKEND, "triton")
    assert count_flops(m, torch.randn(b, L, dm)).conv_matmul == expected
    assert os.environ[token_ops.ENV_BACKEND] == "triton"


@pytest.mark.parametrize("setting, plans, params, gflops", [
    ("3d", "nnUNetPlans", 31_196_399, 954.7), ("3d", "nnUNetResEncUNetMPlans", 102_350_575, 1435.1),
    ("2d", "nnUNetPlans", 46_326_581, 119.3), ("2d", "nnUNetResEncUNetMPlans", 140_019_061, 260.3)])
def test_committed_reference_plans_give_the_published_baseline_counts(setting, plans, params, gflops):
    """benchmarks/plans/ (nnU-Net's planners on the synthetic reference datasets) reproduce the baselines of
    specs/reference-numbers.md: parameters exactly, GFLOPs (counted on the meta device, no compute) within 0.1 %
    (measured here: 954.60, 1434.94, 119.20, 260.25; the reference does not state its counter's small terms)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    root = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "plans", setting)
    pm = PlansManager(os.path.join(root, plans + ".json"))
    cm = pm.get_configuration("3d_fullres" if setting == "3d" else "2d")
    assert list(cm.patch_size) == ([128] * 3 if setting == "3d" else [512] * 2)
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, False)
    assert n_params(net) == params
    fc = count_flops(net.to("meta"), torch.zeros(1, 1, *cm.patch_size, device="meta"))
    assert fc.conv_matmul / 1e9 == pytest.approx(gflops, rel=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# accuracy bookkeeping (no training)

def test_fold_state_decides_skip_validate_resume_train(tmp_path):
    f = tmp_path / "fold_0"
    assert fold_state(str(f)) == "train"
    f.mkdir()
    (f / "checkpoint_latest.pth").write_bytes(b"")
    assert fold_state(str(f)) == "resume"
    (f / "checkpoint_final.pth").write_bytes(b"")
    assert fold_state(str(f)) == "validate"
    (f / "validation").mkdir()
    (f / "validation" / "summary.json").write_text("{}")
    assert fold_state(str(f)) == "done"


def _summary(folder, dice: dict, epochs=None):
    os.makedirs(os.path.join(folder, "validation"), exist_ok=True)
    s = {"mean": {k: {"Dice": v} for k, v in dice.items()},
         "foreground_mean": {"Dice": sum(dice.values()) / len(dice)}, "metric_per_case": [{}, {}]}
    with open(os.path.join(folder, "validation", "summary.json"), "w") as f:
        json.dump(s, f)
    if epochs is not None:
        with open(os.path.join(folder, "debug.json"), "w") as f:
            json.dump({"num_epochs": str(epochs), "num_iterations_per_epoch": "250"}, f)


def test_summaries_are_read_with_class_names_and_averaged_over_folds(tmp_path):
    names = {"1": "liver", "2": "tumour"}
    _summary(str(tmp_path / "fold_0"), {"1": 0.9, "2": 0.5}, epochs=5)
    _summary(str(tmp_path / "fold_1"), {"1": 0.7, "2": 0.3})
    r0 = read_summary(str(tmp_path / "fold_0"), names)
    r1 = read_summary(str(tmp_path / "fold_1"), names)
    assert r0["dice_liver"] == 0.9 and r0["dice_tumour"] == 0.5 and r0["mean_dice"] == pytest.approx(0.7)
    assert r0["epochs"] == 5 and r0["iterations_per_epoch"] == 250 and r0["n_validation_cases"] == 2
    avg = average_folds([dict(r0, status="ok"), dict(r1, status="ok"), {"status": "error"}])
    assert avg["n_folds"] == 2
    assert avg["dice_liver"] == pytest.approx(0.8) and avg["dice_tumour"] == pytest.approx(0.4)
    assert avg["mean_dice"] == pytest.approx(0.6)
    assert (avg["mean_dice_min"], avg["mean_dice_max"]) == (pytest.approx(0.5), pytest.approx(0.7))


def test_training_length_reaches_plugin_trainers_by_environment_and_baselines_by_class():
    p = plan_run(TrainerSpec("nnUNetTrainerLightMUNet", "nnUNetPlans"), 3, 7, None)
    assert p.run_trainer == "nnUNetTrainerLightMUNet"
    assert p.env == {"NNUNET_MAMBA_EPOCHS": "3", "NNUNET_MAMBA_ITERATIONS": "7", "NNUNET_MAMBA_VAL_ITERATIONS": None}
    base = TrainerSpec("nnUNetTrainer", "nnUNetResEncUNetMPlans")
    assert plan_run(base, 5, None, None).run_trainer == "nnUNetTrainer_5epochs"
    assert plan_run(base, 1, None, None).run_trainer == "nnUNetTrainer_1epoch"
    assert plan_run(base, 1000, None, None).run_trainer == "nnUNetTrainer"
    assert plan_run(base, None, None, None).run_trainer == "nnUNetTrainer"
    assert "250 training" in plan_run(base, 5, 2, None).note
    with pytest.raises(ValueError, match="no nnUNetTrainer variant with 7 epochs"):
        plan_run(base, 7, None, None)


# ---------------------------------------------------------------------------------------------------------------
# a real tiny dataset planned by nnU-Net

@pytest.fixture(scope="module")
def tiny(nnunet_dirs):
    from nnunet_mamba.benchmark.plans import plan_synthetic

    return plan_synthetic(DATASET_ID, (32, 32), "BenchTiny", n_cases=6)


def _plans(folder, identifier):
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(os.path.join(folder, identifier + ".json"))
    return pm, pm.get_configuration(CONFIG)


def _conv_flops_by_hooks(net, x):
    """Independent count: 2 * C_in/groups * C_out * prod(kernel) per output voxel of every conv (per input voxel
    for transposed convs, whose weight is (C_in, C_out/groups, k...))."""
    total = [0]

    def hook(mod, inp, out):
        k = 1
        for s in mod.kernel_size:
            k *= s
        if isinstance(mod, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
            total[0] += 2 * mod.in_channels * mod.out_channels // mod.groups * k * inp[0][0, 0].numel()
        else:
            total[0] += 2 * mod.in_channels // mod.groups * mod.out_channels * k * out[0, 0].numel()

    hooks = [m.register_forward_hook(hook) for m in net.modules()
             if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d))]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return total[0]


def test_cost_table(tiny, tmp_path):
    from nnunet_mamba.trainers import nnUNetTrainerLightMUNet
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    source = plans_from_dataset(str(DATASET_ID))
    notes = []
    specs = expand_specs(["nnUNetTrainerLightMUNet", "baselines", "nnUNetTrainerNnMamba", "NoSuchTrainer"], source,
                         notes)
    assert [s.label for s in specs] == ["nnUNetTrainerLightMUNet", "nnUNetTrainer", "nnUNetTrainer ResEnc M",
                                        "nnUNetTrainerNnMamba", "NoSuchTrainer"]
    assert any("nnUNetResEncUNetLPlans" in n for n in notes)  # L not planned: said, not silently dropped
    out = str(tmp_path / "cost")
    result = run_cost(specs, source, CONFIG, torch.device("cpu"), out, warmup=0, repeats=1, notes=notes)
    rows = {r["label"]: r for r in result["rows"]}
    lightm, plain, resenc = rows["nnUNetTrainerLightMUNet"], rows["nnUNetTrainer"], rows["nnUNetTrainer ResEnc M"]

    for r in (lightm, plain, resenc):
        assert r["status"] == "ok", r["error"]
        assert r["train_step_ms"] > 0 and r["infer_ms"] > 0 and r["gflops"] > 0
        assert r["precision"] == "fp32" and r["patch_size"] == [32, 32]

    # parameter counts equal those of the networks built independently from the same plans
    for r, cls, identifier in ((lightm, nnUNetTrainerLightMUNet, "nnUNetPlans"), (plain, nnUNetTrainer, "nnUNetPlans"),
                               (resenc, nnUNetTrainer, "nnUNetResEncUNetMPlans")):
        pm, cm = _plans(source.folder, identifier)
        net = cls.build_network_architecture(pm, cm, 1, 3, False)
        assert r["params"] == n_params(net), r["label"]
        assert r["batch_size"] == cm.batch_size
    assert (plain["network"], resenc["network"], lightm["network"]) == ("PlainConvUNet", "ResidualEncoderUNet",
                                                                         "LightMUNet")
    # GFLOPs of the plain conv net equal an independent per-layer count
    pm, cm = _plans(source.folder, "nnUNetPlans")
    net = nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, False).eval()
    assert plain["gflops"] * 1e9 == pytest.approx(_conv_flops_by_hooks(net, torch.randn(1, 1, 32, 32)), rel=1e-9)
    # the scan: analytic count and backend for the Mamba network only
    assert lightm["scan_gflops"] > 0 and lightm["scan_backend"] == "torch"
    assert plain["scan_gflops"] == 0 and plain["scan_backend"] == "none"

    # trainers that cannot be built are rows with their error
    assert rows["nnUNetTrainerNnMamba"]["status"] == "error"
    assert "nnMamba" in rows["nnUNetTrainerNnMamba"]["error"] and "4" in rows["nnUNetTrainerNnMamba"]["error"]
    assert "no trainer named 'NoSuchTrainer'" in rows["NoSuchTrainer"]["error"]

    # the files: Markdown, CSV and JSON with the same rows, a PNG
    md = open(os.path.join(out, "cost.md")).read()
    assert "| nnUNetTrainerNnMamba |" in md and "GFLOPs scan (analytic)" in md
    with open(os.path.join(out, "cost.csv")) as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["label"] for r in csv_rows] == [r["label"] for r in result["rows"]]
    assert int(csv_rows[0]["params"]) == lightm["params"]
    data = json.load(open(os.path.join(out, "cost.json")))
    assert data["meta"]["device"] == "cpu" and data["rows"] == json.loads(json.dumps(result["rows"]))
    with open(os.path.join(out, "cost.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(out, "cost_errors.log"))


def test_cost_command_line_with_a_plans_file(tiny, tmp_path, capsys):
    out = str(tmp_path / "cli")
    rc = cli_main(["benchmark", "cost", "--plans-file", os.path.join(tiny, "nnUNetPlans.json"), "--num-classes", "3",
                   "--num-input-channels", "1", "-c", CONFIG, "-tr", "nnUNetTrainer", "--device", "cpu",
                   "--warmup", "0", "--repeats", "1", "--batch-size", "1", "-o", out, "--strict"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "[benchmark] (1/1) nnUNetTrainer" in printed and "| nnUNetTrainer | PlainConvUNet |" in printed
    row = json.load(open(os.path.join(out, "cost.json")))["rows"][0]
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pm, cm = _plans(tiny, "nnUNetPlans")
    assert row["params"] == n_params(nnUNetTrainer.build_network_architecture(pm, cm, 1, 3, False))
    assert row["batch_size"] == 1


@pytest.mark.slow
def test_accuracy_trains_through_nnunet_then_skips_and_collects(tiny, tmp_path, capsys, monkeypatch):
    """One plugin trainer, 1 epoch of 2 iterations (nnU-Net's own trainers run 250 iterations per epoch: too slow
    for a CPU test; their class mapping is tested above)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess

    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    preprocess([DATASET_ID], "nnUNetPlans", [CONFIG], [1], show_progress_bar=False)
    source = plans_from_dataset(str(DATASET_ID))
    specs = [TrainerSpec("nnUNetTrainerLightMUNet", "nnUNetPlans")]
    out = str(tmp_path / "acc")
    result = run_accuracy(specs, source, CONFIG, [0], out, epochs=1, iterations=2, val_iterations=1, device="cpu")
    (row,) = result["rows"]
    assert row["status"] == "ok", row["error"]
    summary = json.load(open(row["summary_file"]))
    assert row["mean_dice"] == summary["foreground_mean"]["Dice"]
    assert row["dice_class1"] == summary["mean"]["1"]["Dice"] and row["dice_class2"] == summary["mean"]["2"]["Dice"]
    assert (row["epochs"], row["iterations_per_epoch"]) == (1, 2) and "train_seconds" in row

    # second run: finished fold skipped (nothing trained), cost columns joined from a cost JSON
    cost = tmp_path / "cost.json"
    cost.write_text(json.dumps({"meta": {"benchmark": "cost"}, "rows": [
        {"trainer": "nnUNetTrainerLightMUNet", "plans": "nnUNetPlans", "status": "ok", "params": 123,
         "gflops": 4.5, "train_step_ms": 6.7}]}))
    capsys.readouterr()
    rc = cli_main(["benchmark", "accuracy", "-d", str(DATASET_ID), "-c", CONFIG, "-tr", "nnUNetTrainerLightMUNet",
                   "--epochs", "1", "--cost-json", str(cost), "-o", out, "--strict"])
    assert rc == 0
    assert "finished earlier" in capsys.readouterr().out
    data = json.load(open(os.path.join(out, "accuracy.json")))
    (again,) = data["rows"]
    assert "train_seconds" not in again and again["mean_dice"] == row["mean_dice"]
    assert (again["params"], again["gflops"], again["train_step_ms"]) == (123, 4.5, 6.7)
    with open(os.path.join(out, "accuracy.csv")) as f:
        assert float(next(csv.DictReader(f))["mean_dice"]) == row["mean_dice"]
    with open(os.path.join(out, "accuracy.png"), "rb") as f:
        assert f.read(4) == b"\x89PNG"
    assert "| nnUNetTrainerLightMUNet | nnUNetTrainerLightMUNet | 0 |" in open(os.path.join(out, "accuracy.md")).read()


def test_train_step_profile_sorts_kernels_into_parts():
    """benchmarks/train_step.py --profile: Triton kernel names are matched whole (the causal conv's `_conv_bwd_kernel`
    is not the scan's `_bwd_kernel`); cuDNN's implicit GEMMs are convolutions, not cuBLAS GEMMs."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
    spec = importlib.util.spec_from_file_location("train_step", path)
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    expected = {"_bwd_kernel": "selective scan", "void selective_scan_fwd_kernel<...>": "selective scan",
                "_conv_bwd_kernel": "causal conv / LayerNorm / GroupNorm / depthwise conv (Triton)",
                "_dw_conv_wgrad_kernel": "causal conv / LayerNorm / GroupNorm / depthwise conv (Triton)",
                "sm80_xmma_gemm_f32f32_f32f32_f32_tn_n": "GEMM (cuBLAS)",
                "sm90_xmma_fprop_implicit_gemm_f16f16": "cuDNN (convolutions, batch norm)",
                "conv_depthwise3d_cuda_backward_weight_kernel": "depthwise conv (PyTorch)",
                "CatArrayBatchedCopy_vectorized": "concatenation", "upsample_trilinear3d_backward": "other"}
    assert {name: ts.kernel_category(name) for name in expected} == expected
