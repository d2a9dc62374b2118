"""`aten`: DoRA's fused forward and backward in plain PyTorch ops — the CPU path, and the CUDA strategy that
needs no Triton.

Notation (lorafast.dora): g = m/‖W + s·B·A‖ ((N,), fp32), keep the dropout keep-mask (all ones at p = 0),
f = 1/(1−p), H = (keep⊙X)·Aᵀ (M×r, unscaled by f), Zb = (keep⊙X)·Wᵀ (M×N, unscaled by f).

    Y  = X·Wᵀ + b + (g−1)⊙f·Zb + f·s·H·(g⊙B)ᵀ        (p = 0: Zb = X·Wᵀ, so Y = g⊙Zb + b + s·H·(g⊙B)ᵀ)
    dH = s·dY·(g⊙B)                       T = dYᵀ·H (N×r)
    dX = dY·W + keep⊙f·(((g−1)⊙dY)·W + dH·A)         (p = 0: (g⊙dY)·W + dH·A, one GEMM)
    dA = f·dHᵀ·(keep⊙X)     dB = f·s·g⊙T     db = Σₘ dY     dm = f/‖·‖ ⊙ (Σₘ dY⊙Zb + s·Σᵣ B⊙T)

Saved for backward: x, H, Zb (the one M×N tensor: dm needs the base product; recomputing it would be a
third GEMM, see docs/dora.md), g and 1/‖·‖ (N each) and the seed. The LoRA part of dm comes from T, which
dB needs anyway, so only the base product is saved, not the whole g-scaled term.

Why these forms, on the 2-core CPU (MKL sgemm): the rank-r products use
:func:`lorafast.strategies.aten.rank_r_product` (MKL's faster form for the rank), g is folded into B
(N×r) rather than into an M×N pass where the math allows it, and every M×N / M×K update is in place or
written once with ``out=`` (fresh large tensors cost page faults on this VM). 16-bit x: elementwise products
with the fp32 g are computed in fp32 and rounded once into the 16-bit output (``out=``).
"""

from __future__ import annotations

import threading
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from lorafast.dora.norm import norm_terms, row_sq_norms_uncached
from lorafast.strategies.aten import accum_dtype, as_dtype, dropout_keep_mask, lora_dtype, rank_r_product, scaled_mm

Scale = Union[float, torch.Tensor]

_workspace = threading.local()


def scratch_like(t: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped like ``t`` (contiguous) for a temporary of this backward: on CPU a view of a
    per-thread buffer kept between calls (grown to the largest size seen, one per dtype), elsewhere a new tensor.

    Why: on the 2-core VM the first write to a fresh M×N tensor is dominated by page faults (2048×768 fp32: the
    same multiply took 3.5 ms into a fresh tensor, 0.44 ms into a reused one; glibc returns freed large blocks to
    the OS), and the backward's one M×N scratch needs no new memory each step. CUDA's caching allocator already
    reuses blocks. The buffer is per thread, and each use ends before the backward returns.
    """
    if t.device.type != "cpu":
        return torch.empty(t.shape, dtype=t.dtype, device=t.device)
    buffers = getattr(_workspace, "buffers", None)
    if buffers is None:
        buffers = _workspace.buffers = {}
    numel = t.numel()
    buf = buffers.get(t.dtype)
    if buf is None or buf.numel() < numel:
        buf = buffers[t.dtype] = torch.empty(numel, dtype=t.dtype)
    return buf[:numel].view(t.shape)


def release_workspace() -> None:
    """Free this thread's CPU scratch buffers (they are otherwise kept for the next backward)."""
    _workspace.buffers = {}


def _scaled_product(h: torch.Tensor, b_t: torch.Tensor, scaling: Scale, factor: float) -> Tuple[torch.Tensor, float]:
    """(scaling·h when scaling is a tensor, else h; the python-float alpha left to apply)."""
    if isinstance(scaling, torch.Tensor):
        return h * (scaling * factor), 1.0
    return h, float(scaling) * factor


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    g: torch.Tensor,
    scaling: Scale,
    seed: Optional[torch.Tensor],
    dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y (M, N) in x's dtype, H (M, r) fp32, Zb (M, N) in x's dtype) — see the module docstring.

    x (M, K); weight (N, K) in x's dtype, any strides (a Conv1D weight's transposed view); bias (N,) or None;
    adapters any float dtype; g (N,) fp32 (fp64 for fp64); scaling float or 0-dim tensor; seed int64 (1,)
    when dropout_p > 0.
    """
    dtype = x.dtype
    ldt = lora_dtype(dtype, lora_a.dtype)
    factor = 1.0 / (1.0 - dropout_p)
    M, N = x.shape[0], weight.shape[0]
    if dropout_p > 0.0:
        # keep⊙X in x's dtype (exact: a 0/1 mask), in place into the fresh mask; the base GEMM reads it.
        dropped = dropout_keep_mask(seed, M, x.shape[1], dropout_p, dtype).mul_(x)
        y = F.linear(x, weight, None if bias is None else as_dtype(bias, dtype))
        zb = F.linear(dropped, weight)
        # y += (g−1)·f ⊙ Zb: computed in g's dtype, rounded once into y.
        y.addcmul_(zb, (g - 1.0).mul_(factor))
        lora_in = as_dtype(dropped, ldt)
    else:
        zb = F.linear(x, weight)
        y = torch.empty((M, N), dtype=dtype, device=x.device)
        if bias is None:
            torch.mul(zb, g, out=y)
        else:
            torch.addcmul(as_dtype(bias, g.dtype), zb, g, out=y)
        lora_in = as_dtype(x, ldt)
    h = rank_r_product(lora_in, as_dtype(lora_a, ldt).t())
    gb_t = as_dtype(as_dtype(lora_b, g.dtype) * g[:, None], ldt).t()  # (g⊙B)ᵀ: N×r, g folded in (no grad here)
    h_scaled, alpha = _scaled_product(h, gb_t, scaling, factor)
    if ldt == dtype:
        y.addmm_(h_scaled, gb_t, alpha=alpha)
    else:  # the fp32 LoRA term joins the 16-bit output with one rounding, as in PEFT
        y.add_(scaled_mm(h_scaled, gb_t, alpha))
    return y, as_dtype(h, accum_dtype(dtype)), zb


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    zb: torch.Tensor,
    g: torch.Tensor,
    inv_norm: torch.Tensor,
    scaling: Scale,
    seed: Optional[torch.Tensor],
    dropout_p: float,
    need_dx: bool,
    need_da: bool,
    need_db_lora: bool,
    need_dbias: bool,
    need_dm: bool,
) -> Tuple[Optional[torch.Tensor], ...]:
    """(dX in grad_y's dtype, dA (r, K), dB (N, r), db (N,), dm (N,)) — accumulators in fp32 (fp64 for fp64),
    cast to each parameter's dtype by the caller; None where not needed. Shapes as :func:`forward`."""
    dtype = grad_y.dtype
    acc = accum_dtype(dtype)
    ldt = lora_dtype(dtype, lora_a.dtype)
    factor = 1.0 / (1.0 - dropout_p)
    M, K = x.shape
    tensor_scale = isinstance(scaling, torch.Tensor)
    s = 1.0 if tensor_scale else float(scaling)  # a float folds into the products' alpha
    a_l = as_dtype(lora_a, ldt)
    grad_l = as_dtype(grad_y, ldt)

    dh = None  # s·dY·(g⊙B)
    if need_dx or need_da:
        gb = as_dtype(as_dtype(lora_b, g.dtype) * g[:, None], ldt)
        dh = rank_r_product(grad_l, gb, s)
        if tensor_scale:
            dh.mul_(as_dtype(scaling, ldt))
    t = None  # dYᵀ·H (N×r): dB and the LoRA part of dm
    if need_db_lora or need_dm:
        t = as_dtype(rank_r_product(grad_l.t(), as_dtype(h, ldt)), acc)
    scratch = None  # one M×N buffer, reused: dY⊙Zb for dm, then g⊙dY or (g−1)⊙dY for dX
    dm = None
    if need_dm:
        scratch = torch.mul(grad_y, zb, out=scratch_like(grad_y))
        lora_part = torch.linalg.vecdot(as_dtype(lora_b, acc), t, dim=1)
        if tensor_scale:
            lora_part = lora_part.mul_(scaling)
        dm = scratch.sum(0, dtype=acc).add_(lora_part, alpha=s).mul_(as_dtype(inv_norm, acc))
        if factor != 1.0:
            dm.mul_(factor)
    keep = None
    if dropout_p > 0.0 and (need_dx or need_da):
        keep = dropout_keep_mask(seed, M, K, dropout_p, ldt)
    dx = None
    if need_dx:
        if scratch is None:
            scratch = scratch_like(grad_y)
        if keep is None:
            dx = torch.mul(grad_y, g, out=scratch) @ weight
            if ldt == dtype:
                dx.addmm_(dh, a_l)
            else:  # the fp32 LoRA term joins the 16-bit gradient with one rounding
                dx.add_(dh @ a_l)
        else:
            dx = grad_y @ weight
            part = torch.mul(grad_y, g - 1.0, out=scratch) @ weight  # ((g−1)⊙dY)·W
            if ldt == dtype:
                part.addmm_(dh, a_l)
                dx.addcmul_(part, keep, value=factor)
            else:
                lora_dx = torch.addmm(part.to(ldt), dh, a_l)
                dx.add_(lora_dx.mul_(keep), alpha=factor)
    da = None
    if need_da:
        x_l = as_dtype(x, ldt)
        lora_in = x_l if keep is None else keep.mul_(x_l)  # keep's last use
        da = as_dtype(scaled_mm(dh.t(), lora_in, factor), acc)
    db_lora = None
    if need_db_lora:
        db_lora = t * as_dtype(g, acc)[:, None]
        if s * factor != 1.0:
            db_lora.mul_(s * factor)
        if tensor_scale:
            db_lora.mul_(scaling)
    dbias = grad_y.sum(0, dtype=acc) if need_dbias else None
    return dx, da, db_lora, dbias, dm


def norm(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: Scale,
    row_sq: Optional[torch.Tensor],
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(g, 1/‖W + s·B·A‖, ‖W‖²), (N,) each in fp32 (fp64 for fp64): :func:`lorafast.dora.norm.norm_terms`,
    with ‖W‖² computed here when ``row_sq`` is None (a cache miss)."""
    if row_sq is None:
        row_sq = row_sq_norms_uncached(weight)
    g, inv_norm = norm_terms(weight, lora_a, lora_b, magnitude, scaling, row_sq)
    return g, inv_norm, row_sq
