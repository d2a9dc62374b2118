"""`cublas`: DoRA's base GEMMs by cuBLAS (torch.mm/addmm), the norm, the g-scale, the LoRA terms and the masks by
Triton (lorafast.kernels.dora_*, and the plain op's shrink, dA and in-place dX kernels).

Forward: norm, shrink, Zb = cuBLAS (keep⊙X)·Wᵀ (with dropout keep⊙X is written once by `dropout_apply`, a
transient M×K, and P = cuBLAS X·Wᵀ + b), then one epilogue pass writes Y (`dora_expand`). Backward: the dH/dB/db/dm
pass, dX = cuBLAS (g⊙dY)·W + the plain op's in-place LoRA term (p = 0), or cuBLAS dY·W and ((g−1)⊙dY)·W then
`dora_dx_add` in place (p > 0); dA over X. It pays Y's and dX's extra passes (and the g⊙dY / keep⊙X transients)
for cuBLAS's GEMMs: the floor the dispatcher compares against.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from lorafast.dora.fused import grads_from_one_fill, norm
from lorafast.kernels.dora_bwd import dora_dx_add, dora_grad_h
from lorafast.kernels.dora_fwd import dora_expand, dropout_apply
from lorafast.kernels.lora_bwd import dx_lora_add, lora_grad_a
from lorafast.kernels.lora_fwd import lora_shrink

__all__ = ["backward", "forward", "norm"]


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
    """(y, H, Zb): shapes as :func:`lorafast.dora.aten.forward`; scaling a 0-dim tensor."""
    h = lora_shrink(x, lora_a, seed, dropout_p)
    if dropout_p > 0.0:
        zb = torch.mm(dropout_apply(x, seed, dropout_p), weight.t())
        y = torch.addmm(bias.to(x.dtype), x, weight.t()) if bias is not None else torch.mm(x, weight.t())
    else:
        zb = torch.mm(x, weight.t())
        y = torch.empty_like(zb)
    return dora_expand(y, zb, bias, h, lora_b, g, scaling, dropout_p), h, zb


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
    dx = None
    if need_dx:
        # g·dY (or (g−1)·dY) in fp32, rounded once into dY's dtype: the operand cuBLAS reads.
        scaled = torch.mul(grad_y, g if dropout_p == 0.0 else g - 1.0, out=torch.empty_like(grad_y))
        if dropout_p == 0.0:
            dx = dx_lora_add(torch.mm(scaled, weight), dh, lora_a, None, 0.0)
        else:
            dx = dora_dx_add(torch.mm(grad_y, weight), torch.mm(scaled, weight), dh, lora_a, seed, dropout_p)
    if need_da:
        lora_grad_a(x, dh, seed, dropout_p, lora_a.dtype, out=da)
    return dx, da, db_lora, dbias, dm
