"""QDoRA: DoRA on a bitsandbytes 4-bit (NF4/FP4) base weight, fused.

One ``torch.autograd.Function`` (:class:`QDoraFunction`) dequantizes W once per forward into a transient N×K
buffer (the weight norm's W·Aᵀ and the base GEMMs read that one copy) and once more in backward, only when dX is
needed — as the QLoRA op does (:mod:`lorafast.qlora`, whose dequantization it reuses). The math is the DoRA
strategies' (:mod:`lorafast.dora.strategies`); saved for backward: x, H, Zb, g, 1/‖·‖, the seed and the packed
4-bit storage with its quant-state tensors (alive anyway). The frozen ‖W‖² is cached on the ``Params4bit``
parameter (:mod:`lorafast.dora.norm`), since its dequantized W is a new tensor per call.

Importing this module raises ImportError when bitsandbytes is missing.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Tuple

import torch

from lorafast import dispatch
from lorafast import strategies as lora_strategies
from lorafast.dora import ops, strategies
from lorafast.dora.functional import DoraStepOutputs, triton_dora_fallback
from lorafast.functional import _dropout_seed, op_scale, scale_tensor
from lorafast.qlora import DEFAULT_CUDA, QLoraCall, QuantSnapshot, dequantize
from lorafast.strategies.aten import as_dtype

_TIMING_SEED = 12345


class QDoraFunction(torch.autograd.Function):
    """y = DoRA(x, dequant(W), ...) with the strategy's fused backward; W dequantized in both passes.

    forward(x (M, K) compute dtype, bias, lora_a (r, K), lora_b (N, r), magnitude (N,), scale (0-dim tensor or a
    python float for ``aten``), seed, dropout_p, strategy, use_triton_dequant, QuantSnapshot, norm_key,
    *snapshot tensors) → y (M, N).
    """

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, magnitude, scale, seed, dropout_p, strategy, use_triton, snap,
                norm_key, *quant):
        weight = dequantize(snap, x.dtype, use_triton)  # transient: freed on return, rebuilt in backward
        y, h, zb, g, inv_norm = ops.norm_and_forward(strategy, x, weight, bias, lora_a, lora_b, magnitude, scale,
                                                     seed, dropout_p, norm_key)
        ctx.float_scale = None if isinstance(scale, torch.Tensor) else scale
        ctx.save_for_backward(x, lora_a, lora_b, h, zb, g, inv_norm, seed,
                              scale if ctx.float_scale is None else None, *quant)
        ctx.snap, ctx.dropout_p, ctx.strategy, ctx.use_triton = snap, dropout_p, strategy, use_triton
        ctx.dtypes = (bias.dtype if bias is not None else None, magnitude.dtype)
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_a, lora_b, h, zb, g, inv_norm, seed, scale, *quant = ctx.saved_tensors
        scale = scale if ctx.float_scale is None else ctx.float_scale
        n_inputs = 12 + len(quant)
        if grad_y is None:
            return (None,) * n_inputs
        need_dx, need_dbias, need_da, need_db_lora, need_dm = ctx.needs_input_grad[:5]
        snap = ctx.snap.with_tensors(tuple(quant))
        weight = dequantize(snap, grad_y.dtype, ctx.use_triton) if need_dx else x.new_empty((0, x.shape[1]))
        dx, da, db_lora, dbias, dm = strategies.get(ctx.strategy).backward(
            grad_y, x, weight, lora_a, lora_b, h, zb, g, inv_norm, scale, seed, ctx.dropout_p,
            need_dx, need_da, need_db_lora, need_dbias, need_dm,
        )
        bias_dtype, magnitude_dtype = ctx.dtypes
        return (
            dx if need_dx else None,
            as_dtype(dbias, bias_dtype) if need_dbias else None,
            as_dtype(da, lora_a.dtype) if need_da else None,
            as_dtype(db_lora, lora_b.dtype) if need_db_lora else None,
            as_dtype(dm, magnitude_dtype) if need_dm else None,
            *(None,) * (n_inputs - 5),
        )


def _needs(call: QLoraCall, magnitude: torch.Tensor) -> Tuple[bool, bool, bool, bool, bool]:
    if not torch.is_grad_enabled():
        return (False,) * 5
    bias = call.bias
    return (call.x.requires_grad, call.lora_a.requires_grad, call.lora_b.requires_grad,
            bias is not None and bias.requires_grad, magnitude.requires_grad)


def _timing_run(x2, call: QLoraCall, magnitude, scale, needs) -> Callable[[str], Callable[[], tuple]]:
    """``make_run`` for the dispatcher: dequant, norm, forward and (when needed) dequant again and backward of a
    candidate, outside autograd, with a fixed seed and a constant dY; returns (y, *grads) (COMMON contract)."""

    def make_run(name: str) -> Callable[[], tuple]:
        p = call.dropout_p
        seed = torch.full((1,), _TIMING_SEED, dtype=torch.int64, device=x2.device) if p > 0.0 else None
        grad_y = []

        def run() -> tuple:
            with torch.no_grad():
                weight = dequantize(call.snap, x2.dtype, True)
                y, h, zb, g, inv_norm = ops.norm_and_forward(name, x2, weight, call.bias, call.lora_a, call.lora_b,
                                                             magnitude, scale, seed, p)
                if not any(needs):
                    return DoraStepOutputs(y, None, None, None, None, None)
                if not grad_y:
                    grad_y.append(torch.full_like(y, 1e-2))
                weight = dequantize(call.snap, x2.dtype, True)
                grads = strategies.get(name).backward(grad_y[0], x2, weight, call.lora_a, call.lora_b, h, zb, g,
                                                      inv_norm, scale, seed, p, *needs)
                return DoraStepOutputs(y, *grads)

        return run

    return make_run


def choose(backend: str, call: QLoraCall, x2: torch.Tensor, magnitude: torch.Tensor, scale: torch.Tensor,
           needs) -> Tuple[str, bool]:
    """(DoRA strategy, whether the Triton dequant kernel runs): CPU "auto"/"aten" → bitsandbytes' dequant + aten;
    an explicit Triton strategy → the Triton dequant (CPU only under the interpreter); CUDA "auto" → the fastest of
    dequant + fused/cublas/aten by :func:`lorafast.dispatch.select` under the key op "dora-nf4"/"dora-fp4"."""
    snap: QuantSnapshot = call.snap
    weight_like = torch.empty((snap.shape[0], 0), device="meta")  # only N is read
    have_triton = lora_strategies.triton_available()
    overridden = backend == "auto" and os.environ.get(lora_strategies.ENV_STRATEGY)
    dora_reason = triton_dora_fallback(x2, call.lora_a)
    if backend == "auto" and not overridden and x2.is_cuda and have_triton and dora_reason is None and \
            lora_strategies.triton_fallback(x2, call.lora_a) is None:
        key = dispatch.StrategyKey.for_call(x2, weight_like, call.lora_a, call.dropout_p, *needs[:4],
                                            op=f"dora-{snap.quant_type}" + ("" if needs[4] else "-mfrozen"))
        candidates = ("cublas", "aten") if x2.dtype == torch.float32 else lora_strategies.STRATEGIES
        name = dispatch.select(key, candidates, _timing_run(x2, call, magnitude, scale, needs), default=DEFAULT_CUDA)
        return name, True
    name = dispatch.resolve(backend, x2, weight_like, call.lora_a, call.dropout_p, needs[:4])
    if name in lora_strategies.TRITON_STRATEGIES and dora_reason is not None:
        lora_strategies.warn_once("dora-fp32-rank", f"lorafast: {dora_reason}; running the 'aten' strategy instead "
                                  f"of {name!r}")
        name = "aten"
    return name, have_triton and (x2.is_cuda or name in lora_strategies.TRITON_STRATEGIES)


def qdora_linear(call: QLoraCall, magnitude: torch.Tensor, norm_key: Optional[torch.Tensor],
                 backend: str = "auto") -> torch.Tensor:
    """The fused DoRA op on a 4-bit base for checked arguments (:class:`lorafast.qlora.QLoraCall`, as built by
    :mod:`lorafast.peft.bnb`); ``magnitude`` (N,) PEFT's ``lora_magnitude_vector`` weight; ``norm_key`` the
    ``Params4bit`` the ‖W‖² cache keys on. Returns (*x.shape[:-1], N) in ``call.out_dtype``."""
    x = call.x
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    scale = scale_tensor(call.scaling, x2)
    needs = _needs(call, magnitude)
    strategy, use_triton = choose(backend, call, x2, magnitude, scale, needs)
    scale = op_scale(call.scaling, scale, strategy)
    p = call.dropout_p
    seed = _dropout_seed(x2.device) if p > 0.0 else None
    snap = call.snap
    if any(needs):
        y = QDoraFunction.apply(x2, call.bias, call.lora_a, call.lora_b, magnitude, scale, seed, p, strategy,
                                use_triton, snap, norm_key, *snap.tensors())
    else:  # inference: no graph to record
        weight = dequantize(snap, x2.dtype, use_triton)
        y = ops.norm_and_forward(strategy, x2, weight, call.bias, call.lora_a, call.lora_b, magnitude, scale, seed,
                                 p, norm_key)[0]
    y = y.reshape(*lead, snap.shape[0])
    return y if y.dtype == call.out_dtype else y.to(call.out_dtype)
