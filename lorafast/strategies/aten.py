"""`aten`: the fused LoRA math in plain PyTorch ops — the CPU path, and on CUDA the strategy that needs
no Triton at all.

Same contract as the Triton strategies (see lorafast/ops.py): H is saved unscaled by 1/(1−p), the
dropout mask is regenerated from the saved seed instead of stored, and the M×N / M×K results are
accumulated in place (addmm_) so no M×N temporary exists beyond the output itself.
``scaling`` may also be a python float (the eager path passes one for float scalings): it is folded into
the GEMMs' alpha, which saves a mul launch per use; the Triton strategies read s from a 0-dim tensor.
GPU-safe: no `.item()` or other host sync on CUDA tensors (the mask is `lorafast.dropout.keep_mask`, the
Triton kernels' hash in torch ops, from the seed tensor), so it is valid under CUDA graph capture.
"""

from __future__ import annotations

import threading
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from lorafast.dropout import keep_mask
from lorafast.kernels.dtypes import HALF_DTYPES, adapter_precision

_ACCUM_DTYPES = {torch.float16: torch.float32, torch.bfloat16: torch.float32, torch.float32: torch.float32}


def accum_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for 16/32-bit inputs, fp64 for fp64 (so float64 gradcheck stays exact)."""
    # A dict first: torch.promote_types goes through the dispatcher (~1 µs a call).
    return _ACCUM_DTYPES.get(dtype) or torch.promote_types(dtype, torch.float32)


# At or below this many elements in ``big`` the plain product is cheaper than the transposed form
# (16×64 @ 64×8: 5.4 vs 6.8 µs; 64×64: 9.1 vs 7.6 µs, 1 thread on the 2-core CPU).
_DIRECT_PRODUCT_MAX = 1024
# Ranks that are a multiple of this take the plain product (see rank_r_product).
_RANK_DIRECT_MULTIPLE = 16


def rank_r_product(big: torch.Tensor, small: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``alpha·(big @ small)`` for a skinny ``small`` (k×r): (rows×r), any strides (a transposed view, mostly).

    Computed as ``(smallᵀ @ bigᵀ)ᵀ``: MKL's sgemm is several times slower when the tiny dimension is the
    output's column count (measured on the 2-core CPU: 2048×768 @ 768×8 takes 0.8 ms, and the transposed
    form 0.44 ms; 768×2048 @ 2048×8 takes 7.0 ms vs 0.44 ms; 512×768: 297 vs 131 µs). PEFT's unfused
    layer pays the slow forms. No ``.contiguous()``: every consumer takes strides, and copying back cost
    more than it saved (512×768: 208 vs 131 µs). At tiny sizes the plain product wins, and so it does when r is a
    multiple of 16 and ``big`` is row-major (MKL has a fast kernel for a 16-wide output; 2026-12-04, same CPU,
    direct/transposed time at r = 16: 0.56–0.74 for x·Aᵀ and dY·B at 512×2048→5632, 2048×768→768/3072 and
    256×4096→4096; at r = 8 the transposed form stays faster, up to 2.5×). A transposed ``big`` (dYᵀ·H) keeps
    the transposed form: there the direct one lost at small M (256×4096: 1.5×).
    """
    if big.numel() <= _DIRECT_PRODUCT_MAX or (small.shape[1] % _RANK_DIRECT_MULTIPLE == 0 and big.stride(1) == 1):
        return scaled_mm(big, small, alpha)
    return scaled_mm(small.t(), big.t(), alpha).t()


_zeros: dict = {}


def scaled_mm(a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``alpha·(a @ b)`` in one op: addmm with beta = 0 ignores its input, so a cached 0-dim zero serves
    (a python-float scale folded into the product instead of a separate mul launch)."""
    if alpha == 1.0:
        return a @ b
    key = (a.dtype, a.device)
    zero = _zeros.get(key)
    if zero is None:
        zero = _zeros[key] = torch.zeros((), dtype=a.dtype, device=a.device)
    return torch.addmm(zero, a, b, beta=0, alpha=alpha)


_thread_state = threading.local()
# The CPU lanes mask compares 16-bit random lanes with a threshold: p is realised as round(p·2¹⁶)/2¹⁶, within
# 2⁻¹⁷ (7.6e-6) of p — 2⁻¹⁶ resolution, where the kernels' hash has 2⁻³¹ (lorafast.dropout.mask_threshold).
_LANE_BITS = 16
_LANES = 64 // _LANE_BITS  # 16-bit lanes per int64 draw
# At or below this many mask elements one ``bernoulli_`` (exact p) replaces the lanes' random_ + view + ge: at
# tiny sizes each op is host cost. Whole fwd+bwd at p = 0.1, 1 thread, in a loop (two masks a step): 16×64
# 146 vs 178 µs, 32×64 177 vs 194, 32×128 equal, 64×128 274 vs 240 (bernoulli_ is serial, ~5 ns an element).
_BERNOULLI_MAX = 2048


def cpu_mask_threshold(p: float) -> int:
    """The signed 16-bit threshold of the CPU mask for drop probability ``p`` in [0, 1): keep iff lane ≥ it
    (lanes uniform on [−2¹⁵, 2¹⁵)), so P(drop) = round(p·2¹⁶)/2¹⁶, capped below 1."""
    return min(int(round(p * 2**_LANE_BITS)), 2**_LANE_BITS - 1) - 2 ** (_LANE_BITS - 1)


def cpu_keep_mask(
    seed: torch.Tensor, M: int, K: int, p: float, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The CPU aten strategy's (M, K) 0/1 keep-mask in ``dtype`` (a float dtype), drawn from a per-thread
    generator seeded with ``seed`` (an int64 CPU tensor of one element): each element keeps iff a 16-bit lane
    of 64-bit draws is ≥ :func:`cpu_mask_threshold`; up to ``_BERNOULLI_MAX`` elements, one ``bernoulli_(1 − p)``
    instead (fewer ops). A pure function of (seed, M, K, p), whatever the dtype and thread count (both draws
    are serial, or skip-ahead streams in MKL's bernoulli).

    Why this form (measured at 192×384, 1–2 threads on the 2-core CPU): a full-range int64 ``random_`` gives
    four mask elements per draw (63–90 µs, where ``uniform_`` + ``ge_`` costs 260–310 µs and PEFT's
    ``bernoulli_`` 470–620 µs), and ``torch.ge(..., out=float)`` writes the 0/1 floats in one op (15 µs hot; inside,
    torch computes a bool result and copies it: 35–77 µs with cold caches, where a bool ``ge`` then ``.to(float)``
    takes 100–120 µs), and ``x * bool_mask`` takes torch's slow promotion path.
    Not the kernels' hash (:func:`lorafast.dropout.keep_mask`): in eager torch ops it costs several times
    more. ``.item()`` on a CPU tensor is no device sync; the generator is made once per thread.
    """
    gen = getattr(_thread_state, "generator", None)
    if gen is None:
        gen = _thread_state.generator = torch.Generator()
    gen.manual_seed(seed.item())  # one element (checked by the caller's contract); one call, not three
    if M * K <= _BERNOULLI_MAX:
        return torch.empty((M, K), dtype=dtype).bernoulli_(1.0 - p, generator=gen)
    words = -(-K // _LANES)  # int64 draws per row; a row's lanes past K are drawn and ignored
    lanes = torch.empty((M, words), dtype=torch.int64).random_(-(2**63), None, generator=gen).view(torch.int16)
    if words * _LANES != K:
        lanes = lanes[:, :K]
    return torch.ge(lanes, cpu_mask_threshold(p), out=torch.empty((M, K), dtype=dtype))


def dropout_keep_mask(seed: torch.Tensor, M: int, K: int, p: float, dtype: torch.dtype) -> torch.Tensor:
    """(M, K) 0/1 keep-mask in ``dtype`` as this strategy draws it: the kernels' hash on CUDA (identical
    to `fused`/`cublas`), :func:`cpu_keep_mask` on CPU. Regenerated in backward from the saved seed."""
    if seed.device.type == "cpu":
        return cpu_keep_mask(seed, M, K, p, dtype)
    return keep_mask(seed, M, K, p).to(dtype)


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    seed: Optional[torch.Tensor],
    dropout_p: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """y = X·Wᵀ + b + s/(1−p)·H·Bᵀ and H = (X ⊙ keep)·Aᵀ.

    x: (M, K); weight: (N, K) in x's dtype; adapters any float dtype (cast to x's dtype, which is
    the Triton kernels' dot dtype too). Returns y (M, N) in x's dtype and H (M, r) fp32.
    """
    dtype = x.dtype
    ldt = lora_dtype(dtype, lora_a.dtype)
    # F.linear: addmm(bias, x, Wᵀ) without a Python-level .t() call (~2 µs at tiny sizes).
    y = F.linear(x, weight, None if bias is None else as_dtype(bias, dtype))
    lora_in = as_dtype(x, ldt)  # an fp32 copy only for PEFT's precision (PEFT's own forward makes it too)
    if dropout_p > 0.0:
        # In place into the fresh mask: no second M×K allocation.
        lora_in = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, ldt).mul_(lora_in)
    h = rank_r_product(lora_in, as_dtype(lora_a, ldt).t())
    b_t = as_dtype(lora_b, ldt).t()
    if isinstance(scaling, torch.Tensor):
        h_scaled = h * scaling if dropout_p == 0.0 else h * (scaling / (1.0 - dropout_p))
        if ldt == dtype:
            y.addmm_(h_scaled, b_t)
        else:  # fp32 LoRA term added to the 16-bit base output with one rounding, as PEFT's result + lora_out
            y.add_(h_scaled @ b_t)
    elif ldt == dtype:  # a python float folds into addmm's alpha: one op fewer
        y.addmm_(h, b_t, alpha=scaling / (1.0 - dropout_p))
    else:
        y.add_(scaled_mm(h, b_t, scaling / (1.0 - dropout_p)))
    return y, as_dtype(h, accum_dtype(dtype))


def lora_dtype(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the rank-r products: x's, or fp32 for fp32 adapters on 16-bit x when the adapter precision
    is "fp32" (PEFT's; :func:`lorafast.kernels.dtypes.set_adapter_precision`), as in the Triton strategies."""
    if adapter_dtype == torch.float32 and x_dtype in HALF_DTYPES and adapter_precision() == "fp32":
        return torch.float32
    return x_dtype


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)``, skipping the call when t already has it (a dispatch, ~1 µs at tiny sizes)."""
    return t if t.dtype == dtype else t.to(dtype)


def backward(
    grad_y: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
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
    """dX = dY·W + keep⊙(dH·A)/(1−p), dA = dHᵀ·drop(X), dB = s·dYᵀ·H/(1−p), db = Σₘ dY,
    with dH = s·dY·B. Shapes as in :func:`forward`; dA (r, K), dB (N, r), db (N,) come back fp32 (fp64 for fp64)
    (cast to each parameter's dtype by the caller); None where not needed."""
    dtype = grad_y.dtype
    acc = accum_dtype(dtype)
    ldt = lora_dtype(dtype, lora_a.dtype)
    inv_keep = 1.0 / (1.0 - dropout_p)
    lora_a, lora_b = as_dtype(lora_a, ldt), as_dtype(lora_b, ldt)
    grad_l = as_dtype(grad_y, ldt)  # dY in the LoRA dtype (an fp32 copy only for PEFT's precision)
    tensor_scale = isinstance(scaling, torch.Tensor)
    s = 1.0 if tensor_scale else float(scaling)  # a float folds into each product's alpha
    dh = None  # dY·B, times s when s is a tensor
    if need_dx or need_da:
        dh = rank_r_product(grad_l, lora_b)
        if tensor_scale:
            dh.mul_(as_dtype(scaling, ldt))
    keep = None
    if dropout_p > 0.0 and (need_dx or need_da):
        keep = dropout_keep_mask(seed, x.shape[0], x.shape[1], dropout_p, ldt)
    dx = None
    if need_dx:
        dx = grad_y @ weight
        if keep is None and ldt == dtype:
            dx.addmm_(dh, lora_a, alpha=s)
        elif ldt == dtype:
            dx.addcmul_(dh @ lora_a, keep, value=s * inv_keep)
        else:  # the fp32 LoRA term joins the 16-bit base gradient with one rounding
            lora_dx = scaled_mm(dh, lora_a, s * inv_keep)
            dx.add_(lora_dx if keep is None else lora_dx.mul_(keep))
    da = None
    if need_da:
        x_l = as_dtype(x, ldt)
        lora_in = x_l if keep is None else keep.mul_(x_l)  # keep's last use (dX read it above)
        da = as_dtype(scaled_mm(dh.t(), lora_in, s * inv_keep), acc)
    db_lora = None
    if need_db_lora:
        db_lora = as_dtype(rank_r_product(grad_l.t(), as_dtype(h, ldt), s * inv_keep), acc)
        if tensor_scale:  # 1/(1−p) is already in the product's alpha
            db_lora = db_lora.mul_(scaling)
    dbias = grad_y.sum(0, dtype=acc) if need_dbias else None
    return dx, da, db_lora, dbias
