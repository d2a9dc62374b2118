"""Forward kernels (KERNELS.md plan F1): H = drop(X)·Aᵀ, then Y = X·Wᵀ + b + s·H·Bᵀ.

- `lora_shrink`: H = drop(X)·Aᵀ, split over K so the grid has ≥ 2 programs per SM (relaxed fp32
  atomics into a zeroed M×r buffer). Used by both the `fused` and the `cublas` strategies.
- `lora_expand_gemm` (`fused`): the base GEMM with the rank-r dot and the bias in the epilogue.
- `lora_expand_add` (`cublas`): Y += s·H·Bᵀ in place on cuBLAS's Y = X·Wᵀ + b.

Dtype rules: X/W tiles stay in their storage dtype so tl.dot runs on tensor cores; adapter tiles
(possibly fp32 while X is bf16 — PEFT upcasts adapters) are cast to X's dtype right before the rank-r
dot, or, with LORA_FP32 (adapter precision "fp32", kernels/dtypes.py), the rank-r dot runs on fp32
operands (X's tile widened in registers) at LORA_PRECISION; every accumulator and elementwise step
is fp32 (the interpreter's bf16 arithmetic is wrong, and fp32 is what we want on the GPU anyway).
Column offsets are int64 (a strided x or W past 2³¹ elements would overflow int32 offsets), program ids too.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lorafast.kernels import alloc
from lorafast.kernels.configs import EPILOGUE, GEMM, SKINNY, launch, m_bucket, rank_block, split_for
from lorafast.kernels.dropout import dropout_col_keys, dropout_keep, dropout_row_keys, mask_threshold
from lorafast.kernels.dtypes import dot_precision, lora_dot, skinny_fp32_tiles


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
def add_expand_tile(
    acc, ref_ptr, h_ptr, b_ptr, scale_ptr, h_factor, offs_m, offs_n, mask_m, mask_n, R, stride_bn, stride_br,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr, LORA_PRECISION: tl.constexpr,
):
    """``acc + (s·h_factor·H)·Bᵀ`` on one (BLOCK_M, BLOCK_N) output tile: the rank-r epilogue of the fused GEMM
    and of the in-place `cublas` update, in one place. The dot runs in ``ref_ptr``'s element type (x or Y), or
    on fp32 operands with LORA_FP32; s is read from memory, so a 0-dim tensor scaling needs no host sync."""
    offs_r = tl.arange(0, BLOCK_R)
    scale = tl.load(scale_ptr).to(tl.float32) * h_factor
    h = tl.load(
        h_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & (offs_r[None, :] < R), other=0.0,
    )
    b = tl.load(
        b_ptr + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
        mask=mask_n[None, :] & (offs_r[:, None] < R), other=0.0,
    )
    lora_dtype = tl.float32 if LORA_FP32 else ref_ptr.dtype.element_ty
    lora_precision: tl.constexpr = LORA_PRECISION if LORA_FP32 else DOT_PRECISION
    return tl.dot((h * scale).to(lora_dtype), b.to(lora_dtype), acc, input_precision=lora_precision)


@triton.jit(do_not_specialize=["mask_threshold"])
def lora_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak,
    mask_threshold,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee",
):
    """H[M, R] (fp32, zeroed by the caller) += drop(X)[M, K-slice] · A[R, K-slice]ᵀ.

    Program (i, j) owns row block i and the K tiles j, j + S, j + 2S, … (S = programs along axis 1);
    the 1/(1−p) factor is applied by the caller.
    """
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    lora_dtype = tl.float32 if LORA_FP32 else x_ptr.dtype.element_ty
    lora_precision: tl.constexpr = LORA_PRECISION if LORA_FP32 else DOT_PRECISION
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        row_keys = dropout_row_keys(seed, offs_m)
    for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * split):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        if HAS_DROPOUT:
            keep = dropout_keep(row_keys, dropout_col_keys(seed, offs_k), mask_threshold)
            x = tl.where(keep, x, tl.zeros_like(x))
        a = tl.load(
            a_ptr + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
            mask=(offs_r[None, :] < R) & mask_k[:, None], other=0.0,
        )
        acc = tl.dot(x.to(lora_dtype), a.to(lora_dtype), acc, input_precision=lora_precision)
    # Relaxed: the sum is read only by later kernels (stream order), so no fence is needed (the default
    # acq_rel compiles to MEMBAR.ALL.GPU + CCTL.IVALL around every element on sm_90).
    tl.atomic_add(
        h_ptr + offs_m[:, None] * R + offs_r[None, :], acc,
        mask=mask_m[:, None] & (offs_r[None, :] < R), sem="relaxed",
    )


@triton.jit
def lora_expand_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, scale_ptr, y_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_bn, stride_br, stride_ym, stride_yn,
    h_factor,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee",
):
    """Y[M, N] = X·Wᵀ + b + (s·h_factor·H)·Bᵀ; the rank-r product is an epilogue dot on the tile."""
    tile_m, tile_n = grouped_tile(tl.program_id(0).to(tl.int64), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
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
    acc = add_expand_tile(acc, x_ptr, h_ptr, b_ptr, scale_ptr, h_factor, offs_m, offs_n, mask_m, mask_n, R,
                          stride_bn, stride_br, DOT_PRECISION, BLOCK_R, LORA_FP32, LORA_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
    )


@triton.jit
def lora_expand_add_kernel(
    y_ptr, h_ptr, b_ptr, scale_ptr,
    M, N, R, M_BUCKET,
    stride_ym, stride_yn, stride_bn, stride_br,
    h_factor,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee",
):
    """Y[M, N] += (s·h_factor·H)·Bᵀ in place (Y from cuBLAS: X·Wᵀ + b, in Y's dtype)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tile = mask_m[:, None] & mask_n[None, :]
    acc = tl.load(y_ptrs, mask=tile, other=0.0).to(tl.float32)
    acc = add_expand_tile(acc, y_ptr, h_ptr, b_ptr, scale_ptr, h_factor, offs_m, offs_n, mask_m, mask_n, R,
                          stride_bn, stride_br, DOT_PRECISION, BLOCK_R, LORA_FP32, LORA_PRECISION)
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=tile)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """H = (X ⊙ keep)·Aᵀ, **without** the 1/(1−p) factor (folded into the expand's scale).

    x: (M, K) fp16/bf16/fp32, any strides; lora_a: (r, K) any float dtype; seed: int64 (1,) tensor,
    used only when dropout_p > 0. Returns H: (M, r) fp32, contiguous.
    """
    M, K = x.shape
    R = lora_a.shape[0]
    h = torch.zeros((M, R), dtype=torch.float32, device=x.device)  # programs accumulate into it
    has_dropout = dropout_p > 0.0
    lora_fp32, lora_precision = lora_dot(x.dtype, lora_a.dtype)

    def grid(meta):
        m_tiles = triton.cdiv(M, meta["BLOCK_M"])
        return m_tiles, split_for(m_tiles, triton.cdiv(K, meta["BLOCK_K"]), x.device)

    launch(
        lora_shrink_kernel, SKINNY, x.device, grid,
        (x, lora_a, h, seed if has_dropout else h, M, K, R, m_bucket(M),
         *x.stride(), *lora_a.stride(), mask_threshold(dropout_p)),
        key=("M_BUCKET", "K", "LORA_FP32"), reset_to_zero=("h_ptr",),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R),
        LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision, fp32=skinny_fp32_tiles(x.dtype, lora_fp32, lora_precision),
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

    x: (M, K); weight: (N, K) same dtype as x; bias: (N,) or None; h: (M, r) fp32 contiguous;
    lora_b: (N, r) any float dtype; scaling: 0-dim tensor (read on device). Returns Y: (M, N) in x's dtype.
    """
    M, K = x.shape
    N = weight.shape[0]
    R = h.shape[1]
    y = alloc.empty((M, N), x.dtype, x.device)
    lora_fp32, lora_precision = lora_dot(x.dtype, lora_b.dtype)
    launch(
        lora_expand_gemm_kernel, GEMM, x.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        (x, weight, bias if bias is not None else y, h, lora_b, scaling, y, M, N, K, R, m_bucket(M),
         *x.stride(), *weight.stride(),
         *lora_b.stride(), *y.stride(), float(h_factor)),
        key=("M_BUCKET", "N", "K", "LORA_FP32"),
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R), GROUP_M=8,
        LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision, fp32=x.dtype == torch.float32,
    )
    return y


def lora_expand_add(
    y: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor, h_factor: float = 1.0
) -> torch.Tensor:
    """Y += (scaling·h_factor·H)·Bᵀ in place; returns ``y``.

    y: (M, N) fp16/bf16/fp32, any strides (cuBLAS's X·Wᵀ + b); h: (M, r) fp32 contiguous; lora_b: (N, r)
    any float dtype (cast to y's dtype per tile); scaling: 0-dim tensor.
    """
    M, N = y.shape
    R = h.shape[1]
    lora_fp32, lora_precision = lora_dot(y.dtype, lora_b.dtype)
    launch(
        lora_expand_add_kernel, EPILOGUE, y.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])),
        (y, h, lora_b, scaling, M, N, R, m_bucket(M), *y.stride(),
         *lora_b.stride(), float(h_factor)),
        key=("M_BUCKET", "N", "LORA_FP32"),
        # Autotune runs every config on the same y: restore it between trials, or Y gets the update twice.
        restore=("y_ptr",),
        DOT_PRECISION=dot_precision(y.dtype), BLOCK_R=rank_block(R),
        LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision, fp32=y.dtype == torch.float32,
    )
    return y
