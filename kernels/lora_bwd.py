"""Backward kernels (KERNELS.md steps 3–5), W frozen.

    dH = s·dY·B            (M×r)   ┐ one pass over dY (lora_grad_h), split over N; dH, dB and db
    dB = s·dYᵀ·H           (N×r)   │ are summed with relaxed fp32 atomics
    db = Σₘ dY             (N)     ┘
    dX = dY·W + keep ⊙ (dH·A)/(1−p)   `fused`: GEMM with the rank-r product in the epilogue
                                      `cublas`: torch.mm, then dx_lora_add in place
    dA = dHᵀ·drop(X)       (r×K)   one pass over X, split over M, mask regenerated from the seed

H is saved unscaled by 1/(1−p); callers pass that factor (h_factor) where H is consumed. The rank-r
dots take dY/X, H, dH and the adapters in dY's dtype, or, with LORA_FP32 (fp32 adapters at adapter
precision "fp32", kernels/dtypes.py), as fp32 operands widened in registers at LORA_PRECISION. Offsets are
int64 (program ids and column offsets). Every atomic is `sem="relaxed"`: the sums are read only by
later kernels in stream order, and the default acq_rel fences each element (MEMBAR.ALL.GPU on sm_90).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from lorafast.kernels import alloc
from lorafast.kernels.configs import DX, EPILOGUE, SKINNY, launch, m_bucket, rank_block, split_for
from lorafast.kernels.dropout import dropout_col_keys, dropout_keep, dropout_row_keys, mask_threshold
from lorafast.kernels.dtypes import dot_precision, lora_dot, skinny_fp32_tiles
from lorafast.kernels.lora_fwd import grouped_tile


@triton.jit
def dx_lora_tile(
    ref_ptr, dh_ptr, a_ptr, seed_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_ar, stride_ak,
    mask_threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, LORA_FP32: tl.constexpr,
    LORA_PRECISION: tl.constexpr,
):
    """``keep ⊙ (dH·A)·inv_keep`` (fp32) on one (BLOCK_M, BLOCK_N) tile of dX, the mask regenerated from the
    seed: the LoRA term of the fused dX GEMM and of the in-place `cublas` update, in one place. The dot runs in
    ``ref_ptr``'s element type (dY or dX), or on fp32 operands with LORA_FP32."""
    offs_r = tl.arange(0, BLOCK_R)
    lora_dtype = tl.float32 if LORA_FP32 else ref_ptr.dtype.element_ty
    lora_precision: tl.constexpr = LORA_PRECISION if LORA_FP32 else DOT_PRECISION
    dh = tl.load(
        dh_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & (offs_r[None, :] < R), other=0.0
    )
    a = tl.load(
        a_ptr + offs_r[:, None] * stride_ar + offs_c[None, :] * stride_ak,
        mask=(offs_r[:, None] < R) & mask_c[None, :], other=0.0,
    )
    lora = tl.dot(dh.to(lora_dtype), a.to(lora_dtype), input_precision=lora_precision)
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        keep = dropout_keep(dropout_row_keys(seed, offs_m), dropout_col_keys(seed, offs_c), mask_threshold)
        lora = tl.where(keep, lora * inv_keep, 0.0)
    return lora


@triton.jit
def lora_grad_h_kernel(
    dy_ptr, b_ptr, h_ptr, scale_ptr, dh_ptr, db_lora_ptr, dbias_ptr,
    M, N, R, M_BUCKET,
    stride_dym, stride_dyn, stride_bn, stride_br,
    h_factor,
    NEED_DB_LORA: tl.constexpr, NEED_DBIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee",
):
    """dH (M×R, fp32, scaled by s), dB (N×R) and db (N) accumulated into zeroed fp32 buffers.

    Program (i, j) owns row block i and the N tiles j, j + S, … (S = programs along axis 1).
    """
    pid_m = tl.program_id(0).to(tl.int64)
    split = tl.num_programs(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < M
    mask_r = offs_r < R
    scale = tl.load(scale_ptr).to(tl.float32)
    lora_dtype = tl.float32 if LORA_FP32 else dy_ptr.dtype.element_ty
    lora_precision: tl.constexpr = LORA_PRECISION if LORA_FP32 else DOT_PRECISION
    if NEED_DB_LORA:
        h = tl.load(h_ptr + offs_m[:, None] * R + offs_r[None, :], mask=mask_m[:, None] & mask_r[None, :], other=0.0)
        h_scaled = (h * (scale * h_factor)).to(lora_dtype)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(tl.program_id(1) * BLOCK_N, N, BLOCK_N * split):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        mask_n = offs_n < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_n[None, :], other=0.0,
        )
        b = tl.load(
            b_ptr + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
            mask=mask_n[:, None] & mask_r[None, :], other=0.0,
        )
        dy_lora = dy.to(lora_dtype)
        acc = tl.dot(dy_lora, b.to(lora_dtype), acc, input_precision=lora_precision)
        if NEED_DB_LORA:
            part = tl.dot(tl.trans(dy_lora), h_scaled, input_precision=lora_precision)
            tl.atomic_add(
                db_lora_ptr + offs_n[:, None] * R + offs_r[None, :], part,
                mask=mask_n[:, None] & mask_r[None, :], sem="relaxed",
            )
        if NEED_DBIAS:
            tl.atomic_add(dbias_ptr + offs_n, tl.sum(dy.to(tl.float32), axis=0), mask=mask_n, sem="relaxed")
    tl.atomic_add(
        dh_ptr + offs_m[:, None] * R + offs_r[None, :], acc * scale,
        mask=mask_m[:, None] & mask_r[None, :], sem="relaxed",
    )


@triton.jit(do_not_specialize=["mask_threshold"])
def dx_with_lora_epilogue_kernel(
    dy_ptr, w_ptr, dh_ptr, a_ptr, seed_ptr, dx_ptr,
    M, N, K, R, M_BUCKET,
    stride_dym, stride_dyn, stride_wn, stride_wk, stride_ar, stride_ak, stride_dxm, stride_dxk,
    mask_threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee",
):
    """dX[M, K] = dY·W + keep ⊙ (dH·A)·inv_keep.

    GEMM roles as in the forward (so dX has its own config table with the same meaning): the output tile
    is BLOCK_M × BLOCK_N over dX's K columns, and the reduction steps over the layer's N in BLOCK_K.
    """
    tile_m, tile_c = grouped_tile(tl.program_id(0).to(tl.int64), M, K, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tile_c * BLOCK_N + tl.arange(0, BLOCK_N)  # dX columns (the layer's K)
    mask_m = offs_m < M
    mask_c = offs_c < K
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j0 in range(0, N, BLOCK_K):
        offs_j = j0 + tl.arange(0, BLOCK_K).to(tl.int64)  # reduction over the layer's N
        mask_j = offs_j < N
        dy = tl.load(
            dy_ptr + offs_m[:, None] * stride_dym + offs_j[None, :] * stride_dyn,
            mask=mask_m[:, None] & mask_j[None, :], other=0.0,
        )
        w = tl.load(
            w_ptr + offs_j[:, None] * stride_wn + offs_c[None, :] * stride_wk,
            mask=mask_j[:, None] & mask_c[None, :], other=0.0,
        )
        acc = tl.dot(dy, w, acc, input_precision=DOT_PRECISION)
    acc += dx_lora_tile(dy_ptr, dh_ptr, a_ptr, seed_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_ar, stride_ak,
                        mask_threshold, inv_keep, HAS_DROPOUT, DOT_PRECISION, BLOCK_R, LORA_FP32, LORA_PRECISION)
    tl.store(
        dx_ptr + offs_m[:, None] * stride_dxm + offs_c[None, :] * stride_dxk,
        acc.to(dx_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_c[None, :],
    )


@triton.jit(do_not_specialize=["mask_threshold"])
def dx_lora_add_kernel(
    dx_ptr, dh_ptr, a_ptr, seed_ptr,
    M, K, R, M_BUCKET,
    stride_dxm, stride_dxk, stride_ar, stride_ak,
    mask_threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee",
):
    """dX[M, K] += keep ⊙ (dH·A)·inv_keep in place (dX from cuBLAS: dY·W); BLOCK_N tiles dX's columns."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_c = offs_c < K
    lora = dx_lora_tile(dx_ptr, dh_ptr, a_ptr, seed_ptr, offs_m, offs_c, mask_m, mask_c, R, stride_ar, stride_ak,
                        mask_threshold, inv_keep, HAS_DROPOUT, DOT_PRECISION, BLOCK_R, LORA_FP32, LORA_PRECISION)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_c[None, :] * stride_dxk
    tile = mask_m[:, None] & mask_c[None, :]
    acc = tl.load(dx_ptrs, mask=tile, other=0.0).to(tl.float32) + lora
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=tile)


@triton.jit(do_not_specialize=["mask_threshold"])
def lora_grad_a_kernel(
    x_ptr, dh_ptr, seed_ptr, da_ptr,
    M, K, R, M_BUCKET,
    stride_xm, stride_xk,
    mask_threshold, inv_keep,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    LORA_FP32: tl.constexpr = False, LORA_PRECISION: tl.constexpr = "ieee",
):
    """dA[R, K] (fp32, zeroed by the caller) += dHᵀ·drop(X) over the M tiles i, i + S, … of program
    (k, i) (S = programs along axis 1)."""
    pid_k = tl.program_id(0).to(tl.int64)
    split = tl.num_programs(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    mask_k = offs_k < K
    lora_dtype = tl.float32 if LORA_FP32 else x_ptr.dtype.element_ty
    lora_precision: tl.constexpr = LORA_PRECISION if LORA_FP32 else DOT_PRECISION
    if HAS_DROPOUT:
        seed = tl.load(seed_ptr)
        col_keys = dropout_col_keys(seed, offs_k)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(tl.program_id(1) * BLOCK_M, M, BLOCK_M * split):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        mask_m = offs_m < M
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        if HAS_DROPOUT:
            x = tl.where(dropout_keep(dropout_row_keys(seed, offs_m), col_keys, mask_threshold), x, tl.zeros_like(x))
        dh = tl.load(
            dh_ptr + offs_r[:, None] + offs_m[None, :] * R,
            mask=(offs_r[:, None] < R) & mask_m[None, :], other=0.0,
        )
        acc = tl.dot(dh.to(lora_dtype), x.to(lora_dtype), acc, input_precision=lora_precision)
    tl.atomic_add(
        da_ptr + offs_r[:, None] * K + offs_k[None, :], acc * inv_keep,
        mask=(offs_r[:, None] < R) & mask_k[None, :], sem="relaxed",
    )


def lora_grad_h(
    grad_y: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    scaling: torch.Tensor,
    h_factor: float,
    need_db_lora: bool,
    need_dbias: bool,
    *,
    out: Optional[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]] = None,
    dh_out: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """One pass over dY: dH = s·dY·B, dB = s·h_factor·dYᵀ·H, db = Σₘ dY.

    grad_y: (M, N) fp16/bf16/fp32, any strides (stride-0 grads from .sum() included); lora_b: (N, r);
    h: (M, r) fp32 contiguous as saved by the forward; scaling: 0-dim tensor. ``out``: optional
    zero-filled (dB (N, r), db (N,)) fp32 contiguous buffers to accumulate into (the strategies carve them
    with dA from one fill, :func:`lorafast.kernels.alloc.zeros_views`); None: allocated here. ``dh_out``: an
    optional zero-filled (M, r) fp32 contiguous buffer for dH (carved from the same fill); None: allocated here.
    Returns dH (M, r) fp32 contiguous, dB (N, r) fp32 or None, db (N,) fp32 or None.
    """
    M, N = grad_y.shape
    R = lora_b.shape[1]
    dev = grad_y.device
    dh = torch.zeros((M, R), dtype=torch.float32, device=dev) if dh_out is None else dh_out
    if out is None:
        out = alloc.zeros_views(((N, R) if need_db_lora else None, (N,) if need_dbias else None), torch.float32, dev)
    db_lora, dbias = out
    lora_fp32, lora_precision = lora_dot(grad_y.dtype, lora_b.dtype)

    def grid(meta):
        m_tiles = triton.cdiv(M, meta["BLOCK_M"])
        return m_tiles, split_for(m_tiles, triton.cdiv(N, meta["BLOCK_N"]), dev)

    launch(
        lora_grad_h_kernel, SKINNY, dev, grid,
        (grad_y, lora_b, h, scaling, dh, db_lora if need_db_lora else dh, dbias if need_dbias else dh,
         M, N, R, m_bucket(M),
         *grad_y.stride(), *lora_b.stride(), float(h_factor)),
        key=("M_BUCKET", "N", "LORA_FP32"),
        reset_to_zero=("dh_ptr",) + tuple(
            name for name, on in (("db_lora_ptr", need_db_lora), ("dbias_ptr", need_dbias)) if on
        ),
        NEED_DB_LORA=need_db_lora, NEED_DBIAS=need_dbias, DOT_PRECISION=dot_precision(grad_y.dtype),
        BLOCK_R=rank_block(R), LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision,
        fp32=skinny_fp32_tiles(grad_y.dtype, lora_fp32, lora_precision),
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
    """dX = dY·W + keep ⊙ (dH·A)/(1−p) as one GEMM (the `fused` strategy).

    grad_y: (M, N); weight: (N, K) same dtype; dh: (M, r) fp32 contiguous (already scaled by s);
    lora_a: (r, K) any float dtype; seed: int64 (1,) tensor when dropout_p > 0.
    Returns dX: (M, K) in grad_y's dtype, contiguous.
    """
    M, N = grad_y.shape
    K = weight.shape[1]
    R = lora_a.shape[0]
    dx = alloc.empty((M, K), grad_y.dtype, grad_y.device)
    has_dropout = dropout_p > 0.0
    lora_fp32, lora_precision = lora_dot(grad_y.dtype, lora_a.dtype)
    launch(
        dx_with_lora_epilogue_kernel, DX, grad_y.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_N"]),),
        (grad_y, weight, dh, lora_a, seed if has_dropout else dh, dx, M, N, K, R, m_bucket(M),
         *grad_y.stride(), *weight.stride(),
         *lora_a.stride(), *dx.stride(),
         mask_threshold(dropout_p), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "N", "K", "LORA_FP32"),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(grad_y.dtype), BLOCK_R=rank_block(R), GROUP_M=8,
        LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision, fp32=grad_y.dtype == torch.float32,
    )
    return dx


def dx_lora_add(
    dx: torch.Tensor, dh: torch.Tensor, lora_a: torch.Tensor, seed: Optional[torch.Tensor], dropout_p: float
) -> torch.Tensor:
    """dX += keep ⊙ (dH·A)/(1−p) in place (the `cublas` strategy, after dX = dY·W); returns ``dx``.

    dx: (M, K) fp16/bf16/fp32, any strides; dh: (M, r) fp32 contiguous (scaled by s); lora_a: (r, K);
    seed: int64 (1,) tensor when dropout_p > 0.
    """
    M, K = dx.shape
    R = lora_a.shape[0]
    has_dropout = dropout_p > 0.0
    lora_fp32, lora_precision = lora_dot(dx.dtype, lora_a.dtype)
    launch(
        dx_lora_add_kernel, EPILOGUE, dx.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_N"])),
        (dx, dh, lora_a, seed if has_dropout else dh, M, K, R, m_bucket(M),
         *dx.stride(), *lora_a.stride(),
         mask_threshold(dropout_p), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "K", "LORA_FP32"), restore=("dx_ptr",),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(dx.dtype), BLOCK_R=rank_block(R),
        LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision, fp32=dx.dtype == torch.float32,
    )
    return dx


def lora_grad_a(
    x: torch.Tensor,
    dh: torch.Tensor,
    seed: Optional[torch.Tensor],
    dropout_p: float,
    adapter_dtype: torch.dtype = torch.float32,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """dA = dHᵀ·drop(X), dropout mask regenerated from ``seed``.

    x: (M, K) any strides; dh: (M, r) fp32 contiguous; adapter_dtype: lora_a's dtype (with the adapter
    precision, it decides whether the dot runs on fp32 operands, kernels/dtypes.py); ``out``: an optional
    zero-filled (r, K) fp32 contiguous buffer to accumulate into. Returns dA: (r, K) fp32 (``out`` if given).
    """
    M, K = x.shape
    R = dh.shape[1]
    # Programs accumulate into it.
    da = torch.zeros((R, K), dtype=torch.float32, device=x.device) if out is None else out
    has_dropout = dropout_p > 0.0
    lora_fp32, lora_precision = lora_dot(x.dtype, adapter_dtype)

    def grid(meta):
        k_tiles = triton.cdiv(K, meta["BLOCK_K"])
        return k_tiles, split_for(k_tiles, triton.cdiv(M, meta["BLOCK_M"]), x.device)

    launch(
        lora_grad_a_kernel, SKINNY, x.device, grid,
        (x, dh, seed if has_dropout else dh, da, M, K, R, m_bucket(M), *x.stride(),
         mask_threshold(dropout_p), 1.0 / (1.0 - dropout_p)),
        key=("M_BUCKET", "K", "LORA_FP32"), reset_to_zero=("da_ptr",),
        HAS_DROPOUT=has_dropout, DOT_PRECISION=dot_precision(x.dtype), BLOCK_R=rank_block(R),
        LORA_FP32=lora_fp32, LORA_PRECISION=lora_precision, fp32=skinny_fp32_tiles(x.dtype, lora_fp32, lora_precision),
    )
    return da


def lora_grads(
    grad_y: torch.Tensor,
    x: torch.Tensor,
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
    """The rank-r side of the backward, shared by the `fused` and `cublas` strategies: :func:`lora_grad_h`
    then :func:`lora_grad_a`, with dA, dB, db — and dH, where it is no larger than they are — carved from
    **one** zero fill: one fill launch per backward where there were up to four.

    Why dH only up to that size: the views share one storage, which lives as long as the longest-lived view.
    dA, dB and db are parameter gradients (autograd keeps fp32 adapters' views as ``.grad`` until the
    optimizer's ``zero_grad``), so dH's M×r fp32 bytes stay allocated with them; with M·r ≤ r·K + N·r + N
    that at most doubles the layer's LoRA-gradient bytes. Above it (large M: the layer is GEMM-bound, where a
    launch more is not measurable) dH gets its own fill, freed after the backward.

    Races and autotuning: every view is disjoint and 64-byte aligned (no program's atomics reach another
    view); each kernel's ``reset_to_zero`` zeroes only its own views between autotune trials (and Triton
    zeroes them once more before the chosen config runs), so dH's reset while tuning the dH/dB pass leaves
    dA (zero, accumulated later by the dA pass) alone. The fill happens before either kernel, whatever split
    the chosen config makes, and whether the launch goes through the autotuner or a cached handle.

    Shapes as :func:`lora_grad_h` / :func:`lora_grad_a`; x (M, K), lora_a (r, K). Returns (dH (M, r),
    dA (r, K), dB (N, r), db (N,)) fp32, None where not needed (dH is always computed: dX needs it too).
    """
    N, R = lora_b.shape
    M, K = x.shape
    grad_numel = (R * K if need_da else 0) + (N * R if need_db_lora else 0) + (N if need_dbias else 0)
    shapes = ((R, K) if need_da else None, (N, R) if need_db_lora else None, (N,) if need_dbias else None,
              (M, R) if M * R <= grad_numel else None)
    da, db_lora, dbias, dh = alloc.zeros_views(shapes, torch.float32, grad_y.device)
    h_factor = 1.0 / (1.0 - dropout_p)
    dh, db_lora, dbias = lora_grad_h(
        grad_y, lora_b, h, scaling, h_factor, need_db_lora, need_dbias, out=(db_lora, dbias), dh_out=dh
    )
    if need_da:
        lora_grad_a(x, dh, seed, dropout_p, lora_a.dtype, out=da)
    return dh, da, db_lora, dbias

