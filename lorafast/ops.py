"""The fused LoRA linear as `torch.library` custom ops with fake and autograd registrations, and the
eager `autograd.Function` with the same math.

`torch.compile(fullgraph=True)` traces the custom ops as opaque nodes (no graph break); the strategy
string (lorafast.strategies) picks the implementation at run time. Saved for backward: x (already
alive), H (M×r) and the dropout seed (None at p = 0) — nothing else of size M×K or M×N.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from lorafast import strategies
from lorafast.strategies.aten import accum_dtype, as_dtype


def forward_impl(x, weight, bias, lora_a, lora_b, scaling, seed, dropout_p, strategy):
    """The forward math of ``strategy`` with no autograd wrapper (inference calls)."""
    return strategies.get(strategy).forward(x, weight, bias, lora_a, lora_b, scaling, seed, dropout_p)


@torch.library.custom_op("lorafast::lora_linear_fwd", mutates_args=())
def lora_linear_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Tensor,
    lora_b: Tensor,
    scaling: Tensor,
    seed: Optional[Tensor],
    dropout_p: float,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """x (M, K) → (y (M, N) in x's dtype, H (M, r) fp32 — unscaled LoRA hidden, saved for backward)."""
    y, h = forward_impl(x, weight, bias, lora_a, lora_b, scaling, seed, dropout_p, backend)
    # The fake below promises contiguous outputs; the aten strategy returns H as a transposed view.
    return y.contiguous(), h.contiguous()


@lora_linear_fwd.register_fake
def _(x, weight, bias, lora_a, lora_b, scaling, seed, dropout_p, backend):
    y = x.new_empty((x.shape[0], weight.shape[0]))
    h = x.new_empty((x.shape[0], lora_a.shape[0]), dtype=accum_dtype(x.dtype))
    return y, h


@torch.library.custom_op("lorafast::lora_linear_bwd", mutates_args=())
def lora_linear_bwd(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Tensor,
    lora_b: Tensor,
    h: Tensor,
    scaling: Tensor,
    seed: Optional[Tensor],
    dropout_p: float,
    backend: str,
    need_dx: bool,
    need_da: bool,
    need_db_lora: bool,
    need_dbias: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dX (M, K) in x's dtype, dA (r, K), dB (N, r), db (N,) — fp32 accumulators); an output not
    asked for comes back as an empty (0,) tensor, since custom ops cannot return None."""
    grads = strategies.get(backend).backward(
        grad_y, x, weight, lora_a, lora_b, h, scaling, seed, dropout_p, need_dx, need_da, need_db_lora, need_dbias
    )
    return _unaliased(grads, x)


def _unaliased(grads, x: Tensor) -> Tuple[Tensor, ...]:
    """Contiguous, with no two sharing a storage (a custom op's outputs may not alias, and the Triton strategies
    carve dA, dB and db from one zero fill); None becomes an empty (0,) tensor."""
    storages = set()
    out = []
    for g in grads:
        if g is None:
            out.append(x.new_empty((0,)))
            continue
        g = g.contiguous()
        ptr = g.untyped_storage().data_ptr()
        if ptr in storages:
            g = g.clone()
        storages.add(ptr)
        out.append(g)
    return tuple(out)


@lora_linear_bwd.register_fake
def _(grad_y, x, weight, lora_a, lora_b, h, scaling, seed, dropout_p, backend, need_dx, need_da, need_db_lora,
      need_dbias):
    acc = accum_dtype(x.dtype)
    M, K = x.shape
    N, r = lora_b.shape
    return (
        x.new_empty((M, K) if need_dx else (0,)),
        x.new_empty((r, K) if need_da else (0,), dtype=acc),
        x.new_empty((N, r) if need_db_lora else (0,), dtype=acc),
        x.new_empty((N,) if need_dbias else (0,), dtype=acc),
    )


def _setup_context(ctx, inputs, output):
    x, weight, bias, lora_a, lora_b, scaling, seed, dropout_p, backend = inputs
    _, h = output
    ctx.float_scale = None  # the custom op's scaling is always a tensor
    ctx.save_for_backward(x, weight, lora_a, lora_b, h, seed, scaling)
    ctx.dropout_p = dropout_p
    ctx.backend = backend
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.mark_non_differentiable(h)
    # No zero-filled dY when y gets no gradient (e.g. only another output was used): backward skips.
    ctx.set_materialize_grads(False)


_NO_GRADS = (None,) * 9


def _grads_from(ctx, grad_y, run_backward):
    """Unpack ctx once (checkpointing allows a single unpack), run ``run_backward(grad_y, *saved, p,
    need_dx, need_da, need_db_lora, need_dbias)`` → (dX, dA, dB, db) accumulators, and map them to the
    9 forward inputs' grads, each in its input's dtype."""
    x, weight, lora_a, lora_b, h, seed, *saved_scale = ctx.saved_tensors
    scaling = ctx.float_scale if ctx.float_scale is not None else saved_scale[0]
    if grad_y is None:  # materialize_grads is off: y's gradient is all zeros, so is every input's
        return _NO_GRADS
    need_dx, need_dw, need_dbias, need_da, need_db_lora = ctx.needs_input_grad[:5]
    dx, da, db_lora, dbias = run_backward(
        grad_y, x, weight, lora_a, lora_b, h, scaling, seed, ctx.dropout_p,
        need_dx, need_da, need_db_lora, need_dbias,
    )
    # Documented fallback: a trainable base weight gets dW = dYᵀ·X from a plain matmul.
    dw = (grad_y.t() @ x.to(grad_y.dtype)).to(weight.dtype) if need_dw else None
    return (
        dx if need_dx else None,
        dw,
        as_dtype(dbias, ctx.bias_dtype) if need_dbias else None,
        as_dtype(da, lora_a.dtype) if need_da else None,
        as_dtype(db_lora, lora_b.dtype) if need_db_lora else None,
        None,
        None,
        None,
        None,
    )


def _backward(ctx, grad_y, _grad_h):
    def through_custom_op(grad_y, x, weight, lora_a, lora_b, h, scaling, seed, p, *needs):
        return torch.ops.lorafast.lora_linear_bwd(
            grad_y, x, weight, lora_a, lora_b, h, scaling, seed, p, ctx.backend, *needs
        )

    return _grads_from(ctx, grad_y, through_custom_op)


lora_linear_fwd.register_autograd(_backward, setup_context=_setup_context)


class LoraLinearFunction(torch.autograd.Function):
    """The same forward/backward as the custom ops, for eager mode: returns y only (H is saved, not an
    output, which spares autograd a non-differentiable output per call).

    Eager calls skip the torch.library dispatch layers (custom_op + register_autograd cost about 30 µs
    in forward and 140 µs in backward per call on the 2-core CPU, which matters at small shapes);
    under torch.compile, functional.lora_linear uses the custom ops, which dynamo traces as one node.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling, seed, dropout_p, backend):
        y, h = strategies.get(backend).forward(x, weight, bias, lora_a, lora_b, scaling, seed, dropout_p)
        if isinstance(scaling, Tensor):
            ctx.float_scale = None
            ctx.save_for_backward(x, weight, lora_a, lora_b, h, seed, scaling)
        else:
            ctx.float_scale = scaling
            ctx.save_for_backward(x, weight, lora_a, lora_b, h, seed)
        ctx.dropout_p = dropout_p
        ctx.backend = backend
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _grads_from(ctx, grad_y, strategies.get(ctx.backend).backward)


# autograd.Function.apply's Python wrapper binds default args and unwraps functorch wrappers (~5 µs a call
# at 9 arguments); with no functorch transform active and no setup_context, it then calls this.
_apply_function = super(torch.autograd.Function, LoraLinearFunction).apply


def apply_function(*args):
    """``LoraLinearFunction.apply(*args)`` → y, without the Python wrapper's work when it has none to do."""
    if torch._C._are_functorch_transforms_active():
        return LoraLinearFunction.apply(*args)
    return _apply_function(*args)
