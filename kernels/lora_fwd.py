"""Forward kernels (KERNELS.md plan F1): H = drop(X)·Aᵀ, then Y = X·Wᵀ + b + s·H·Bᵀ.

Dtype rules: X/W tiles stay in their storage dtype so tl.dot runs on tensor cores; adapter tiles
(possibly fp32 while X is bf16 — PEFT upcasts adapters) are cast to X's dtype right before the dot;
every accumulator and elementwise step is fp32 (the interpreter's bf16 arithmetic is wrong, and
fp32 is what we want on the GPU anyway).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lorafast.kernels import alloc
from lorafast.kernels.configs import GEMM, SKINNY, launch, m_bucket, rank_block
from lorafast.kernels.dropout import dropout_keep
from lorafast.kernels.dtypes import dot_precision


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear program id to (tile_m, tile_n) in GROUP_M-row bands, for L2 reuse of W."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    group = pid // per_group
    first_m = group * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    tile_m = first_m + (pid % per_group) % rows
    tile_n = (pid % per_group) // rows
    return tile_m, tile_n


@triton.jit
def lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak, stride_hm, stride_hr,
    p,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """H[M, R] (fp32) = drop(X)[M, K] · A[R, K]ᵀ; the 1/(1−p) factor is applied by the caller."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, offs_m, offs_k, K, p), x, tl.zeros_like(x))
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=(offs_r[None, :] < R) & (offs_k[:, None] < K), other=0.0,
        )
        acc = tl.dot(x, a.to(x.dtype), acc, input_precision=DOT_PRECISION)
    tl.store(
        h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr, acc,
        mask=(offs_m[:, None] < M) & (offs_r[None, :] < R),
    )


@triton.jit
def lora_expand_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, scale_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_hm, stride_hr,
    stride_bn, stride_br, stride_ym, stride_yn,
    h_factor,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Y[M, N] = X·Wᵀ + b + (s·h_factor·H)·Bᵀ; the rank-r product is an epilogue dot on the tile."""
    tile_m, tile_n = grouped_tile(tl.program_id(0).to(tl.int64), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
            mask=mask_n[None, :] & mask_k[:, None], other=0.0,
        )
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
    # LoRA epilogue: the scale is read from memory so a 0-dim tensor scaling needs no host sync.
    scale = tl.load(scale_ptr).to(tl.float32) * h_factor
    h = tl.load(
        h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
        mask=mask_m[:, None] & (offs_r[None, :] < R), other=0.0,
    )
    b = tl.load(
        b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=mask_n[None, :] & (offs_r[:, None] < R), other=0.0,
    )
    dot_dtype = x_ptr.dtype.element_ty
    acc = tl.dot((h * scale).to(dot_dtype), b.to(dot_dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
    )


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """H = (X ⊙ keep)·Aᵀ, **without** the 1/(1−p) factor (folded into the expand's scale).

    x: (M, K) fp16/bf16/fp32, any strides; lora_a: (r, K) any float dtype; seed: int64 (1,) tensor,
    used only when dropout_p > 0. Returns H: (M, r) fp32, contiguous.
    """
    M, K = x.shape
    R = lora_a.shape[0]
    h = alloc.empty((M, R), torch.float32, x.device)
    has_dropout = dropout_p > 0.0
    launch(
        lora_shrink_kernel, SKINNY, x.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
        (x, lora_a, h, seed if has_dropout else h, M, K, R, m_bucket(M),
         x.stride(0), x.stride(1), lora_a.stride(0), lora_a.stride(1), h.stride(0), h.stride(1),
         float(dropout_p)),
        key=("M_BUCKET", "K"),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R),
        fp32=x.dtype == torch.float32,
    )
    return h


def lora_expand_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    h: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: torch.Tensor,
    h_factor: float = 1.0,
) -> torch.Tensor:
    """Y = X·Wᵀ + b + (scaling·h_factor·H)·Bᵀ in one GEMM with the LoRA term in the epilogue.

    x: (M, K); weight: (N, K) same dtype as x; bias: (N,) or None; h: (M, r) fp32;
    lora_b: (N, r) any float dtype; scaling: 0-dim or (1,) tensor on x's device; h_factor: python
    float (1/(1−p) under dropout). Returns Y: (M, N) in x's dtype, contiguous.
    """
    M, K = x.shape
    N = weight.shape[0]
    R = h.shape[1]
    y = alloc.empty((M, N), x.dtype, x.device)
    launch(
        lora_expand_gemm_kernel, GEMM, x.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        (x, weight, bias if bias is not None else y, h, lora_b, scaling, y, M, N, K, R, m_bucket(M),
         x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), h.stride(0), h.stride(1),
         lora_b.stride(0), lora_b.stride(1), y.stride(0), y.stride(1), float(h_factor)),
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R), GROUP_M=8,
        fp32=x.dtype == torch.float32,
    )
    return y
