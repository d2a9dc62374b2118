"""`cublas` for the grouped op: torch's grouped GEMM (``torch.nn.functional.grouped_mm`` — cuBLAS/CUTLASS grouped
kernels on CUDA, bf16, sm_80+; a loop of ``mm`` per expert where it does not run) for the base products, Triton for
the LoRA side work: the shrink with its mask, Y_e += b_e + s/(1−p)·H_e·B_eᵀ in place, dH/dB/db over dY,
dX_e += keep⊙(dH_e·A_e)/(1−p) in place, dA over X. Pays one extra read+write of Y and of dX for the vendor GEMM.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from lorafast.kernels.moe_bwd import moe_dx_lora_add, moe_grads
from lorafast.kernels.moe_fwd import moe_expand_add, moe_shrink
from lorafast.moe.groups import Groups, weight_kn, weight_nk
from lorafast.moe.strategies.aten import grouped_matmul


def forward(x, weight, transposed, bias, offsets, lora_a, lora_b, scaling, seed, dropout_p) -> Tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """Shapes as :mod:`lorafast.moe.strategies`. Returns (y, H fp32)."""
    offsets = offsets.to(torch.int32)
    h = moe_shrink(x, lora_a, offsets, seed, dropout_p)
    y = grouped_matmul(x, weight_kn(weight, transposed), Groups(offsets, x.shape[0]))
    moe_expand_add(y, bias, offsets, h, lora_b, scaling, h_factor=1.0 / (1.0 - dropout_p))
    return y, h


def backward(grad_y, x, weight, transposed, offsets, lora_a, lora_b, h, scaling, seed, dropout_p, need_dx, need_da,
             need_db_lora, need_dbias) -> Tuple[Optional[torch.Tensor], ...]:
    """Returns (dX, dA, dB, db), None where not needed."""
    offsets = offsets.to(torch.int32)
    dh, da, db_lora, dbias = moe_grads(grad_y, x, offsets, lora_a, lora_b, h, scaling, seed, dropout_p, need_da,
                                       need_db_lora, need_dbias)
    dx = None
    if need_dx:
        dx = grouped_matmul(grad_y, weight_nk(weight, transposed), Groups(offsets, x.shape[0]))
        moe_dx_lora_add(dx, offsets, dh, lora_a, seed, dropout_p)
    return dx, da, db_lora, dbias
