"""Tensor-layout helpers shared by the kernels' wrappers and nnunet_mamba.ops (PyTorch only, no Triton)."""
from __future__ import annotations

from typing import Sequence

import torch


def column_blocks(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The (..., sum of widths) tensor whose consecutive column blocks ``parts`` are, or None where they are not.

    The parts must share storage, dtype, device, every dimension but the last and every stride, have unit last
    stride, and each must start where the one before ends: the blocks of a ``split(..., dim=-1)`` of one tensor, or
    gradients written side by side into one buffer. The result is a view of that storage (nothing is copied)."""
    if not parts or any(p is None for p in parts) or parts[0].stride(-1) != 1:
        return None
    first = parts[0]
    storage, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for p in parts:
        if (p.dtype != first.dtype or p.device != first.device or p.shape[:-1] != first.shape[:-1]
                or p.stride() != first.stride() or p.untyped_storage().data_ptr() != storage
                or p.storage_offset() != offset):
            return None
        offset += p.shape[-1]
    width = offset - first.storage_offset()
    if first.dim() > 1 and first.shape[-2] > 1 and first.stride(-2) < width:  # rows would overlap
        return None
    return first.as_strided((*first.shape[:-1], width), first.stride(), first.storage_offset())


def as_3d(spatial: Sequence[int], per_axis: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """A 2D or 3D map's spatial sizes and a per-axis value (a pooling kernel, up-sampling factors) as 3-tuples, with
    a unit leading axis for 2D: the (D, H, W) form the 2D/3D map kernels take."""
    pad = (1,) * (3 - len(per_axis))
    return pad + tuple(spatial), pad + tuple(per_axis)
