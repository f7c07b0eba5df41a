"""The one trainer base of the plugin: nnU-Net's trainer with the training recipe given as data.

Each network trainer is a few lines: a ``Recipe`` and a ``build_network_architecture`` static method that reads
the plan. Everything else (data, augmentation, checkpoints, validation, inference, DDP) is nnU-Net's own code.
"""
from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
from torch._dynamo import OptimizedModule

from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from ..graphs import ENV as ENV_CUDA_GRAPHS
from ..graphs import graph_for_training

# Quick runs (tests, demos): override the recipe's length without a new trainer class (the class name is
# stored in checkpoints, so tests and demos exercise the real trainers).
ENV_EPOCHS = "NNUNET_MAMBA_EPOCHS"
ENV_ITERATIONS = "NNUNET_MAMBA_ITERATIONS"
ENV_VAL_ITERATIONS = "NNUNET_MAMBA_VAL_ITERATIONS"


@dataclass(frozen=True)
class Recipe:
    """Optimiser, schedule, length, precision and deep supervision of a trainer (specs/recipes.md)."""

    optimizer: str = "sgd"  # sgd (Nesterov) | adam (coupled L2) | adamw (decoupled)
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    schedule: str = "poly"  # poly (1 - e/E)^0.9 | cosine (CosineAnnealingLR closed form, periodic past t_max)
    cosine_t_max: Optional[int] = None
    cosine_eta_min: float = 0.0
    num_epochs: int = 1000
    amp: bool = True  # False: no autocast anywhere, no GradScaler (the "NoAMP" form)
    deep_supervision: bool = True
    grad_clip: bool = True  # nnU-Net clips the gradient norm at 12; False disables clipping

    def but(self, **changes) -> "Recipe":
        return replace(self, **changes)


NNUNET_DEFAULT = Recipe()


class CosineLRScheduler(torch.optim.lr_scheduler._LRScheduler):
    """Closed-form CosineAnnealingLR stepped with the epoch index, as nnU-Net steps its PolyLRScheduler."""

    def __init__(self, optimizer, initial_lr, t_max, eta_min=0.0, current_step=None):
        self.initial_lr, self.t_max, self.eta_min = initial_lr, t_max, eta_min
        self.ctr = 0
        super().__init__(optimizer, current_step if current_step is not None else -1)

    def step(self, current_step=None):
        if current_step is None or current_step == -1:
            current_step = self.ctr
            self.ctr += 1
        lr = self.eta_min + (self.initial_lr - self.eta_min) * (1 + math.cos(math.pi * current_step / self.t_max)) / 2
        for g in self.optimizer.param_groups:
            g["lr"] = lr


def _env_int(name: str) -> Optional[int]:
    v = os.environ.get(name)
    if v in (None, ""):
        return None
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"environment variable {name} must be a positive integer, got {v!r}") from None
    if n < 1:
        raise ValueError(f"environment variable {name} must be a positive integer, got {v!r}")
    return n


class _StepView:
    """What nnU-Net's train/validation step sees as ``self.network`` / ``self.loss`` for one step.

    Runs the call with autocast disabled (NoAMP recipes: nnU-Net's step opens autocast itself, and an inner
    ``autocast(enabled=False)`` is the only way to switch it off without copying the step), and hides the
    parameters from ``clip_grad_norm_`` when the recipe does not clip.
    """

    def __init__(self, module, autocast_off: bool, clip: bool):
        self.module, self.autocast_off, self.clip = module, autocast_off, clip

    def __call__(self, *args, **kwargs):
        if not self.autocast_off:
            return self.module(*args, **kwargs)
        device_type = next((a.device.type for a in args if torch.is_tensor(a)), "cuda")
        with torch.autocast(device_type, enabled=False):
            return self.module(*args, **kwargs)

    def parameters(self):
        return self.module.parameters() if self.clip else iter(())


class nnUNetTrainerMambaBase(nnUNetTrainer):
    """Base of every plugin trainer. Subclasses set ``recipe`` and ``build_network_architecture``."""

    recipe: ClassVar[Recipe] = NNUNET_DEFAULT

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        r = self.recipe
        self.initial_lr, self.weight_decay = r.initial_lr, r.weight_decay
        self.num_epochs = r.num_epochs
        self.enable_deep_supervision = r.deep_supervision
        if not r.amp:
            self.grad_scaler = None
        self._graphed_shape = None  # the batch shape the training graphs were captured for (NNUNET_MAMBA_CUDA_GRAPHS)
        for env, attr in ((ENV_EPOCHS, "num_epochs"), (ENV_ITERATIONS, "num_iterations_per_epoch"),
                          (ENV_VAL_ITERATIONS, "num_val_iterations_per_epoch")):
            n = _env_int(env)
            if n is not None:
                setattr(self, attr, n)
                self.print_to_log_file(f"{env}={n}: {attr} set to {n} (quick run, not the recipe)")

    def _do_i_compile(self):
        return False  # the scan backends are custom autograd functions / kernels that torch.compile breaks on

    def configure_optimizers(self):
        r, params = self.recipe, self.network.parameters()
        if r.optimizer == "sgd":
            opt = torch.optim.SGD(params, r.initial_lr, weight_decay=r.weight_decay, momentum=r.momentum,
                                  nesterov=True)
        elif r.optimizer == "adam":
            opt = torch.optim.Adam(params, r.initial_lr, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay)
        elif r.optimizer == "adamw":
            opt = torch.optim.AdamW(params, r.initial_lr, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay)
        else:
            raise ValueError(f"unknown optimizer {r.optimizer!r} in {type(self).__name__}.recipe")
        if r.schedule == "poly":
            sched = PolyLRScheduler(opt, r.initial_lr, self.num_epochs)
        elif r.schedule == "cosine":
            sched = CosineLRScheduler(opt, r.initial_lr, r.cosine_t_max or self.num_epochs, r.cosine_eta_min)
        else:
            raise ValueError(f"unknown schedule {r.schedule!r} in {type(self).__name__}.recipe")
        return opt, sched

    def _unwrapped_network(self):
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    def set_deep_supervision_enabled(self, enabled: bool):
        mod = self._unwrapped_network()
        target = mod.decoder if hasattr(getattr(mod, "decoder", None), "deep_supervision") else mod
        if hasattr(target, "deep_supervision"):
            target.deep_supervision = enabled and self.enable_deep_supervision

    @contextmanager
    def _step_view(self):
        r = self.recipe
        if r.amp and r.grad_clip:
            yield
            return
        net, loss = self.network, self.loss
        self.network = _StepView(net, autocast_off=not r.amp, clip=r.grad_clip)
        self.loss = _StepView(loss, autocast_off=not r.amp, clip=True)
        try:
            yield
        finally:
            self.network, self.loss = net, loss

    def train_step(self, batch: dict) -> dict:
        if _cuda_graphs_requested():
            self._use_training_graphs(batch["data"])
        with self._step_view():
            return super().train_step(batch)

    def _use_training_graphs(self, data: torch.Tensor):
        """NNUNET_MAMBA_CUDA_GRAPHS=1: capture the network's training forward + backward on the first batch, replay
        them from then on (nnunet_mamba/graphs.py). Refuses, saying why, where graphs cannot reproduce the step."""
        shape = tuple(data.shape)
        if self._graphed_shape is not None:
            if shape != self._graphed_shape:
                raise RuntimeError(f"{ENV_CUDA_GRAPHS}=1: the training graphs were captured for batches of shape "
                                   f"{self._graphed_shape}, this batch is {shape}; graphs need one batch shape "
                                   f"(unset {ENV_CUDA_GRAPHS} for this run)")
            return
        why = None
        if self.device.type != "cuda":
            why = f"CUDA graphs need a CUDA device, this trainer runs on {self.device}"
        elif self.is_ddp:
            why = "single-GPU training only (DDP's gradient all-reduce runs in hooks outside the captured graphs)"
        if why:
            raise RuntimeError(f"{ENV_CUDA_GRAPHS}=1: {why}. Unset {ENV_CUDA_GRAPHS} to train without graphs.")
        # AMP recipes: nnU-Net's train_step runs the forward under autocast's default dtype (float16 on CUDA)
        graph_for_training(self._unwrapped_network(), data.to(self.device, non_blocking=True),
                           autocast_dtype=torch.get_autocast_dtype("cuda") if self.recipe.amp else None)
        self._graphed_shape = shape
        self.print_to_log_file(f"{ENV_CUDA_GRAPHS}=1: the network's training forward and backward are captured for "
                               f"batches of shape {shape} and replayed every step")

    def validation_step(self, batch: dict) -> dict:
        with self._step_view():
            return super().validation_step(batch)


def _cuda_graphs_requested() -> bool:
    mode = os.environ.get(ENV_CUDA_GRAPHS, "0")
    if mode not in ("0", "1"):
        raise ValueError(f"{ENV_CUDA_GRAPHS}={mode!r}: use 1 (capture the training step as CUDA graphs) or 0")
    return mode == "1"


def plan_topology(configuration_manager):
    """(spatial dims, plan strides, a description for error messages) of an nnU-Net configuration."""
    patch = list(configuration_manager.patch_size)
    strides = configuration_manager.network_arch_init_kwargs["strides"]
    return len(patch), [list(s) for s in strides], f"the configuration with patch size {patch}"
