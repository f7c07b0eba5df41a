"""Every plugin trainer takes a real nnU-Net train_step on a 2d and on a 3d_fullres configuration (CPU, small
patches): its recipe's optimiser and loss, deep-supervision targets at the scales it reports, finite loss, weights
updated, every parameter with a finite gradient."""
import numpy as np
import pytest
import torch

from helpers import make_plans, make_trainer
from nnunet_mamba import trainers
from nnunet_mamba.trainers import base

SCRATCH = [n for n in trainers.__all__ if n.startswith("nnUNetTrainer") and "Pretrained" not in n
           and n != "nnUNetTrainerMambaBase"]


@pytest.mark.parametrize("nd", [2, 3])
@pytest.mark.parametrize("name", SCRATCH)
def test_train_step(name, nd, tmp_path, monkeypatch):
    patch = (32, 32) if nd == 2 else (32, 32, 32)
    config = "2d" if nd == 2 else "3d_fullres"
    plans = make_plans(patch, [[1] * nd] + [[2] * nd] * 5, name=config)  # 6 stages: enough for every network
    cls = getattr(trainers, name)
    trainer = make_trainer(cls, plans, tmp_path, monkeypatch)
    torch.manual_seed(0)
    net = cls.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, 1, 3,
                                         trainer.enable_deep_supervision)
    trainer.network = net
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()
    trainer.set_deep_supervision_enabled(trainer.enable_deep_supervision)
    x = torch.randn(2, 1, *patch)
    target = (x > 0.3).float() + (x > 1.0).float()
    scales = trainer._get_deep_supervision_scales()
    if scales is None:
        batch_target = target
    else:
        batch_target = [torch.nn.functional.interpolate(target, scale_factor=tuple(s), mode="nearest")
                        for s in scales]
    before = [p.detach().clone() for p in net.parameters()]
    result = trainer.train_step({"data": x, "target": batch_target})
    assert np.isfinite(result["loss"])
    no_grad = [n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    # nnU-Net's default DS weights give the lowest of the outputs weight 0: its head (nnMamba's ds3) gets no
    # gradient (nnU-Net uses 1e-6 under DDP); the upstream nnMamba weights are all non-zero on a 5-step plan
    weights = getattr(trainer.loss, "weight_factors", None)
    assert no_grad == (["ds3_cls_conv.weight", "ds3_cls_conv.bias"] if weights is not None and weights[-1] == 0
                       else [])
    assert any(not torch.equal(a, p) for a, p in zip(before, net.parameters()))
    assert all(torch.isfinite(p).all() for p in net.parameters())


def test_cuda_graphs_request_is_refused_where_graphs_cannot_run(tmp_path, monkeypatch):
    """NNUNET_MAMBA_CUDA_GRAPHS=1 (nnunet_mamba/graphs.py; replay checked against eager steps on the GPU in
    tests/test_graphs.py): a CPU trainer refuses with the reason and the way out, before any work; other values than
    0/1 are errors. On a GPU the fp32 recipe captures the forward without autocast and nnU-Net's AMP recipe under
    autocast's float16, as its train_step runs it."""
    patch = (32, 32)
    plans = make_plans(patch, [[1, 1]] + [[2, 2]] * 5, name="2d")
    batch = {"data": torch.randn(2, 1, *patch), "target": torch.zeros(2, 1, *patch)}
    captures = []

    class Captured(Exception):
        pass

    def fake_capture(module, sample, autocast_dtype=None):
        captures.append(autocast_dtype)
        raise Captured

    monkeypatch.setattr(base, "graph_for_training", fake_capture)
    for cls in (trainers.nnUNetTrainerLightMUNet, trainers.nnUNetTrainerLightMUNet_nnUNetRecipe):
        trainer = make_trainer(cls, plans, tmp_path, monkeypatch)
        monkeypatch.setenv("NNUNET_MAMBA_CUDA_GRAPHS", "1")
        with pytest.raises(RuntimeError, match="CUDA device.*Unset NNUNET_MAMBA_CUDA_GRAPHS"):
            trainer.train_step(batch)
        monkeypatch.setenv("NNUNET_MAMBA_CUDA_GRAPHS", "yes")
        with pytest.raises(ValueError, match="use 1"):
            trainer.train_step(batch)
        trainer.device = torch.device("cuda")  # as on a GPU machine (the batch stays where it is)
        monkeypatch.setenv("NNUNET_MAMBA_CUDA_GRAPHS", "1")
        with monkeypatch.context() as m, pytest.raises(Captured):
            m.setattr(torch.Tensor, "to", lambda t, *args, **kwargs: t)
            trainer.train_step(batch)
    assert captures == [None, torch.float16]
