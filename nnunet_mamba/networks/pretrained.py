"""VMamba ImageNet weights for VM-UNet and MSVM-UNet from a local checkpoint file (nothing is downloaded).

* VM-UNet (specs/vm_unet.md §2.2): VMamba-S v0 (``vmamba_small_e238_ema.pth``). Every checkpoint key that exists in
  ``VMUNet.vmunet`` is loaded (encoder blocks that exist, patch merging, patch embedding); then the same keys
  with ``layers.i`` renamed ``layers_up.(3-i)`` are loaded into the mirrored decoder stages.
* MSVM-UNet (specs/msvm_unet.md §2.4): VMamba-T v2 (``vssm1_tiny_0230s_ckpt_epoch_264.pth``) into the encoder,
  with ``layers.i.downsample -> downsamples.i``, ``ln_1 -> norm``, ``self_attention -> op``, the stem
  ``patch_embed.0-4 -> layer0.0-4`` / ``patch_embed.5-7 -> layer1.0-2``; the classifier (``norm``, ``head``,
  ``classifier.*``) is skipped.

Unlike upstream (which drops whatever does not match without a word), the loaders return a ``LoadReport`` listing
the loaded keys, the model keys left at their initialisation (missing), the checkpoint keys that found no place
(unexpected), those deliberately skipped, and shape mismatches (not loaded). No nnunetv2 import here.
"""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

ENV_PRETRAINED = "NNUNET_MAMBA_PRETRAINED"
CLASSIFIER_KEYS = re.compile(r"^(norm\.(weight|bias)|head\.(weight|bias)|classifier\..*)$")


@dataclass
class LoadReport:
    """What a pretrained load did. Key names are the model's (``loaded``, ``missing``) or the checkpoint's."""

    source: str
    loaded: list = field(default_factory=list)
    missing: list = field(default_factory=list)
    unexpected: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    mismatched: list = field(default_factory=list)  # (checkpoint key, model key, checkpoint shape, model shape)

    def summary(self) -> str:
        lines = [f"pretrained weights from {self.source}: {len(self.loaded)} tensors loaded"]
        for title, keys in (("missing (model keys left at their initialisation)", self.missing),
                            ("unexpected (checkpoint keys with no place in the model)", self.unexpected),
                            ("skipped (ImageNet classifier)", self.skipped)):
            if keys:
                lines.append(f"  {title}: {len(keys)}")
                lines += [f"    {g}" for g in group_keys(keys)]
        if self.mismatched:
            lines.append(f"  shape mismatches (not loaded): {len(self.mismatched)}")
            lines += [f"    {ck} -> {mk}: checkpoint {tuple(cs)} vs model {tuple(ms)}"
                      for ck, mk, cs, ms in self.mismatched]
        return "\n".join(lines)

    def __str__(self):
        return self.summary()


def group_keys(keys: Iterable[str]) -> list[str]:
    """Compress key lists for reading: the keys of one block / stage / module become ``prefix.* (n keys)``."""
    groups: "OrderedDict[str, list]" = OrderedDict()
    for k in keys:
        m = re.match(r"^(.*\b(?:blocks|layers|layers_up|downsamples)\.\d+)\.", k)
        prefix = m.group(1) if m else k.rsplit(".", 1)[0]
        groups.setdefault(prefix, []).append(k)
    return [ks[0] if len(ks) == 1 else f"{p}.* ({len(ks)} keys)" for p, ks in groups.items()]


def read_checkpoint(path: Optional[str]) -> dict:
    """The state dict of a VMamba checkpoint file (key ``model``, or a bare state dict)."""
    if not path:
        raise FileNotFoundError(f"no pretrained checkpoint given: set the environment variable {ENV_PRETRAINED} "
                                f"to the path of a local VMamba ImageNet checkpoint (.pth)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {path!r} does not exist (from {ENV_PRETRAINED} or the "
                                f"path given); download the VMamba ImageNet weights and point to the file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # VMamba checkpoints also pickle their yacs config and optimizer state
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as e:
            raise RuntimeError(
                f"cannot unpickle {path!r} ({e}). Install the missing module, or extract the weights once: "
                f"python -c \"import torch; torch.save(torch.load('{path}', weights_only=False)['model'], "
                f"'weights_only.pth')\" where that module is available") from e
    if isinstance(ckpt, dict) and isinstance(ckpt.get("model"), dict):
        return ckpt["model"]
    if isinstance(ckpt, dict) and ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt
    keys = list(ckpt)[:10] if isinstance(ckpt, dict) else type(ckpt).__name__
    raise ValueError(f"{path!r} is not a VMamba checkpoint: expected a dict with the state dict under 'model' "
                     f"(or a bare state dict), found {keys}")


def _fit(v: torch.Tensor, shape: torch.Size) -> Optional[torch.Tensor]:
    """The checkpoint tensor in the model's shape, or None. Conv-shaped (out, in, 1, 1) Linear2d weights fit."""
    if v.shape == shape:
        return v
    if v.dim() > len(shape) and all(s == 1 for s in v.shape[len(shape):]) and v.shape[:len(shape)] == shape:
        return v.reshape(shape)
    return None


def load_mapped(model: nn.Module, ckpt: dict, targets: Callable[[str], Optional[list]], source: str) -> LoadReport:
    """Load ``ckpt`` into ``model``: ``targets(ckpt_key)`` gives the candidate model keys of each checkpoint tensor
    (those that exist receive it; None = skipped on purpose). Loads strictly and reports everything else.
    """
    own = model.state_dict()
    new, report = dict(own), LoadReport(source)
    for ck, v in ckpt.items():
        ts = targets(ck)
        if ts is None:
            report.skipped.append(ck)
            continue
        ts = [t for t in ts if t in own]
        if not ts:
            report.unexpected.append(ck)
        for t in ts:
            fitted = _fit(v, own[t].shape) if torch.is_tensor(v) else None
            if fitted is None:
                report.mismatched.append((ck, t, tuple(getattr(v, "shape", ())), tuple(own[t].shape)))
                continue
            new[t] = fitted
            report.loaded.append(t)
    model.load_state_dict(new, strict=True)
    loaded = set(report.loaded)
    report.missing = [k for k in own if k not in loaded]
    return report


# ----------------------------------------------------------------------------------------------------------------
# VM-UNet


def vmunet_targets(key: str) -> Optional[list]:
    """Upstream's two passes: the key as is (encoder) and ``layers.i -> layers_up.(3-i)`` (mirrored decoder)."""
    if CLASSIFIER_KEYS.match(key):
        return None
    out = [key]
    m = re.match(r"^layers\.([0-3])\.(.*)$", key)
    if m:
        out.append(f"layers_up.{3 - int(m.group(1))}.{m.group(2)}")
    return out


def load_vmunet_pretrained(model: nn.Module, path: Optional[str]) -> LoadReport:
    """Load a VMamba v0 ImageNet checkpoint into a ``VMUNet`` (its ``vmunet`` VSSM) as upstream's ``load_from``."""
    return load_mapped(model.vmunet, read_checkpoint(path), vmunet_targets, str(path))


# ----------------------------------------------------------------------------------------------------------------
# MSVM-UNet


def msvmunet_targets(key: str) -> Optional[list]:
    """VMamba v2 checkpoint key -> MSVM-UNet encoder key (upstream ``load_pretrained_ckpt`` + the encoder split)."""
    if CLASSIFIER_KEYS.match(key):
        return None
    k = re.sub(r"^layers\.(\d+)\.downsample\.", r"downsamples.\1.", key)
    k = k.replace("ln_1", "norm").replace("self_attention", "op")
    m = re.match(r"^patch_embed\.(\d+)\.(.*)$", k)
    if m:
        j = int(m.group(1))
        k = f"layer0.{j}.{m.group(2)}" if j < 5 else f"layer1.{j - 5}.{m.group(2)}"
    return [f"encoder.{k}"]


def load_msvmunet_pretrained(model: nn.Module, path: Optional[str]) -> LoadReport:
    """Load a VMamba v2 ImageNet checkpoint into the encoder of an ``MSVMUNet``."""
    return load_mapped(model, read_checkpoint(path), msvmunet_targets, str(path))
