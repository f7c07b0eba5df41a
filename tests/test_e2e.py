"""End to end through nnU-Net's own command-line tools: plan_and_preprocess -> 2 short epochs with the plugin
trainer -> predict with test-time mirroring -> evaluate. Checks every test case is predicted and the summary
holds Dice for every class."""
import json
import os

import pytest

from nnunet_mamba.demo import run_cycle


def check_cycle(r, n_classes):
    assert r.predictions == [f"case_{i:03d}.nii.gz" for i in range(8, 8 + r.n_test_cases)]
    assert sorted(r.dice) == [str(c) for c in range(1, n_classes)]
    assert all(0.0 <= v <= 1.0 for v in r.dice.values())
    with open(r.summary_file) as f:
        summary = json.load(f)
    assert len(summary["metric_per_case"]) == r.n_test_cases
    folder = os.path.dirname(r.summary_file)
    assert not [p for p in r.predictions if not os.path.getsize(os.path.join(folder, p))]


@pytest.mark.slow
@pytest.mark.parametrize("dim,shape,dataset_id", [(2, (64, 64), 902), (3, (32, 32, 32), 903)])
def test_lightm_unet_cycle(tmp_path, dim, shape, dataset_id):
    r = run_cycle(str(tmp_path), trainer="nnUNetTrainerLightMUNet", dim=dim, shape=shape, dataset_id=dataset_id,
                  device="cpu", epochs=2, iterations=3, val_iterations=1, verbose=False)
    check_cycle(r, 3)
    # nnU-Net's own final validation on the fold's validation cases ran too
    results = os.path.join(str(tmp_path), "nnUNet_results", r.dataset_name,
                           f"nnUNetTrainerLightMUNet__nnUNetPlans__{r.configuration}", "fold_0")
    assert os.path.isfile(os.path.join(results, "checkpoint_final.pth"))
    assert os.path.isfile(os.path.join(results, "validation", "summary.json"))
