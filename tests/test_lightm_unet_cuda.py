"""LightM-UNet on the GPU, without nnU-Net (the GPU machine runs the network alone; tests/test_lightm_unet.py builds
it from nnU-Net plans on the CPU)."""
import pytest
import torch

from nnunet_mamba.networks import lightm_unet
from nnunet_mamba.networks.lightm_unet import LightMUNet


@pytest.mark.cuda
def test_recomputes_only_the_large_layers_on_cuda(monkeypatch):
    """recompute=None: on CUDA a Mamba layer is recomputed when its input has more than RECOMPUTE_ABOVE elements; the
    smaller ones keep their activations. Which layers are recomputed does not change the gradients."""
    calls = []
    real = lightm_unet.recomputed

    def spy(module, forward, x, enabled=None):
        calls.append((x.numel(), enabled))
        return real(module, forward, x, enabled)

    monkeypatch.setattr(lightm_unet, "recomputed", spy)
    torch.manual_seed(0)
    net = LightMUNet(3, 8, 1, 2).cuda()
    x = torch.randn(1, 1, 32, 32, 32, device="cuda")
    grads = {}
    for above in (0, 16 ** 3 * 8):  # everything recomputed; the layers at and below 16^3 x 8 elements stored
        monkeypatch.setattr(lightm_unet, "RECOMPUTE_ABOVE", above)
        calls.clear()
        net.zero_grad()
        net(x).square().mean().backward()
        grads[above] = [p.grad.clone() for p in net.parameters()]
        assert calls and all(enabled == (n > above) for n, enabled in calls)
    assert any(not enabled for _, enabled in calls) and any(enabled for _, enabled in calls)
    for a, b in zip(*grads.values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
