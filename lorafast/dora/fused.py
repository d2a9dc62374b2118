"""`fused`: DoRA's forward and backward as Triton GEMMs with the g-scale and the LoRA term in their epilogues
(lorafast.kernels.dora_*; the shrink and dA passes are the plain op's).

Forward (3 launches + H's zero fill): the norm (one pass over W), the shrink H = (keep⊙X)·Aᵀ, the GEMM writing Y
and Zb (two accumulators with dropout). Backward (3 launches + 2 fills): dH/dB/db/dm over dY and Zb, the dX GEMM
(two accumulators with dropout), dA over X. Same contract and mask as the other strategies
(:mod:`lorafast.dora.strategies`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from lorafast.kernels import alloc
from lorafast.kernels.dora_bwd import dora_dx, dora_grad_h
from lorafast.kernels.dora_fwd import dora_gemm
from lorafast.kernels.dora_norm import dora_norm
from lorafast.kernels.lora_bwd import lora_grad_a
from lorafast.kernels.lora_fwd import lora_shrink


def norm(weight, lora_a, lora_b, magnitude, scaling, row_sq):
    """(g, 1/‖W + s·B·A‖, row_sq as given) (N,) fp32 in one launch (:func:`lorafast.kernels.dora_norm.dora_norm`)."""
    return dora_norm(weight, lora_a, lora_b, magnitude, scaling, row_sq)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    g: torch.Tensor,
    scaling: torch.Tensor,
    seed: Optional[torch.Tensor],
    dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (M, N), H (M, r) fp32, Zb (M, N)): shapes as :func:`lorafast.dora.aten.forward`; scaling a 0-dim tensor."""
    h = lora_shrink(x, lora_a, seed, dropout_p)
    y, zb = dora_gemm(x, weight, bias, h, lora_b, g, scaling, seed, dropout_p)
    return y, h, zb


def grads_from_one_fill(grad_y, lora_a, lora_b, need_da, need_db_lora, need_dbias, need_dm):
    """dA (r, K), dB (N, r), db (N,), dm (N,) fp32, zeroed, from one fill (None where not needed): they are
    parameter gradients, alive equally long (:func:`lorafast.kernels.alloc.zeros_views`)."""
    (N, R), K = lora_b.shape, lora_a.shape[1]
    shapes = ((R, K) if need_da else None, (N, R) if need_db_lora else None, (N,) if need_dbias else None,
              (N,) if need_dm else None)
    return alloc.zeros_views(shapes, torch.float32, grad_y.device)


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    zb: torch.Tensor,
    g: torch.Tensor,
    inv_norm: torch.Tensor,
    scaling: torch.Tensor,
    seed: Optional[torch.Tensor],
    dropout_p: float,
    need_dx: bool,
    need_da: bool,
    need_db_lora: bool,
    need_dbias: bool,
    need_dm: bool,
) -> Tuple[Optional[torch.Tensor], ...]:
    """(dX, dA, dB, db, dm): shapes and dtypes as :func:`lorafast.dora.aten.backward`."""
    da, db_lora, dbias, dm = grads_from_one_fill(grad_y, lora_a, lora_b, need_da, need_db_lora, need_dbias, need_dm)
    dh = dora_grad_h(grad_y, zb, lora_b, h, g, inv_norm, scaling, dropout_p, need_dx or need_da, (db_lora, dbias, dm))
    dx = dora_dx(grad_y, weight, g, dh, lora_a, seed, dropout_p) if need_dx else None
    if need_da:
        lora_grad_a(x, dh, seed, dropout_p, lora_a.dtype, out=da)
    return dx, da, db_lora, dbias, dm
