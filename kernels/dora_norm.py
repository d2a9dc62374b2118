"""DoRA's weight norm in one pass over W (the `fused` and `cublas` DoRA strategies):

    ‖W_n + s·B_n·A‖²  accumulated tile by tile:  Σ_k (W_nk + s·(B·A)_nk)²,   g_n = m_n / ‖·‖_n

`dora_norm_kernel`: one program per BLOCK_M rows of W streams those rows once over K; for each (BLOCK_M, BLOCK_K)
tile it forms the matching tile of B·A in registers (a (BLOCK_M×r)·(r×BLOCK_K) dot: the same 2·N·K·r FLOPs the
factored form spends on W·Aᵀ) and adds the squares of W + s·B·A to one BLOCK_M vector. Nothing N×K is written,
W is read once, and there is nothing to cancel: the sum is PEFT's dense norm, accumulated in fp32 in tiles.

Why not the factored form ‖W‖² + 2s·B·(W·Aᵀ) + s²·B·(A·Aᵀ)·Bᵀ (what the aten strategy computes with torch ops,
:mod:`lorafast.dora.norm`): in a kernel it needs a BLOCK_M×r and an r×r fp32 accumulator live across the K loop,
and at rank block 128 every SKINNY fp32 config spilled (AOT gate, sm_80: 1,720-1,800 B at 16×32×16), while this
form keeps one vector; it also loses digits when W ≈ −s·B·A, this form does not. ‖W‖² is then not needed (the
aten strategy's cache serves its own factored form; this kernel returns ``row_sq`` untouched).

Precision: the B·A dot takes fp32 operands at IEEE precision and W's tile is widened in registers: g − 1 is ~1e-3
after training, so the norm needs ~fp32 accuracy (TF32's 10-bit mantissa would leave g − 1 one digit). The FMA
work (2·N·K·r) sits under the N·K stream of W (Llama 14336×4096, r = 16: 1.9 GFLOP, ~30 µs at H100's fp32 FMA
rate against ~35 µs to read W in bf16 — an estimate, not timed on a GPU), so the gate entry is not required to
show tensor-core instructions.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lorafast.kernels.configs import SKINNY, launch, rank_block


@triton.jit
def dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, m_ptr, scale_ptr, g_ptr, inv_norm_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g and 1/‖W + s·B·A‖ for rows [pid·BLOCK_M, +BLOCK_M) of W (N, K). The SKINNY config table's BLOCK_M tiles
    W's rows and BLOCK_K its columns (BLOCK_N is unused)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    s = tl.load(scale_ptr).to(tl.float32)
    b = tl.load(
        b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=mask_n[:, None] & mask_r[None, :], other=0.0,
    ).to(tl.float32)
    sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)
        a = tl.load(
            a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
            mask=mask_r[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)
        v = w + s * tl.dot(b, a, input_precision="ieee")  # this tile of W + s·B·A, never stored
        sq += tl.sum(v * v, axis=1)
    sq = tl.where(mask_n, sq, 1.0)  # rows past N: no 1/0 in lanes that are not stored
    inv_norm = 1.0 / tl.sqrt_rn(sq)  # IEEE-rounded: tl.rsqrt is an approximation on GPUs
    m = tl.load(m_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    tl.store(g_ptr + offs_n, m * inv_norm, mask=mask_n)
    tl.store(inv_norm_ptr + offs_n, inv_norm, mask=mask_n)


def dora_norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: torch.Tensor,
    row_sq: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """(g, 1/‖W + s·B·A‖, row_sq), g and 1/‖·‖ (N,) fp32, in one launch; ``row_sq`` (the aten strategy's cached
    ‖W‖²) is not needed here and comes back as given (the strategies' common ``norm`` signature).

    weight (N, K) fp16/bf16/fp32 any strides (a Conv1D weight's ``.t()`` view included); lora_a (r, K), lora_b
    (N, r), magnitude (N,) any float dtypes; scaling a 0-dim tensor.
    """
    N, K = weight.shape
    R = lora_a.shape[0]
    device = weight.device
    g = torch.empty(N, dtype=torch.float32, device=device)
    inv_norm = torch.empty(N, dtype=torch.float32, device=device)
    launch(
        dora_norm_kernel, SKINNY, device, lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),),
        (weight, lora_a, lora_b, magnitude, scaling, g, inv_norm, N, K, R,
         *weight.stride(), *lora_a.stride(), *lora_b.stride()),
        key=("N", "K"), BLOCK_R=rank_block(R), fp32=True,
    )
    return g, inv_norm, row_sq
