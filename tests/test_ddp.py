"""Every network under torch DistributedDataParallel with two gloo processes on CPU, wrapped as nnU-Net's DDP path
wraps it: every parameter gets a gradient on every step (DDP fails on unused parameters otherwise) and the two
replicas stay identical. (nnU-Net also converts BatchNorm to SyncBatchNorm, which PyTorch allows for GPU modules
only; on the CPU the BatchNorm layers stay per-process.)"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

CASES = {
    "lightm_unet_2d": (lambda: _net("lightm_unet", "LightMUNet", 2, 32, 1, 3), (2, 1, 16, 16)),
    "lightm_unet_3d": (lambda: _net("lightm_unet", "LightMUNet", 3, 32, 1, 3), (2, 1, 8, 8, 8)),
    "nnmamba_3d_ds": (lambda: _net("nnmamba", "nnMambaSeg", in_ch=1, number_classes=3, spatial_dims=3),
                      (2, 1, 16, 16, 16)),
    "nnmamba_css_2d_ds": (lambda: _net("nnmamba", "nnMambaSeg", in_ch=1, number_classes=3, spatial_dims=2,
                                       css=True, ds_heads=True), (2, 1, 32, 32)),
    "vm_unet_2d": (lambda: _net("vm_unet", "VMUNet", 1, 3, spatial_dims=2), (2, 1, 32, 32)),
    "msvm_unet_2d": (lambda: _net("msvm_unet", "MSVMUNet", 1, 3, spatial_dims=2), (2, 1, 32, 32)),
}


def _net(module, cls, *args, **kwargs):
    import importlib

    return getattr(importlib.import_module(f"nnunet_mamba.networks.{module}"), cls)(*args, **kwargs)


def _loss(out, y):
    outs = out if isinstance(out, (list, tuple)) else [out]
    total = 0.0
    for i, o in enumerate(outs):  # deep-supervision outputs: nearest-downsampled targets, weights 2^-i
        t = F.interpolate(y[:, None].float(), size=o.shape[2:], mode="nearest")[:, 0].long()
        total = total + F.cross_entropy(o, t) / 2 ** i
    return total


def _worker(rank, world, name, store_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, init_method=f"file://{store_file}")
    build, shape = CASES[name]
    torch.manual_seed(0)  # the same initial weights on both ranks (DDP also broadcasts rank 0's)
    net = build()
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(ddp.parameters(), 1e-2, momentum=0.99, nesterov=True)
    no_grad = set()
    for step in range(2):
        g = torch.Generator().manual_seed(1000 + 10 * rank + step)  # different data on each rank
        x = torch.randn(shape, generator=g)
        y = (x[:, 0] > 0).long() + (x[:, 0] > 1).long()
        opt.zero_grad()
        _loss(ddp(x), y).backward()
        no_grad |= {n for n, p in net.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()}
        opt.step()
    flat = torch.cat([p.detach().flatten() for p in net.parameters()])
    gathered = [torch.zeros_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        torch.save({"no_grad": sorted(no_grad), "max_diff": (gathered[0] - gathered[1]).abs().max().item(),
                    "changed": bool((flat != torch.cat([p.detach().flatten() for p in build().parameters()])).any())},
                   result_file)
    dist.barrier()  # both ranks done (result written) before either exits
    # Skip the interpreter's teardown of the gloo group: its C++ threads sometimes abort there ("terminate called
    # without an active exception", seen in 2 of 6 CI runs, always after the result was complete).
    os._exit(0)


@pytest.mark.parametrize("name", list(CASES))
def test_ddp_two_gloo_processes(name, tmp_path):
    result = str(tmp_path / "result.pt")
    mp.spawn(_worker, args=(2, name, str(tmp_path / "store"), result), nprocs=2, join=True)
    r = torch.load(result)
    assert r["no_grad"] == []
    assert r["max_diff"] == 0.0
    assert r["changed"]
