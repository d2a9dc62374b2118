"""Backward kernels (KERNELS.md steps 3–5), W frozen.

    dH = s·dY·B            (M×r)   ┐ one pass over dY (lora_grad_h), dB and db by fp32 atomics
    dB = s·dYᵀ·H           (N×r)   │
    db = Σₘ dY             (N)     ┘
    dX = dY·W + keep ⊙ (dH·A)/(1−p)   GEMM with the rank-r product in the epilogue
    dA = dHᵀ·drop(X)       (r×K)   one pass over X, mask regenerated from the seed

H is saved unscaled by 1/(1−p); callers pass that factor (h_factor) where H is consumed.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lorafast.kernels import alloc
from lorafast.kernels.configs import GEMM, SKINNY, interpreting, launch, m_bucket, rank_block
from lorafast.kernels.dropout import dropout_keep
from lorafast.kernels.dtypes import dot_precision
from lorafast.kernels.lora_fwd import grouped_tile


@triton.jit
def lora_grad_h_kernel(
    dy_ptr, b_ptr, h_ptr, scale_ptr, dh_ptr, db_lora_ptr, dbias_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br, stride_hm, stride_hr,
    h_factor,
    NEED_DB_LORA: tl.constexpr, NEED_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dH (M×R, fp32, scaled by s) stored; dB (N×R) and db (N) accumulated into fp32 buffers."""
    pid = tl.program_id(0).to(tl.int64)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    scale = tl.load(scale_ptr).to(tl.float32)
    dot_dtype = dy_ptr.dtype.element_ty
    if NEED_DB_LORA:
        h = tl.load(
            h_ptr + offs_m[:, None] * stride_hm + offs_r[None, :] * stride_hr,
            mask=mask_m[:, None] & mask_r[None, :], other=0.0,
        )
        h_scaled = (h * (scale * h_factor)).to(dot_dtype)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :], other=0.0,
        )
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :], other=0.0,
        )
        acc = tl.dot(dy, b.to(dot_dtype), acc, input_precision=DOT_PRECISION)
        if NEED_DB_LORA:
            part = tl.dot(tl.trans(dy), h_scaled, input_precision=DOT_PRECISION)
            tl.atomic_add(
                db_lora_ptr + offs_n[:, None] * R + offs_r[None, :], part,
                mask=mask_n[:, None] & mask_r[None, :],
            )
        if NEED_DBIAS:
            tl.atomic_add(dbias_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n)
    tl.store(
        dh_ptr + offs_m[:, None] * R + offs_r[None, :], acc * scale,
        mask=mask_m[:, None] & mask_r[None, :],
    )


@triton.jit
def dx_with_lora_epilogue_kernel(
    dy_ptr, w_ptr, dh_ptr, a_ptr, seed_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    p, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX[M, K] = dY·W + keep ⊙ (dH·A)·inv_keep; the reduction runs over N."""
    tile_m, tile_k = grouped_tile(tl.program_id(0).to(tl.int64), M, K, BLOCK_M, BLOCK_K, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_k = offs_k < K
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :] * stride_wk,
            mask=mask_n[:, None] & mask_k[None, :], other=0.0,
        )
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    dot_dtype = dy_ptr.dtype.element_ty
    dh = tl.load(
        dh_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & (offs_r[None, :] < R), other=0.0
    )
    a = tl.load(
        a_ptr + offs_r[:, None] * stride_ar + offs_k[None, :] * stride_ak,
        mask=(offs_r[:, None] < R) & mask_k[None, :], other=0.0,
    )
    lora = tl.dot(dh.to(dot_dtype), a.to(dot_dtype), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        keep = dropout_keep(tl.load(seed_ptr), offs_m, offs_k, K, p)
        lora = tl.where(keep, lora * inv_keep, 0.0)
    acc += lora
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_k[None, :],
    )


@triton.jit
def lora_grad_a_kernel(
    x_ptr, dh_ptr, seed_ptr, da_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk,
    p, inv_keep,
    HAS_DROPOUT: tl.constexpr, SPLIT_M: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA[R, K] (fp32) = dHᵀ·drop(X); SPLIT_M programs share a K tile and combine by atomics."""
    pid_k = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1).to(tl.int64)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    dot_dtype = x_ptr.dtype.element_ty
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(pid_m * BLOCK_M, M, BLOCK_M * SPLIT_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(seed, offs_m, offs_k, K, p), x, tl.zeros_like(x))
        dh = tl.load(
            dh_ptr + offs_r[:, None] + offs_m[None, :] * R,
            mask=(offs_r[:, None] < R) & mask_m[None, :], other=0.0,
        )
        acc = tl.dot(dh.to(dot_dtype), x, acc, input_precision=DOT_PRECISION)
    acc = acc * inv_keep
    out_ptrs = da_ptr + offs_r[:, None] * K + offs_k[None, :]
    out_mask = (offs_r[:, None] < R) & mask_k[None, :]
    if SPLIT_M == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


def lora_grad_h(
    grad_y: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    scaling: torch.Tensor,
    h_factor: float,
    need_db_lora: bool,
    need_dbias: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One pass over dY: dH = s·dY·B, dB = s·h_factor·dYᵀ·H, db = Σₘ dY.

    grad_y: (M, N) fp16/bf16/fp32, any strides (stride-0 grads from .sum() included); lora_b: (N, r);
    h: (M, r) fp32 as saved by the forward; scaling: 0-dim tensor. Returns dH (M, r) fp32,
    dB (N, r) fp32 or None, db (N,) fp32 or None.
    """
    M, N = grad_y.shape
    R = lora_b.shape[1]
    dh = alloc.empty((M, R), torch.float32, grad_y.device)
    db_lora = torch.zeros((N, R), dtype=torch.float32, device=grad_y.device) if need_db_lora else None
    dbias = torch.zeros((N,), dtype=torch.float32, device=grad_y.device) if need_dbias else None
    launch(
        lora_grad_h_kernel, SKINNY, grad_y.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]),),
        (grad_y, lora_b, h, scaling, dh, db_lora if need_db_lora else dh, dbias if need_dbias else dh,
         M, N, R, m_bucket(M),
         grad_y.stride(0), grad_y.stride(1), lora_b.stride(0), lora_b.stride(1), h.stride(0), h.stride(1),
         float(h_factor)),
        key=("M_BUCKET", "N"),
        reset_to_zero=tuple(name for name, on in (("db_lora_ptr", need_db_lora), ("dbias_ptr", need_dbias)) if on),
        NEED_DB_LORA=need_db_lora, NEED_DBIAS=need_dbias, DOT_PRECISION=dot_precision(grad_y.dtype),
        BLOCK_R=rank_block(R),
        fp32=grad_y.dtype == torch.float32,
    )
    return dh, db_lora, dbias


def dx_with_lora_epilogue(
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    dh: torch.Tensor,
    lora_a: torch.Tensor,
    seed: Optional[torch.Tensor],
    dropout_p: float,
) -> torch.Tensor:
    """dX = dY·W + keep ⊙ (dH·A)/(1−p) as one GEMM.

    grad_y: (M, N); weight: (N, K) same dtype; dh: (M, r) fp32 contiguous (already scaled by s);
    lora_a: (r, K) any float dtype; seed: int64 (1,) tensor when dropout_p > 0.
    Returns dX: (M, K) in grad_y's dtype, contiguous.
    """
    M, N = grad_y.shape
    K = weight.shape[1]
    R = lora_a.shape[0]
    dx = alloc.empty((M, K), grad_y.dtype, grad_y.device)
    has_dropout = dropout_p > 0.0
    launch(
        dx_with_lora_epilogue_kernel, GEMM, grad_y.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),),
        (grad_y, weight, dh, lora_a, seed if has_dropout else dh, dx, M, N, K, R, m_bucket(M),
         grad_y.stride(0), grad_y.stride(1), weight.stride(0), weight.stride(1),
         lora_a.stride(0), lora_a.stride(1), dx.stride(0), dx.stride(1),
         float(dropout_p), 1.0 / (1.0 - dropout_p)),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(grad_y.dtype), BLOCK_R=rank_block(R), GROUP_M=8,
        fp32=grad_y.dtype == torch.float32,
    )
    return dx


def _split_m(M: int, K: int) -> int:
    """How many programs share one K tile of dA: enough to fill ~132 SMs when K is small."""
    if interpreting():
        return 1 if M <= 64 else 2  # exercise both the store and the atomic path in tests
    k_tiles = triton.cdiv(K, 64)
    return max(1, min(triton.cdiv(264, k_tiles), triton.cdiv(M, 256), 32))


def lora_grad_a(x: torch.Tensor, dh: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """dA = dHᵀ·drop(X), dropout mask regenerated from ``seed``.

    x: (M, K) any strides; dh: (M, r) fp32 contiguous. Returns dA: (r, K) fp32.
    """
    M, K = x.shape
    R = dh.shape[1]
    split = _split_m(M, K)
    if split > 1:  # programs accumulate into it
        da = torch.zeros((R, K), dtype=torch.float32, device=x.device)
    else:
        da = alloc.empty((R, K), torch.float32, x.device)
    has_dropout = dropout_p > 0.0
    launch(
        lora_grad_a_kernel, SKINNY, x.device,
        lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), split),
        (x, dh, seed if has_dropout else dh, da, M, K, R, m_bucket(M), x.stride(0), x.stride(1),
         float(dropout_p), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "K"),
        reset_to_zero=("da_ptr",) if split > 1 else (),
        HAS_DROPOUT=has_dropout, SPLIT_M=split, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R),
        fp32=x.dtype == torch.float32,
    )
    return da
