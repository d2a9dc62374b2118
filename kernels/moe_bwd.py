"""Grouped (MoE experts) backward kernels, W frozen, over the same (expert, row-tile) schedule as the forward
(:func:`lorafast.kernels.moe_fwd.expert_row_tile`):

    dH_e = s·dY_e·B_e              (rows×r)  ┐ one pass over dY (moe_grad_h), split over N; dH, dB and db are
    dB_e = s·h_factor·dY_eᵀ·H_e    (N×r)     │ summed with relaxed fp32 atomics, dB straight into lora_B's
    db_e = Σ_rows dY_e             (N)       ┘ rank-major (N, r·E) layout
    dX_e = dY_e·W_e + keep ⊙ (dH_e·A_e)·inv_keep   `fused`: grouped GEMM with the rank-r epilogue
                                                    `cublas`: torch's grouped GEMM, then moe_dx_lora_add in place
    dA_e = dH_eᵀ·drop(X_e)·inv_keep (r×K)    one program per (row tile, K tile), relaxed atomics into lora_A's
                                             (E·r, K) layout, mask regenerated from the seed

No dW: the frozen expert weight gets nothing. The tail's rows (past offsets[-1]) get dX = 0 and feed nothing.
The rank-r dots take dY/X, H, dH and the adapters in dY's dtype. Offsets int64 before stride products.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lorafast.kernels import alloc
from lorafast.kernels.configs import EPILOGUE, MOE_DH, MOE_DX, MOE_SKINNY, launch, m_bucket, rank_block, split_for
from lorafast.kernels.dropout import dropout_col_keys, dropout_keep, dropout_row_keys, mask_threshold
from lorafast.kernels.dtypes import dot_precision
from lorafast.kernels.lora_bwd import dx_lora_tile
from lorafast.kernels.moe_fwd import expert_block, expert_row_tile, nk_strides, row_tiles


@triton.jit
def moe_grad_h_kernel(
    dy_ptr, b_ptr, h_ptr, scale_ptr, dh_ptr, db_lora_ptr, dbias_ptr, offsets_ptr,
    S, N, R, E, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_bc,
    h_factor,
    NEED_DB_LORA: tl.constexpr, NEED_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """dH (S×R, scaled by s), dB (N, R·E) and db (E, N), all fp32 and zeroed by the caller; program (i, j) owns row
    tile i and the N tiles j, j + S', … (S' = programs on axis 1)."""
    group, row0, end = expert_row_tile(tl.program_id(0), offsets_ptr, E, S, BLOCK_M, BLOCK_E)
    if group < E:
        split = tl.num_programs(1)
        offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < end
        mask_r = offs_r < R
        scale = tl.load(scale_ptr).to(tl.float32)
        lora_dtype = dy_ptr.dtype.element_ty
        # lora_B and dB (N·r·E elements, < 2³¹: checked by the launcher) take int32 offsets: their tiles are
        # strided along both axes (B_e's rank stride is E), one address per element, and int64 offsets there
        # spilled (AOT gate, sm_90, r = 32–64).
        b_cols = offs_r[None, :] * (E * stride_bc) + group * stride_bc
        db_cols = offs_r[None, :] * E + group
        if NEED_DB_LORA:
            h = tl.load(h_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :],
                        other=0.0)
            h_scaled = (h * (scale * h_factor)).to(lora_dtype)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for n0 in range(tl.program_id(1) * BLOCK_N, N, BLOCK_N * split):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < N
            dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n.to(tl.int64)[None, :] * stride_dyn,
                         mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            b = tl.load(b_ptr + offs_n[:, None] * stride_bn + b_cols, mask=mask_n[:, None] & mask_r[None, :],
                        other=0.0)
            acc = tl.dot(dy, b.to(lora_dtype), acc, input_precision=DOT_PRECISION)
            if NEED_DB_LORA:
                part = tl.dot(tl.trans(dy), h_scaled, input_precision=DOT_PRECISION)
                # dB is (N, R·E) contiguous: B_e's rank j is column j·E + e.
                tl.atomic_add(db_lora_ptr + offs_n[:, None] * (R * E) + db_cols, part,
                              mask=mask_n[:, None] & mask_r[None, :], sem="relaxed")
            if NEED_DBIAS:
                tl.atomic_add(dbias_ptr + group * N + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n,
                              sem="relaxed")
        tl.atomic_add(dh_ptr + offs_m[:, None] * R + offs_r[None, :], acc * scale,
                      mask=mask_m[:, None] & mask_r[None, :], sem="relaxed")


@triton.jit(do_not_specialize=["mask_threshold"])
def moe_dx_kernel(
    dy_ptr, w_ptr, dh_ptr, a_ptr, seed_ptr, dx_ptr, offsets_ptr,
    S, N, K, R, E, M_BUCKET,
    stride_dym, stride_dyn, stride_we, stride_wn, stride_wk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    mask_threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX[rows of e] = dY·W_e + keep ⊙ (dH·A_e)·inv_keep; the tail's rows get zeros. GEMM roles as the dense dX
    kernel: BLOCK_N tiles dX's K columns, BLOCK_K steps over the layer's N."""
    group, row0, end = expert_row_tile(tl.program_id(0), offsets_ptr, E, S, BLOCK_M, BLOCK_E)
    if group <= E:
        offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_c = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < end
        mask_c = offs_c < K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if group < E:
            expert = group.to(tl.int64)
            w_base = w_ptr + expert * stride_we
            for j0 in range(0, N, BLOCK_K):
                offs_j = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
                mask_j = offs_j < N
                dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_j[None, :] * stride_dyn,
                             mask=mask_m[:, None] & mask_j[None, :], other=0.0)
                w = tl.load(w_base + offs_j[:, None] * stride_wn + offs_c[None, :] * stride_wk,
                            mask=mask_j[:, None] & mask_c[None, :], other=0.0)
                acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
            acc += dx_lora_tile(dy_ptr, dh_ptr, a_ptr + expert * R * stride_ar, seed_ptr, offs_m, offs_c, mask_m,
                                mask_c, R, stride_ar, stride_ak, mask_threshold, inv_keep, HAS_DROPOUT, DOT_PRECISION,
                                BLOCK_R, False, "ieee")
        tl.store(dx_ptr + offs_m[:, None] * stride_dxm + offs_c[None, :] * stride_dxk,
                 acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :])


@triton.jit(do_not_specialize=["mask_threshold"])
def moe_dx_lora_add_kernel(
    dx_ptr, dh_ptr, a_ptr, seed_ptr, offsets_ptr,
    S, K, R, E, M_BUCKET,
    stride_dxm, stride_dxk, stride_ar, stride_ak,
    mask_threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dX[rows of e] += keep ⊙ (dH·A_e)·inv_keep in place (dX from torch's grouped GEMM: dY_e·W_e); the tail's rows
    are set to zero."""
    group, row0, end = expert_row_tile(tl.program_id(0), offsets_ptr, E, S, BLOCK_M, BLOCK_E)
    if group <= E:
        offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_c = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < end
        mask_c = offs_c < K
        tile = mask_m[:, None] & mask_c[None, :]
        dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_c[None, :] * stride_dxk
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if group < E:
            expert = group.to(tl.int64)
            acc = tl.load(dx_ptrs, mask=tile, other=0.0).to(tl.float32)
            acc += dx_lora_tile(dx_ptr, dh_ptr, a_ptr + expert * R * stride_ar, seed_ptr, offs_m, offs_c, mask_m,
                                mask_c, R, stride_ar, stride_ak, mask_threshold, inv_keep, HAS_DROPOUT, DOT_PRECISION,
                                BLOCK_R, False, "ieee")
        tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=tile)


@triton.jit(do_not_specialize=["mask_threshold"])
def moe_grad_a_kernel(
    x_ptr, dh_ptr, seed_ptr, da_ptr, offsets_ptr,
    S, K, R, E, M_BUCKET,
    stride_xm, stride_xk,
    mask_threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """dA[e·R : e·R+R, K tile] (fp32, zeroed by the caller) += dH_rowsᵀ·drop(X)_rows·inv_keep for program
    (row tile, K tile)."""
    group, row0, end = expert_row_tile(tl.program_id(0), offsets_ptr, E, S, BLOCK_M, BLOCK_E)
    if group < E:
        expert = group.to(tl.int64)
        offs_m = (row0 + tl.arange(0, BLOCK_M)).to(tl.int64)
        offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
        offs_r = tl.arange(0, BLOCK_R)
        mask_m = offs_m < end
        mask_k = offs_k < K
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if HAS_DROPOUT:
            seed = tl.load(seed_ptr)
            keep = dropout_keep(dropout_row_keys(seed, offs_m), dropout_col_keys(seed, offs_k), mask_threshold)
            x = tl.where(keep, x, tl.zeros_like(x))
        dh = tl.load(dh_ptr + offs_r[:, None] + offs_m[None, :] * R, mask=(offs_r[:, None] < R) & mask_m[None, :],
                     other=0.0)
        part = tl.dot(dh.to(x_ptr.dtype.element_ty), x, input_precision=DOT_PRECISION)
        tl.atomic_add(da_ptr + (expert * R + offs_r[:, None]) * K + offs_k[None, :], part * inv_keep,
                      mask=(offs_r[:, None] < R) & mask_k[None, :], sem="relaxed")


def moe_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    offsets: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    scaling: torch.Tensor,
    seed: Optional[torch.Tensor],
    dropout_p: float,
    need_da: bool,
    need_db_lora: bool,
    need_dbias: bool,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The rank-r side of the grouped backward (both Triton strategies): dH, dB and db in one pass over dY, then
    dA over X; dA, dB and db carved from one zero fill. grad_y (S, N) any strides; x (S, K); lora_a (E·r, K);
    lora_b (N, r·E); h (S, r) fp32. Returns (dH (S, r), dA (E·r, K), dB (N, r·E), db (E, N)) fp32, None where not
    needed (dH is always computed: dX needs it)."""
    S, N = grad_y.shape
    K = x.shape[1]
    E = offsets.shape[0]
    R = lora_a.shape[0] // E
    dev = grad_y.device
    if lora_b.shape[0] * lora_b.stride(0) >= 2**31 or N * E >= 2**31:
        raise ValueError(f"moe_grads: lora_B {tuple(lora_b.shape)} or db (E, N) spans 2³¹ elements or more (the "
                         "dH/dB kernel indexes them in int32)")
    shapes = (tuple(lora_a.shape) if need_da else None, tuple(lora_b.shape) if need_db_lora else None,
              (E, N) if need_dbias else None)
    da, db_lora, dbias = alloc.zeros_views(shapes, torch.float32, dev)
    dh = torch.zeros((S, R), dtype=torch.float32, device=dev)
    h_factor = 1.0 / (1.0 - dropout_p)

    def grid_h(meta):
        tiles = row_tiles(S, E, meta["BLOCK_M"])
        return tiles, split_for(triton.cdiv(S, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"]), dev)

    launch(
        moe_grad_h_kernel, MOE_DH, dev, grid_h,
        (grad_y, lora_b, h, scaling, dh, db_lora if need_db_lora else dh, dbias if need_dbias else dh, offsets,
         S, N, R, E, m_bucket(S), *grad_y.stride(), *lora_b.stride(), h_factor),
        key=("M_BUCKET", "N"),
        reset_to_zero=("dh_ptr",) + tuple(n for n, on in (("db_lora_ptr", need_db_lora), ("dbias_ptr", need_dbias))
                                          if on),
        NEED_DB_LORA=need_db_lora, NEED_DBIAS=need_dbias, DOT_PRECISION=dot_precision(grad_y.dtype),
        BLOCK_R=rank_block(R), BLOCK_E=expert_block(E), fp32=grad_y.dtype == torch.float32,
    )
    if need_da:
        has_dropout = dropout_p > 0.0
        launch(
            moe_grad_a_kernel, MOE_SKINNY, dev,
            lambda meta: (row_tiles(S, E, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"])),
            (x, dh, seed if has_dropout else dh, da, offsets, S, K, R, E, m_bucket(S), *x.stride(),
             mask_threshold(dropout_p), h_factor),
            key=("M_BUCKET", "K"), reset_to_zero=("da_ptr",),
            HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R),
            BLOCK_E=expert_block(E), fp32=x.dtype == torch.float32,
        )
    return dh, da, db_lora, dbias


def moe_dx(grad_y: torch.Tensor, weight: torch.Tensor, transposed: bool, offsets: torch.Tensor, dh: torch.Tensor,
           lora_a: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """dX_e = dY_e·W_e + keep ⊙ (dH_e·A_e)/(1−p) as one grouped GEMM (the `fused` strategy). grad_y (S, N); weight
    (E, N, K) or transposed (E, K, N); dh (S, r) fp32 (scaled by s); lora_a (E·r, K). Returns dX (S, K) in grad_y's
    dtype (tail rows zero)."""
    S, N = grad_y.shape
    E = offsets.shape[0]
    K = weight.shape[1] if transposed else weight.shape[2]
    R = dh.shape[1]
    dx = alloc.empty((S, K), grad_y.dtype, grad_y.device)
    has_dropout = dropout_p > 0.0
    launch(
        moe_dx_kernel, MOE_DX, grad_y.device,
        lambda meta: (row_tiles(S, E, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"])),
        (grad_y, weight, dh, lora_a, seed if has_dropout else dh, dx, offsets, S, N, K, R, E, m_bucket(S),
         *grad_y.stride(), *nk_strides(weight, transposed), *lora_a.stride(), *dx.stride(),
         mask_threshold(dropout_p), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "N", "K"),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(grad_y.dtype), BLOCK_R=rank_block(R),
        BLOCK_E=expert_block(E), fp32=grad_y.dtype == torch.float32,
    )
    return dx


def moe_dx_lora_add(dx: torch.Tensor, offsets: torch.Tensor, dh: torch.Tensor, lora_a: torch.Tensor,
                    seed: Optional[torch.Tensor], dropout_p: float) -> torch.Tensor:
    """dX_e += keep ⊙ (dH_e·A_e)/(1−p) in place, tail rows zeroed (the `cublas` strategy, after the grouped GEMM
    dY_e·W_e). dx (S, K) any strides; dh (S, r) fp32 (scaled by s); lora_a (E·r, K). Returns ``dx``."""
    S, K = dx.shape
    E = offsets.shape[0]
    R = dh.shape[1]
    has_dropout = dropout_p > 0.0
    launch(
        moe_dx_lora_add_kernel, EPILOGUE, dx.device,
        lambda meta: (row_tiles(S, E, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"])),
        (dx, dh, lora_a, seed if has_dropout else dh, offsets, S, K, R, E, m_bucket(S), *dx.stride(),
         *lora_a.stride(), mask_threshold(dropout_p), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "K"), restore=("dx_ptr",),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(dx.dtype), BLOCK_R=rank_block(R),
        BLOCK_E=expert_block(E), fp32=dx.dtype == torch.float32,
    )
    return dx
