"""SS2D / SS3D (specs/ss2d.md) against an independent per-direction reference, parameter formulas, companions."""
import math

import pytest
import torch
import torch.nn.functional as F

from nnunet_mamba.modules.ss2d import SS2D, Linear2d, ss2d_param_count
from nnunet_mamba.modules.vmamba import PatchExpand, PatchMerging, VSSBlock, VSSBlockV2, pixel_shuffle_nd
from nnunet_mamba.ops import selective_scan

# ------------------------------------------------------------------------------------------------------------
# Independent reference: explicit re-ordered copies per direction, one selective_scan call per direction.
# The orders are written out from the spec tables (not taken from cross_scan_orders).


def _orders_2d():
    # (sequence of the map, inverse) for HW, WH, reversed HW, reversed WH (ss2d.md §1)
    hw = (lambda x: x.flatten(2), lambda s, S: s.reshape(*s.shape[:2], *S))
    wh = (lambda x: x.transpose(2, 3).flatten(2), lambda s, S: s.reshape(*s.shape[:2], S[1], S[0]).transpose(2, 3))
    rev = lambda o: (lambda x: o[0](x).flip(-1), lambda s, S: o[1](s.flip(-1), S))
    return [hw, wh, rev(hw), rev(wh)]


def _orders_3d(k=6):
    import itertools
    perms = [(0, 1, 2), (1, 2, 0), (2, 0, 1)] if k == 6 else list(itertools.permutations(range(3)))

    def fwd(p):
        return lambda x: x.permute(0, 1, *[2 + a for a in p]).flatten(2)

    def inv(p):
        def f(s, S):
            s = s.reshape(*s.shape[:2], *[S[a] for a in p])
            back = [p.index(i) for i in range(3)]
            return s.permute(0, 1, *[2 + a for a in back])
        return f

    base = [(fwd(p), inv(p)) for p in perms]
    return base + [(lambda x, o=o: o[0](x).flip(-1), lambda s, S, o=o: o[1](s.flip(-1), S)) for o in base]


def reference_scan(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    """SS2D core by the book: per direction k, copy the map into order k, project, scan, map back, sum."""
    S = x.shape[2:]
    D, R, N = m.d_inner, m.dt_rank, m.d_state
    orders = _orders_2d() if x.dim() == 4 else _orders_3d(m.K)
    A = -torch.exp(m.A_logs.float())
    y = 0
    for k, (to_seq, from_seq) in enumerate(orders):
        xs = to_seq(x)  # (b, D, L)
        x_dbl = torch.einsum("cd,bdl->bcl", m.x_proj_weight[k], xs)
        dts, Bs, Cs = torch.split(x_dbl, [R, N, N], dim=1)
        delta = torch.einsum("dr,brl->bdl", m.dt_projs_weight[k], dts)
        rows = slice(k * D, (k + 1) * D)
        ys = selective_scan(xs, delta, A[rows], Bs, Cs, D=m.Ds[rows].float(),
                            delta_bias=m.dt_projs_bias[k].float(), delta_softplus=True, backend="torch")
        y = y + from_seq(ys, S)
    return y


def reference_forward(m: SS2D, x: torch.Tensor) -> torch.Tensor:
    conv = m.conv
    if m.forward_type == "v0":
        xz = F.linear(x, m.in_proj.weight)
        u, z = xz[..., :m.d_inner], xz[..., m.d_inner:]
        u = F.silu(conv(u.movedim(-1, 1)))
        y = reference_scan(m, u).movedim(1, -1)
        y = F.layer_norm(y, (m.d_inner,), m.out_norm.weight, m.out_norm.bias, 1e-5) * F.silu(z)
        return F.linear(y, m.out_proj.weight)
    u = torch.einsum("oc,bc...->bo...", m.in_proj.weight, x)
    u = F.silu(conv(u))
    y = reference_scan(m, u)
    y = F.layer_norm(y.movedim(1, -1), (m.d_inner,), m.out_norm.weight, m.out_norm.bias, 1e-5).movedim(-1, 1)
    return torch.einsum("oc,bc...->bo...", m.out_proj.weight, y)


def _randomise(m):
    """Non-trivial values for the plain parameters (A_logs = 0 for N = 1 would hide ordering errors less)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("A_logs", "Ds", "out_norm.weight", "out_norm.bias"):
                p.add_(0.3 * torch.randn(p.shape, generator=g))


CASES = [("v0", 2, None, (5, 7)), ("v05_noz", 2, None, (6, 4)), ("v0", 3, None, (3, 4, 5)),
         ("v05_noz", 3, None, (4, 3, 5)), ("v05_noz", 3, 12, (3, 2, 4))]


@pytest.mark.parametrize("ft,nd,k,S", CASES)
def test_ss2d_matches_per_direction_reference(ft, nd, k, S):
    torch.manual_seed(0)
    m = SS2D(16, ft, nd, k_directions=k)
    _randomise(m)
    D = m.d_inner
    u = torch.randn(2, D, *S)
    torch.testing.assert_close(m.scan(u), reference_scan(m, u), rtol=1e-4, atol=1e-4)
    x = torch.randn(2, *S, 16) if ft == "v0" else torch.randn(2, 16, *S)
    x.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = m(x), reference_forward(m, x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-3, atol=1e-4)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-3, atol=1e-4, msg=f"gradient of {n}")


def test_scan_directions_are_data():
    m2, m3 = SS2D(16, "v0", 2), SS2D(16, "v0", 3)
    assert (m2.K, m3.K, SS2D(16, "v0", 3, k_directions=12).K) == (4, 6, 12)
    assert m2.orders[:2] == [((0, 1), False), ((1, 0), False)] and m2.orders[2][1] is True
    with pytest.raises(ValueError, match="K=5"):
        SS2D(16, "v0", 2, k_directions=5)


@pytest.mark.parametrize("ft,nd,expected", [("v0", 2, 105_216), ("v05_noz", 2, 26_016), ("v0", 3, 132_480),
                                            ("v05_noz", 3, 31_008)])
def test_parameter_count_d96(ft, nd, expected):
    m = SS2D(96, ft, nd)
    assert sum(p.numel() for p in m.parameters()) == expected == ss2d_param_count(96, ft, nd)


@pytest.mark.parametrize("d,v0,v05,v0_3d,v05_3d", [(192, 339_456, 98_112, 403_200, 112_704),
                                                    (384, 1_195_008, 380_544, 1_359_360, 428_160)])
def test_parameter_formulas_table(d, v0, v05, v0_3d, v05_3d):
    R = math.ceil(d / 16)
    assert ss2d_param_count(d, "v0") == v0 == 6 * d * d + 16 * d * R + 424 * d
    assert ss2d_param_count(d, "v05_noz") == v05 == 2 * d * d + 8 * d * R + 31 * d
    assert ss2d_param_count(d, "v0", 3) == v0_3d == 6 * d * d + 24 * d * R + 660 * d
    assert ss2d_param_count(d, "v05_noz", 3) == v05_3d == 2 * d * d + 12 * d * R + 59 * d


def test_parameter_names_shapes_and_init():
    m = SS2D(32, "v0")
    shapes = {n: tuple(p.shape) for n, p in m.named_parameters()}
    assert shapes == {"in_proj.weight": (128, 32), "conv2d.weight": (64, 1, 3, 3), "conv2d.bias": (64,),
                      "x_proj_weight": (4, 2 + 32, 64), "dt_projs_weight": (4, 64, 2), "dt_projs_bias": (4, 64),
                      "A_logs": (256, 16), "Ds": (256,), "out_norm.weight": (64,), "out_norm.bias": (64,),
                      "out_proj.weight": (32, 64)}
    assert torch.equal(m.A_logs[5], torch.log(torch.arange(1, 17.0)))
    assert torch.equal(m.Ds, torch.ones(256))
    assert m.x_proj_weight.abs().max() <= 64 ** -0.5
    assert m.dt_projs_weight.abs().max() <= 2 ** -0.5
    dt = F.softplus(m.dt_projs_bias)
    assert dt.min() >= 1e-4 - 1e-7 and dt.max() <= 0.1 + 1e-6
    m3 = SS2D(32, "v05_noz", 3)
    names = {n for n, _ in m3.named_parameters()}
    assert "conv3d.weight" in names and "conv3d.bias" not in names and torch.all(m3.A_logs == 0)
    assert tuple(m3.x_proj_weight.shape) == (6, 2 + 2, 32) and tuple(m3.A_logs.shape) == (192, 1)


def test_linear2d_loads_conv_shaped_weight():
    lin = Linear2d(6, 4)
    w = torch.randn(4, 6, 1, 1)
    lin.load_state_dict({"weight": w, "bias": torch.zeros(4)})
    assert torch.equal(lin.weight, w.view(4, 6))
    x = torch.randn(2, 6, 3, 5)
    torch.testing.assert_close(lin(x), F.conv2d(x, w))
    torch.testing.assert_close(lin(torch.randn(1, 6, 2, 2, 2)).shape, torch.Size([1, 4, 2, 2, 2]))


@pytest.mark.parametrize("ft", ["v0", "v05_noz"])
def test_bf16_autocast_fp32_core(ft):
    m = SS2D(16, ft)
    x = torch.randn(1, 6, 6, 16) if ft == "v0" else torch.randn(1, 16, 6, 6)
    ref = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    torch.testing.assert_close(y, ref, rtol=0.05, atol=0.05)  # only the input was rounded to bf16
    m.core_fp32 = False  # VMamba v0 mode: projections in bf16, scan in fp32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x.bfloat16())
    assert torch.isfinite(y.float()).all()


def test_blocks_shapes_and_counts():
    b0 = VSSBlock(96)
    assert sum(p.numel() for p in b0.parameters()) == 105_408
    b2 = VSSBlockV2(96)
    assert sum(p.numel() for p in b2.parameters()) == 100_608  # P_v05 + 8d^2 + 9d
    x = torch.randn(1, 8, 8, 16)
    assert VSSBlock(16)(x).shape == x.shape
    x = torch.randn(1, 16, 4, 4, 4)
    assert VSSBlockV2(16, spatial_dims=3)(x).shape == x.shape


def test_patch_merging_order_2d():
    pm = PatchMerging(3, (2, 2))
    x = torch.randn(1, 4, 6, 3)
    cat = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
    torch.testing.assert_close(pm(x), pm.reduction(pm.norm(cat)))
    assert sum(p.numel() for p in PatchMerging(96, (2, 2)).parameters()) == 8 * 96 ** 2 + 8 * 96


def test_patch_merging_order_3d_anisotropic():
    pm = PatchMerging(2, (1, 2, 2))
    x = torch.randn(1, 3, 4, 2, 2)
    # offsets (0,0,0), (0,1,0), (0,0,1), (0,1,1): first axis fastest, factor 1 on axis 0
    cat = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], -1)
    torch.testing.assert_close(pm(x), pm.reduction(pm.norm(cat)))
    pm = PatchMerging(2, (2, 2, 2))
    x = torch.randn(1, 2, 2, 2, 2)
    offs = [(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0), (0, 0, 1), (1, 0, 1), (0, 1, 1), (1, 1, 1)]
    cat = torch.cat([x[:, a::2, b::2, c::2] for a, b, c in offs], -1)
    torch.testing.assert_close(pm(x), pm.reduction(pm.norm(cat)))
    with pytest.raises(ValueError, match="divisible"):
        pm(torch.randn(1, 3, 2, 2, 2))


def test_pixel_shuffle_order():
    # ss2d.md §4: input channel (p0*f1 + p1)*c + j -> output pixel (h*f0 + p0, w*f1 + p1), channel j
    c, f = 3, (2, 4)
    x = torch.randn(1, 2, 3, f[0] * f[1] * c)
    y = pixel_shuffle_nd(x, f)
    assert y.shape == (1, 4, 12, 3)
    for h, w, p0, p1, j in [(0, 0, 1, 3, 2), (1, 2, 0, 1, 0), (1, 1, 1, 2, 1)]:
        assert y[0, h * f[0] + p0, w * f[1] + p1, j] == x[0, h, w, (p0 * f[1] + p1) * c + j]
    x = torch.randn(1, 1, 2, 1, 8 * 2)
    y = pixel_shuffle_nd(x, (2, 2, 2))
    assert y[0, 1, 2, 1, 1] == x[0, 0, 1, 0, ((1 * 2 + 0) * 2 + 1) * 2 + 1]
    pe = PatchExpand(192, 96, (2, 2))
    assert sum(p.numel() for p in pe.parameters()) == 8 * 96 ** 2 + 2 * 96
    assert pe(torch.randn(1, 2, 2, 192)).shape == (1, 4, 4, 96)
