"""Stock nnU-Net finds the plugin trainers right after pip install, in a fresh interpreter."""
import os
import subprocess
import sys

import pytest

LOOKUP = ("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; import pickle; "
          "c = f('{name}'); print(c.__module__ + '.' + c.__name__); pickle.dumps(c)")


def _fresh(code, env_extra=None):
    env = {k: v for k, v in os.environ.items() if k != "nnUNet_extTrainer"}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd="/")


@pytest.mark.parametrize("name,module", [("nnUNetTrainerLightMUNet", "nnunet_mamba.trainers.lightm_unet"),
                                         ("nnUNetTrainer_5epochs", "nnunetv2.training")])
def test_fresh_interpreter_finds_trainers(name, module):
    r = _fresh(LOOKUP.format(name=name))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith(module)


def test_user_ext_trainer_folders_are_kept(tmp_path):
    (tmp_path / "my_trainers.py").write_text(
        "from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer\n"
        "class nnUNetTrainerMyOwn(nnUNetTrainer):\n    pass\n")
    r = _fresh("import os; print(os.environ['nnUNet_extTrainer'])", {"nnUNet_extTrainer": str(tmp_path)})
    paths = r.stdout.strip().split(os.pathsep)
    assert paths[0] == str(tmp_path) and paths[-1].endswith(os.path.join("nnunet_mamba", "nnunet_ext"))
    r = _fresh("from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name as f; "
               "print(f('nnUNetTrainerMyOwn').__name__, f('nnUNetTrainerLightMUNet').__name__)",
               {"nnUNet_extTrainer": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1] == "nnUNetTrainerMyOwn nnUNetTrainerLightMUNet"
