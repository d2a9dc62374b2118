"""The DoRA op as `torch.library` custom ops (fake + autograd registrations, for ``torch.compile(fullgraph=True)``)
and the eager `autograd.Function` with the same math; both run a strategy of :mod:`lorafast.dora.strategies`.

Saved for backward: x (alive anyway), W, the adapters (parameters), H (M×r fp32), Zb (M×N in x's dtype, the one
M×N tensor), g and 1/‖·‖ (N, fp32) and the seed (None at p = 0): nothing N×K, no dropout mask. The frozen
‖W‖² comes from :mod:`lorafast.dora.norm`'s cache; the lookup runs inside the op, so a compiled graph reads the
cache at run time like eager code does (and never bakes a stale norm into the graph).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from lorafast.dora import strategies
from lorafast.dora.norm import cached_row_sq_norms, store_row_sq_norms
from lorafast.strategies.aten import accum_dtype, as_dtype


def norm_and_forward(
    strategy: str, x, weight, bias, lora_a, lora_b, magnitude, scaling, seed, dropout_p, norm_key=None
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, H, Zb, g, 1/‖·‖) of ``strategy``: the weight norm (‖W‖² from the cache, filled on a miss), then the
    forward. ``norm_key``: what the ‖W‖² cache keys on when ``weight`` is transient (a dequantized 4-bit W)."""
    impl = strategies.get(strategy)
    row_sq = cached_row_sq_norms(weight, norm_key)
    g, inv_norm, fresh = impl.norm(weight, lora_a, lora_b, magnitude, scaling, row_sq)
    if row_sq is None and fresh is not None:  # the Triton norm needs no ‖W‖² and returns None
        store_row_sq_norms(weight, fresh, norm_key)
    y, h, zb = impl.forward(x, weight, bias, lora_a, lora_b, g, scaling, seed, dropout_p)
    return y, h, zb, g, inv_norm


@torch.library.custom_op("lorafast::dora_linear_fwd", mutates_args=())
def dora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    magnitude: Tensor,
    scaling: Tensor,
    seed: Optional[Tensor],
    dropout_p: float,
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x (M, K) → (y (M, N) x's dtype, H (M, r) fp32, Zb (M, N) x's dtype, g (N,), 1/‖·‖ (N,) fp32)."""
    outs = norm_and_forward(backend, x, weight, bias, lora_a, lora_b, magnitude, scaling, seed, dropout_p)
    return tuple(t.contiguous() for t in outs)


@dora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, magnitude, scaling, seed, dropout_p, backend):
    M, N, r = x.shape[0], weight.shape[0], lora_a.shape[0]
    acc = accum_dtype(x.dtype)
    return (x.new_empty((M, N)), x.new_empty((M, r), dtype=acc), x.new_empty((M, N)),
            x.new_empty((N,), dtype=acc), x.new_empty((N,), dtype=acc))


@torch.library.custom_op("lorafast::dora_linear_bwd", mutates_args=())
def dora_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    h: Tensor,
    zb: Tensor,
    g: Tensor,
    inv_norm: Tensor,
    scaling: Tensor,
    seed: Optional[Tensor],
    dropout_p: float,
    backend: str,
    need_dx: bool,
    need_da: bool,
    need_db_lora: bool,
    need_dbias: bool,
    need_dm: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dX (M, K) x's dtype, dA (r, K), dB (N, r), db (N,), dm (N,) fp32); one not asked for is an empty (0,)."""
    grads = strategies.get(backend).backward(
        grad_y, x, weight, lora_a, lora_b, h, zb, g, inv_norm, scaling, seed, dropout_p,
        need_dx, need_da, need_db_lora, need_dbias, need_dm,
    )
    out, storages = [], set()
    for t in grads:  # custom op outputs may not alias each other (the Triton strategies carve them from one fill)
        if t is None:
            out.append(x.new_empty((0,)))
            continue
        t = t.contiguous()
        if t.untyped_storage().data_ptr() in storages:
            t = t.clone()
        storages.add(t.untyped_storage().data_ptr())
        out.append(t)
    return tuple(out)


@dora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_a, lora_b, h, zb, g, inv_norm, scaling, seed, dropout_p, backend, need_dx, need_da,
      need_db_lora, need_dbias, need_dm):
    acc = accum_dtype(x.dtype)
    M, K = x.shape
    N, r = lora_b.shape
    return (
        x.new_empty((M, K) if need_dx else (0,)),
        x.new_empty((r, K) if need_da else (0,), dtype=acc),
        x.new_empty((N, r) if need_db_lora else (0,), dtype=acc),
        x.new_empty((N,) if need_dbias else (0,), dtype=acc),
        x.new_empty((N,) if need_dm else (0,), dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, magnitude, scaling, seed, dropout_p, backend = inputs
    _, h, zb, g, inv_norm = output
    ctx.float_scale = None
    ctx.save_for_backward(x, weight, lora_a, lora_b, h, zb, g, inv_norm, seed, scaling)
    ctx.dropout_p, ctx.backend = dropout_p, backend
    ctx.dtypes = (bias.dtype if bias is not None else None, magnitude.dtype)
    ctx.mark_non_differentiable(h, zb, g, inv_norm)
    ctx.set_materialize_grads(False)


_NO_GRADS = (None,) * 10


def _grads_from(ctx, grad_y, run_backward):
    """Unpack ctx once, run ``run_backward(grad_y, *saved, p, *needs)`` → (dX, dA, dB, db, dm) and map them to the
    10 forward inputs' grads, each in its input's dtype."""
    x, weight, lora_a, lora_b, h, zb, g, inv_norm, seed, *saved_scale = ctx.saved_tensors
    scaling = ctx.float_scale if ctx.float_scale is not None else saved_scale[0]
    if grad_y is None:
        return _NO_GRADS
    need_dx, need_dw, need_dbias, need_da, need_db_lora, need_dm = ctx.needs_input_grad[:6]
    dx, da, db_lora, dbias, dm = run_backward(
        grad_y, x, weight, lora_a, lora_b, h, zb, g, inv_norm, scaling, seed, ctx.dropout_p,
        need_dx, need_da, need_db_lora, need_dbias, need_dm,
    )
    if need_dw:  # the functional entry routes a trainable W to the reference; reaching here is a bug
        raise RuntimeError("lorafast.dora_linear: the fused DoRA op has no gradient for the base weight")
    bias_dtype, magnitude_dtype = ctx.dtypes
    return (
        dx if need_dx else None,
        None,
        as_dtype(dbias, bias_dtype) if need_dbias else None,
        as_dtype(da, lora_a.dtype) if need_da else None,
        as_dtype(db_lora, lora_b.dtype) if need_db_lora else None,
        as_dtype(dm, magnitude_dtype) if need_dm else None,
        None, None, None, None,
    )


def _backward(ctx, grad_y, *_non_differentiable):
    def through_custom_op(grad_y, x, weight, lora_a, lora_b, h, zb, g, inv_norm, scaling, seed, p, *needs):
        return torch.ops.lorafast.dora_linear_bwd(
            grad_y, x, weight, lora_a, lora_b, h, zb, g, inv_norm, scaling, seed, p, ctx.backend, *needs
        )

    return _grads_from(ctx, grad_y, through_custom_op)


dora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class DoraLinearFunction(torch.autograd.Function):
    """The custom ops' forward/backward for eager mode, returning y only (eager calls skip the torch.library
    dispatch layers, which cost tens of µs per call on the CPU: see lorafast.ops.LoraLinearFunction).

    forward(x (M, K), weight (N, K), bias, lora_a, lora_b, magnitude (N,), scaling (float or 0-dim tensor),
    seed, dropout_p, strategy, norm_key) → y (M, N).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, scaling, seed, dropout_p, backend, norm_key=None):
        y, h, zb, g, inv_norm = norm_and_forward(
            backend, x, weight, bias, lora_a, lora_b, magnitude, scaling, seed, dropout_p, norm_key
        )
        if isinstance(scaling, Tensor):
            ctx.float_scale = None
            ctx.save_for_backward(x, weight, lora_a, lora_b, h, zb, g, inv_norm, seed, scaling)
        else:
            ctx.float_scale = scaling
            ctx.save_for_backward(x, weight, lora_a, lora_b, h, zb, g, inv_norm, seed)
        ctx.dropout_p, ctx.backend = dropout_p, backend
        ctx.dtypes = (bias.dtype if bias is not None else None, magnitude.dtype)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return (*_grads_from(ctx, grad_y, strategies.get(ctx.backend).backward), None)
