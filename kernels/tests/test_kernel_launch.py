"""Cached launches (kernels/launch.py): the same kernels run, keyed so that every specialisation Triton would make
stays apart, and the results match Triton's own launch bit for bit and the float64 oracle.

Compiled only (a CUDA machine): under the interpreter every launch takes Triton's path, which the last test checks.
"""
import pytest
import torch

from test_scan_triton import check_against_oracle, leaves, make_inputs

ON_GPU = torch.cuda.is_available()


@pytest.fixture
def cached():
    from nnunet_mamba.kernels import launch
    saved = launch.ENABLED
    yield launch
    launch.ENABLED = saved


def _scan_grads(tk, inp, gy):
    x = leaves(inp)
    y, last = tk.selective_scan_triton(x["u"], x["delta"], x["A"], x["B"], x["C"], D=x["D"], z=x["z"],
                                       delta_bias=x["delta_bias"], delta_softplus=True, return_last_state=True)
    y.backward(gy)
    return [y, last] + [x[k].grad for k in sorted(x)]


@pytest.mark.cuda
def test_cached_scan_launches_match_triton_and_the_oracle(tk, tuning, cached):
    tuning(T=64)  # several chunks: all six kernels run (forward summary + carry + output, _bsum + carry + _bwd)
    inp = make_inputs(2, 48, 1000, 16, "grouped", groups=2, device="cuda", seed=3)
    gy = torch.randn(2, 48, 1000, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    cached.ENABLED = False
    want = _scan_grads(tk, inp, gy)
    cached.ENABLED = True
    kernels = (tk._chunk_kernel, tk._carry_kernel, tk._bsum_kernel, tk._bwd_kernel)
    for k in kernels:
        k.cache.clear()
    first = _scan_grads(tk, inp, gy)  # compiles (or takes Triton's cache) and fills ours
    sizes = [len(k.cache) for k in kernels]
    assert sizes == [2, 2, 1, 1]  # _chunk: summary and output pass; _carry: forward and reverse
    again = _scan_grads(tk, inp, gy)  # every launch from our cache
    assert [len(k.cache) for k in kernels] == sizes
    for a, b, c in zip(want, first, again):
        assert torch.equal(a, b) and torch.equal(a, c)
    check_against_oracle(tk, inp)  # and the cached path is right, not only equal to itself


def _shifted(t):
    """t's values channels-last (the layout the kernels read in place), starting 4 bytes past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 4, device=t.device, dtype=t.dtype)
    b, c, L = t.shape
    v = buf[1:1 + t.numel()].view(b, L, c).transpose(1, 2)
    v.copy_(t)
    assert v.data_ptr() % 16 == 4 and v.stride(1) == 1
    return v


@pytest.mark.cuda
def test_alignment_dtype_and_sizes_get_their_own_entries(tk, tuning, cached):
    """A view whose data starts 4 bytes past a 16-byte boundary, a half-precision input, another length: each is a
    different Triton specialisation, so each must compile its own entry and still match the oracle."""
    cached.ENABLED = True
    tuning(T=64)
    check_against_oracle(tk, make_inputs(1, 32, 300, 16, "shared", device="cuda", seed=1))
    n0 = len(tk._bwd_kernel.cache)
    inp = make_inputs(1, 32, 300, 16, "shared", device="cuda", seed=2)
    inp = {k: (_shifted(v) if k in ("u", "delta", "z", "B", "C") else v) for k, v in inp.items()}
    check_against_oracle(tk, inp)
    n1 = len(tk._bwd_kernel.cache)
    assert n1 > n0
    check_against_oracle(tk, make_inputs(1, 32, 300, 16, "shared", device="cuda", seed=1, dtype=torch.bfloat16),
                         tol=1e-2, gtol=1.5e-2)
    check_against_oracle(tk, make_inputs(1, 32, 500, 16, "shared", device="cuda", seed=4))
    assert len(tk._bwd_kernel.cache) >= n1 + 2


@pytest.mark.skipif(ON_GPU, reason="the interpreter's path")
def test_interpreted_kernels_take_tritons_path(tk):
    assert not tk._bwd_kernel.fast and not tk._bwd_kernel.cache
