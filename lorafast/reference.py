"""Plain-PyTorch LoRA linear: PEFT's math, the oracle every fast path is checked against.

This module is deliberately naive: it mirrors `peft.tuners.lora.layer.Linear.forward` for one
adapter (base linear, input cast to the adapter dtype, dropout, A then B, times scaling, result
cast back to the input dtype) so that tests and benchmarks have one trusted definition.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

Scaling = Union[float, torch.Tensor]


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Scaling,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    *,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference ``Y = X·Wᵀ + b + s·(drop(X)·Aᵀ)·Bᵀ``.

    Args:
        x: (..., K) activations, any float dtype.
        weight: (N, K) base weight. bias: (N,) or None.
        lora_a: (r, K); lora_b: (N, r) — may be a wider dtype than ``x`` (PEFT upcasts adapters;
            ``x`` is then cast to ``lora_a.dtype`` for the LoRA branch, as PEFT does).
        scaling: python float or 0-dim tensor ``s``.
        dropout_p, training: dropout on the LoRA input, active only when ``training`` and p > 0.
        backend: accepted for signature compatibility with :func:`lorafast.lora_linear`; ignored.
        dropout_mask: optional boolean keep-mask broadcastable to ``x`` (True = keep). When given
            (and dropout is active) it replaces the random mask, so a kernel's mask can be
            replayed exactly: drop(X) = X ⊙ mask / (1 − p).

    Returns:
        (..., N) tensor in ``x.dtype``.
    """
    del backend
    result = F.linear(x, weight, bias)
    lora_in = x.to(lora_a.dtype)
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            lora_in = F.dropout(lora_in, p=dropout_p, training=True)
        else:
            lora_in = lora_in * dropout_mask.to(lora_in.dtype) / (1.0 - dropout_p)
    lora = F.linear(F.linear(lora_in, lora_a), lora_b) * scaling
    return (result + lora).to(x.dtype)


def dora_weight_norm(
    weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: Scaling
) -> torch.Tensor:
    """PEFT's DoRA weight norm ‖W + s·B·A‖ per output row, dense (it builds the N×K sum, as PEFT does).

    weight (N, K) is cast to the adapters' dtype first (PEFT casts it to the LoRA input's dtype); returns
    (N,) in that dtype, with no gradient (PEFT detaches it: DoRA paper §4.3).
    """
    with torch.no_grad():
        w = weight.to(lora_a.dtype)
        return torch.linalg.norm(w + scaling * (lora_b @ lora_a), dim=1)


def dora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: Scaling,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    *,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference DoRA linear, PEFT 0.21's ``DoraLinearVariant.forward`` for one adapter.

    With g = m / ‖W + s·B·A‖_row (the norm detached) and D = drop(X):

    - no dropout (p = 0, or eval): Y = g ⊙ (X·Wᵀ + s·(X·Aᵀ)·Bᵀ) + b;
    - training with p > 0:         Y = X·Wᵀ + b + (g − 1) ⊙ (D·Wᵀ) + g ⊙ s·(D·Aᵀ)·Bᵀ.

    Both are ``result + (g − 1)·base + g·s·lora`` with result = X·Wᵀ + b, base = (X or D)·Wᵀ, lora = (X or
    D)·Aᵀ·Bᵀ; PEFT forms the no-dropout base as ``result − b``, which is the same math (this oracle computes
    X·Wᵀ directly). The LoRA side, W in it and the norm run in the adapters' dtype (PEFT casts x to
    ``lora_A``'s dtype), the result is cast back to x's dtype.

    Args:
        x: (..., K); weight: (N, K) in x's dtype; bias: (N,) or None.
        lora_a: (r, K); lora_b: (N, r); magnitude: (N,) — PEFT's ``lora_magnitude_vector[name].weight``.
        scaling: python float or 0-dim tensor s. dropout_p, training: as :func:`lora_linear`.
        dropout_mask: optional boolean keep-mask broadcastable to ``x`` replacing the random one.

    Returns:
        (..., N) in x's dtype.
    """
    del backend
    result = F.linear(x, weight, bias)
    lora_in = x.to(lora_a.dtype)
    weight_l = weight.to(lora_a.dtype)
    g = magnitude / dora_weight_norm(weight, lora_a, lora_b, scaling)
    if training and dropout_p > 0.0:
        if dropout_mask is None:
            lora_in = F.dropout(lora_in, p=dropout_p, training=True)
        else:
            lora_in = lora_in * dropout_mask.to(lora_in.dtype) / (1.0 - dropout_p)
    base = F.linear(lora_in, weight_l)
    lora = F.linear(F.linear(lora_in, lora_a), lora_b)
    return (result + (g - 1) * base + g * lora * scaling).to(x.dtype)


def grouped_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    offsets: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Scaling,
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    *,
    transposed: bool = False,
    dropout_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Reference grouped (MoE experts) LoRA: for each expert e, ``Y_e = X_e·W_eᵀ + b_e + s·(drop(X_e)·A_eᵀ)·B_eᵀ``.

    PEFT's ``ParamWrapper`` math for a 3-D expert parameter, one expert at a time: A_e and B_e are the slices
    ``lora_a.reshape(E, r, K)[e]`` and ``lora_b.reshape(N, r, E)[:, :, e]`` its ``get_delta_weight`` takes
    (lora_A is Linear(K, r·E), expert-major; lora_B is Linear(r·E, N), rank-major).

    Args:
        x: (S, K) token rows sorted by expert (expert e owns rows ``offsets[e-1]:offsets[e]``), any float dtype.
        weight: (E, N, K) — transformers' ``gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I) — or, with
            ``transposed``, (E, K, N) (gpt-oss). bias: (E, N) or None.
        offsets: (E,) integer cumulative row counts; rows at or past ``offsets[-1]`` belong to no expert and
            get zeros.
        lora_a: (E·r, K); lora_b: (N, r·E) — may be a wider dtype than ``x`` (the LoRA branch then runs in it).
        scaling, dropout_p, training, dropout_mask: as :func:`lora_linear`; the mask is (S, K).
        backend: ignored (signature compatibility with :func:`lorafast.grouped_lora_linear`).

    Returns:
        (S, N) tensor in ``x.dtype``.
    """
    del backend
    E = weight.shape[0]
    K = x.shape[1]
    N = weight.shape[2] if transposed else weight.shape[1]
    r = lora_a.shape[0] // E
    a = lora_a.reshape(E, r, K)
    b = lora_b.reshape(N, r, E)
    y = x.new_zeros((x.shape[0], N))
    start = 0
    for e, end in enumerate(offsets.tolist()):
        x_e = x[start:end]
        w_e = weight[e].t() if transposed else weight[e]
        base = F.linear(x_e, w_e, None if bias is None else bias[e])
        lora_in = x_e.to(lora_a.dtype)
        if training and dropout_p > 0.0:
            if dropout_mask is None:
                lora_in = F.dropout(lora_in, p=dropout_p, training=True)
            else:
                lora_in = lora_in * dropout_mask[start:end].to(lora_in.dtype) / (1.0 - dropout_p)
        lora = F.linear(F.linear(lora_in, a[e]), b[:, :, e]) * scaling
        y[start:end] = (base + lora).to(x.dtype)
        start = end
    return y
