"""`fused` for the grouped op: Triton grouped GEMMs over an (expert, row-tile) schedule with the LoRA work in their
epilogues (lorafast.kernels.moe_fwd / moe_bwd).

Forward: H = drop(X_e)·A_eᵀ (shrink), then Y_e = X_e·W_eᵀ + b_e + s/(1−p)·H_e·B_eᵀ in one grouped GEMM.
Backward: dH/dB/db in one pass over dY, dX_e = dY_e·W_e + keep⊙(dH_e·A_e)/(1−p) in one grouped GEMM, dA over X.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from lorafast.kernels.moe_bwd import moe_dx, moe_grads
from lorafast.kernels.moe_fwd import moe_lora_gemm, moe_shrink


def forward(x, weight, transposed, bias, offsets, lora_a, lora_b, scaling, seed, dropout_p) -> Tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Two launches (plus H's zero fill); shapes as :mod:`lorafast.moe.strategies`. Returns (y, H fp32)."""
    offsets = offsets.to(torch.int32)
    h = moe_shrink(x, lora_a, offsets, seed, dropout_p)
    y = moe_lora_gemm(x, weight, transposed, bias, offsets, h, lora_b, scaling, h_factor=1.0 / (1.0 - dropout_p))
    return y, h


def backward(grad_y, x, weight, transposed, offsets, lora_a, lora_b, h, scaling, seed, dropout_p, need_dx, need_da,
             need_db_lora, need_dbias) -> Tuple[Optional[torch.Tensor], ...]:
    """Up to three launches (plus two zero fills); returns (dX, dA, dB, db), None where not needed."""
    offsets = offsets.to(torch.int32)
    dh, da, db_lora, dbias = moe_grads(grad_y, x, offsets, lora_a, lora_b, h, scaling, seed, dropout_p, need_da,
                                       need_db_lora, need_dbias)
    dx = moe_dx(grad_y, weight, transposed, offsets, dh, lora_a, seed, dropout_p) if need_dx else None
    return dx, da, db_lora, dbias
