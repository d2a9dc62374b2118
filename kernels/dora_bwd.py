"""DoRA backward kernels, W frozen (notation of lorafast.dora.aten; T = dYᵀ·H, N×r):

    dH = s·dY·(g⊙B)  (M×r)   ┐ `dora_grad_h`: one pass over dY (and Zb), split over N; dH, dB, db and dm
    dB = f·s·g⊙T     (N×r)   │ are summed with relaxed fp32 atomics (each program adds its N tiles' share:
    db = Σₘ dY       (N)     │ T and Σₘ dY⊙Zb are linear in the rows, so dm needs no second pass)
    dm = f/‖·‖ ⊙ (Σₘ dY⊙Zb + s·Σᵣ B⊙T)  ┘
    dX = dY·W + keep⊙f·(((g−1)⊙dY)·W + dH·A)    (p = 0: (g⊙dY)·W + dH·A)
        `fused`: `dora_dx` — one GEMM; with dropout two accumulators (dY and (g−1)⊙dY, scaled in registers)
                 share each loaded W tile, the mask regenerated in the epilogue
        `cublas`: cuBLAS dY·W and ((g−1)⊙dY)·W, then `dora_dx_add` in place (p = 0: cuBLAS (g⊙dY)·W, then the
                 plain op's `dx_lora_add`)
    dA = f·dHᵀ·(keep⊙X)  the plain op's `lora_grad_a`

The g-scaled dY tile is rounded to dY's dtype for the tensor-core dot (fp32 product, one rounding per element);
(g−1)⊙dY keeps its own digits that way (g ≈ 1, so g⊙dY − dY would not). Every atomic is ``sem="relaxed"``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lorafast.kernels import alloc
from lorafast.kernels.configs import DORA_DX, DORA_SKINNY, EPILOGUE, TWO_ACC, launch, m_bucket, rank_block, split_for
from lorafast.kernels.dropout import dropout_col_keys, dropout_keep, dropout_row_keys, mask_threshold
from lorafast.kernels.dtypes import dot_precision, lora_dot, skinny_fp32_tiles
from lorafast.kernels.lora_fwd import grouped_tile


@triton.jit
def dora_grad_h_kernel(
    dy_ptr, zb_ptr, b_ptr, h_ptr, g_ptr, inv_norm_ptr, scale_ptr, dh_ptr, db_lora_ptr, dbias_ptr, dm_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_zm, stride_zn, stride_bn, stride_br,
    h_factor,
    NEED_DH: tl.constexpr, NEED_DB_LORA: tl.constexpr, NEED_DBIAS: tl.constexpr, NEED_DM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee",
):
    """Program (i, j) owns row block i and the N tiles j, j + S, … (S = programs along axis 1); adds its share
    of dH (M×R), dB (N×R), db (N) and dm (N) into zeroed fp32 buffers; h_factor = f."""
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    scale = tl.load(scale_ptr).to(tl.float32)
    lora_dtype = tl.float32 if LORA_FP32 else dy_ptr.dtype.element_ty
    lora_precision: tl.constexpr = LORA_PRECISION if LORA_FP32 else DOT_PRECISION
    NEED_T: tl.constexpr = NEED_DB_LORA or NEED_DM
    if NEED_T:
        h = tl.load(h_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        h = h.to(lora_dtype)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(tl.program_id(1) * BLOCK_N, N, BLOCK_N * split):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < N
        tile = mask_m[:, None] & mask_n[None, :]
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn, mask=tile, other=0.0)
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :], other=0.0,
        ).to(tl.float32)
        g = tl.load(g_ptr + offs_n, mask=mask_n, other=0.0)
        dy_lora = dy.to(lora_dtype)
        if NEED_DH:
            acc = tl.dot(dy_lora, (b * g[:, None]).to(lora_dtype), acc, input_precision=lora_precision)
        if NEED_T:
            t = tl.dot(tl.trans(dy_lora), h, input_precision=lora_precision)  # this block's rows of dYᵀ·H
            if NEED_DB_LORA:
                tl.atomic_add(
                    db_lora_ptr + offs_n[:, None] * R + offs_r[None, :], t * ((scale * h_factor) * g)[:, None],
                    mask=mask_n[:, None] & mask_r[None, :], sem="relaxed",
                )
        if NEED_DM:
            zb = tl.load(zb_ptr + offs_m[:, None] * stride_zm + offs_n[None, :] * stride_zn, mask=tile, other=0.0)
            part = tl.sum(dy.to(tl.float32) * zb.to(tl.float32), axis=0) + scale * tl.sum(b * t, axis=1)
            inv_norm = tl.load(inv_norm_ptr + offs_n, mask=mask_n, other=0.0)
            tl.atomic_add(dm_ptr + offs_n, part * (inv_norm * h_factor), mask=mask_n, sem="relaxed")
        if NEED_DBIAS:
            tl.atomic_add(dbias_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n, sem="relaxed")
    if NEED_DH:
        tl.atomic_add(
            dh_ptr + offs_m[:, None] * R + offs_r[None, :], acc * scale,
            mask=mask_m[:, None] & mask_r[None, :], sem="relaxed",
        )


@triton.jit
def dora_dx_tile(
    ref_ptr, part, dh_ptr, a_ptr, seed_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_ar, stride_ak,
    mask_threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr,
    LORA_PRECISION: tl.constexpr, HASH_MASK: tl.constexpr,
):
    """``keep ⊙ f·(part + dH·A)`` (fp32) on one (BLOCK_M, BLOCK_N) tile of dX (``part``: ((g−1)⊙dY)·W's tile, or
    zeros); without dropout ``part + dH·A``. The dot runs in ``ref_ptr``'s element type, or fp32 with LORA_FP32."""
    offs_r = tl.arange(0, BLOCK_R)
    lora_dtype = tl.float32 if LORA_FP32 else ref_ptr.dtype.element_ty
    lora_precision: tl.constexpr = LORA_PRECISION if LORA_FP32 else DOT_PRECISION
    dh = tl.load(dh_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & (offs_r[None, :] < R),
                 other=0.0)
    a = tl.load(a_ptr + offs_r[:, None] * stride_ar + offs_c[None, :] * stride_ak,
                mask=(offs_r[:, None] < R) & mask_c[None, :], other=0.0)
    out = tl.dot(dh.to(lora_dtype), a.to(lora_dtype), part, input_precision=lora_precision)
    if HAS_DROPOUT:
        out = out * inv_keep
        if HASH_MASK:  # False only in the compile gate's twin (the mask's cost alone)
            seed = tl.load(seed_ptr)
            keep = dropout_keep(dropout_row_keys(seed, offs_m), dropout_col_keys(seed, offs_c), mask_threshold)
            out = tl.where(keep, out, 0.0)
    return out


@triton.jit(do_not_specialize=["mask_threshold"])
def dora_dx_kernel(
    dy_ptr, w_ptr, g_ptr, dh_ptr, a_ptr, seed_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    mask_threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee", HASH_MASK: tl.constexpr = True,
):
    """dX[M, K] (the `fused` strategy): GEMM roles as the plain op's dX kernel (BLOCK_N tiles dX's columns, the
    reduction steps over the layer's N in BLOCK_K). HASH_MASK: the compile gate's twin switch (see dora_gemm)."""
    tile_m, tile_c = grouped_tile(tl.program_id(0).to(tl.int64), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tile_c * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_c = offs_c < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_DROPOUT:
        part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_K):
        offs_j = j0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_j = offs_j < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_j[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_j[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + offs_j[:, None] * stride_wn + offs_c[None, :] * stride_wk,
            mask=mask_j[:, None] & mask_c[None, :], other=0.0,
        )
        g = tl.load(g_ptr + offs_j, mask=mask_j, other=0.0)
        if HAS_DROPOUT:  # dY and (g−1)⊙dY share the loaded W tile
            acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
            scaled = (dy.to(tl.float32) * (g - 1.0)[None, :]).to(dy.dtype)
            part = tl.dot(scaled, w, part, input_precision=DOT_PRECISION)
        else:
            scaled = (dy.to(tl.float32) * g[None, :]).to(dy.dtype)
            acc = tl.dot(scaled, w, acc, input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        acc += dora_dx_tile(dy_ptr, part, dh_ptr, a_ptr, seed_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_ar,
                            stride_ak, mask_threshold, inv_keep, HAS_DROPOUT, DOT_PRECISION, BLOCK_R, LORA_FP32,
                            LORA_PRECISION, HASH_MASK)
    else:  # the LoRA dot accumulates into acc itself: no second tile
        acc = dora_dx_tile(dy_ptr, acc, dh_ptr, a_ptr, seed_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_ar,
                           stride_ak, mask_threshold, inv_keep, HAS_DROPOUT, DOT_PRECISION, BLOCK_R, LORA_FP32,
                           LORA_PRECISION, HASH_MASK)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_c[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :],
    )


@triton.jit(do_not_specialize=["mask_threshold"])
def dora_dx_add_kernel(
    dx_ptr, part_ptr, dh_ptr, a_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    stride_dxm, stride_dxk, stride_pm, stride_pk, stride_ar, stride_ak,
    mask_threshold, inv_keep,
    DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee", HASH_MASK: tl.constexpr = True,
):
    """`cublas` with dropout: dX[M, K] += keep ⊙ f·(part + dH·A) in place (dX = dY·W and part = ((g−1)⊙dY)·W
    from cuBLAS); BLOCK_N tiles dX's columns."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_c = offs_c < K
    tile = mask_m[:, None] & mask_c[None, :]
    part = tl.load(part_ptr + offs_m[:, None] * stride_pm + offs_c[None, :] * stride_pk, mask=tile, other=0.0)
    lora = dora_dx_tile(dx_ptr, part.to(tl.float32), dh_ptr, a_ptr, seed_ptr, offs_m, offs_c, mask_m, mask_c, R,
                        stride_ar, stride_ak, mask_threshold, inv_keep, True, DOT_PRECISION, BLOCK_R, LORA_FP32,
                        LORA_PRECISION, HASH_MASK)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_c[None, :] * stride_dxk
    acc = tl.load(dx_ptrs, mask=tile, other=0.0).to(tl.float32) + lora
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=tile)


def dora_grad_h(
    grad_y: torch.Tensor,
    zb: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    g: torch.Tensor,
    inv_norm: torch.Tensor,
    scaling: torch.Tensor,
    dropout_p: float,
    need_dh: bool,
    outs: Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]],
) -> Optional[torch.Tensor]:
    """One pass over dY (and Zb): returns dH (M, r) fp32 (None unless ``need_dh``) and adds dB, db and dm into
    ``outs`` = (dB (N, r), db (N,), dm (N,)) — zero-filled fp32 contiguous buffers, None where not needed.

    grad_y (M, N) any strides (stride-0 included); zb (M, N) any strides; lora_b (N, r) any float dtype; h (M, r)
    fp32 contiguous (unscaled); g, inv_norm (N,) fp32; scaling 0-dim tensor.
    """
    M, N = grad_y.shape
    R = lora_b.shape[1]
    dev = grad_y.device
    db_lora, dbias, dm = outs
    dh = torch.zeros((M, R), dtype=torch.float32, device=dev) if need_dh else None
    lora_fp32, lora_precision = lora_dot(grad_y.dtype, lora_b.dtype)
    fallback_ptr = g  # any valid pointer for an output the constexprs switch off

    def grid(meta):
        m_tiles = triton.cdiv(M, meta["BLOCK_M"])
        return m_tiles, split_for(m_tiles, triton.cdiv(N, meta["BLOCK_N"]), dev)

    zero = tuple(name for name, t in (("dh_ptr", dh), ("db_lora_ptr", db_lora), ("dbias_ptr", dbias),
                                      ("dm_ptr", dm)) if t is not None)
    launch(
        dora_grad_h_kernel, DORA_SKINNY, dev, grid,
        (grad_y, zb, lora_b, h, g, inv_norm, scaling, *(t if t is not None else fallback_ptr
                                                        for t in (dh, db_lora, dbias, dm)),
         M, N, R, m_bucket(M), *grad_y.stride(), *zb.stride(), *lora_b.stride(), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "N", "LORA_FP32"), reset_to_zero=zero,
        NEED_DH=need_dh, NEED_DB_LORA=db_lora is not None, NEED_DBIAS=dbias is not None, NEED_DM=dm is not None,
        DOT_PRECISION=dot_precision(grad_y.dtype), BLOCK_R=rank_block(R), LORA_FP32=lora_fp32,
        LORA_PRECISION=lora_precision, fp32=skinny_fp32_tiles(grad_y.dtype, lora_fp32, lora_precision),
    )
    return dh


def dora_dx(
    grad_y: torch.Tensor,
    weight: torch.Tensor,
    g: torch.Tensor,
    dh: torch.Tensor,
    lora_a: torch.Tensor,
    seed: Optional[torch.Tensor],
    dropout_p: float,
) -> torch.Tensor:
    """dX (M, K) in grad_y's dtype, contiguous, from one GEMM (the `fused` strategy).

    grad_y (M, N) any strides; weight (N, K) grad_y's dtype, any strides; g (N,) fp32; dh (M, r) fp32 contiguous
    (s·dY·(g⊙B)); lora_a (r, K) any float dtype; seed int64 (1,) when dropout_p > 0.
    """
    M, N = grad_y.shape
    K = weight.shape[1]
    R = lora_a.shape[0]
    dx = alloc.empty((M, K), grad_y.dtype, grad_y.device)
    has_dropout = dropout_p > 0.0
    lora_fp32, lora_precision = lora_dot(grad_y.dtype, lora_a.dtype)
    launch(
        dora_dx_kernel, TWO_ACC if has_dropout else DORA_DX, grad_y.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),),
        (grad_y, weight, g, dh, lora_a, seed if has_dropout else dh, dx, M, N, K, R, m_bucket(M),
         *grad_y.stride(), *weight.stride(), *lora_a.stride(), *dx.stride(),
         mask_threshold(dropout_p), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "N", "K", "LORA_FP32"),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(grad_y.dtype), BLOCK_R=rank_block(R), GROUP_M=8,
        LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision, fp32=grad_y.dtype == torch.float32,
    )
    return dx


def dora_dx_add(dx: torch.Tensor, part: torch.Tensor, dh: torch.Tensor, lora_a: torch.Tensor, seed: torch.Tensor,
                dropout_p: float) -> torch.Tensor:
    """dX += keep ⊙ f·(part + dH·A) in place (the `cublas` strategy with dropout); returns ``dx``.

    dx, part (M, K) any strides; dh (M, r) fp32 contiguous; lora_a (r, K); seed int64 (1,).
    """
    M, K = dx.shape
    R = lora_a.shape[0]
    lora_fp32, lora_precision = lora_dot(dx.dtype, lora_a.dtype)
    launch(
        dora_dx_add_kernel, EPILOGUE, dx.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"])),
        (dx, part, dh, lora_a, seed, M, K, R, m_bucket(M), *dx.stride(), *part.stride(), *lora_a.stride(),
         mask_threshold(dropout_p), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "K", "LORA_FP32"), restore=("dx_ptr",),
        DOT_PRECISION=dot_precision(dx.dtype), BLOCK_R=rank_block(R), LORA_FP32=lora_fp32,
        LORA_PRECISION=lora_precision, fp32=dx.dtype == torch.float32,
    )
    return dx
