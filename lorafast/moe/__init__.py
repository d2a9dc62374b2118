"""LoRA on MoE experts without ΔW: the grouped op and the experts forward that runs it.

- :func:`grouped_lora_linear`: ``Y_e = X_e·W_eᵀ (+ b_e) + s·(drop(X_e)·A_eᵀ)·B_eᵀ`` over tokens sorted by expert,
  W in transformers' layouts and A/B in PEFT's ParamWrapper layouts, all read in place; a fused backward with
  dX, dA, dB (and db) and nothing for the frozen W.
- :func:`experts_forward`: transformers' grouped experts forward (sort, gather, two projections, the model's own
  gate activation, routing weights, combine) with each targeted projection through the grouped op.

The PEFT integration lives in :mod:`lorafast.peft.experts`.
"""

from lorafast.moe.experts import ExpertLora, experts_forward
from lorafast.moe.functional import grouped_lora_linear

__all__ = ["ExpertLora", "experts_forward", "grouped_lora_linear"]
