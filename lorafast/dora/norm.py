"""DoRA's weight norm without an N×K tensor, in torch ops, and the cache of the frozen ‖W‖².

    ‖W_n + s·B_n·A‖² = ‖W_n‖² + 2s·B_n·(W·Aᵀ)_n + s²·B_n·(A·Aᵀ)·B_nᵀ

‖W‖² (N,) depends on the frozen weight only: it is computed once per weight and kept in :data:`_ROW_SQ` until
the weight's data, dtype, device, layout or version (in-place writes) change. W·Aᵀ (N×r) and A·Aᵀ (r×r) are
computed per call, in fp32 (fp64 for fp64 weights): O(N·K·r) FLOPs, one read of W, nothing N×K written.
A 16-bit W is widened to fp32 in row chunks of at most :data:`CHUNK_ELEMENTS` elements (CPU torch has no
mixed-precision matmul with an fp32 result), so the largest temporary stays bounded whatever N×K is.

Cancellation: when W_n + s·B_n·A is small next to W_n the three terms nearly cancel; in fp32 the relative
error of the norm grows like ε·‖W_n‖²/‖W_n + s·B_n·A‖² (tested against the dense float64 norm). A sum
that rounds below zero is clamped to 0 (g = m/0 = inf, as PEFT's dense norm gives for an exactly zero row).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

from lorafast.strategies.aten import accum_dtype, as_dtype, rank_r_product

# Rows of a 16-bit W are widened to fp32 this many elements at a time (4 MiB of fp32): bounded memory.
CHUNK_ELEMENTS = 1 << 20

_ROW_SQ: WeakIdKeyDictionary = WeakIdKeyDictionary()


def norm_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype the norm is accumulated and kept in: fp32, or fp64 for fp64 weights."""
    return accum_dtype(weight_dtype)


def _row_chunks(weight: torch.Tensor, dtype: torch.dtype):
    """(start, rows of W in ``dtype``) pieces covering W: W itself when it has the dtype, else row blocks of at
    most CHUNK_ELEMENTS elements (views cast one at a time)."""
    if weight.dtype == dtype:
        yield 0, weight
        return
    N, K = weight.shape
    step = max(1, CHUNK_ELEMENTS // max(K, 1))
    for start in range(0, N, step):
        yield start, weight[start:start + step].to(dtype)


def row_sq_norms_uncached(weight: torch.Tensor) -> torch.Tensor:
    """‖W_n‖² for each row of ``weight`` (N, K): (N,) in :func:`norm_dtype`, summed in that dtype."""
    dtype = norm_dtype(weight.dtype)
    out = torch.empty(weight.shape[0], dtype=dtype, device=weight.device)
    for start, rows in _row_chunks(weight, dtype):
        torch.linalg.vecdot(rows, rows, dim=1, out=out[start:start + rows.shape[0]])
    return out


def _signature(weight: torch.Tensor) -> Optional[tuple]:
    """What ‖W‖² depends on besides the values: None when it cannot be tracked (inference tensors have no
    version counter), so the caller recomputes."""
    try:
        version = weight._version
    except RuntimeError:
        return None
    return (weight.data_ptr(), weight.dtype, weight.device, tuple(weight.shape), weight.stride(), version)


def _owner(weight: torch.Tensor) -> torch.Tensor:
    # A transposed view of a Conv1D weight is a new object per call: key on the parameter it views
    # (views share the version counter, and the signature holds the view's own layout).
    return weight._base if weight._base is not None else weight


def cached_row_sq_norms(weight: torch.Tensor, key: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """The cached ‖W‖² of ``weight`` if still valid, else None. ``key``: the tensor whose identity and version
    stand for the weight's values (default: ``weight``, or the tensor it is a view of); a 4-bit layer passes
    its packed parameter, since its dequantized W is a new tensor per call."""
    if torch.compiler.is_compiling():
        return None
    owner = _owner(weight) if key is None else key
    entry = _ROW_SQ.get(owner)
    if entry is None:
        return None
    signature = _signature(owner), _signature(weight) if key is None else None
    return entry[1] if entry[0] == signature and signature[0] is not None else None


def store_row_sq_norms(weight: torch.Tensor, values: torch.Tensor, key: Optional[torch.Tensor] = None) -> None:
    """Remember ``values`` (= ‖W‖², (N,)) for ``weight`` (see :func:`cached_row_sq_norms` for ``key``)."""
    if torch.compiler.is_compiling():
        return
    owner = _owner(weight) if key is None else key
    signature = _signature(owner), _signature(weight) if key is None else None
    if signature[0] is not None:
        _ROW_SQ[owner] = (signature, values)


def row_sq_norms(weight: torch.Tensor, key: Optional[torch.Tensor] = None) -> torch.Tensor:
    """‖W_n‖² (N,) of the frozen ``weight``, from the cache or computed (and cached) now."""
    values = cached_row_sq_norms(weight, key)
    if values is None:
        values = row_sq_norms_uncached(weight)
        store_row_sq_norms(weight, values, key)
    return values


def clear_cache() -> None:
    """Forget every cached ‖W‖² (tests)."""
    _ROW_SQ.clear()


def weight_times_adapter(weight: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """W·Aᵀ (N, r) in :func:`norm_dtype`: weight (N, K) any strides, lora_a (r, K) any float dtype (cast up)."""
    dtype = norm_dtype(weight.dtype)
    a_t = as_dtype(lora_a, dtype).t()
    # rank_r_product picks MKL's fast form for the rank (the rank as the row count at r = 8, the plain product at
    # multiples of 16: 5632×2048, r = 16: 4.5 vs 7.4 ms on the 2-core CPU); 16-bit rows come in fp32 chunks.
    parts = [rank_r_product(rows, a_t) for _, rows in _row_chunks(weight, dtype)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def norm_terms(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    row_sq: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(g, 1/‖W + s·B·A‖) per row, (N,) each in :func:`norm_dtype`, in torch ops (no gradient).

    weight (N, K), lora_a (r, K), lora_b (N, r), magnitude (N,), scaling float or 0-dim tensor, row_sq the
    frozen ‖W‖² (N,) in the norm dtype. g = m·(1/‖·‖), so g − 1 keeps its digits in fp32.
    """
    with torch.no_grad():
        dtype = row_sq.dtype
        a = as_dtype(lora_a, dtype)
        b = as_dtype(lora_b, dtype)
        s = as_dtype(scaling, dtype) if isinstance(scaling, torch.Tensor) else float(scaling)
        # 2s·W·Aᵀ + s²·B·(A·Aᵀ) in one addmm, then the row dot with B: ‖W‖² + B·(2s·W·Aᵀ + s²·B·A·Aᵀ).
        cross = weight_times_adapter(weight, a)
        if isinstance(s, torch.Tensor):
            cross = cross.mul_(2 * s).add_(b @ (a @ a.t()) * (s * s))
        else:
            cross = torch.addmm(cross, b, a @ a.t(), beta=2 * s, alpha=s * s)
        sq = torch.linalg.vecdot(b, cross, dim=1).add_(row_sq)
        inv_norm = sq.clamp_min_(0).rsqrt_()
        return as_dtype(magnitude, dtype) * inv_norm, inv_norm
