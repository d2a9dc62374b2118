"""`cublas`: the base GEMMs by cuBLAS (torch.addmm / mm), the LoRA side work by our Triton kernels.

Forward: H = drop(X)·Aᵀ (Triton shrink, mask in registers), Y = addmm(b, X, Wᵀ) (cuBLAS), then
Y += s/(1−p)·H·Bᵀ in place (Triton). Backward: dH/dB/db in one Triton pass over dY, dX = dY·W (cuBLAS)
then dX += keep⊙(dH·A)/(1−p) in place (Triton), dA over X (Triton). Same contract as `fused` (saved:
x, H, seed; the same mask): it pays one extra read+write of Y and of dX for cuBLAS's better GEMM, which
is the floor the dispatcher never falls below.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from lorafast.kernels.lora_bwd import dx_lora_add, lora_grads
from lorafast.kernels.lora_fwd import lora_expand_add, lora_shrink


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    seed: Optional[torch.Tensor],
    dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Shapes and dtypes as :func:`lorafast.strategies.fused.forward`. Returns (y, H fp32)."""
    h = lora_shrink(x, lora_a, seed, dropout_p)
    y = torch.addmm(bias.to(x.dtype), x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    lora_expand_add(y, h, lora_b, scaling, h_factor=1.0 / (1.0 - dropout_p))
    return y, h


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    scaling: torch.Tensor,
    seed: Optional[torch.Tensor],
    dropout_p: float,
    need_dx: bool,
    need_da: bool,
    need_db_lora: bool,
    need_dbias: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Shapes and dtypes as :func:`lorafast.strategies.fused.backward`."""
    dh, da, db_lora, dbias = lora_grads(
        grad_y, x, lora_a, lora_b, h, scaling, seed, dropout_p, need_da, need_db_lora, need_dbias
    )
    dx = dx_lora_add(torch.mm(grad_y, weight), dh, lora_a, seed, dropout_p) if need_dx else None
    return dx, da, db_lora, dbias
