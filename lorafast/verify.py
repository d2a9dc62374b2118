"""Verification while tuning: is a candidate strategy's step output the ``aten`` strategy's, on the same inputs?

The dispatcher (:mod:`lorafast.dispatch`) times every candidate on the user's GPU; a race, an atomics or a layout
bug that only a real GPU shows would make a candidate fast *and* wrong. So each candidate's timing-run outputs
(y, then each gradient) are compared with the ``aten`` candidate's outputs of the same step: the same inputs, the
same dropout mask (identical on CUDA), the same dY. ``aten`` runs plain PyTorch ops (cuBLAS GEMMs), the strategy
least exposed to what the interpreter cannot show.

Tolerance. The tests accept a strategy whose error against a float64 reference is at most ``2·e + f``, where ``e``
is the error of the same math done by PyTorch in the low precision and ``f`` the floor of
:data:`lorafast.tolerances.REL_TOL` (flash-attention's rule). Here there is no float64 reference (verification adds
no steps), but ``aten`` *is* a low-precision PyTorch run of the same math, with an error ``e`` of its own. By the
triangle inequality a candidate that passes the tests' rule lies within ``3·e + f`` of ``aten``. ``e`` is a few
roundings of the compute dtype (the output's, and the 16-bit rank-r products of ``aten``), so it is bounded by
about the dtype's machine epsilon ε:

    ‖candidate − aten‖ / ‖aten‖  ≤  REL_TOL[dtype] + 3·ε(dtype)

per output, the dtype being the step's compute dtype (y's; the fp32 gradient accumulators of a bf16 step carry
bf16 products). That is 3.9e-2 for bf16, 4.9e-3 for fp16 and 2.0e-5 for fp32 (IEEE dots). With TF32 on
(``torch.backends.cuda.matmul.allow_tf32``; the kernels and cuBLAS then both round fp32 operands to 10 mantissa
bits, differently), fp32 gets fp16's bound. What this catches: garbage, missing or doubled partial sums, wrong
tiles — errors of order one, against which these bounds are small. What it cannot catch: an error below the bf16
bound (a 1 % bias in bf16 passes, as it would pass the test suite's own bf16 tolerance of 1.6e-2).

Norms are accumulated in fp32 (each output upcast in chunks, never a full fp32 copy of a large y). A reference
output that is all zeros is compared in absolute terms (‖candidate‖ ≤ the bound), so near-zero gradients neither
divide by zero nor fail on rounding noise; the dispatcher also times with seeded random adapters (PEFT initialises
lora_B to zeros, which would make dA and the LoRA terms of y and dX exactly zero, and so unverifiable).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from lorafast.tolerances import REL_TOL

# The LoRA step's outputs, in the order a timing run returns them (:class:`lorafast.dispatch.StepOutputs`).
LORA_OUTPUTS = ("y", "dx", "da", "db", "dbias")
# Elements upcast to fp32 at a time (16 Mi elements: 64 MB of fp32 per temporary).
_CHUNK = 1 << 24
_TF32_LIKE = torch.float16  # fp32 under TF32 has fp16's 10 mantissa bits


@dataclass(frozen=True)
class Mismatch:
    """One output of a candidate outside the bound: which, how far (relative to aten), and the bound."""

    output: str
    error: float
    tolerance: float

    def describe(self) -> str:
        return f"{self.output} off by {self.error:.3g} relative to aten (tolerance {self.tolerance:.3g})"


def _tf32_enabled() -> bool:
    return bool(torch.backends.cuda.matmul.allow_tf32)


def tolerance(dtype: torch.dtype) -> float:
    """The largest ‖candidate − aten‖/‖aten‖ accepted for a step computed in ``dtype`` (see the module docstring)."""
    if dtype == torch.float32 and _tf32_enabled():
        dtype = _TF32_LIKE
    return REL_TOL.get(dtype, REL_TOL[torch.float32]) + 3.0 * torch.finfo(dtype).eps


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ with fp32 accumulation (‖out − ref‖ when ref is all zeros); inf when the shapes differ
    or ``out`` has a NaN/inf where ``ref`` is finite. One host sync per 16 Mi elements."""
    if out.shape != ref.shape:
        return float("inf")
    flat_out, flat_ref = out.detach().reshape(-1), ref.detach().reshape(-1)
    sums = torch.zeros(3, dtype=torch.float64, device=out.device)  # ‖Δ‖², ‖ref‖², non-finite count
    for start in range(0, flat_out.numel(), _CHUNK):
        o = flat_out[start:start + _CHUNK].float()
        r = flat_ref[start:start + _CHUNK].to(device=o.device, dtype=torch.float32)
        diff = o - r
        sums += torch.stack([
            torch.linalg.vector_norm(diff).double() ** 2,
            torch.linalg.vector_norm(r).double() ** 2,
            (~torch.isfinite(o) & torch.isfinite(r)).sum().double(),
        ])
    num2, den2, bad = sums.tolist()
    if bad or num2 != num2:  # non-finite where the reference is finite, or NaN in the norms
        return float("inf")
    return (num2 ** 0.5) / (den2 ** 0.5 if den2 > 0.0 else 1.0)


def output_names(outputs: Sequence[object]) -> Tuple[str, ...]:
    """Names of a step's outputs: a NamedTuple's fields, else "y", "out1", "out2", …"""
    fields = getattr(outputs, "_fields", None)
    if fields is not None:
        return tuple(fields)
    return ("y", *(f"out{i}" for i in range(1, len(outputs))))


def first_mismatch(outputs: Sequence[Optional[torch.Tensor]], reference: Sequence[Optional[torch.Tensor]]
                   ) -> Optional[Mismatch]:
    """The first output of ``outputs`` outside :func:`tolerance` of ``reference`` (the aten step's), or None.

    Both are a step's (y, then each gradient, None where not computed). The bound's dtype is the reference y's
    (the compute dtype). An output the reference has and the candidate lacks (or the reverse), or a different
    number of outputs, is a mismatch with infinite error. A reference output that is not finite is not judged
    (nothing to compare with).
    """
    names = output_names(reference)
    if len(outputs) != len(reference):
        return Mismatch("outputs", float("inf"), 0.0)
    bound = tolerance(reference[0].dtype)
    for name, out, ref in zip(names, outputs, reference):
        if out is None and ref is None:
            continue
        if out is None or ref is None:
            return Mismatch(name, float("inf"), bound)
        if not bool(torch.isfinite(ref).all()):
            continue
        error = relative_error(out, ref)
        if not error <= bound:
            return Mismatch(name, error, bound)
    return None
