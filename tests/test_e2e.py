"""End to end through nnU-Net's own command-line tools: plan_and_preprocess -> 2 short epochs with the plugin
trainer -> predict with test-time mirroring -> evaluate. Checks every test case is predicted and the summary
holds Dice for every class (tests/helpers.py: check_cycle). The other networks' runs are in their test files."""
import pytest

from helpers import check_cycle
from nnunet_mamba.demo import run_cycle


@pytest.mark.slow
@pytest.mark.parametrize("dim,shape,dataset_id", [(2, (64, 64), 902), (3, (32, 32, 32), 903)])
def test_lightm_unet_cycle(tmp_path, dim, shape, dataset_id):
    r = run_cycle(str(tmp_path), trainer="nnUNetTrainerLightMUNet", dim=dim, shape=shape, dataset_id=dataset_id,
                  device="cpu", epochs=2, iterations=3, val_iterations=1, verbose=False)
    check_cycle(r, 3, weight_key="down_layers.1.0.0.mamba.A_log")
