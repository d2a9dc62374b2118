"""Public DoRA op: :func:`dora_linear` (validation, autocast, strategy choice) and :func:`run`, the unchecked
hot path for callers that validated once (the PEFT plan)."""

from __future__ import annotations

import os
from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from lorafast import dispatch, reference
from lorafast import strategies as lora_strategies
from lorafast.dora import ops, strategies
from lorafast.functional import _dropout_seed, autocast_inputs, op_scale, scale_tensor
from lorafast.validation import FLOAT_DTYPES, check_lora_linear_args

# What `auto` runs on CUDA when it must not time (compile tracing, graph capture) and has no cached choice.
DEFAULT_CUDA = "cublas"
# Timing runs (the dispatcher's) use a constant seed and dY: they never draw from the default generator.
_TIMING_SEED = 0x5EED


def check_dora_linear_args(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p, backend) -> None:
    """:func:`lorafast.validation.check_lora_linear_args`, plus the magnitude: a float (N,) tensor on x's device."""
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p, backend)
    N = weight.shape[0]
    if not isinstance(magnitude, torch.Tensor):
        raise TypeError(f"dora_linear: magnitude must be a torch.Tensor, got {type(magnitude).__name__}")
    described = f"magnitude (shape {tuple(magnitude.shape)}, dtype {magnitude.dtype}, device {magnitude.device})"
    if magnitude.dtype not in FLOAT_DTYPES:
        raise TypeError(f"dora_linear: {described} has unsupported dtype; expected a float dtype")
    if tuple(magnitude.shape) != (N,):
        raise ValueError(f"dora_linear: {described} must be (N,) = ({N},)")
    if magnitude.device != x.device:
        raise ValueError(f"dora_linear: {described} is not on x's device {x.device}")


def grad_needs(x, weight, bias, lora_a, lora_b, magnitude) -> Tuple[bool, bool, bool, bool, bool]:
    """(need_dx, need_da, need_db_lora, need_dbias, need_dm) when autograd records this call (else all False)."""
    if not torch.is_grad_enabled():
        return (False,) * 5
    return (x.requires_grad, lora_a.requires_grad, lora_b.requires_grad, bias is not None and bias.requires_grad,
            magnitude.requires_grad)


class DoraStepOutputs(NamedTuple):
    """A DoRA timing step's outputs (named so a rejected candidate's warning names the output): y (M, N), then
    dX (M, K), dA (r, K), dB (N, r), db (N,), dm (N,), None where not needed."""

    y: torch.Tensor
    dx: Optional[torch.Tensor]
    da: Optional[torch.Tensor]
    db: Optional[torch.Tensor]
    dbias: Optional[torch.Tensor]
    dm: Optional[torch.Tensor]


def step_runner(x2, weight, bias, lora_a, lora_b, magnitude, scale, p, needs) -> Callable[[str], Callable[[], tuple]]:
    """``make_run`` for :func:`lorafast.dispatch.select`: one forward (+ the needed backward) of a DoRA strategy
    outside autograd, with a fixed seed and a constant dY; ``run()`` returns (y, dx, da, db_lora, dbias, dm) with
    None for a gradient not needed (COMMON dispatcher contract: outputs, so candidates can be cross-checked)."""

    def make_run(name: str) -> Callable[[], tuple]:
        impl = strategies.get(name)
        seed = torch.full((1,), _TIMING_SEED, dtype=torch.int64, device=x2.device) if p > 0.0 else None
        grad_y = []

        def run() -> tuple:
            with torch.no_grad():
                y, h, zb, g, inv_norm = ops.norm_and_forward(name, x2, weight, bias, lora_a, lora_b, magnitude,
                                                             scale, seed, p)
                if not any(needs):
                    return DoraStepOutputs(y, None, None, None, None, None)
                if not grad_y:
                    grad_y.append(torch.full_like(y, 1e-2))
                grads = impl.backward(grad_y[0], x2, weight, lora_a, lora_b, h, zb, g, inv_norm, scale, seed, p,
                                      *needs)
                return DoraStepOutputs(y, *grads)

        return run

    return make_run


def dispatch_op(needs: Sequence[bool], weight: torch.Tensor) -> str:
    """The dispatcher's ``op`` for a DoRA call: dm's need and a transposed (Conv1D) weight time differently."""
    return "dora" + ("" if needs[4] else "-mfrozen") + ("-wT" if weight.stride(-1) != 1 else "")


# fp32 DoRA above this rank runs `aten` on NVIDIA GPUs: every fp32 config of the dH/dB/dm pass spilled at rank
# block 128 there (compile gate; kernels/configs.py DORA_SKINNY). AMD (gfx942) compiled it without spills.
MAX_TRITON_FP32_RANK = 64


def triton_dora_fallback(x2: torch.Tensor, lora_a: torch.Tensor) -> Optional[str]:
    """Why the Triton DoRA strategies cannot run these inputs beyond the plain op's reasons, or None."""
    if x2.dtype == torch.float32 and lora_a.shape[0] > MAX_TRITON_FP32_RANK and x2.is_cuda and not torch.version.hip:
        return f"fp32 DoRA at rank {lora_a.shape[0]} > {MAX_TRITON_FP32_RANK} on an NVIDIA GPU"
    return None


def choose_strategy(backend: str, x2, weight, bias, lora_a, lora_b, magnitude, scale, p) -> str:
    """The DoRA strategy for a call on the 2-D ``x2``: on CUDA with "auto", the fastest by
    :func:`lorafast.dispatch.select_call` (key op "dora…"); otherwise :func:`lorafast.dispatch.resolve` (aten on
    CPU, LORAFAST_STRATEGY, explicit strategies with their device checks and visible fallbacks), then
    :func:`triton_dora_fallback`."""
    dora_reason = triton_dora_fallback(x2, lora_a)
    overridden = os.environ.get(lora_strategies.ENV_STRATEGY)
    if backend == "auto" and not overridden and x2.is_cuda and lora_strategies.triton_available() and \
            lora_strategies.triton_fallback(x2, lora_a) is None and dora_reason is None:
        needs5 = grad_needs(x2, weight, bias, lora_a, lora_b, magnitude)
        candidates = ("cublas", "aten") if x2.dtype == torch.float32 else lora_strategies.STRATEGIES
        make_run = step_runner(x2, weight, bias, lora_a, lora_b, magnitude, scale, p, needs5)
        return dispatch.select_call(x2, weight, lora_a, p, needs5[:4], candidates, make_run, DEFAULT_CUDA,
                                    op=dispatch_op(needs5, weight))
    name = dispatch.resolve(backend, x2, weight, lora_a, p, (False,) * 4)
    if name in lora_strategies.TRITON_STRATEGIES and dora_reason is not None:
        lora_strategies.warn_once("dora-fp32-rank", f"lorafast: {dora_reason}; running the 'aten' strategy instead "
                                  f"of {name!r}")
        return "aten"
    return name


def run(
    x2: torch.Tensor,
    lead: Sequence[int],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scale: Union[float, torch.Tensor],
    p: float,
    strategy: str,
) -> torch.Tensor:
    """The op on validated inputs: x2 (M, K) with M > 0, ``scale`` as :func:`lorafast.functional.op_scale` gives
    it, ``p`` the dropout probability in effect, ``strategy`` a STRATEGIES name. Returns (*lead, N)."""
    seed = _dropout_seed(x2.device) if p > 0.0 else None
    if torch.compiler.is_compiling():
        if not isinstance(scale, torch.Tensor):
            scale = scale_tensor(scale, x2)
        y = ops.dora_linear_fwd(x2, weight, bias, lora_a, lora_b, magnitude, scale, seed, p, strategy)[0]
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                         for t in (x2, lora_a, lora_b, magnitude, bias)):
        y = ops.DoraLinearFunction.apply(x2, weight, bias, lora_a, lora_b, magnitude, scale, seed, p, strategy)
    else:  # inference: no graph to record
        y = ops.norm_and_forward(strategy, x2, weight, bias, lora_a, lora_b, magnitude, scale, seed, p)[0]
    if len(lead) == 1:
        return y
    return torch.ops.aten._unsafe_view.default(y, (*lead, weight.shape[0]))


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused DoRA linear, PEFT 0.21's math (:func:`lorafast.reference.dora_linear`). With g = m/‖W + s·B·A‖_row
    (detached) and D = drop(X):

    - p = 0 or eval:     Y = g ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) + b
    - training, p > 0:   Y = X·Wᵀ + b + (g − 1) ⊙ (D·Wᵀ) + g ⊙ s·(D·Aᵀ)·Bᵀ

    Args:
        x: (..., K) fp16 / bf16 / fp32 (fp64 on the aten strategy), any strides.
        weight: (N, K) in x's dtype, any strides (a Conv1D weight's ``.t()`` view is read as is); frozen. A weight
            that requires grad runs :func:`lorafast.reference.dora_linear` instead (one warning).
        bias: (N,) or None; gets a gradient when it requires grad.
        lora_a: (r, K); lora_b: (N, r): any float dtype (PEFT's fp32 adapters on a 16-bit x included).
        magnitude: (N,) any float dtype — PEFT's ``lora_magnitude_vector[name].weight``; gets a gradient.
        scaling: python float or 0-dim tensor s (no gradient).
        dropout_p, training, backend: as :func:`lorafast.lora_linear` (backend "auto" times the strategies on
            CUDA under the dispatcher key op "dora…"; ``aten`` on CPU).

    The weight norm never builds an N×K tensor: ‖W‖² is cached per frozen weight (recomputed when its data,
    dtype, device or version change), W·Aᵀ and A·Aᵀ are computed per call in fp32; g is fp32.

    Returns:
        (..., N) tensor in x's dtype (the autocast dtype under autocast).
    """
    if isinstance(x, torch.Tensor):
        x, weight, bias = autocast_inputs(x, weight, bias)
    check_dora_linear_args(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p, backend)
    p = float(dropout_p) if training else 0.0
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0 or (weight.requires_grad and torch.is_grad_enabled()):
        if x2.shape[0] != 0:
            lora_strategies.warn_once("dora-trainable-weight", "lorafast.dora_linear: the base weight requires "
                                      "grad; running the unfused reference (the fused op keeps W frozen)")
        return reference.dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling, dropout_p, training)
    scale = scale_tensor(scaling, x)
    strategy = choose_strategy(backend, x2, weight, bias, lora_a, lora_b, magnitude, scale, p)
    args = (x2, lead, weight, bias, lora_a, lora_b, magnitude, op_scale(scaling, scale, strategy), p, strategy)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return run(*args)
    return run(*args)
