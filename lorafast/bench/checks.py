"""Correctness and memory: each implementation's output and gradients vs a float64 reference, and the
bytes it saves for backward.

Relative norm ‖out−ref‖/‖ref‖; with dropout the implementation's own mask is recovered by a probe and
replayed in the reference. ``saved`` counts every unique storage packed for backward
(``saved_tensors_hooks``), ``saved extra`` only those that are not x nor a weight (those are alive
anyway); GPU ``peak`` is ``max_memory_allocated`` during one call minus what was allocated before it.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from lorafast import reference
from lorafast.bench.impls import Implementation, build_implementations, inference_call, training_call
from lorafast.bench.inputs import LoRAInputs
from lorafast.tolerances import REL_TOL

# Relative-norm error allowed vs float64: TOLERANCE[dtype] + 2 × the error of the plain-PyTorch
# reference run in the same dtype (flash-attention's rule); one table for the tests and the bench.
TOLERANCE = REL_TOL


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf when out has a NaN/inf or the shapes differ)."""
    if out.shape != ref.shape:
        return math.inf
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(out64).all():
        return math.inf
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def _probe_inputs(inputs: LoRAInputs) -> LoRAInputs:
    # With W = 0 and A, B, dY, s > 0: dX = keep ⊙ (dH·A)/(1−p) with dH·A > 0 everywhere, so the
    # nonzeros of dX are exactly the implementation's dropout keep-mask.
    def positive(t: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=t.device).manual_seed(1)
        return (torch.rand(t.shape, generator=gen, device=t.device) + 0.5).to(t.dtype)

    return replace(
        inputs,
        weight=torch.zeros_like(inputs.weight),
        lora_a=positive(inputs.lora_a).requires_grad_(True),
        lora_b=positive(inputs.lora_b).requires_grad_(True),
        dy=positive(inputs.dy),
    )


def recover_dropout_mask(name: str, inputs: LoRAInputs, dropout_p: float, backend: str, seed: int) -> torch.Tensor:
    """The (M, K) keep-mask that implementation ``name`` draws after ``torch.manual_seed(seed)``.

    Dropout masks are pure functions of the RNG state and the shape, so a probe call with the same
    seed and shapes draws the same mask; see :func:`_probe_inputs` for how it is read off dX."""
    probe = _probe_inputs(inputs)
    impl = build_implementations(probe, dropout_p, backend, names=[name])[name]
    call = training_call(impl, probe.x, probe.dy)
    torch.manual_seed(seed)
    dx = call()[1]
    return dx != 0


def float64_reference(
    inputs: LoRAInputs, dropout_p: float, training: bool, mask: Optional[torch.Tensor], base_only: bool
) -> Tuple[torch.Tensor, ...]:
    """(y, dX, dA, dB) in float64 (y, dX for ``base_only``; y alone when not ``training``)."""

    def f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().to(torch.float64)

    x = f64(inputs.x).requires_grad_(training)
    W, b = f64(inputs.weight), f64(inputs.bias)
    A, B = f64(inputs.lora_a).requires_grad_(training), f64(inputs.lora_b).requires_grad_(training)
    with torch.set_grad_enabled(training):
        if base_only:
            y = F.linear(x, W, b)
        else:
            y = reference.lora_linear(x, W, b, A, B, inputs.scaling, dropout_p, training, dropout_mask=mask)
        if not training:
            return (y,)
        wrt = [x] if base_only else [x, A, B]
        return (y.detach(), *torch.autograd.grad(y, wrt, f64(inputs.dy)))


GRAD_NAMES = ("y", "dx", "da", "db")


def check_implementation(
    name: str,
    inputs: LoRAInputs,
    dropout_p: float,
    mode: str,
    backend: str = "auto",
    seed: int = 0,
    reference_cache: Optional[Dict[Tuple, Tuple[torch.Tensor, ...]]] = None,
) -> Dict[str, float]:
    """Relative errors of implementation ``name`` vs float64 for one mode, plus the dropout keep
    fraction seen (``keep``, ``fwd+bwd`` with p > 0 only). Keys: y, dx, da, db (those that apply).

    ``reference_cache`` (a dict the caller keeps per inputs and mode) reuses the float64 results
    across implementations when no dropout mask is involved; float64 matmuls dominate on a CPU."""
    impl = build_implementations(inputs, dropout_p, backend, names=[name])[name]
    training = mode == "fwd+bwd"
    torch.manual_seed(seed)
    outs = training_call(impl, inputs.x, inputs.dy)() if training else (inference_call(impl, inputs.x)(),)
    mask = None
    errors: Dict[str, float] = {}
    if training and dropout_p > 0.0 and name != "base":
        mask = recover_dropout_mask(name, inputs, dropout_p, backend, seed)
        errors["keep"] = mask.float().mean().item()
    key = (name == "base", mode, dropout_p)
    if mask is None and reference_cache is not None and key in reference_cache:
        refs = reference_cache[key]
    else:
        refs = float64_reference(inputs, dropout_p, training, mask, base_only=name == "base")
        if mask is None and reference_cache is not None:
            reference_cache[key] = refs
    for grad_name, out, ref in zip(GRAD_NAMES, outs, refs):
        errors[grad_name] = relative_error(out, ref)
    return errors


def passes(errors: Dict[str, float], reference_errors: Optional[Dict[str, float]], dtype: torch.dtype) -> bool:
    """Every error ≤ TOLERANCE[dtype] + 2 × the same-dtype reference's error (when given)."""
    for key in GRAD_NAMES:
        if key not in errors:
            continue
        limit = TOLERANCE[dtype]
        if reference_errors is not None and key in reference_errors:
            limit += 2.0 * reference_errors[key]
        if not errors[key] <= limit:  # also catches NaN
            return False
    return True



def saved_bytes(impl: Implementation, inputs: LoRAInputs) -> Tuple[int, int]:
    """(all bytes saved for backward, the part that is not x nor a weight) for one training forward.

    Counts unique storages packed through ``saved_tensors_hooks``, so a tensor saved twice or a view
    of x counts once (and x not at all in the second number)."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    x_leaf = inputs.x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = impl.forward(x_leaf, True)
    alive = {t.untyped_storage().data_ptr() for t in [inputs.x, *impl.weights] if t is not None}
    del y
    total = sum(storages.values())
    extra = sum(nbytes for ptr, nbytes in storages.items() if ptr not in alive)
    return total, extra


def gpu_peak_bytes(call: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


