"""The Triton GroupNorm against a float64 oracle (``F.group_norm`` on float64 copies, ``F.relu`` of it for the fused
ReLU): output and every gradient.

On CPU these run through Triton's interpreter (conftest.py) at small sizes; ``small_blocks`` shrinks the block and
sets the number of reduction programs so that rows split into several chunks of several steps, the last one
partial. On a GPU compiled, plus the full-size map the kernel is for.
"""
import pytest
import torch
import torch.nn.functional as F

from oracle import rel_err

ON_GPU = torch.cuda.is_available()


@pytest.fixture(scope="module")
def gn():
    from nnunet_mamba.kernels import group_norm_triton as mod
    return mod


@pytest.fixture
def small_blocks(gn, monkeypatch):
    """BLOCK = 32; the test sets ``gn.PROGRAMS_CPU`` (reduction programs in all) through ``monkeypatch``."""
    monkeypatch.setattr(gn, "BLOCK", 32)
    return monkeypatch


def check(gn, x, w, b, G, tol=1e-5, need=(True, True, True), seed=0, relu=False):
    """Output and the gradients for the inputs in ``need`` (the others get none) against the oracle; ``relu``: the
    fused ReLU against ``F.relu`` of the oracle. Returns our output and the oracle's."""
    leaf = lambda t, req, dt=None: None if t is None else t.detach().to(dt or t.dtype).requires_grad_(req)
    ours = [leaf(t, req) for t, req in zip((x, w, b), need)]
    ref = [leaf(t, req, torch.float64) for t, req in zip((x, w, b), need)]
    # the oracle with weight None and a bias: a weight of ones (PyTorch's CUDA group-norm backward fails for that
    # combination with "tensor does not have a device", H200, torch 2.11)
    w0 = ref[1] if ref[1] is not None or ref[2] is None else torch.ones_like(ref[2])
    y, y0 = gn.group_norm_triton(*ours, G, 1e-5, relu=relu), F.group_norm(ref[0], G, w0, ref[2], 1e-5)
    if relu:
        y0 = F.relu(y0)
    assert y.shape == x.shape and y.dtype == x.dtype and y.is_contiguous()
    assert rel_err(y, y0) < tol, rel_err(y, y0)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.device)
    (y.float() * gy).sum().backward()
    (y0 * gy.double()).sum().backward()
    for name, a, a0, req in zip(("x", "weight", "bias"), ours, ref, need):
        if a is None:
            continue
        if not req:
            assert a.grad is None, name
            continue
        assert a.grad.dtype == a.dtype and a.grad.shape == a.shape, name
        assert rel_err(a.grad, a0.grad) < tol, (name, rel_err(a.grad, a0.grad))
    return y, y0


def inputs(shape, dev, affine=(True, True), offset=0.0, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = shape[1]
    x = (1.5 * torch.randn(shape, generator=g) + 0.3 + offset).to(dev, dtype)
    w = (1 + 0.5 * torch.randn(C, generator=g)).to(dev) if affine[0] else None
    b = (0.5 * torch.randn(C, generator=g)).to(dev) if affine[1] else None
    return x, w, b


@pytest.mark.parametrize("G", [1, 4, 8])  # 8 = C: one channel a group
@pytest.mark.parametrize("affine", [(True, True), (False, False)])
def test_3d_maps(gn, dev, G, affine):
    """(N, C, D, H, W) with S = 210: not a multiple of the block (256)."""
    x, w, b = inputs((2, 8, 5, 6, 7), dev, affine, seed=G)
    check(gn, x, w, b, G)


@pytest.mark.parametrize("G", [1, 3, 6])
def test_2d_maps(gn, dev, G):
    x, w, b = inputs((3, 6, 9, 11), dev, seed=10 + G)
    check(gn, x, w, b, G)


def test_1d_maps_and_one_element_rows(gn, dev):
    """S = 37, and S = 1 with 6-element groups (2-element groups are ill-conditioned: y = +-1, dx ~ eps)."""
    check(gn, *inputs((2, 4, 37), dev, seed=20), G=2)
    check(gn, *inputs((3, 12, 1, 1), dev, seed=21), G=2)


@pytest.mark.parametrize("programs", [1, 16, 64])  # 8 rows: one chunk a row (fewer programs than rows), 2, 8
def test_several_chunks_and_steps(gn, dev, small_blocks, programs):
    """S = 693 in 32-element steps: 1 chunk of 22 steps, 2 of 11, or 8 of 3 (the last one 21 elements)."""
    small_blocks.setattr(gn, "PROGRAMS_CPU", programs)
    check(gn, *inputs((2, 4, 7, 9, 11), dev, seed=30), G=2)


@pytest.mark.parametrize("affine", [(True, False), (False, True)])
def test_weight_or_bias_alone(gn, dev, affine):
    check(gn, *inputs((2, 6, 4, 5, 6), dev, affine, seed=40), G=3)


@pytest.mark.parametrize("offset", [1e3, -1e4])
def test_large_common_offset(gn, dev, small_blocks, offset):
    """x = offset + 1.5 randn: fp32 accuracy relative to the spread, not the offset (PyTorch's own fp32 group norm
    is off by ~3e-5 on y and ~1e-4 on dweight at 1e3; sum / sum of squares in fp32 by far more)."""
    small_blocks.setattr(gn, "PROGRAMS_CPU", 16)
    check(gn, *inputs((2, 4, 7, 9, 11), dev, offset=offset, seed=50), G=2)


def test_non_contiguous_input(gn, dev):
    """A strided slice and a channels-last map: made contiguous; output and dx dense."""
    x, w, b = inputs((2, 8, 6, 5, 10), dev, seed=60)
    check(gn, x[..., ::2], w, b, 4)
    check(gn, x.to(memory_format=torch.channels_last_3d), w, b, 4)


@pytest.mark.parametrize("need", [(False, True, True), (True, False, False), (False, False, True)])
def test_some_gradients_not_requested(gn, dev, need):
    check(gn, *inputs((2, 6, 5, 7), dev, seed=70), G=2, need=need)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fp32_arithmetic(gn, dev, dtype):
    check(gn, *inputs((2, 8, 5, 6, 7), dev, dtype=dtype, seed=80), G=4, tol=1e-2)


def test_backward_is_bitwise_repeatable(gn, dev, small_blocks):
    small_blocks.setattr(gn, "PROGRAMS_CPU", 16)
    x, w, b = inputs((2, 4, 7, 9, 11), dev, seed=90)
    grads = []
    for _ in range(2):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        gn.group_norm_triton(xs, ws, b, 2, 1e-5).square().sum().backward()
        grads.append((xs.grad, ws.grad))
    assert all(torch.equal(a, b) for a, b in zip(*grads))


# fused ReLU: relu(group_norm(x)); backward through the recomputed pre-activation's mask (relu'(0) = 0)


@pytest.mark.parametrize("G", [1, 8])
@pytest.mark.parametrize("affine", [(True, True), (False, False)])
def test_relu_3d_maps(gn, dev, G, affine):
    y, _ = check(gn, *inputs((2, 8, 5, 6, 7), dev, affine, seed=110 + G), G=G, relu=True)
    assert (y >= 0).all() and 0.2 < (y == 0).float().mean() < 0.8


@pytest.mark.parametrize("G", [1, 3])
def test_relu_2d_maps(gn, dev, G):
    check(gn, *inputs((3, 6, 9, 11), dev, seed=120 + G), G=G, relu=True)


@pytest.mark.parametrize("programs", [1, 16, 64])
def test_relu_several_chunks_and_steps(gn, dev, small_blocks, programs):
    """The mask in every chunk and step of the sums pass (S = 693 in 32-element steps, as above)."""
    small_blocks.setattr(gn, "PROGRAMS_CPU", programs)
    check(gn, *inputs((2, 4, 7, 9, 11), dev, seed=130), G=2, relu=True)


def test_relu_non_contiguous_input(gn, dev):
    x, w, b = inputs((2, 8, 6, 5, 10), dev, seed=140)
    check(gn, x[..., ::2], w, b, 4, relu=True)
    check(gn, x.to(memory_format=torch.channels_last_3d), w, b, 4, relu=True)


@pytest.mark.parametrize("affine", [(True, False), (False, True)])
def test_relu_weight_or_bias_alone(gn, dev, affine):
    check(gn, *inputs((2, 6, 4, 5, 6), dev, affine, seed=150), G=3, relu=True)


@pytest.mark.parametrize("need", [(False, True, True), (True, False, False), (False, False, True)])
def test_relu_some_gradients_not_requested(gn, dev, need):
    check(gn, *inputs((2, 6, 5, 7), dev, seed=160), G=2, need=need, relu=True)


def test_relu_large_common_offset(gn, dev, small_blocks):
    small_blocks.setattr(gn, "PROGRAMS_CPU", 16)
    check(gn, *inputs((2, 4, 7, 9, 11), dev, offset=1e3, seed=170), G=2, relu=True)


@pytest.mark.parametrize("shape, G", [((2, 8, 5, 6, 7), 4), ((2, 6, 9, 11), 1)])
def test_relu_exact_zeros_of_the_pre_activation(gn, dev, shape, G):
    """Pre-activations exactly 0 (in fp32 and in the float64 oracle) get no gradient, as ``threshold_backward``
    gives: x = 0 over some (sample, group)s (mean = xhat = 0 exactly: the pre-activation is the bias, 0, negative or
    positive per channel; a constant other than 0 leaves the oracle's x scale - mean scale at ~1e-14), and a channel
    with weight 0 and bias 0 in groups of random x."""
    x, w, b = inputs(shape, dev, seed=180 + G)
    cpg = shape[1] // G
    x[0, :cpg] = 0.0  # sample 0, group 0 (channels 0 .. cpg - 1)
    b[:4] = torch.tensor([0.0, -0.5, 0.25, 0.0]) if G == 1 else torch.tensor([0.0, -0.5, 0.0, 0.25])
    zero_x = [(0, c) for c in range(min(cpg, 4))]  # (n, c) with x = 0: pre-activation = bias (0, < 0, > 0)
    if G > 1:  # cpg = 2
        w[2], b[2] = 0.0, 0.0  # channel 2 (group 1): pre-activation 0 at random x (sample 0)
        x[1, 2:4] = 0.0  # sample 1, group 1: channel 2's bias 0, channel 3's positive
        zero_x += [(1, 2), (1, 3)]
    pre = F.group_norm(x.double(), G, w.double(), b.double(), 1e-5)
    assert all(torch.equal(pre[n, c], b[c].double().expand_as(pre[n, c])) for n, c in zero_x)
    assert (pre == 0).sum() >= 2 * x[0, 0].numel()  # a float64 ReLU with relu'(0) = 1 would differ there
    y, y0 = check(gn, x, w, b, G, relu=True)
    assert torch.equal(y == 0, y0 == 0)
    assert all(torch.equal(y[n, c], F.relu(b[c]).expand_as(y[n, c])) for n, c in zero_x)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relu_half_inputs_fp32_arithmetic(gn, dev, dtype):
    y, _ = check(gn, *inputs((2, 8, 5, 6, 7), dev, dtype=dtype, seed=190), G=4, tol=1e-2, relu=True)
    assert y.dtype == dtype


def test_relu_backward_is_bitwise_repeatable(gn, dev, small_blocks):
    small_blocks.setattr(gn, "PROGRAMS_CPU", 16)
    x, w, b = inputs((2, 4, 7, 9, 11), dev, seed=200)
    outs = []
    for _ in range(2):
        xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
        y = gn.group_norm_triton(xs, ws, bs, 2, 1e-5, relu=True)
        y.square().sum().backward()
        outs.append((y, xs.grad, ws.grad, bs.grad))
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_relu_saves_no_more_than_without(gn, dev):
    """The fused ReLU saves x, the parameters and the statistics only: no output, no mask."""
    x, w, b = inputs((2, 6, 5, 7), dev, seed=210)
    saved = {}
    for relu in (False, True):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            gn.group_norm_triton(x.requires_grad_(), w.requires_grad_(), b.requires_grad_(), 2, relu=relu)
        saved[relu] = sizes
    assert max(saved[True]) == x.numel() and saved[True].count(x.numel()) == 1
    assert sum(saved[True]) - sum(saved[False]) == b.numel()  # the bias: a reference to the parameter


def test_rejects_wrong_shapes(gn, dev):
    x, w, b = inputs((2, 6, 5, 7), dev)
    with pytest.raises(ValueError, match="divisible"):
        gn.group_norm_triton(x, w, b, 4)
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        gn.group_norm_triton(x[:, :, 0, 0], w, b, 2)
    with pytest.raises(ValueError, match=r"shape \(6,\)"):
        gn.group_norm_triton(x, w[:3], b, 2)


@pytest.mark.cuda
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("relu", [False, True])
def test_full_size_matches_torch(gn, relu):
    """LightM-UNet's full-resolution map (2, 32, 128^3), 8 groups, against a float64 oracle on the GPU (PyTorch's
    group norm, and ``F.relu`` of it for the fused ReLU); PyTorch's own fp32 errors are printed beside."""
    x, w, b = inputs((2, 32, 128, 128, 128), "cuda", seed=100)
    gy = torch.randn_like(x)
    runs = {}
    for name, dtype, fn in (("triton", torch.float32, lambda *t: gn.group_norm_triton(*t, 8, 1e-5, relu=relu)),
                            ("torch fp32", torch.float32, lambda x, w, b: F.group_norm(x, 8, w, b, 1e-5)),
                            ("oracle", torch.float64, lambda x, w, b: F.group_norm(x, 8, w, b, 1e-5))):
        ts = [t.detach().to(dtype, copy=True).requires_grad_() for t in (x, w, b)]
        y = fn(*ts)
        if relu and name != "triton":
            y = F.relu(y)
        y.backward(gy.to(dtype))
        runs[name] = [y.detach()] + [t.grad for t in ts]
        del ts, y
    errs = {name: [rel_err(a, o) for a, o in zip(runs[name], runs["oracle"])] for name in ("triton", "torch fp32")}
    # measured (H200): the kernel's gradients within 1e-4 of the oracle, PyTorch's fp32 ones off by up to 3.4e-4
    assert errs["triton"][0] < 1e-5 and max(errs["triton"][1:]) < 1e-4, errs


class _NoKernel:
    """Stands in for a kernel: the launch does nothing (under the interpreter a launch itself runs torch ops)."""

    def __getitem__(self, grid):
        return lambda *args, **meta: None


@pytest.mark.parametrize("relu", [False, True])
def test_few_host_ops_per_call(gn, dev, monkeypatch, relu):
    """The host work around the kernels: the forward issues a handful of aten ops (the buffers' allocations) and
    the backward as few; the statistics' merge and every per-channel coefficient are computed in kernels. Counted
    with the kernels stubbed out, through a ``TorchDispatchMode``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    for name in ("_stats_kernel", "_coef_kernel", "_affine_kernel", "_grad_sums_kernel", "_grad_coef_kernel"):
        monkeypatch.setattr(gn, name, _NoKernel())
    ts = [t.requires_grad_() for t in inputs((2, 8, 5, 6, 7), dev, seed=220)]
    with Ops() as fwd:
        y = gn.group_norm_triton(*ts, 4, relu=relu)
    gy = torch.ones_like(y)
    with Ops() as bwd:
        torch.autograd.grad(y, ts, gy)
    # measured (torch 2.14): forward 6 (empty x 4, unbind, empty_like), backward 7 (the same and autograd's
    # ones_like); with the merge and the coefficients computed by PyTorch ops on the host: 47 and 58 (73 with relu)
    assert len(fwd.ops) <= 8, fwd.ops
    assert len(bwd.ops) <= 8, bwd.ops
