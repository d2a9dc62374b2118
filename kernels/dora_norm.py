"""DoRA's weight norm in one pass over W (the `fused` and `cublas` DoRA strategies):

    ‖W_n + s·B_n·A‖² = ‖W_n‖² + B_n·(2s·(W·Aᵀ)_n + s²·(A·Aᵀ)·B_nᵀ),   g_n = m_n / ‖·‖_n

`dora_norm_kernel`: one program per BLOCK_M rows of W streams those rows once over K, accumulating W·Aᵀ
(BLOCK_M×r) and, on a cache miss, ‖W‖² (read from the cache otherwise), and A·Aᵀ (r×r) from the A tiles it loads
anyway — every program computes A·Aᵀ itself (r²·K FMAs, a fraction BLOCK_R/BLOCK_M of its W·Aᵀ work), so no
program waits for another and the whole norm is one launch. Writes g and 1/‖·‖ (fp32) and, on a miss, ‖W‖².
Nothing N×K is written; the only N×K read is W, once.

Precision: the dots take fp32 operands (W's tile widened in registers) at IEEE precision. g − 1 is ~1e-3 after
training, so the norm needs ~fp32 accuracy (TF32's 10-bit mantissa would leave g − 1 one digit); the FMA work
(2·N·K·r) is small next to streaming N·K elements (Llama 14336×4096, r = 16: 1.9 GFLOP, ~30 µs of FMA at H100's
fp32 rate, under the ~35 µs read of W in bf16 — an estimate, not timed on a GPU). So the gate entry is not
required to show tensor-core instructions.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lorafast.kernels.configs import SKINNY, launch, rank_block


@triton.jit
def dora_norm_kernel(
    w_ptr, a_ptr, b_ptr, m_ptr, scale_ptr, row_sq_ptr, g_ptr, inv_norm_ptr,
    N, K, R,
    stride_wn, stride_wk, stride_ar, stride_ak, stride_bn, stride_br,
    NEED_ROW_SQ: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g, 1/‖W + s·B·A‖ (and ‖W‖² when NEED_ROW_SQ, else read) for rows [pid·BLOCK_M, +BLOCK_M) of W (N, K).

    The SKINNY config table's BLOCK_M tiles W's rows and BLOCK_K its columns (BLOCK_N is unused)."""
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_n = offs_n < N
    mask_r = offs_r < R
    wa = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    aa = tl.zeros((BLOCK_R, BLOCK_R), dtype=tl.float32)
    row_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :], other=0.0,
        ).to(tl.float32)
        a_t = tl.load(  # Aᵀ tile (BLOCK_K, BLOCK_R)
            a_ptr + offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar,
            mask=mask_k[:, None] & mask_r[None, :], other=0.0,
        ).to(tl.float32)
        wa = tl.dot(w, a_t, wa, input_precision="ieee")
        aa = tl.dot(tl.trans(a_t), a_t, aa, input_precision="ieee")
        if NEED_ROW_SQ:
            row_sq += tl.sum(w * w, axis=1)
    if NEED_ROW_SQ:
        tl.store(row_sq_ptr + offs_n, row_sq, mask=mask_n)
    else:
        row_sq = tl.load(row_sq_ptr + offs_n, mask=mask_n, other=0.0)
    b = tl.load(
        b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
        mask=mask_n[:, None] & mask_r[None, :], other=0.0,
    ).to(tl.float32)
    s = tl.load(scale_ptr).to(tl.float32)
    cross = 2.0 * s * wa + (s * s) * tl.dot(b, aa, input_precision="ieee")
    sq = tl.maximum(row_sq + tl.sum(b * cross, axis=1), 0.0)
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
    row_sq: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, 1/‖W + s·B·A‖, ‖W‖²), (N,) fp32 each, in one launch.

    weight (N, K) fp16/bf16/fp32 any strides (a Conv1D weight's ``.t()`` view included); lora_a (r, K), lora_b
    (N, r), magnitude (N,) any float dtypes; scaling a 0-dim tensor; row_sq the cached ‖W‖² (N,) fp32, or None:
    computed in the same pass and returned for the cache.
    """
    N, K = weight.shape
    R = lora_a.shape[0]
    device = weight.device
    need_row_sq = row_sq is None
    if need_row_sq:
        row_sq = torch.empty(N, dtype=torch.float32, device=device)
    g = torch.empty(N, dtype=torch.float32, device=device)
    inv_norm = torch.empty(N, dtype=torch.float32, device=device)
    launch(
        dora_norm_kernel, SKINNY, device, lambda meta: (triton.cdiv(N, meta["BLOCK_M"]),),
        (weight, lora_a, lora_b, magnitude, scaling, row_sq, g, inv_norm, N, K, R,
         *weight.stride(), *lora_a.stride(), *lora_b.stride()),
        key=("N", "K"), NEED_ROW_SQ=need_row_sq, BLOCK_R=rank_block(R), fp32=True,
    )
    return g, inv_norm, row_sq
