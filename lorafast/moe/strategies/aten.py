"""`aten` for the grouped (MoE experts) op: torch ops only — the CPU default, and the strategy that needs no Triton.

Same contract as the Triton strategies (:mod:`lorafast.moe.strategies`): H (S×r) is saved unscaled by 1/(1−p),
the dropout mask is regenerated from the seed (never stored), nothing of size E×N×K is ever made (no ΔW, no dW).

The base products use ``torch.nn.functional.grouped_mm`` where torch runs it for these operands (CPU: fp32/bf16/
fp16 with 16-byte-aligned strides; CUDA: bf16) — the op transformers' default ``grouped_mm`` experts
implementation runs, so the frozen block and this strategy pay the same base cost — and a loop of ``mm`` per
expert otherwise (float64, odd strides). The rank-r side:

- on CPU, the expand (Y_e += s·H_e·B_eᵀ) and dX's LoRA term are in-place ``addmm_`` per expert: no S×N
  temporary (a loop of 64 addmm_ took 5.7 ms where grouped_mm + add_ took 21 ms at S=8192, N=1024, r=16,
  1 thread on the 2-core CPU); the shrink, dH and dA/dB (grouped_mm's 2-D×2-D form) are grouped_mm calls.
- on CUDA with grouped_mm (bf16), every product is a grouped_mm and the bias a gather: no host sync, so the
  call is capturable in a CUDA graph. Otherwise the loops run there too, after one device-to-host copy of the
  offsets.

lora_B's expert slices are strided (rank-major, see :mod:`lorafast.moe.groups`) and BLAS needs a unit stride:
each call makes one expert-major copy of lora_B (r·E·N elements, the parameter's own size — r/K of one expert
weight), where the Triton strategies read it in place. lora_A's slices are plain views. The rank-r products
run in the compute dtype (x's): PEFT's ParamWrapper casts the adapters to the parameter's dtype too.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from lorafast.moe.groups import Groups, a_per_expert, b_per_expert, weight_kn, weight_nk
from lorafast.strategies.aten import accum_dtype, as_dtype, dropout_keep_mask

_GROUPED_MM = getattr(F, "grouped_mm", None)
_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _layout_ok(t: torch.Tensor) -> bool:
    """torch's grouped_mm stride rule: one of the last two dims has unit stride and the other a multiple of 16
    bytes (at least the unit dim's size), and the data starts on a 16-byte boundary."""
    if t.data_ptr() % 16:
        return False
    align = 16 // t.element_size()
    s, n = t.stride(), t.shape
    if s[-2] == 1 and s[-1] >= max(1, n[-2]):
        return s[-1] % align == 0
    if s[-1] == 1 and s[-2] >= max(1, n[-1]):
        return s[-2] % align == 0
    return False


@functools.cache
def _capability(index: Optional[int]) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(torch.cuda.current_device() if index is None else index)


def grouped_mm_usable(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``torch.nn.functional.grouped_mm(a, b, offs=...)`` runs for these operands on their device."""
    if _GROUPED_MM is None or a.dtype != b.dtype or a.dtype not in _GROUPED_MM_DTYPES:
        return False
    if a.device.type == "cuda":
        if a.dtype != torch.bfloat16 or _capability(a.device.index) < (8, 0):
            return False
    elif a.device.type != "cpu":
        return False
    return _layout_ok(a) and _layout_ok(b)


def _zero_tail(out: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Rows at or past offsets[-1] belong to no expert: zeros (grouped_mm leaves them uninitialised)."""
    if out.device.type == "cpu":
        end = groups.bounds()[-1]
        if end < out.shape[0]:
            out[end:].zero_()
        return out
    tail = torch.arange(out.shape[0], device=out.device) >= groups.offsets[-1]
    return out.masked_fill_(tail[:, None], 0)


def grouped_matmul(a: torch.Tensor, b: torch.Tensor, groups: Groups) -> torch.Tensor:
    """out[rows of e] = a[rows of e] @ b[e]; a (S, P), b (E, P, Q) any strides → (S, Q) contiguous in a's dtype,
    zero rows past offsets[-1]."""
    if grouped_mm_usable(a, b):
        return _zero_tail(_GROUPED_MM(a, b, offs=groups.offsets), groups)
    bounds = groups.bounds()
    out = a.new_empty((a.shape[0], b.shape[2]))
    for e in range(groups.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            torch.mm(a[lo:hi], b[e], out=out[lo:hi])
    return _zero_tail(out, groups)


def grouped_matmul_add_(
    out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, groups: Groups, alpha: float = 1.0
) -> torch.Tensor:
    """out[rows of e] += alpha·a[rows of e] @ b[e] in place (a (S, r), b (E, r, Q)): addmm_ per expert on CPU
    (no S×Q temporary), one grouped_mm + add_ where it runs on CUDA (no host sync)."""
    if a.device.type != "cpu" and grouped_mm_usable(a, b):
        return out.add_(_zero_tail(_GROUPED_MM(a, b, offs=groups.offsets), groups), alpha=alpha)
    bounds = groups.bounds()
    for e in range(groups.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        if hi > lo:
            out[lo:hi].addmm_(a[lo:hi], b[e], alpha=alpha)
    return out


def grouped_outer(a: torch.Tensor, b: torch.Tensor, groups: Groups) -> torch.Tensor:
    """out[e] = a[rows of e]ᵀ @ b[rows of e]: a (S, P), b (S, Q) → (E, P, Q) (zeros for an expert with no rows;
    rows past offsets[-1] ignored). grouped_mm's 2-D × 2-D form, or mm per expert."""
    a_t = a.t()
    if grouped_mm_usable(a_t, b):
        return _GROUPED_MM(a_t, b, offs=groups.offsets)
    bounds = groups.bounds()
    out = a.new_empty((groups.num_experts, a.shape[1], b.shape[1]))
    for e in range(groups.num_experts):
        lo, hi = bounds[e], bounds[e + 1]
        torch.mm(a_t[:, lo:hi], b[lo:hi], out=out[e])
    return out


def _add_bias_(y: torch.Tensor, bias: torch.Tensor, groups: Groups) -> None:
    """y[rows of e] += bias[e] (bias (E, N))."""
    bias = as_dtype(bias, y.dtype)
    if y.device.type == "cpu":
        bounds = groups.bounds()
        for e in range(groups.num_experts):
            lo, hi = bounds[e], bounds[e + 1]
            if hi > lo:
                y[lo:hi].add_(bias[e])
        return
    padded = torch.cat([bias, bias.new_zeros((1, bias.shape[1]))])  # row E: the no-expert tail
    y.add_(padded[_row_experts(groups, y.device)])


def _row_experts(groups: Groups, device: torch.device) -> torch.Tensor:
    """(S,) expert of each row, E for the tail (no host sync)."""
    return torch.searchsorted(groups.offsets, torch.arange(groups.rows, device=device, dtype=torch.int32), right=True)


def expert_row_sums(grad_y: torch.Tensor, groups: Groups, dtype: torch.dtype) -> torch.Tensor:
    """(E, N) per-expert column sums of grad_y (S, N) in ``dtype`` (a bias gradient)."""
    out = torch.zeros((groups.num_experts + 1, grad_y.shape[1]), dtype=dtype, device=grad_y.device)
    out.index_add_(0, _row_experts(groups, grad_y.device), as_dtype(grad_y, dtype))
    return out[: groups.num_experts]


def b_expert_major(lora_b: torch.Tensor, num_experts: int, dtype: torch.dtype, rank_first: bool) -> torch.Tensor:
    """One contiguous copy of lora_B's expert slices in ``dtype``: (E, r, N) (``rank_first``, the expand's
    operand) or (E, N, r) (dH's)."""
    view = b_per_expert(lora_b, num_experts)  # (E, N, r), strided
    if rank_first:
        view = view.transpose(1, 2)
    return torch.empty(view.shape, dtype=dtype, device=lora_b.device).copy_(view)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    transposed: bool,
    bias: Optional[torch.Tensor],
    offsets: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    seed: Optional[torch.Tensor],
    dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Y_e = X_e·W_eᵀ + b_e + s/(1−p)·H_e·B_eᵀ with H_e = (X_e ⊙ keep)·A_eᵀ.

    Shapes as :func:`lorafast.moe.functional.grouped_lora_linear` (x (S, K), weight (E, N, K) or transposed
    (E, K, N) in x's dtype, offsets (E,) int). Returns y (S, N) in x's dtype and H (S, r) in the accumulation
    dtype (fp32; fp64 for fp64 x).
    """
    S, K = x.shape
    E = weight.shape[0]
    dtype = x.dtype
    groups = Groups(offsets, S)
    y = grouped_matmul(x, weight_kn(weight, transposed), groups)
    if bias is not None:
        _add_bias_(y, bias, groups)
    lora_in = x if dropout_p == 0.0 else dropout_keep_mask(seed, S, K, dropout_p, dtype).mul_(x)
    h = grouped_matmul(lora_in, as_dtype(a_per_expert(lora_a, E), dtype).transpose(1, 2), groups)
    b_rn = b_expert_major(lora_b, E, dtype, rank_first=True)
    if isinstance(scaling, torch.Tensor):
        grouped_matmul_add_(y, h * (as_dtype(scaling, dtype) / (1.0 - dropout_p)), b_rn, groups)
    else:
        grouped_matmul_add_(y, h, b_rn, groups, alpha=scaling / (1.0 - dropout_p))
    return y, as_dtype(h, accum_dtype(dtype))


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    transposed: bool,
    offsets: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    h: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    seed: Optional[torch.Tensor],
    dropout_p: float,
    need_dx: bool,
    need_da: bool,
    need_db_lora: bool,
    need_dbias: bool,
) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """dX_e = dY_e·W_e + keep⊙(dH_e·A_e)/(1−p), dA_e = dH_eᵀ·drop(X_e), dB_e = s·dY_eᵀ·H_e/(1−p), db_e = Σ dY_e,
    with dH_e = s·dY_e·B_e; never a dW. Returns dX (S, K) in grad_y's dtype, dA (E·r, K), dB (N, r·E) in PEFT's
    layouts and db (E, N), the last three in the accumulation dtype; None where not needed."""
    S, K = x.shape
    E = weight.shape[0]
    N = grad_y.shape[1]
    dtype = grad_y.dtype
    acc = accum_dtype(dtype)
    groups = Groups(offsets, S)
    tensor_scale = isinstance(scaling, torch.Tensor)
    s = 1.0 if tensor_scale else float(scaling)  # a float folds into the products' alpha
    inv_keep = 1.0 / (1.0 - dropout_p)
    dh = None  # dY·B, times s when s is a tensor
    if need_dx or need_da:
        dh = grouped_matmul(grad_y, b_expert_major(lora_b, E, dtype, rank_first=False), groups)
        if tensor_scale:
            dh.mul_(as_dtype(scaling, dtype))
    keep = None
    if dropout_p > 0.0 and (need_dx or need_da):
        keep = dropout_keep_mask(seed, S, K, dropout_p, dtype)
    a = as_dtype(a_per_expert(lora_a, E), dtype)  # (E, r, K)
    dx = None
    if need_dx:
        dx = grouped_matmul(grad_y, weight_nk(weight, transposed), groups)
        if keep is None:
            grouped_matmul_add_(dx, dh, a, groups, alpha=s)
        else:
            dx.addcmul_(grouped_matmul(dh, a, groups), keep, value=s * inv_keep)
    da = None
    if need_da:
        lora_in = x if keep is None else keep.mul_(x)  # keep's last use
        da = as_dtype(grouped_outer(dh, lora_in, groups), acc).mul_(s * inv_keep).view(-1, K)
    db_lora = None
    if need_db_lora:
        db_e = grouped_outer(as_dtype(h, dtype), grad_y, groups)  # (E, r, N): H_eᵀ·dY_e
        db_lora = torch.empty((N, db_e.shape[1], E), dtype=acc, device=grad_y.device)
        db_lora.copy_(db_e.permute(2, 1, 0)).mul_(s * inv_keep)  # rank-major, as lora_B
        if tensor_scale:
            db_lora.mul_(scaling)
        db_lora = db_lora.view(N, -1)
    dbias = expert_row_sums(grad_y, groups, acc) if need_dbias else None
    return dx, da, db_lora, dbias
