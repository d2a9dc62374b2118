"""`fused`: Triton GEMMs with the LoRA work in their epilogues (lorafast.kernels).

Forward: H = drop(X)·Aᵀ (shrink), then Y = X·Wᵀ + b + s/(1−p)·H·Bᵀ in one GEMM.
Backward: dH/dB/db in one pass over dY, dX = dY·W + keep⊙(dH·A)/(1−p) in one GEMM, dA over X.
Wins where our GEMM is close to cuBLAS's or where launches dominate; the dispatcher decides.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from lorafast.kernels.lora_bwd import dx_with_lora_epilogue, lora_grads
from lorafast.kernels.lora_fwd import lora_expand_gemm, lora_shrink


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
    """Two launches (plus the zero-fill of H). x (M, K), weight (N, K) in x's dtype, adapters any float
    dtype, scaling 0-dim, seed int64 (1,) or None at p = 0. Returns (y (M, N) in x's dtype, H (M, r) fp32)."""
    h = lora_shrink(x, lora_a, seed, dropout_p)
    y = lora_expand_gemm(x, weight, bias, h, lora_b, scaling, h_factor=1.0 / (1.0 - dropout_p))
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
    """Up to three launches (plus one zero fill, two at large M: :func:`lorafast.kernels.lora_bwd.lora_grads`):
    dH/dB/db over dY, the dX GEMM with its LoRA epilogue, dA over X. dA, dB and db (and dH) share one storage.
    Returns (dX in grad_y's dtype, dA (r, K) fp32, dB (N, r) fp32, db (N,) fp32), None where not needed."""
    dh, da, db_lora, dbias = lora_grads(
        grad_y, x, lora_a, lora_b, h, scaling, seed, dropout_p, need_da, need_db_lora, need_dbias
    )
    dx = dx_with_lora_epilogue(grad_y, weight, dh, lora_a, seed, dropout_p) if need_dx else None
    return dx, da, db_lora, dbias
