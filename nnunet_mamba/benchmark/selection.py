"""Which trainers on which plans: trainer specs, the plugin's trainers, nnU-Net's baselines, plans folders.

A trainer spec is ``TRAINER`` or ``TRAINER:PLANS`` (a plans identifier, e.g. ``nnUNetTrainer:nnUNetResEncUNetMPlans``;
default: the benchmark's ``-p``). Two keywords expand to several specs:

* ``plugin``    - every trainer in ``nnunet_mamba.trainers.__all__`` that builds its own network, except those
  whose name contains ``Pretrained`` (they need a weights file and build the same network as their from-scratch
  trainer; name them explicitly to include them);
* ``baselines`` - nnU-Net's ``nnUNetTrainer`` on the default plans (PlainConvUNet) and on the ResEnc M and L
  presets (``nnUNetResEncUNetMPlans``, ``nnUNetResEncUNetLPlans``) where those plans exist in the plans folder.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

RESENC_PLANS = {"nnUNetResEncUNetMPlans": "nnUNetPlannerResEncM", "nnUNetResEncUNetLPlans": "nnUNetPlannerResEncL"}
BASELINE_TRAINER = "nnUNetTrainer"


@dataclass(frozen=True)
class TrainerSpec:
    trainer: str
    plans: str  # plans identifier (file name without .json in the plans folder)

    @property
    def label(self) -> str:
        short = {"nnUNetPlans": "", "nnUNetResEncUNetMPlans": " ResEnc M", "nnUNetResEncUNetLPlans": " ResEnc L"}
        return self.trainer + (short[self.plans] if self.plans in short else f" ({self.plans})")


@dataclass
class PlansSource:
    """Where plans come from: a folder with ``<identifier>.json`` files and the dataset's ``dataset.json``."""

    folder: str
    default_plans: str
    dataset_json: dict
    dataset_name: str
    description: str

    def plans_file(self, identifier: str) -> str:
        return os.path.join(self.folder, identifier + ".json")

    def has_plans(self, identifier: str) -> bool:
        return os.path.isfile(self.plans_file(identifier))

    def load_plans(self, identifier: str) -> dict:
        path = self.plans_file(identifier)
        if not os.path.isfile(path):
            planner = RESENC_PLANS.get(identifier)
            hint = (f"plan them with `nnUNetv2_plan_experiment -d DATASET -pl {planner}`" if planner else
                    "check the plans identifier")
            raise FileNotFoundError(f"no plans {identifier!r} in {self.folder} ({identifier}.json missing): {hint}")
        with open(path) as f:
            return json.load(f)


def plans_from_dataset(dataset: str, plans_identifier: str = "nnUNetPlans") -> PlansSource:
    """The plans folder of a dataset (id or DatasetXXX_Name) in ``nnUNet_preprocessed``."""
    if not os.environ.get("nnUNet_preprocessed"):
        raise RuntimeError("nnUNet_preprocessed is not set: set it to nnU-Net's preprocessed folder, or pass "
                           "--plans-file with a plans JSON instead of a dataset id")
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    name = maybe_convert_to_dataset_name(dataset)
    folder = os.path.join(os.environ["nnUNet_preprocessed"], name)
    ds = os.path.join(folder, "dataset.json")
    if not os.path.isfile(ds):
        raise FileNotFoundError(f"{ds} does not exist: run `nnUNetv2_plan_and_preprocess -d {dataset}` (or "
                                f"nnUNetv2_extract_fingerprint + nnUNetv2_plan_experiment) first")
    with open(ds) as f:
        dataset_json = json.load(f)
    return PlansSource(folder, plans_identifier, dataset_json, name, f"{name} ({folder})")


def plans_from_file(plans_file: str, dataset_json: Optional[str] = None, num_classes: Optional[int] = None,
                    num_input_channels: Optional[int] = None) -> PlansSource:
    """A plans JSON anywhere, with a dataset.json (given, or next to the plans) or just the class/channel counts.

    ``num_classes`` counts the background (nnU-Net's number of segmentation heads for label-based training).
    """
    plans_file = os.path.abspath(plans_file)
    if not os.path.isfile(plans_file):
        raise FileNotFoundError(f"plans file {plans_file} does not exist")
    folder, name = os.path.split(plans_file)
    if not name.endswith(".json"):
        raise ValueError(f"plans file {plans_file} must be a .json file")
    if num_classes is not None or num_input_channels is not None:
        if num_classes is None or num_input_channels is None or num_classes < 2 or num_input_channels < 1:
            raise ValueError("--num-classes (>= 2, background included) and --num-input-channels (>= 1) go together")
        ds = {"channel_names": {str(i): f"channel{i}" for i in range(num_input_channels)},
              "labels": {"background": 0, **{f"class{c}": c for c in range(1, num_classes)}},
              "file_ending": ".nii.gz"}
    else:
        ds_file = dataset_json or os.path.join(folder, "dataset.json")
        if not os.path.isfile(ds_file):
            raise FileNotFoundError(f"{ds_file} does not exist: pass --dataset-json, or --num-classes and "
                                    f"--num-input-channels")
        with open(ds_file) as f:
            ds = json.load(f)
    with open(plans_file) as f:
        dataset_name = json.load(f).get("dataset_name", "unknown dataset")
    return PlansSource(folder, name[:-len(".json")], ds, dataset_name, plans_file)


def plugin_trainer_names() -> list[str]:
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from .. import trainers

    names = []
    for name in trainers.__all__:
        cls = getattr(trainers, name)
        if (isinstance(cls, type) and issubclass(cls, nnUNetTrainer) and "Pretrained" not in name
                and cls.build_network_architecture is not nnUNetTrainer.build_network_architecture):
            names.append(name)
    return names


def expand_specs(items: list[str], source: PlansSource, notes: Optional[list] = None) -> list[TrainerSpec]:
    """Trainer specs from the command line (keywords expanded, duplicates removed, order kept)."""
    specs: list[TrainerSpec] = []
    for item in items:
        if item == "plugin":
            specs += [TrainerSpec(n, source.default_plans) for n in plugin_trainer_names()]
        elif item == "baselines":
            specs.append(TrainerSpec(BASELINE_TRAINER, source.default_plans))
            for plans, planner in RESENC_PLANS.items():
                if source.has_plans(plans):
                    specs.append(TrainerSpec(BASELINE_TRAINER, plans))
                elif notes is not None:
                    notes.append(f"{plans} not found in {source.folder}: to include it, plan it with "
                                 f"`nnUNetv2_plan_experiment -d DATASET -pl {planner}`")
        else:
            trainer, _, plans = item.partition(":")
            if not trainer:
                raise ValueError(f"bad trainer spec {item!r}: use TRAINER or TRAINER:PLANS_IDENTIFIER")
            specs.append(TrainerSpec(trainer, plans or source.default_plans))
    seen, unique = set(), []
    for s in specs:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def find_trainer_class(name: str):
    """The plugin's trainers by name first, then nnU-Net's own lookup (its trainer tree and nnUNet_extTrainer)."""
    from .. import trainers

    if name in trainers.__all__:
        return getattr(trainers, name)
    if name == BASELINE_TRAINER:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
        return nnUNetTrainer
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        return recursive_find_trainer_class_by_name(name)
    except RuntimeError:
        raise LookupError(f"no trainer named {name!r}: neither in nnunet_mamba.trainers nor in nnU-Net's trainers "
                          f"(plugin trainers: {', '.join(plugin_trainer_names())})") from None
