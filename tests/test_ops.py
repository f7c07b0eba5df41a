"""The op boundary against the float64 oracle: outputs, last state and every gradient."""
import time

import pytest
import torch

from nnunet_mamba import ops
from nnunet_mamba.ops import BackendUnavailable, selective_scan
from oracle import selective_scan_oracle

LAYOUTS = ["const", "shared", "grouped"]


def make_inputs(b, d, L, N, layout, groups=2, dtype=torch.float32, seed=0, requires_grad=True, positive=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)
    u = r(b, d, L)
    delta = 0.5 * r(b, d, L)
    if positive:  # without softplus, delta is a step size (> 0) already
        delta = delta.abs()
    A = -torch.rand(d, N, generator=g) * 2 - 0.1
    shape = {"const": (d, N), "shared": (b, N, L), "grouped": (b, groups, N, L)}[layout]
    B, C = r(*shape), r(*shape)
    D, z, bias = r(d), r(b, d, L), 0.3 * r(d)
    ts = dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=bias)
    out = {}
    for k, t in ts.items():
        t = t.to(dtype) if k in ("u", "delta", "B", "C", "z") else t
        out[k] = t.clone().requires_grad_(requires_grad)
    return out


def run(fn, inp, **kw):
    return fn(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], D=inp["D"], z=inp["z"],
              delta_bias=inp["delta_bias"], **kw)


CASES = [(2, 4, 1, 3, "shared"), (1, 6, 37, 4, "grouped"), (2, 4, 130, 8, "const"), (1, 8, 300, 16, "grouped"),
         (3, 2, 64, 2, "shared"), (1, 4, 1000, 5, "grouped")]


@pytest.mark.parametrize("b,d,L,N,layout", CASES)
@pytest.mark.parametrize("softplus", [True, False])
def test_torch_backend_matches_oracle(b, d, L, N, layout, softplus):
    inp = make_inputs(b, d, L, N, layout, seed=L + N, positive=not softplus)
    ref = make_inputs(b, d, L, N, layout, seed=L + N, positive=not softplus)
    y, last = run(selective_scan, inp, delta_softplus=softplus, return_last_state=True, backend="torch")
    y0, last0 = run(selective_scan_oracle, ref, delta_softplus=softplus, return_last_state=True)
    assert y.dtype == torch.float32 and last.dtype == torch.float32
    torch.testing.assert_close(y.double(), y0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(last.double(), last0, atol=1e-4, rtol=1e-4)
    g = torch.Generator().manual_seed(1)
    gy, gl = torch.randn(y.shape, generator=g), torch.randn(last.shape, generator=g)
    ((y * gy).sum() + (last * gl).sum()).backward()
    ((y0 * gy.double()).sum() + (last0 * gl.double()).sum()).backward()
    for k in inp:
        torch.testing.assert_close(inp[k].grad.double(), ref[k].grad.double(), atol=2e-3, rtol=2e-3)


def test_low_rank_delta_multiplied_out_or_fused(monkeypatch):
    """delta_proj_weight W with delta given as (b, R, L): a backend without the fused form (torch) gets W @ delta;
    outputs and every gradient (v and W included) against the float64 oracle on the multiplied-out delta. A backend
    that fuses it receives W itself and the low-rank delta unchanged."""
    inp = make_inputs(2, 6, 40, 4, "shared", seed=3)
    g = torch.Generator().manual_seed(4)
    inp["delta"] = (0.7 * torch.randn(2, 40, 3, generator=g)).transpose(1, 2).requires_grad_()  # token-major v
    W = torch.randn(6, 3, generator=g).requires_grad_()
    ref = {k: v.detach().double().requires_grad_() for k, v in inp.items()}
    W0 = W.detach().double().requires_grad_()
    # reuse_buffers is a promise the torch backend does not use: not passed on to it
    y = run(selective_scan, inp, delta_softplus=True, backend="torch", delta_proj_weight=W, reuse_buffers=True)
    y0 = selective_scan_oracle(ref["u"], torch.einsum("dr,brl->bdl", W0, ref["delta"]), ref["A"], ref["B"], ref["C"],
                               D=ref["D"], z=ref["z"], delta_bias=ref["delta_bias"], delta_softplus=True)
    torch.testing.assert_close(y.double(), y0, atol=1e-4, rtol=1e-4)
    gy = torch.randn(y.shape, generator=g)
    (y * gy).sum().backward()
    (y0 * gy.double()).sum().backward()
    for k in inp:
        torch.testing.assert_close(inp[k].grad.double(), ref[k].grad, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(W.grad.double(), W0.grad, atol=2e-3, rtol=2e-3)

    # a backend that takes it gets W and the low-rank delta, and forms delta in its kernels when
    # NNUNET_MAMBA_FUSED_DELTA=1 (default 0); reuse_buffers reaches only a backend that declares it
    seen = {}
    monkeypatch.setitem(ops.scan._BACKENDS, "fusing", ops.scan._Backend(
        "fusing", lambda u, delta, *a, **kw: seen.update(delta=delta, **kw) or u, lambda dev: None, -100,
        fuses_delta_proj=True, reuses_buffers=True))

    def fused(mode):
        if mode is None:
            monkeypatch.delenv("NNUNET_MAMBA_FUSED_DELTA", raising=False)
        else:
            monkeypatch.setenv("NNUNET_MAMBA_FUSED_DELTA", mode)
        seen.clear()
        selective_scan(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"], backend="fusing", delta_proj_weight=W,
                       reuse_buffers=True)
        assert seen["delta_proj_weight"] is W and seen["delta"] is inp["delta"] and seen["reuse_buffers"] is True
        return seen["delta_in_kernels"]

    assert fused("1") and not fused("0") and not fused(None)
    with pytest.raises(ValueError, match="NNUNET_MAMBA_FUSED_DELTA='yes': use 1"):
        fused("yes")


def _x_proj_case(seed=5, b=2, d=6, L=40, N=4, R=3):
    """Tokens x (b, L, d) (the scan's u as their (b, d, L) view), x_proj's weight (R + 2N, d), dt_proj's (d, R), A, D,
    the delta bias and z."""
    g = torch.Generator().manual_seed(seed)
    leaf = lambda *shape, scale=1.0: (scale * torch.randn(*shape, generator=g)).requires_grad_()
    return dict(x=leaf(b, L, d), Wx=leaf(R + 2 * N, d, scale=d ** -0.5), W=leaf(d, R, scale=R ** -0.5),
                A=(-torch.rand(d, N, generator=g) - 0.5).requires_grad_(), D=leaf(d), bias=leaf(d, scale=0.5),
                z=leaf(b, d, L))


def _x_proj_scan(fn, c, **kw):
    return fn(c["x"].transpose(1, 2), None, c["A"], None, None, D=c["D"], z=c["z"], delta_bias=c["bias"],
              delta_softplus=True, delta_proj_weight=c["W"], x_proj_weight=c["Wx"], **kw)


def test_x_proj_applied_by_the_op(monkeypatch):
    """x_proj_weight Wx with delta, B and C None: a backend without the fused form (torch) gets the column blocks of
    F.linear(tokens, Wx) (ops.linear_split); the output and the gradients of the tokens and of every parameter
    against the float64 oracle on the product formed independently. A backend that fuses it (Triton) receives
    x_proj = (Wx, product, grads_into) and delta, B, C None; misuse is an error that says what to pass."""
    R, N = 3, 4
    c = _x_proj_case(R=R, N=N)
    y = _x_proj_scan(selective_scan, c, backend="torch", reuse_buffers=True)
    ref = {k: v.detach().double().requires_grad_() for k, v in c.items()}
    dbl = ref["x"] @ ref["Wx"].t()
    delta = torch.einsum("dr,blr->bdl", ref["W"], dbl[..., :R])
    y0 = selective_scan_oracle(ref["x"].transpose(1, 2), delta, ref["A"], dbl[..., R:R + N].transpose(1, 2),
                               dbl[..., R + N:].transpose(1, 2), D=ref["D"], z=ref["z"], delta_bias=ref["bias"],
                               delta_softplus=True)
    torch.testing.assert_close(y.double(), y0, atol=1e-4, rtol=1e-4)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(6))
    (y * gy).sum().backward()
    (y0 * gy.double()).sum().backward()
    for k in c:
        torch.testing.assert_close(c[k].grad.double(), ref[k].grad, atol=2e-3, rtol=2e-3, msg=k)

    seen = {}
    monkeypatch.setitem(ops.scan._BACKENDS, "fusing", ops.scan._Backend(
        "fusing", lambda u, delta, A, B, C, **kw: seen.update(delta=delta, B=B, C=C, **kw) or u, lambda dev: None,
        -100, fuses_delta_proj=True))
    _x_proj_scan(selective_scan, c, backend="fusing")
    assert seen["x_proj"][0] is c["Wx"] and seen["delta"] is None and seen["B"] is None and seen["C"] is None
    with pytest.raises(ValueError, match="delta, B and C come from it"):
        selective_scan(c["x"].transpose(1, 2), c["z"], c["A"], None, None, delta_proj_weight=c["W"],
                       x_proj_weight=c["Wx"], backend="torch")
    with pytest.raises(ValueError, match=r"must be \(R \+ 2N, dim\)"):
        selective_scan(c["x"].transpose(1, 2), None, c["A"], None, None, delta_proj_weight=c["W"],
                       x_proj_weight=c["Wx"][1:], backend="torch")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_fp32_state(dtype):
    inp = make_inputs(2, 4, 50, 4, "grouped", dtype=dtype, requires_grad=False)
    y, last = run(selective_scan, inp, delta_softplus=True, return_last_state=True, backend="torch")
    assert y.dtype == dtype and last.dtype == torch.float32
    y0, last0 = run(selective_scan_oracle, inp, delta_softplus=True, return_last_state=True)
    torch.testing.assert_close(last.double(), last0, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(y.double(), y0.to(dtype).double(), atol=2e-2, rtol=2e-2)


def test_long_sequence_no_overflow():
    """Large delta*A over thousands of steps: states stay finite (no exp(-cumsum) tricks)."""
    inp = make_inputs(1, 2, 5000, 4, "shared", requires_grad=False)
    inp["delta"] = inp["delta"] * 0 + 30.0
    y = run(selective_scan, inp, delta_softplus=True, backend="torch")
    assert torch.isfinite(y).all()


def test_unavailable_backend_says_how_to_install():
    if "mamba_ssm" in ops.available_backends("cpu"):
        pytest.skip("mamba_ssm usable")
    inp = make_inputs(1, 2, 8, 2, "shared", requires_grad=False)
    with pytest.raises(BackendUnavailable, match="pip install|CUDA"):
        run(selective_scan, inp, backend="mamba_ssm")
    with pytest.raises(ValueError, match="unknown"):
        run(selective_scan, inp, backend="nope")
    assert ops.available_backends("cpu")[-1] == "torch"


def _ref_algorithm(u, delta, A, B, C, D, z, delta_bias):
    """mamba-ssm's reference *algorithm* (per-step loop indexing precomputed (b, d, L, N) tensors)."""
    delta = torch.nn.functional.softplus(delta + delta_bias[..., None])
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    x = A.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        ys.append(torch.einsum("bdn,bn->bd", x, C[:, :, i]))
    y = torch.stack(ys, 2) + u * D[:, None]
    return y * torch.nn.functional.silu(z)


def test_torch_backend_10x_faster_than_reference_algorithm():
    """(1, 64, 4096, N=16) forward+backward on CPU: at least 10x faster than the per-step reference."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    inp = make_inputs(1, 64, 4096, 16, "shared")

    def timed(fn, **kw):
        for t in inp.values():
            t.grad = None
        t0 = time.perf_counter()
        run(fn, inp, **kw).sum().backward()
        return time.perf_counter() - t0

    t_ours = min(timed(selective_scan, delta_softplus=True, backend="torch") for _ in range(2))
    t_ref = timed(lambda *a, **k: _ref_algorithm(*a[:5], k["D"], k["z"], k["delta_bias"]))
    print(f"torch backend {t_ours * 1e3:.0f} ms, reference algorithm {t_ref * 1e3:.0f} ms, "
          f"speed-up {t_ref / t_ours:.1f}x")
    assert t_ref / t_ours >= 10


def test_time_constant_bc_never_reach_mamba_ssm():
    """(d, N) B/C: mamba-ssm's path for them failed on the GPU, so the backend refuses them with a reason and
    "auto" skips it (checked without a GPU: the refusal happens before any kernel is touched)."""
    from nnunet_mamba.ops import scan

    be = scan._BACKENDS["mamba_ssm"]
    inp = make_inputs(1, 2, 8, 2, "const", requires_grad=False)
    assert "not supported" in be.unsupported(inp["B"])
    assert be.unsupported(make_inputs(1, 2, 8, 2, "shared")["B"]) is None
    with pytest.raises(BackendUnavailable, match="not supported"):
        scan._selective_scan_mamba_ssm(inp["u"], inp["delta"], inp["A"], inp["B"], inp["C"])


# ----------------------------------------------------------------------------------------------------------
# causal_conv1d_silu (the Mamba mixer's conv + SiLU on (b, L, C) tokens)

def _causal_conv_loop(x, w, bias):
    """float64 definition, position by position: y[l] = silu(bias + sum_k w[k] x[l - (K-1) + k])."""
    b, L, C = x.shape
    K = w.shape[-1]
    w = w.reshape(C, K).double()
    y = torch.zeros(b, L, C, dtype=torch.float64)
    for pos in range(L):
        acc = bias.double().expand(b, C).clone()
        for k in range(K):
            q = pos - (K - 1) + k
            if q >= 0:
                acc += w[:, k] * x[:, q].double()
        y[:, pos] = acc * torch.sigmoid(acc)
    return y


def test_causal_conv1d_torch_backend_matches_definition():
    g = torch.Generator().manual_seed(0)
    xz = torch.randn(2, 13, 10, generator=g)
    x = xz[..., :5]  # a view with gaps, as the mixer passes it
    w, bias = torch.randn(5, 1, 4, generator=g), torch.randn(5, generator=g)
    y = ops.causal_conv1d_silu(x, w, bias, backend="torch")
    assert y.shape == (2, 13, 5)
    torch.testing.assert_close(y.double(), _causal_conv_loop(x, w, bias), rtol=1e-5, atol=1e-6)


def test_causal_conv1d_backend_errors(monkeypatch):
    x, w = torch.randn(1, 4, 3), torch.randn(3, 1, 4)
    with pytest.raises(BackendUnavailable, match="CUDA tensors only"):
        ops.causal_conv1d_silu(x, w, backend="triton")
    with pytest.raises(ValueError, match="known: auto, torch, triton"):
        ops.causal_conv1d_silu(x, w, backend="cudnn")
    monkeypatch.setenv("NNUNET_MAMBA_TOKEN_OPS_BACKEND", "triton")  # forcing reaches the same check
    with pytest.raises(BackendUnavailable):
        ops.causal_conv1d_silu(x, w)


def test_token_layer_norm_is_nn_layer_norm():
    """Same parameters and state dict as nn.LayerNorm, same function (torch backend on CPU) on a strided token view."""
    from nnunet_mamba.modules.common import TokenLayerNorm

    ref, ours = torch.nn.LayerNorm(6), TokenLayerNorm(6)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 6, 5, 7).flatten(2).transpose(1, 2)  # (b, L, C) tokens of a channels-first map
    torch.testing.assert_close(ours(x), ref(x))


def assert_same_module(ours, ref, x):
    """ours takes ref's state dict (same keys, in order) and then computes the same output and the same gradients
    of x and of every parameter."""
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = x.requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    y_ref, y = ref(x), ours(x2)
    torch.testing.assert_close(y, y_ref)
    gy = torch.randn_like(y)
    y_ref.backward(gy)
    y.backward(gy)
    torch.testing.assert_close(x2.grad, x.grad)
    for p_ours, p_ref in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p_ours.grad, p_ref.grad)


@pytest.mark.parametrize("shape, groups, affine", [((2, 8, 5, 6, 7), 4, True), ((3, 6, 9, 4), 3, False),
                                                  ((1, 4, 11), 1, True)])
def test_group_norm_is_nn_group_norm(shape, groups, affine, monkeypatch):
    """Same parameters and state dict as nn.GroupNorm; output and every gradient equal to it in float64 (the
    var_mean-statistics path forced for these small maps; the Triton one is tested in kernels/tests)."""
    from nnunet_mamba.modules.common import GroupNorm
    from nnunet_mamba.ops import token_ops

    monkeypatch.setattr(token_ops, "VAR_MEAN_FROM", 0)
    calls = []
    fn = token_ops._GroupNormFn
    monkeypatch.setattr(fn, "apply", lambda *a, _f=fn.apply: calls.append(1) or _f(*a))

    ref = torch.nn.GroupNorm(groups, shape[1], affine=affine).double()
    ours = GroupNorm(groups, shape[1], affine=affine).double()
    if affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-1, 1)
    assert_same_module(ours, ref, torch.randn(*shape, dtype=torch.float64) * 3 + 2)
    assert calls


def test_group_norm_runs_in_fp32_under_autocast(monkeypatch):
    from nnunet_mamba.modules.common import GroupNorm
    from nnunet_mamba.ops import token_ops

    monkeypatch.setattr(token_ops, "VAR_MEAN_FROM", 0)
    gn = GroupNorm(2, 4)
    x = torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gn(x.bfloat16())
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, torch.nn.functional.group_norm(x.bfloat16().float(), 2, gn.weight, gn.bias))


@pytest.mark.parametrize("var_mean_from", [0, 1 << 60])  # the var_mean-statistics path, F.group_norm
@pytest.mark.parametrize("shape, groups, affine", [((2, 8, 5, 6, 7), 4, True), ((3, 6, 9, 4), 3, False),
                                                  ((2, 4, 11), 1, True)])
def test_group_norm_relu_is_relu_of_group_norm(shape, groups, affine, var_mean_from, monkeypatch):
    """ops.group_norm(..., relu=True) on the torch backends = F.relu(F.group_norm(...)): output and every gradient
    (float64), including pre-activations exactly 0 (x = 0 over a (sample, group) and a zero bias: relu'(0) = 0)."""
    import torch.nn.functional as F
    from nnunet_mamba.ops import token_ops

    monkeypatch.setattr(token_ops, "VAR_MEAN_FROM", var_mean_from)
    g = torch.Generator().manual_seed(len(shape) + groups)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * 3 + 1
    x[0, :shape[1] // groups] = 0.0
    params = [torch.randn(shape[1], generator=g, dtype=torch.float64) for _ in range(2)] if affine else [None, None]
    if affine:
        params[1][0] = 0.0
    outs = []
    for fn in (lambda *a: token_ops.group_norm(*a, backend="torch", relu=True),
               lambda x, G, w, b: F.relu(F.group_norm(x, G, w, b))):
        leaves = [t if t is None else t.clone().requires_grad_() for t in (x, *params)]
        y = fn(leaves[0], groups, *leaves[1:])
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
        outs.append([y] + [t.grad for t in leaves if t is not None])
    assert (outs[1][0] == 0).any()
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b)


def test_group_norm_module_relu_call(monkeypatch):
    """GroupNorm(x, relu=True) = F.relu(GroupNorm(x)), values and gradients; parameters and state dict unchanged;
    under autocast fp32, like the plain call."""
    import torch.nn.functional as F
    from nnunet_mamba.modules.common import GroupNorm
    from nnunet_mamba.ops import token_ops

    monkeypatch.setattr(token_ops, "VAR_MEAN_FROM", 0)
    gn = GroupNorm(2, 4).double()
    assert list(gn.state_dict()) == list(torch.nn.GroupNorm(2, 4).state_dict())
    with torch.no_grad():
        gn.weight.uniform_(0.5, 1.5)
        gn.bias.uniform_(-1, 1)
    x = torch.randn(2, 4, 6, 5, dtype=torch.float64)
    grads = []
    for call in (lambda x: gn(x, relu=True), lambda x: F.relu(gn(x))):
        gn.zero_grad()
        xs = x.clone().requires_grad_()
        y = call(xs)
        y.backward(torch.cos(torch.arange(y.numel(), dtype=torch.float64)).view_as(y))
        grads.append((y, xs.grad, gn.weight.grad.clone(), gn.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    gn.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gn(x.bfloat16(), relu=True)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, F.relu(F.group_norm(x.bfloat16().float(), 2, gn.weight, gn.bias)))


def test_group_norm_passes_relu_to_the_triton_kernel(monkeypatch):
    """The Triton backend gets relu (a stand-in kernel module: no triton import in this process)."""
    import sys
    import types
    from nnunet_mamba.ops import token_ops

    calls = []
    fake = types.SimpleNamespace(group_norm_triton=lambda *a, **kw: calls.append((a, kw)) or a[0])
    monkeypatch.setitem(sys.modules, "nnunet_mamba.kernels.group_norm_triton", fake)
    monkeypatch.setattr(token_ops, "_use_triton", lambda *a, **kw: True)
    x = torch.randn(1, 4, 3)
    token_ops.group_norm(x, 2, relu=True)
    token_ops.group_norm(x, 2)
    assert [kw for _, kw in calls] == [{"relu": True}, {"relu": False}]


@pytest.mark.parametrize("nd, k, bias", [(3, 3, False), (3, 5, True), (2, 3, True), (2, 1, False)])
def test_depthwise_conv_module_is_the_conv(nd, k, bias):
    """DepthwiseConv{2,3}d: nn.Conv{nd}d(c, c, k, padding=k // 2, groups=c) - same state dict, output and gradients
    (float64, the torch backend on CPU; the Triton kernel is tested in kernels/tests)."""
    from nnunet_mamba.modules.common import conv_nd, depthwise_conv_nd

    ref = conv_nd(nd)(6, 6, k, padding=k // 2, groups=6, bias=bias).double()
    ours = depthwise_conv_nd(nd)(6, k, bias=bias).double()
    assert isinstance(ours, conv_nd(nd))
    assert_same_module(ours, ref, torch.randn(2, 6, *(5, 7, 4)[:nd], dtype=torch.float64))


def test_depthwise_conv_auto_keeps_cudnn_for_2d_channels_last(monkeypatch):
    from nnunet_mamba.ops import token_ops

    monkeypatch.setattr(token_ops, "_triton_unavailable", lambda device: None)  # as on a CUDA machine
    used = []
    decide = token_ops._use_triton
    monkeypatch.setattr(token_ops, "_use_triton", lambda *a, **kw: used.append(decide(*a, **kw)) or False)
    n = token_ops.TRITON_FROM["depthwise-conv"]
    x = torch.randn(1, 64, 1, n // 64)  # a 2D map over the size threshold
    token_ops.depthwise_conv(x, torch.randn(64, 1, 1, 1))
    token_ops.depthwise_conv(x.contiguous(memory_format=torch.channels_last), torch.randn(64, 1, 1, 1))
    assert used == [True, False]  # Triton for the channels-first map, cuDNN for the channels-last one
    monkeypatch.setenv(token_ops.ENV_BACKEND, "triton")  # the environment still forces Triton there
    token_ops.depthwise_conv(x.contiguous(memory_format=torch.channels_last), torch.randn(64, 1, 1, 1))
    assert used == [True, False, True]


def test_token_ops_auto_takes_triton_only_from_the_measured_size(monkeypatch):
    from nnunet_mamba.ops import token_ops

    monkeypatch.setattr(token_ops, "_triton_unavailable", lambda device: None)  # as on a CUDA machine
    for op, n in token_ops.TRITON_FROM.items():
        assert not token_ops._use_triton(op, torch.zeros(1).expand(n - 1), "auto")
        assert token_ops._use_triton(op, torch.zeros(1).expand(n), "auto")
        assert not token_ops._use_triton(op, torch.zeros(1).expand(n), "torch")
    monkeypatch.setenv(token_ops.ENV_BACKEND, "torch")
    assert not token_ops._use_triton("layer-norm", torch.zeros(1).expand(10 ** 9), "auto")


@pytest.mark.parametrize("nd,k,stride", [(3, 1, 1), (2, 1, 1), (3, 3, 1), (2, 1, 2)])
def test_pointwise_conv_module_is_the_conv(nd, k, stride):
    """PointwiseConv{2,3}d: nn.Conv{2,3}d's parameters, state dict and function; a 1x1(x1) stride-1 one goes through
    ops.pointwise_conv (cuDNN off CUDA), any other through the conv's own forward."""
    from nnunet_mamba.modules.common import conv_nd, pointwise_conv_nd

    torch.manual_seed(nd * 10 + k)
    ours = pointwise_conv_nd(nd)(6, 5, k, stride=stride, padding=k // 2)
    ref = conv_nd(nd)(6, 5, k, stride=stride, padding=k // 2)
    ref.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 6, *(9,) * nd)
    torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="pointwise_conv: weight must be"):
        ops.pointwise_conv(x, torch.randn(5, 6, *(3,) * nd))


@pytest.mark.parametrize("nd,kernel", [(3, 2), (3, (1, 2, 2)), (2, (2, 3))])
def test_max_pool_module_is_nn_max_pool(nd, kernel):
    """MaxPool{2,3}d: nn.MaxPool's function (ops.max_pool: PyTorch's pooling off CUDA), values and gradients; a
    module whose stride is not its kernel keeps its own forward."""
    from torch import nn

    from nnunet_mamba.modules.common import max_pool_nd

    x = torch.randn(2, 3, *(6, 6, 6)[:nd], requires_grad=True)
    ours = max_pool_nd(nd)(kernel_size=kernel, stride=kernel)
    ref = {2: nn.MaxPool2d, 3: nn.MaxPool3d}[nd](kernel_size=kernel, stride=kernel)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = ours(x), ref(x2)
    assert torch.equal(y, y2)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(x.grad, x2.grad)
    overlapping = max_pool_nd(nd)(kernel_size=3, stride=1)
    assert torch.equal(overlapping(x), {2: nn.MaxPool2d, 3: nn.MaxPool3d}[nd](3, 1)(x))
