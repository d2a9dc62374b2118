"""The grouped op as `torch.library` custom ops (fake + autograd registrations, for ``torch.compile``) and the
eager `autograd.Function` with the same math; the strategy string picks the implementation at run time.

Saved for backward: x (already alive), the expert weight (a parameter), offsets, the adapters, H (S×r) and the
dropout seed — nothing of size S×K beyond x, nothing of size E×N×K. A trainable expert weight gets
dW_e = dY_eᵀ·X_e from :func:`lorafast.moe.strategies.aten.grouped_outer` (a documented fallback, not fused; PEFT
never trains it).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from lorafast.moe import strategies
from lorafast.moe.groups import Groups, out_features
from lorafast.ops import _unaliased
from lorafast.strategies.aten import accum_dtype, as_dtype


@torch.library.custom_op("lorafast::grouped_lora_fwd", mutates_args=())
def grouped_lora_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    offsets: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    seed: Optional[Tensor],
    dropout_p: float,
    transposed: bool,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """x (S, K) → (y (S, N) in x's dtype, H (S, r) — unscaled LoRA hidden, saved for backward)."""
    y, h = strategies.get(backend).forward(x, weight, transposed, bias, offsets, lora_a, lora_b, scaling, seed,
                                           dropout_p)
    return y.contiguous(), h.contiguous()


@grouped_lora_fwd.register_fake
def _(x, weight, bias, offsets, lora_a, lora_b, scaling, seed, dropout_p, transposed, backend):
    r = lora_a.shape[0] // weight.shape[0]
    return (x.new_empty((x.shape[0], out_features(weight, transposed))),
            x.new_empty((x.shape[0], r), dtype=accum_dtype(x.dtype)))


@torch.library.custom_op("lorafast::grouped_lora_bwd", mutates_args=())
def grouped_lora_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    offsets: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    h: Tensor,
    scaling: Tensor,
    seed: Optional[Tensor],
    dropout_p: float,
    transposed: bool,
    backend: str,
    need_dx: bool,
    need_da: bool,
    need_db_lora: bool,
    need_dbias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dX (S, K), dA (E·r, K), dB (N, r·E), db (E, N)); one not asked for is an empty (0,) tensor."""
    grads = strategies.get(backend).backward(
        grad_y, x, weight, transposed, offsets, lora_a, lora_b, h, scaling, seed, dropout_p,
        need_dx, need_da, need_db_lora, need_dbias,
    )
    return _unaliased(grads, x)


@grouped_lora_bwd.register_fake
def _(grad_y, x, weight, offsets, lora_a, lora_b, h, scaling, seed, dropout_p, transposed, backend, need_dx,
      need_da, need_db_lora, need_dbias):
    acc = accum_dtype(x.dtype)
    N = grad_y.shape[1]
    return (
        x.new_empty(x.shape if need_dx else (0,)),
        x.new_empty(lora_a.shape if need_da else (0,), dtype=acc),
        x.new_empty(lora_b.shape if need_db_lora else (0,), dtype=acc),
        x.new_empty((weight.shape[0], N) if need_dbias else (0,), dtype=acc),
    )


def _weight_grad(grad_y: Tensor, x: Tensor, weight: Tensor, offsets: Tensor, transposed: bool) -> Tensor:
    """dW for a trainable expert weight (documented fallback): dW_e = dY_eᵀ·X_e, in the weight's layout."""
    from lorafast.moe.strategies.aten import grouped_outer

    dw = grouped_outer(grad_y, x.to(grad_y.dtype), Groups(offsets, x.shape[0]))  # (E, N, K)
    return (dw.transpose(1, 2) if transposed else dw).to(weight.dtype)


_NO_GRADS = (None,) * 11


def _grads_from(ctx, grad_y, run_backward):
    """Map the backward's accumulators to the forward inputs' grads (each in its input's dtype)."""
    x, weight, offsets, lora_a, lora_b, h, seed, *saved_scale = ctx.saved_tensors
    scaling = ctx.float_scale if ctx.float_scale is not None else saved_scale[0]
    if grad_y is None:
        return _NO_GRADS
    need_dx, need_dw, need_dbias, _, need_da, need_db_lora = ctx.needs_input_grad[:6]
    dx, da, db_lora, dbias = run_backward(
        grad_y, x, weight, ctx.transposed, offsets, lora_a, lora_b, h, scaling, seed, ctx.dropout_p,
        need_dx, need_da, need_db_lora, need_dbias,
    )
    dw = _weight_grad(grad_y, x, weight, offsets, ctx.transposed) if need_dw else None
    return (
        dx if need_dx else None,
        dw,
        as_dtype(dbias, ctx.bias_dtype) if need_dbias else None,
        None,
        as_dtype(da, lora_a.dtype) if need_da else None,
        as_dtype(db_lora, lora_b.dtype) if need_db_lora else None,
        None, None, None, None, None,
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, offsets, lora_a, lora_b, scaling, seed, dropout_p, transposed, backend = inputs
    ctx.float_scale = None
    ctx.save_for_backward(x, weight, offsets, lora_a, lora_b, output[1], seed, scaling)
    ctx.dropout_p, ctx.transposed, ctx.backend = dropout_p, transposed, backend
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_y, _grad_h):
    def through_custom_op(grad_y, x, weight, transposed, offsets, lora_a, lora_b, h, scaling, seed, p, *needs):
        return torch.ops.lorafast.grouped_lora_bwd(
            grad_y, x, weight, offsets, lora_a, lora_b, h, scaling, seed, p, transposed, ctx.backend, *needs
        )

    return _grads_from(ctx, grad_y, through_custom_op)


grouped_lora_fwd.register_autograd(_backward, setup_context=_setup_context)


class GroupedLoraFunction(torch.autograd.Function):
    """Eager twin of the custom ops (skips torch.library's dispatch layers); returns y, saves H."""

    @staticmethod
    def forward(ctx, x, weight, bias, offsets, lora_a, lora_b, scaling, seed, dropout_p, transposed, backend):
        y, h = strategies.get(backend).forward(x, weight, transposed, bias, offsets, lora_a, lora_b, scaling, seed,
                                               dropout_p)
        if isinstance(scaling, Tensor):
            ctx.float_scale = None
            ctx.save_for_backward(x, weight, offsets, lora_a, lora_b, h, seed, scaling)
        else:
            ctx.float_scale = scaling
            ctx.save_for_backward(x, weight, offsets, lora_a, lora_b, h, seed)
        ctx.dropout_p, ctx.transposed, ctx.backend = dropout_p, transposed, backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _grads_from(ctx, grad_y, strategies.get(ctx.backend).backward)
