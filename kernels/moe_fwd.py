"""Grouped (MoE experts) forward kernels over an (expert, row-tile) schedule of expert-sorted tokens.

Tokens arrive sorted by expert with cumulative ``offsets`` (E,); group e owns rows ``offsets[e-1]:offsets[e]`` and a
last group E (the "tail") owns rows ``offsets[E-1]:S`` — expert-parallel sentinels, which get zeros. Each row-tile
program finds its group in registers (:func:`expert_row_tile`: a cumulative sum of the groups' tile counts, E+1
int32 loads per program) instead of a host-built schedule: no host sync, no extra launch, and the schedule follows
the autotuned BLOCK_M. The grid's row axis is the bound cdiv(S, BLOCK_M) + E + 1; programs past the last tile exit.

- `moe_shrink`: H = drop(X_e)·A_eᵀ per row (fp32, split over K with relaxed atomics, as the dense shrink).
- `moe_lora_gemm` (`fused`): Y_e = X_e·W_eᵀ + b_e + s·h_factor·H_e·B_eᵀ, the rank-r term in the epilogue
  (:func:`lorafast.kernels.lora_fwd.add_expand_tile`, shared with the dense kernels).
- `moe_expand_add` (`cublas`): Y_e += b_e + s·h_factor·H_e·B_eᵀ in place on torch's grouped GEMM output; tail rows
  set to zero.

Layouts, all read in place through strides: W_e is ``w + e·stride_we`` with (N, K) strides (transformers' (E, N, K)
or gpt-oss's (E, K, N) — the launcher passes the strides of the (E, N, K) view); A_e is rows e·r … e·r+r−1 of
lora_A (E·r, K); B_e is columns e, e+E, … of lora_B (N, r·E), i.e. ``b + e·stride_bc`` with rank stride E·stride_bc.
Dtype rules as the dense kernels (fp32 accumulators and elementwise math; the rank-r dots in x's dtype, as PEFT's
ParamWrapper casts its factors to the parameter dtype). Expert, row and column offsets are int64 before any stride
product.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lorafast.kernels import alloc
from lorafast.kernels.configs import EPILOGUE, MOE_GEMM, MOE_SKINNY, launch, m_bucket, rank_block, split_for
from lorafast.kernels.dropout import dropout_col_keys, dropout_keep, dropout_row_keys, mask_threshold
from lorafast.kernels.dtypes import dot_precision
from lorafast.kernels.lora_fwd import add_expand_tile


@triton.jit
def expert_row_tile(pid, offsets_ptr, E, S, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr):
    """(group, first row, end row) of row-tile program ``pid``: group e < E is expert e, E the tail (rows past
    offsets[E-1]), > E no work. BLOCK_E ≥ E + 1."""
    offs_e = tl.arange(0, BLOCK_E)
    ends = tl.load(offsets_ptr + offs_e, mask=offs_e < E, other=0)
    ends = tl.where(offs_e < E, ends, S)
    starts = tl.load(offsets_ptr + offs_e - 1, mask=(offs_e > 0) & (offs_e <= E), other=0)
    starts = tl.where(offs_e == 0, 0, tl.where(offs_e <= E, starts, S))
    tiles = (ends - starts + BLOCK_M - 1) // BLOCK_M
    last_tile = tl.cumsum(tiles, 0)  # exclusive end of each group's tiles
    group = tl.sum((last_tile <= pid).to(tl.int32), 0)
    this = offs_e == group
    first_tile = tl.sum(tl.where(this, last_tile - tiles, 0), 0)
    row0 = tl.sum(tl.where(this, starts, 0), 0) + (pid - first_tile) * BLOCK_M
    end = tl.sum(tl.where(this, ends, 0), 0)
    return group, row0, end


@triton.jit(do_not_specialize=["mask_threshold"])
def moe_shrink_kernel(
    x_ptr, a_ptr, h_ptr, seed_ptr, offsets_ptr,
    S, K, R, E, M_BUCKET,
    stride_xm, stride_xk, stride_ar, stride_ak,
    mask_threshold,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """H[rows of e, :R] (fp32, zeroed by the caller) += drop(X)[rows, K-slice]·A_e[:, K-slice]ᵀ; program (i, j)
    owns row tile i and the K tiles j, j + S', … (S' = programs on axis 1). The tail's rows stay zero."""
    group, row0, end = expert_row_tile(tl.program_id(0), offsets_ptr, E, S, BLOCK_M, BLOCK_E)
    if group < E:
        split = tl.num_programs(1)
        offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < end
        a_base = a_ptr + group.to(tl.int64) * R * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            row_keys = dropout_row_keys(seed, offs_m)
        for k0 in range(tl.program_id(1) * BLOCK_K, K, BLOCK_K * split):
            offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
            mask_k = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                        mask=mask_m[:, None] & mask_k[None, :], other=0.0)
            if HAS_DROPOUT:
                keep = dropout_keep(row_keys, dropout_col_keys(seed, offs_k), mask_threshold)
                x = tl.where(keep, x, tl.zeros_like(x))
            a = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                        mask=(offs_r[None, :] < R) & mask_k[:, None], other=0.0)
            acc = tl.dot(x, a.to(x_ptr.dtype.element_ty), acc, input_precision=DOT_PRECISION)
        tl.atomic_add(h_ptr + offs_m[:, None] * R + offs_r[None, :], acc,
                      mask=mask_m[:, None] & (offs_r[None, :] < R), sem="relaxed")


@triton.jit
def moe_lora_gemm_kernel(
    x_ptr, w_ptr, bias_ptr, h_ptr, b_ptr, scale_ptr, y_ptr, offsets_ptr,
    S, N, K, R, E, M_BUCKET,
    stride_xm, stride_xk, stride_we, stride_wn, stride_wk, stride_biase, stride_biasn,
    stride_bn, stride_bc, stride_ym, stride_yn,
    h_factor,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Y[rows of e] = X·W_eᵀ + b_e + (s·h_factor·H)·B_eᵀ; the tail's rows get zeros. Row tiles run along axis 0
    (fastest in launch order), so the few tiles of one expert share W_e's column tile in L2."""
    group, row0, end = expert_row_tile(tl.program_id(0), offsets_ptr, E, S, BLOCK_M, BLOCK_E)
    if group <= E:
        offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < end
        mask_n = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if group < E:
            expert = group.to(tl.int64)
            w_base = w_ptr + expert * stride_we
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
                mask_k = offs_k < K
                x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                            mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                w = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                            mask=mask_n[None, :] & mask_k[:, None], other=0.0)
                acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
            acc = add_expand_tile(acc, x_ptr, h_ptr, b_ptr + expert * stride_bc, scale_ptr, h_factor, offs_m, offs_n,
                                  mask_m, mask_n, R, stride_bn, E * stride_bc, DOT_PRECISION, BLOCK_R, False, "ieee")
            if HAS_BIAS:
                bias = tl.load(bias_ptr + expert * stride_biase + offs_n * stride_biasn, mask=mask_n, other=0.0)
                acc += bias.to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty),
                 mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def moe_expand_add_kernel(
    y_ptr, bias_ptr, h_ptr, b_ptr, scale_ptr, offsets_ptr,
    S, N, R, E, M_BUCKET,
    stride_ym, stride_yn, stride_biase, stride_biasn, stride_bn, stride_bc,
    h_factor,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Y[rows of e] += b_e + (s·h_factor·H)·B_eᵀ in place (Y from torch's grouped GEMM: X_e·W_eᵀ); the tail's rows
    are set to zero (the grouped GEMM leaves them unwritten)."""
    group, row0, end = expert_row_tile(tl.program_id(0), offsets_ptr, E, S, BLOCK_M, BLOCK_E)
    if group <= E:
        offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < end
        mask_n = offs_n < N
        tile = mask_m[:, None] & mask_n[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if group < E:
            expert = group.to(tl.int64)
            acc = tl.load(y_ptrs, mask=tile, other=0.0).to(tl.float32)
            acc = add_expand_tile(acc, y_ptr, h_ptr, b_ptr + expert * stride_bc, scale_ptr, h_factor, offs_m, offs_n,
                                  mask_m, mask_n, R, stride_bn, E * stride_bc, DOT_PRECISION, BLOCK_R, False, "ieee")
            if HAS_BIAS:
                bias = tl.load(bias_ptr + expert * stride_biase + offs_n * stride_biasn, mask=mask_n, other=0.0)
                acc += bias.to(tl.float32)[None, :]
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=tile)


def expert_block(E: int) -> int:
    """BLOCK_E: a power of two ≥ E + 1 (the experts and the tail group)."""
    return max(16, 1 << E.bit_length())


def row_tiles(S: int, E: int, block_m: int) -> int:
    """Row-tile programs to launch: Σ_e cdiv(count_e, BLOCK_M) over E + 1 groups is at most this."""
    return triton.cdiv(S, block_m) + E + 1


def moe_shrink(x: torch.Tensor, lora_a: torch.Tensor, offsets: torch.Tensor, seed: Optional[torch.Tensor],
               dropout_p: float) -> torch.Tensor:
    """H = (X ⊙ keep)·A_eᵀ per expert, without the 1/(1−p) factor. x (S, K) any strides, sorted by expert; lora_a
    (E·r, K) any float dtype; offsets (E,) int32. Returns H (S, r) fp32 contiguous (tail rows zero)."""
    S, K = x.shape
    E = offsets.shape[0]
    R = lora_a.shape[0] // E
    h = torch.zeros((S, R), dtype=torch.float32, device=x.device)
    has_dropout = dropout_p > 0.0

    def grid(meta):
        tiles = row_tiles(S, E, meta["BLOCK_M"])
        return tiles, split_for(triton.cdiv(S, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"]), x.device)

    launch(
        moe_shrink_kernel, MOE_SKINNY, x.device, grid,
        (x, lora_a, h, seed if has_dropout else h, offsets, S, K, R, E, m_bucket(S), *x.stride(), *lora_a.stride(),
         mask_threshold(dropout_p)),
        key=("M_BUCKET", "K"), reset_to_zero=("h_ptr",),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R), BLOCK_E=expert_block(E),
        fp32=x.dtype == torch.float32,
    )
    return h


def nk_strides(weight: torch.Tensor, transposed: bool) -> tuple:
    """(stride_e, stride_n, stride_k) of the expert weight viewed as (E, N, K)."""
    se, s1, s2 = weight.stride()
    return (se, s2, s1) if transposed else (se, s1, s2)


def bias_args(bias: Optional[torch.Tensor], placeholder: torch.Tensor) -> tuple:
    """(pointer, stride_e, stride_n) of an (E, N) bias, or a placeholder pointer when there is none."""
    return (bias, *bias.stride()) if bias is not None else (placeholder, 0, 0)


def moe_lora_gemm(x: torch.Tensor, weight: torch.Tensor, transposed: bool, bias: Optional[torch.Tensor],
                  offsets: torch.Tensor, h: torch.Tensor, lora_b: torch.Tensor, scaling: torch.Tensor,
                  h_factor: float = 1.0) -> torch.Tensor:
    """Y_e = X_e·W_eᵀ + b_e + (s·h_factor·H_e)·B_eᵀ in one grouped GEMM (the `fused` strategy). x (S, K); weight
    (E, N, K) or transposed (E, K, N) in x's dtype; bias (E, N) or None; h (S, r) fp32 contiguous; lora_b (N, r·E);
    scaling 0-dim tensor. Returns Y (S, N) in x's dtype (tail rows zero)."""
    S, K = x.shape
    E = offsets.shape[0]
    N = weight.shape[2] if transposed else weight.shape[1]
    R = h.shape[1]
    y = alloc.empty((S, N), x.dtype, x.device)
    bias_ptr, *bias_strides = bias_args(bias, y)
    launch(
        moe_lora_gemm_kernel, MOE_GEMM, x.device,
        lambda meta: (row_tiles(S, E, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])),
        (x, weight, bias_ptr, h, lora_b, scaling, y, offsets, S, N, K, R, E, m_bucket(S),
         *x.stride(), *nk_strides(weight, transposed), *bias_strides, *lora_b.stride(), *y.stride(), float(h_factor)),
        key=("M_BUCKET", "N", "K"),
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R),
        BLOCK_E=expert_block(E), fp32=x.dtype == torch.float32,
    )
    return y


def moe_expand_add(y: torch.Tensor, bias: Optional[torch.Tensor], offsets: torch.Tensor, h: torch.Tensor,
                   lora_b: torch.Tensor, scaling: torch.Tensor, h_factor: float = 1.0) -> torch.Tensor:
    """Y_e += b_e + (s·h_factor·H_e)·B_eᵀ in place, tail rows zeroed (the `cublas` strategy, after the grouped
    GEMM). y (S, N) any strides; bias (E, N) or None; h (S, r) fp32; lora_b (N, r·E). Returns ``y``."""
    S, N = y.shape
    E = offsets.shape[0]
    R = h.shape[1]
    bias_ptr, *bias_strides = bias_args(bias, y)
    launch(
        moe_expand_add_kernel, EPILOGUE, y.device,
        lambda meta: (row_tiles(S, E, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])),
        (y, bias_ptr, h, lora_b, scaling, offsets, S, N, R, E, m_bucket(S), *y.stride(), *bias_strides,
         *lora_b.stride(), float(h_factor)),
        key=("M_BUCKET", "N"), restore=("y_ptr",),
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(y.dtype), BLOCK_R=rank_block(R),
        BLOCK_E=expert_block(E), fp32=y.dtype == torch.float32,
    )
    return y
