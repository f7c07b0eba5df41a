"""Independent float64 oracle of mamba-ssm's selective_scan_fn: a plain per-step loop, written from the math; and the
relative error the kernel tests compare against their oracles with."""
import torch
import torch.nn.functional as F


def rel_err(a, b):
    """||a - b|| / ||b|| in float64 (b the oracle)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def selective_scan_oracle(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                          return_last_state=False):
    """float64, straight from the recurrence (specs/mamba_block.md §4). Differentiable through autograd."""
    f = torch.float64
    u, delta, A = u.to(f), delta.to(f), A.to(f)
    b, d, L = u.shape
    N = A.shape[1]
    if delta_bias is not None:
        delta = delta + delta_bias.to(f)[:, None]
    if delta_softplus:
        delta = torch.where(delta > 20, delta, F.softplus(delta))

    def per_channel(X):  # -> (b or 1, d, N, L or 1)
        X = X.to(f)
        if X.dim() == 2:
            return X[None, :, :, None]
        if X.dim() == 3:
            X = X[:, None]
        G = X.shape[1]
        return X.repeat_interleave(d // G, dim=1)

    Bc, Cc = per_channel(B), per_channel(C)
    h = u.new_zeros(b, d, N)
    ys = []
    for t in range(L):
        Bt = Bc[..., t if Bc.shape[-1] > 1 else 0]
        Ct = Cc[..., t if Cc.shape[-1] > 1 else 0]
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * Bt * u[:, :, t, None]
        ys.append((h * Ct).sum(-1))
    y = torch.stack(ys, -1)
    if D is not None:
        y = y + D.to(f)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(f))
    return (y, h) if return_last_state else y
