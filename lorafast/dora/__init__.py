"""DoRA (weight-decomposed LoRA, PEFT's ``use_dora=True``) on the fused path, PEFT 0.21's exact math.

    g = m / ‖W + s·B·A‖_row  (detached)
    p = 0 or eval:   Y = g ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) + b
    training, p > 0: Y = X·Wᵀ + b + (g − 1) ⊙ (D·Wᵀ) + g ⊙ s·(D·Aᵀ)·Bᵀ,   D = drop(X)

Layers (the plain op's ladder): :func:`lorafast.reference.dora_linear` (the float64-readable oracle) →
:mod:`~lorafast.dora.norm` (the norm without an N×K tensor, the ‖W‖² cache) → the strategies
(:mod:`~lorafast.dora.aten`, :mod:`~lorafast.dora.fused`, :mod:`~lorafast.dora.cublas`; one contract,
:mod:`~lorafast.dora.strategies`) → :mod:`~lorafast.dora.ops` (custom ops, autograd) →
:func:`~lorafast.dora.functional.dora_linear` (public entry) → the PEFT layer (:mod:`lorafast.peft.dora`).
"""

from lorafast.dora.functional import dora_linear

__all__ = ["dora_linear"]
