"""Small synthetic segmentation datasets in nnU-Net's raw format (for the demo, tests and benchmarks).

Each case holds one ball per foreground class at a random position, brighter for higher classes, on a noisy
background: learnable in a few epochs, so Dice after a short training means something.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np


def _case(rng: np.random.Generator, shape: Sequence[int], n_classes: int):
    grid = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    label = np.zeros(shape, np.uint8)
    for c in range(1, n_classes):
        radius = rng.uniform(0.15, 0.25) * min(shape)
        center = [rng.uniform(radius, s - radius) for s in shape]
        dist2 = sum((g - m) ** 2 for g, m in zip(grid, center))
        label[dist2 <= radius ** 2] = c
    image = rng.normal(0.0, 0.3, shape) + 1.5 * label
    return image.astype(np.float32), label


def _write(array: np.ndarray, path: str, spacing: Sequence[float]):
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing([float(s) for s in spacing][::-1])  # SimpleITK is x, y, z; arrays are z, y, x
    sitk.WriteImage(img, path)


def make_dataset(raw_dir: str, dataset_id: int, shape: Sequence[int], n_train: int = 8, n_test: int = 2,
                 n_classes: int = 3, spacing: Sequence[float] | None = None, name: str = "Synthetic",
                 seed: int = 0) -> str:
    """Write ``Dataset{id:03d}_{name}`` (imagesTr, labelsTr, imagesTs, labelsTs, dataset.json); returns its path.

    ``shape`` has 2 entries for a 2D dataset (stored as single-slice images, which nnU-Net plans as 2D) or 3.
    """
    rng = np.random.default_rng(seed)
    folder = os.path.join(raw_dir, f"Dataset{dataset_id:03d}_{name}")
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
    full_shape = tuple(shape) if len(shape) == 3 else (1, *shape)
    spacing = tuple(spacing) if spacing is not None else (1.0,) * len(shape)
    full_spacing = spacing if len(shape) == 3 else (999.0, *spacing)
    for i in range(n_train + n_test):
        image, label = _case(rng, shape, n_classes)
        split = "Tr" if i < n_train else "Ts"
        case = f"case_{i:03d}"
        _write(image.reshape(full_shape), os.path.join(folder, f"images{split}", f"{case}_0000.nii.gz"), full_spacing)
        _write(label.reshape(full_shape), os.path.join(folder, f"labels{split}", f"{case}.nii.gz"), full_spacing)
    dataset_json = {
        "channel_names": {"0": "synthetic"},
        "labels": {"background": 0, **{f"class{c}": c for c in range(1, n_classes)}},
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": name,
    }
    with open(os.path.join(folder, "dataset.json"), "w") as f:
        json.dump(dataset_json, f, indent=2)
    return folder
