"""``nn.Linear`` arithmetic in the layouts the Mamba layers need, so that no tensor is copied to change its layout.

* ``linear_split(x, weight, bias, sizes)`` - ``F.linear(x, weight, bias).split(sizes, -1)``. The autograd of
  ``split`` concatenates the blocks' gradients into one (…, sum(sizes)) tensor before the Linear's backward (at
  LightM-UNet's 128^3 tokens: 11 ms of copies per training step for the Mamba mixers' in_proj); here the backward
  takes each block's gradient where it lies: ``dx = sum_k g_k W_k`` and ``dW_k = g_k^T x``. Gradients that already
  lie side by side in one buffer (the Triton scan writes those of the mixer's x_proj blocks dt, B, C so) are used
  as that one tensor; blocks narrower than 16 columns are otherwise concatenated (x_proj's per-block products
  measured slower than the concatenation).
* ``norm=`` (a LayerNorm over x's last axis) on ``linear_split`` / ``linear_channels_first``: ``F.linear(LN(x))`` with
  the LayerNorm folded into the Triton GEMMs (``_NormLinearFn``): its affine into the Linear's weight and bias, its
  normalisation into the forward GEMM's prologue, its backward into the input gradient's epilogue; its output is
  never written. Taken at 16-32 channels from ``TRITON_FROM["layer-norm-fold"]`` (LightM-UNet's 128^3 layers; at
  64 channels it measured slower), else LayerNorm then the product.
* ``linear_grads_into(g, x, weight, dx)`` - the backward of ``F.linear(x, weight)`` with the input gradient added
  into dx in the GEMM's pass (the scan op applies the Mamba mixer's x_proj with it: ops.selective_scan).
* ``pointwise_conv(x, weight, bias)`` - a 1x1(x1) convolution of a channels-first (B, C_in, *S) map, ``W x_b`` per
  batch element: on the Triton GEMM where its size and widths qualify (LightM-UNet's ResUpBlock conv at 128^3),
  without cuDNN's NCHW <-> NHWC conversions; ``F.conv2d/3d`` otherwise.
* ``linear_channels_first(x, weight, bias, residual=None)`` - the Linear of tokens x (B, L, C_in) returned as a
  channels-first (B, C_out, L) tensor (``W x_b^T`` per batch element), the layout of the feature maps around a Mamba
  layer; its backward returns dx token-major (the layout the layer's LayerNorm and the scan read coalesced). With
  ``residual=(s, t)`` it returns ``ops.scaled_add`` of that and s, t, the residual added in the GEMM's epilogue
  (LightM-UNet's ``skip_scale`` residual after the mixer's out_proj: one pass over the map less).

Under autocast they run in the autocast dtype as ``F.linear`` would (cuBLAS). In fp32 on CUDA, the products of the
forward and of the input's gradient whose operand has at least ``TRITON_FROM["linear"]`` elements (ops/token_ops.py)
and 16-256 columns run the Triton 3xTF32 GEMM (kernels/linear_triton.py: as accurate as cuBLAS's SGEMM on these
tall-skinny shapes, 1.3-1.7x faster on the H200; a channels-first input gradient only up to 64 columns), and the
weights' gradients from ``TRITON_FROM["linear-wgrad"]`` elements with 16-64 (multiples of 16) outputs and inputs run
its split-token reduction (2.1-3.2x cuBLAS at 2 x 128^3 tokens; not faster at 2 x 64^3 or for x_proj's 34 or 36
unaligned outputs). ``NNUNET_MAMBA_TOKEN_OPS_BACKEND=torch`` keeps every product on cuBLAS.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..kernels.layout import column_blocks
from .token_ops import _use_triton, layer_norm, scaled_add, scaled_residual_grads


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(..., n) as (rows, n): a view where the strides allow, else a copy."""
    return t.reshape(-1, t.shape[-1])


def _tf32x3(a: torch.Tensor, b: torch.Tensor, size_of: torch.Tensor | None = None) -> bool:
    """Whether ``a @ b`` runs the Triton 3xTF32 GEMM: fp32 CUDA operands, an (rows, 16-256) operand from the
    measured size (that of ``size_of`` if given), 16-256 output columns; a row-major a, or a column-major one (a
    channels-first gradient) with up to 64 output columns (module docstring)."""
    if not (a.is_cuda and a.dtype == torch.float32 and b.dtype == torch.float32):
        return False
    layout = a.stride(1) == 1 or (a.stride(0) == 1 and b.shape[1] <= 64)
    shape_measured = 16 <= a.shape[1] <= 256 and 16 <= b.shape[1] <= 256 and layout
    return _use_triton("linear", a if size_of is None else size_of, "auto", measured_faster=shape_measured)


def _wgrad(g: torch.Tensor, x: torch.Tensor, out=None) -> torch.Tensor:
    """``sum_b g[b]^T @ x[b]`` for g (B, L, N) and x (B, L, K), any strides (a Linear's weight gradient), or written
    into ``out``: the Triton split-token reduction where measured faster (module docstring), else cuBLAS."""
    if _wgrad_on_triton(g, x):
        from ..kernels.linear_triton import weight_grad_tf32x3
        return weight_grad_tf32x3(g, x, out=out)
    return _wgrad_cublas(g, x, out)


def _wgrad_on_triton(g: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether ``sum_b g[b]^T @ x[b]`` runs the Triton split-token reduction: fp32 CUDA operands with the widths and
    from the size at which it measured faster than cuBLAS (module docstring)."""
    N, K = g.shape[2], x.shape[2]
    return g.is_cuda and g.dtype == x.dtype == torch.float32 and _use_triton(
        "linear-wgrad", g, "auto", measured_faster=N <= 64 and K <= 64 and N % 16 == 0 and K % 16 == 0)


def _wgrad_cublas(g: torch.Tensor, x: torch.Tensor, out=None) -> torch.Tensor:
    """``_wgrad`` on cuBLAS: one GEMM over the tokens per batch element (a batched GEMM with the tokens as its
    reduction axis runs on a handful of thread blocks)."""
    out = torch.mm(g[0].t(), x[0], out=out)
    for b in range(1, g.shape[0]):
        out.addmm_(g[b].t(), x[b])
    return out


def _mm(a: torch.Tensor, b: torch.Tensor, out=None) -> torch.Tensor:
    """``a @ b`` for 2-D operands, or added into ``out``: the Triton 3xTF32 GEMM where ``_tf32x3``, else cuBLAS."""
    if _tf32x3(a, b):
        from ..kernels.linear_triton import matmul_tf32x3
        return matmul_tf32x3(a, b, out=out, accumulate=out is not None)
    return a @ b if out is None else out.addmm_(a, b)


def _product(x: torch.Tensor, weight: torch.Tensor, bias=None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: the Triton 3xTF32 GEMM (bias fused) on the rows of x where ``_tf32x3``."""
    x2 = _rows(x)
    if _tf32x3(x2, weight.t()):
        from ..kernels.linear_triton import matmul_tf32x3
        return matmul_tf32x3(x2, weight.t(), bias).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def linear_grads_into(g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """The backward of ``F.linear(x, weight)`` (no bias) for its output's gradient g (..., N): adds ``g @ weight``
    into dx (x's shape; in the GEMM's pass where dx is contiguous) and returns the weight's gradient. The selective
    scan's x_proj (ops.selective_scan's ``x_proj_weight``) adds its input gradient into du so."""
    g2 = _rows(g)
    if dx.is_contiguous():
        _mm(g2, weight, out=dx.view(-1, dx.shape[-1]))
    else:
        dx += _mm(g2, weight).view(dx.shape)
    return _wgrad(g2[None], _rows(x)[None])


def _gradient_blocks(grads, sizes) -> list[tuple[torch.Tensor, slice]]:
    """The gradients of a split Linear's output blocks as (gradient, its rows of the weight): one block of all rows
    where they lie side by side in one buffer (the Triton scan writes x_proj's dt, B and C so), else every block
    that reached the loss."""
    whole = column_blocks(grads)
    if whole is not None:
        return [(whole, slice(None))]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    return [(g, slice(s0, s0 + n)) for g, s0, n in zip(grads, starts, sizes) if g is not None]


class _SplitLinearFn(torch.autograd.Function):

    @staticmethod
    def forward(ctx, x, weight, bias, sizes):
        ctx.save_for_backward(x, weight)
        ctx.sizes = sizes
        ctx.set_materialize_grads(False)
        return _product(x, weight, bias).split(sizes, dim=-1)

    @staticmethod
    def backward(ctx, *grads):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x2 = _rows(x)
        blocks = _gradient_blocks(grads, ctx.sizes)
        if len(blocks) > 1 and None not in grads and min(ctx.sizes) < 16:  # narrow blocks (x_proj's dt): one
            blocks = [(torch.cat(grads, dim=-1), slice(None))]  # product beats per-block products
        dx = None
        dw = torch.zeros_like(weight) if need_w else None  # the rows of blocks that did not reach the loss stay 0
        db = torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype) if need_b else None
        for g, rows in blocks:
            g2 = _rows(g)
            if need_x:
                dx = _mm(g2, weight[rows], out=dx)
            if need_w:
                _wgrad(g2[None], x2[None], out=dw[rows])
            if need_b:
                db[rows] = g2.sum(0)
        if need_x:
            dx = torch.zeros_like(x) if dx is None else dx.reshape(x.shape)
        return dx, dw, db, None


class _NormLinearFn(torch.autograd.Function):
    """``F.linear(LayerNorm(x), weight, bias)`` with the LayerNorm folded into the Triton GEMMs: its weight into the
    product's (W' = W diag(ln_weight)) and its bias into the bias (b' = W ln_bias + b), its normalisation into the
    GEMM's prologue, which reads x in place and stores the rows' mean and rstd; in the backward the input gradient's
    GEMM ends in LayerNorm's backward (whole rows in a tile) and the weight gradient's normalises x again from the
    statistics, with the gradient's column sums from the same pass. The LayerNorm's output is never written.
    dW, d(ln_weight), d(ln_bias) and db follow from dW' = g^T xhat and q = sum g on the host (small matrices). One
    GEMM per batch element: x may be a channels-first token view. Output: the (B, L, N) tokens split into ``sizes``,
    or with ``channels_first`` a (B, N, L) tensor."""

    @staticmethod
    def forward(ctx, x, ln_weight, ln_bias, weight, bias, eps, sizes, channels_first):
        from ..kernels.linear_triton import matmul_tf32x3
        (B, L, _), N = x.shape, weight.shape[0]
        w, b = _folded(weight, bias, ln_weight, ln_bias)
        mean, rstd = x.new_empty(B, L), x.new_empty(B, L)
        y = x.new_empty(B, N, L) if channels_first else x.new_empty(B, L, N)
        for i in range(B):
            matmul_tf32x3(x[i], w.t(), b, out=y[i].t() if channels_first else y[i], norm=(mean[i], rstd[i], eps))
        ctx.save_for_backward(x, ln_weight, ln_bias, weight, mean, rstd)
        ctx.cfg = sizes, channels_first
        ctx.set_materialize_grads(False)
        return y if channels_first else y.split(sizes, dim=-1)

    @staticmethod
    def backward(ctx, *grads):
        from ..kernels.linear_triton import matmul_tf32x3, weight_grad_tf32x3
        x, ln_weight, ln_bias, weight, mean, rstd = ctx.saved_tensors
        sizes, channels_first = ctx.cfg
        w, _ = _folded(weight, None, ln_weight, None)
        # the gradients as (B, L, n) token-major views with their rows of the weight
        blocks = [(grads[0].transpose(1, 2), slice(None))] if channels_first else _gradient_blocks(grads, sizes)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x) if blocks else torch.zeros_like(x)  # x's layout (channels-first stays so)
            for i in range(x.shape[0]):
                for k, (g, rows) in enumerate(blocks):
                    last = k == len(blocks) - 1
                    matmul_tf32x3(g[i], w[rows], out=dx[i], accumulate=k > 0,
                                  norm_grad=(x[i], mean[i], rstd[i]) if last else None)
        dw_f = torch.zeros_like(weight)  # g^T xhat, and q = the column sums of g
        q = weight.new_zeros(weight.shape[0])
        xhat = None
        for g, rows in blocks:
            if _wgrad_on_triton(g, x):
                _, q[rows] = weight_grad_tf32x3(g, x, out=dw_f[rows], norm=(mean, rstd))
            else:
                if xhat is None:
                    xhat = (x - mean[..., None]) * rstd[..., None]
                _wgrad_cublas(g, xhat, out=dw_f[rows])
                q[rows] = g.sum((0, 1))
        dw, dlw, dlb = dw_f, None, None
        if ln_weight is not None:
            dw = dw_f * ln_weight
            dlw = (dw_f * weight).sum(0)
        if ln_bias is not None:
            dw = dw.addr(q, ln_bias)
            dlb = q @ weight
        return dx, dlw, dlb, dw, q if ctx.needs_input_grad[4] else None, None, None, None


def _folded(weight, bias, ln_weight, ln_bias):
    """The Linear's weight and bias with a LayerNorm's affine folded in: W diag(ln_weight), W ln_bias + b."""
    w = weight * ln_weight if ln_weight is not None else weight
    if ln_bias is not None:
        bias = weight @ ln_bias if bias is None else torch.addmv(bias, weight, ln_bias)
    return w, bias


def _norm_folds(x, weight, norm, sizes, channels_first) -> bool:
    """Whether ``_NormLinearFn`` takes LayerNorm ``norm`` + the Linear: fp32 CUDA operands (no autocast) from the
    measured size (``TRITON_FROM["layer-norm-fold"]``) with 16 or 32 channels (the forward's prologue holds a row in
    one K step; at 64 channels it measured slower), on the persistent GEMM for the forward and for every block's
    input gradient (whose epilogue, LayerNorm's backward, needs each row whole in one tile)."""
    from ..kernels.linear_triton import streams
    C = x.shape[-1]
    params = [t for t in (weight, norm.weight, norm.bias) if t is not None]
    if not (x.is_cuda and x.dim() == 3 and all(t.dtype == torch.float32 for t in (x, *params))
            and not torch.is_autocast_enabled(x.device.type) and tuple(norm.normalized_shape) == (C,)):
        return False
    shapes = C in (16, 32) and streams(C, weight.shape[0], x.device) and all(streams(n, C, x.device) for n in sizes)
    return _use_triton("layer-norm-fold", x, "auto", measured_faster=shapes)


def linear_split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 sizes: Sequence[int], norm: torch.nn.LayerNorm | None = None) -> tuple[torch.Tensor, ...]:
    """``F.linear(x, weight, bias).split(sizes, dim=-1)`` whose backward does not concatenate the blocks' gradients
    (module docstring); with ``norm`` (a LayerNorm over x's last axis: its weight, bias and eps) applied to x first,
    folded into the GEMMs where they run on Triton (``_NormLinearFn``). Under autocast the GEMM runs in the autocast
    dtype, as ``F.linear`` would."""
    if sum(sizes) != weight.shape[0]:
        raise ValueError(f"linear_split: sizes {list(sizes)} must add up to the {weight.shape[0]} output features")
    sizes = tuple(int(s) for s in sizes)
    if norm is not None:
        if _norm_folds(x, weight, norm, sizes, False):
            return _NormLinearFn.apply(x, norm.weight, norm.bias, weight, bias, norm.eps, sizes, False)
        x = layer_norm(x, norm.weight, norm.bias, norm.eps)
    if not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))):
        return F.linear(x, weight, bias).split(list(sizes), dim=-1)  # no backward: the plain ops, less overhead
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
    return _SplitLinearFn.apply(x, weight, bias, sizes)


class _ChannelsFirstLinearFn(torch.autograd.Function):
    """One GEMM per batch element, each into its slice of a preallocated output: ``torch.matmul`` would fold the
    batch into the rows and hand back a transposed (channels-last) view. The Triton GEMM computes ``x_b W^T`` into the
    transposed slice (bias and the scaled residual s * t fused); cuBLAS ``W x_b^T`` (bias in one more pass, the
    residual in another)."""

    @staticmethod
    def forward(ctx, x, weight, bias, s, t, triton_grads):
        ctx.save_for_backward(x, weight, s, t if s is not None and s.requires_grad else None)  # t: for s's gradient
        ctx.triton_grads, ctx.t_dtype = triton_grads, None if t is None else t.dtype
        y = x.new_empty(x.shape[0], weight.shape[0], x.shape[1])  # (B, C_out, L)
        # per batch element from the measured size; with a bias or residual, which cost cuBLAS one more pass each,
        # from that size over the whole batch (LightM-UNet's proj at 64^3: 0.12 ms + 0.11 ms for the bias on cuBLAS)
        extra = bias is not None or s is not None
        if _tf32x3(x[0], weight.t(), x if extra else None) and (
                s is None or (s.dtype == t.dtype == torch.float32 and s.is_cuda)):
            from ..kernels.linear_triton import matmul_tf32x3
            for b in range(x.shape[0]):
                matmul_tf32x3(x[b], weight.t(), bias, out=y[b].t(), residual=None if s is None else (s, t[b].t()))
            return y
        for b in range(x.shape[0]):
            torch.mm(weight, x[b].t(), out=y[b])
        if bias is not None:  # one pass; addmm's broadcast bias (copied into the output first) measured slower
            y += bias[:, None]
        return y if s is None else y.addcmul_(s, t)

    @staticmethod
    def backward(ctx, g):
        x, weight, s, t = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = x.new_empty(x.shape)  # (B, L, C_in), token-major
            if _tf32x3(g[0].t(), weight):
                from ..kernels.linear_triton import matmul_tf32x3
                for b in range(x.shape[0]):
                    matmul_tf32x3(g[b].t(), weight, out=dx[b])
            else:
                for b in range(x.shape[0]):
                    torch.mm(g[b].t(), weight, out=dx[b])
        if ctx.needs_input_grad[1]:
            dw = _wgrad(g.transpose(1, 2), x)
        if ctx.needs_input_grad[2]:  # False without a bias
            db = g.sum((0, 2))
        gs, gt = scaled_residual_grads(g, s, t, *ctx.needs_input_grad[3:5], ctx.triton_grads, ctx.t_dtype) \
            if s is not None else (None, None)
        return dx, dw, db, gs, gt, None


def linear_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                          residual: tuple[torch.Tensor, torch.Tensor] | None = None,
                          norm: torch.nn.LayerNorm | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias).transpose(1, 2)`` for tokens x (B, L, C_in), computed into a contiguous
    (B, C_out, L) tensor; the gradient of x comes back token-major (module docstring). ``residual`` = (s, t), s a
    1-element tensor and t (B, C_out, L): ``ops.scaled_add`` of that and s, t, in the GEMM's pass where it runs on
    Triton (the Mamba mixer's out_proj with LightM-UNet's ``skip_scale`` residual). ``norm``: a LayerNorm applied to
    x first, folded into the GEMMs where they run on Triton (``_NormLinearFn``; then x's gradient comes back in x's
    layout)."""
    if norm is not None:
        if residual is None and _norm_folds(x, weight, norm, (weight.shape[0],), True):
            return _NormLinearFn.apply(x, norm.weight, norm.bias, weight, bias, norm.eps, (weight.shape[0],), True)
        x = layer_norm(x, norm.weight, norm.bias, norm.eps)
    if x.dim() != 3:
        raise ValueError(f"linear_channels_first: x must be (B, L, C_in), got {tuple(x.shape)}")
    if torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias = x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)
        if residual is not None:  # the residual in autocast's promotion, as scaled_add does it
            return scaled_add(_ChannelsFirstLinearFn.apply(x, weight, bias, None, None, False), *residual)
    if residual is None:
        return _ChannelsFirstLinearFn.apply(x, weight, bias, None, None, False)
    s, t = residual
    if not isinstance(s, torch.Tensor) or s.numel() != 1 or t.shape != (x.shape[0], weight.shape[0], x.shape[1]):
        raise ValueError(f"linear_channels_first: residual must be (1-element s, t of the output's shape "
                         f"{(x.shape[0], weight.shape[0], x.shape[1])})")
    return _ChannelsFirstLinearFn.apply(x, weight, bias, s, t, _use_triton("scaled-add", t, "auto"))


class _PointwiseConvFn(torch.autograd.Function):
    """A 1x1(x1) conv of a contiguous channels-first map as one GEMM per batch element on the Triton kernel: y_b^T =
    x_b^T W^T with x_b^T (L, C_in) and y_b^T (L, C_out) column-major views (bias fused); dx_b^T = g_b^T W (Triton
    where its widths qualify, else cuBLAS); dW = sum_b g_b x_b^T (``_wgrad``)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        from ..kernels.linear_triton import matmul_tf32x3
        ctx.save_for_backward(x, weight)
        (B, C), O = x.shape[:2], weight.shape[0]
        x3, w2 = x.view(B, C, -1), weight.view(O, C)
        y = x.new_empty(B, O, *x.shape[2:])
        y3 = y.view(B, O, -1)
        for b in range(B):
            matmul_tf32x3(x3[b].t(), w2.t(), bias, out=y3[b].t())
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        (B, C), O = x.shape[:2], weight.shape[0]
        x3, w2, g3 = x.view(B, C, -1), weight.view(O, C), g.reshape(B, O, -1)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x, memory_format=torch.contiguous_format)
            dx3 = dx.view(B, C, -1)
            if _tf32x3(g3[0].t(), w2):
                from ..kernels.linear_triton import matmul_tf32x3
                for b in range(B):
                    matmul_tf32x3(g3[b].t(), w2, out=dx3[b].t())
            else:
                for b in range(B):
                    torch.mm(w2.t(), g3[b], out=dx3[b])
        if ctx.needs_input_grad[1]:
            dw = _wgrad(g3.transpose(1, 2), x3.transpose(1, 2)).view(weight.shape)
        if ctx.needs_input_grad[2]:
            db = g3.sum((0, 2))
        return dx, dw, db


def pointwise_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.conv2d/3d(x, weight, bias)`` for a 1x1(x1) ``weight`` (C_out, C_in, 1, ...) on a (B, C_in, *S) map: one
    Triton 3xTF32 GEMM per batch element (as accurate as cuBLAS's SGEMM) for contiguous fp32 CUDA maps outside
    autocast whose per-element operand has the measured size and up to 64 output channels (module docstring), or
    with fewer than 16 channels on one side and up to 64 on the other from the measured size of the wider map
    (``TRITON_FROM["pointwise-narrow"]``), cuDNN otherwise."""
    nd = x.dim() - 2
    if weight.dim() != nd + 2 or tuple(weight.shape[2:]) != (1,) * nd or weight.shape[1] != x.shape[1]:
        raise ValueError(f"pointwise_conv: weight must be (C_out, {x.shape[1]}{', 1' * nd}) for a {nd}D map, got "
                         f"{tuple(weight.shape)}")
    (B, C), O = x.shape[:2], weight.shape[0]
    if x.is_contiguous() and not torch.is_autocast_enabled(x.device.type):
        # _tf32x3 checks device, dtypes, widths and size (x_b^T as the column-major operand it will be); narrow convs
        # (fewer than 16 channels on one side, up to 64 on the other) go by the size of the wider map
        narrow = min(C, O) < 16 and max(C, O) <= 64 and x.is_cuda and x.dtype == weight.dtype == torch.float32
        if _tf32x3(x.view(B, C, -1)[0].t(), weight.view(O, C).t()) or (
                narrow and _use_triton("pointwise-narrow", x, "auto", size=x.numel() // C * max(C, O))):
            return _PointwiseConvFn.apply(x, weight, bias)
    return {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[nd](x, weight, bias)
