"""DoRA forward kernels (notation of lorafast.dora.aten: g (N,) fp32, keep the dropout mask, f = 1/(1−p),
H = (keep⊙X)·Aᵀ unscaled, Zb = (keep⊙X)·Wᵀ unscaled; H comes from the plain op's `lora_shrink`):

    Y = X·Wᵀ + b + (g−1)⊙f·Zb + g⊙(f·s·H·Bᵀ)         (p = 0: Zb = X·Wᵀ and Y = g⊙(Zb + s·H·Bᵀ) + b)

- `dora_gemm` (`fused`): one GEMM with the g-scale and the LoRA term in the epilogue; it writes Y and Zb (saved
  for dm). With dropout it keeps two accumulators over the same loaded X and W tiles — X·Wᵀ and (keep⊙X)·Wᵀ, the
  mask regenerated in registers from the seed — so W is streamed once for both products: 2× the tensor-core
  FLOPs of a plain GEMM, 1× its bytes (docs/dora.md has the trade-off).
- `dora_expand` (`cublas`): after cuBLAS's Zb (and, with dropout, P = X·Wᵀ + b), one pass writes Y: the g-scale,
  the bias and the LoRA term; with dropout in place on P.
- `dropout_apply` (`cublas` with dropout): keep⊙X (unscaled) for cuBLAS's second product.

Shared helpers come from the plain op's kernels (`grouped_tile`, `add_expand_tile`, the dropout hash); every
elementwise step is fp32, dots take X/W in their storage dtype (tensor cores).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lorafast.kernels import alloc
from lorafast.kernels.configs import DORA_GEMM, EPILOGUE, TWO_ACC, launch, m_bucket, rank_block
from lorafast.kernels.dropout import dropout_col_keys, dropout_keep, dropout_row_keys, mask_threshold
from lorafast.kernels.dtypes import dot_precision, lora_dot
from lorafast.kernels.lora_fwd import add_expand_tile, grouped_tile


@triton.jit(do_not_specialize=["mask_threshold"])
def dora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, g_ptr, scale_ptr, seed_ptr, y_ptr, zb_ptr,
    M, N, K, R, M_BUCKET,
    stride_xm, stride_xk, stride_wn, stride_wk,
    stride_bn, stride_br, stride_ym, stride_yn,
    mask_threshold, h_factor,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee", HASH_MASK: tl.constexpr = True,
):
    """Y[M, N] and Zb[M, N] (same strides as Y) as in the module docstring; h_factor = f. HASH_MASK=False exists
    for the compile gate only: the same two accumulators without the hash, so the twin's instruction difference
    is the mask's cost alone (launchers never pass it)."""
    tile_m, tile_n = grouped_tile(tl.program_id(0).to(tl.int64), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DROPOUT:
        acc_kept = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        seed = tl.load(seed_ptr)
        row_keys = dropout_row_keys(seed, offs_m)
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
        if HAS_DROPOUT:  # the same X and W tiles, the mask made in registers: W streamed once for both
            kept = x
            if HASH_MASK:
                kept = tl.where(dropout_keep(row_keys, dropout_col_keys(seed, offs_k), mask_threshold), x,
                                tl.zeros_like(x))
            acc_kept = tl.dot(kept, w, acc_kept, input_precision=DOT_PRECISION)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    # The LoRA term in a tile of its own: accumulating it into a live tile instead (after storing Zb) spilled more
    # on sm_80/sm_90 at rank block 128 (AOT gate: 8-328 B in this kernel and dora_expand), not less.
    lora = add_expand_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), x_ptr, h_ptr, b_ptr, scale_ptr,
                           h_factor, offs_m, offs_n, mask_m, mask_n, R, stride_bn, stride_br, DOT_PRECISION,
                           BLOCK_R, LORA_FP32, LORA_PRECISION)
    if HAS_DROPOUT:
        zb = acc_kept
        y = acc + ((g - 1.0) * h_factor)[None, :] * acc_kept + g[None, :] * lora
    else:
        zb = acc
        y = g[None, :] * (acc + lora)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tile = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + out, y.to(y_ptr.dtype.element_ty), mask=tile)
    tl.store(zb_ptr + out, zb.to(zb_ptr.dtype.element_ty), mask=tile)


@triton.jit
def dora_expand_kernel(
    y_ptr, zb_ptr, bias_ptr, h_ptr, b_ptr, g_ptr, scale_ptr,
    M, N, R, M_BUCKET,
    stride_ym, stride_yn, stride_zm, stride_zn, stride_bn, stride_br,
    h_factor,
    HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee",
):
    """`cublas`: Y = g⊙(Zb + s·H·Bᵀ) + b (no dropout: Y written, Zb read), or, with dropout, in place on
    Y = P = X·Wᵀ + b: Y += (g−1)⊙f·Zb + g⊙(f·s·H·Bᵀ). BLOCK_K is unused."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    tile = mask_m[:, None] & mask_n[None, :]
    zb = tl.load(zb_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, mask=tile, other=0.0)
    zb = zb.to(tl.float32)
    g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
    lora = add_expand_tile(tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), y_ptr, h_ptr, b_ptr, scale_ptr,
                           h_factor, offs_m, offs_n, mask_m, mask_n, R, stride_bn, stride_br, DOT_PRECISION,
                           BLOCK_R, LORA_FP32, LORA_PRECISION)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
    if HAS_DROPOUT:
        y = tl.load(y_ptrs, mask=tile, other=0.0).to(tl.float32)
        y += ((g - 1.0) * h_factor)[None, :] * zb + g[None, :] * lora
    else:
        y = g[None, :] * (zb + lora)
        if HAS_BIAS:
            y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=tile)


@triton.jit(do_not_specialize=["mask_threshold"])
def dropout_apply_kernel(
    x_ptr, seed_ptr, out_ptr,
    M, K, M_BUCKET,
    stride_xm, stride_xk, stride_om, stride_ok,
    mask_threshold,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HASH_MASK: tl.constexpr = True,
):
    """out[M, K] = keep ⊙ X (unscaled), the mask of every other kernel; BLOCK_N tiles K (BLOCK_K is unused).
    HASH_MASK: the compile gate's twin switch (see dora_gemm)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    tile = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk, mask=tile, other=0.0)
    if HASH_MASK:
        seed = tl.load(seed_ptr)
        keep = dropout_keep(dropout_row_keys(seed, offs_m), dropout_col_keys(seed, offs_k), mask_threshold)
        x = tl.where(keep, x, tl.zeros_like(x))
    tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :] * stride_ok, x, mask=tile)


def dora_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    h: torch.Tensor,
    lora_b: torch.Tensor,
    g: torch.Tensor,
    scaling: torch.Tensor,
    seed: Optional[torch.Tensor],
    dropout_p: float,
) -> tuple:
    """(Y, Zb) (M, N) in x's dtype, contiguous, from one GEMM (the `fused` strategy's forward).

    x (M, K) any strides; weight (N, K) x's dtype, any strides (Conv1D's ``.t()`` view read as is); bias (N,) or
    None; h (M, r) fp32 contiguous (unscaled); lora_b (N, r) any float dtype; g (N,) fp32; scaling 0-dim tensor;
    seed int64 (1,) when dropout_p > 0.
    """
    M, K = x.shape
    N = weight.shape[0]
    R = h.shape[1]
    y = alloc.empty((M, N), x.dtype, x.device)
    zb = alloc.empty((M, N), x.dtype, x.device)
    has_dropout = dropout_p > 0.0
    lora_fp32, lora_precision = lora_dot(x.dtype, lora_b.dtype)
    launch(
        dora_gemm_kernel, TWO_ACC if has_dropout else DORA_GEMM, x.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),),
        (x, weight, bias if bias is not None else y, h, lora_b, g, scaling, seed if has_dropout else g, y, zb,
         M, N, K, R, m_bucket(M), *x.stride(), *weight.stride(), *lora_b.stride(), *y.stride(),
         mask_threshold(dropout_p), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "N", "K", "LORA_FP32"),
        HAS_BIAS=bias is not None, HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(x.dtype),
        BLOCK_R=rank_block(R), GROUP_M=8, LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision,
        fp32=x.dtype == torch.float32,
    )
    return y, zb


def dora_expand(
    y: torch.Tensor,
    zb: torch.Tensor,
    bias: Optional[torch.Tensor],
    h: torch.Tensor,
    lora_b: torch.Tensor,
    g: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
) -> torch.Tensor:
    """The `cublas` forward's epilogue, returns ``y``: no dropout, Y (written) = g⊙(Zb + s·H·Bᵀ) + b; with
    dropout, in place on Y = X·Wᵀ + b (cuBLAS): Y += (g−1)⊙f·Zb + g⊙(f·s·H·Bᵀ) (bias already in Y).

    y, zb (M, N) x's dtype, any strides; h (M, r) fp32 contiguous; lora_b (N, r); g (N,) fp32; scaling 0-dim.
    """
    M, N = y.shape
    R = h.shape[1]
    has_dropout = dropout_p > 0.0
    has_bias = bias is not None and not has_dropout
    lora_fp32, lora_precision = lora_dot(y.dtype, lora_b.dtype)
    launch(
        dora_expand_kernel, EPILOGUE, y.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])),
        (y, zb, bias if has_bias else g, h, lora_b, g, scaling, M, N, R, m_bucket(M), *y.stride(), *zb.stride(),
         *lora_b.stride(), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "N", "LORA_FP32"),
        # In place with dropout: autotune trials must each start from cuBLAS's Y.
        restore=("y_ptr",) if has_dropout else (),
        HAS_BIAS=has_bias, HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(y.dtype), BLOCK_R=rank_block(R),
        LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision, fp32=y.dtype == torch.float32,
    )
    return y


def dropout_apply(x: torch.Tensor, seed: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """keep ⊙ X (M, K) in x's dtype, contiguous (unscaled by 1/(1−p)); x any strides, seed int64 (1,)."""
    M, K = x.shape
    out = alloc.empty((M, K), x.dtype, x.device)
    launch(
        dropout_apply_kernel, EPILOGUE, x.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"])),
        (x, seed, out, M, K, m_bucket(M), *x.stride(), *out.stride(), mask_threshold(dropout_p)),
        key=("M_BUCKET", "K"), fp32=x.dtype == torch.float32,
    )
    return out
