"""Argument checks for the public op: one clear error per problem, before any kernel runs."""

from __future__ import annotations

from typing import Optional, Union

import torch

from lorafast.strategies import BACKENDS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


def check_lora_linear_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    dropout_p: float,
    backend: str,
) -> None:
    """Raise TypeError / ValueError naming the offending argument, its shape, dtype and device."""
    named = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"lora_linear: {_describe(name, t)} has unsupported dtype; expected one of "
                "float16, bfloat16, float32, float64"
            )
    if weight.dtype != x.dtype:
        raise TypeError(
            f"lora_linear: {_describe('weight', weight)} must have x's dtype {x.dtype} (as nn.Linear requires)"
        )
    if x.dim() == 0:
        raise ValueError(f"lora_linear: {_describe('x', x)} must have at least 1 dimension (..., K)")
    for name, t, rank in (("weight", weight, 2), ("lora_a", lora_a, 2), ("lora_b", lora_b, 2)):
        if t.dim() != rank:
            raise ValueError(f"lora_linear: {_describe(name, t)} must be {rank}-D")
    K = x.shape[-1]
    N, r = weight.shape[0], lora_a.shape[0]
    if weight.shape[1] != K:
        raise ValueError(f"lora_linear: {_describe('weight', weight)} must be (N, K) with K = x.shape[-1] = {K}")
    if lora_a.shape[1] != K:
        raise ValueError(f"lora_linear: {_describe('lora_a', lora_a)} must be (r, K) with K = {K}")
    if tuple(lora_b.shape) != (N, r):
        raise ValueError(
            f"lora_linear: {_describe('lora_b', lora_b)} must be (N, r) = ({N}, {r}) "
            f"to match weight (N={N}) and lora_a (r={r})"
        )
    if r == 0:
        raise ValueError(f"lora_linear: {_describe('lora_a', lora_a)} has rank r = 0; r must be >= 1")
    if bias is not None and tuple(bias.shape) != (N,):
        raise ValueError(f"lora_linear: {_describe('bias', bias)} must be (N,) = ({N},)")
    for name, t in named.items():
        if t.device != x.device:
            raise ValueError(f"lora_linear: {_describe(name, t)} is not on x's device {x.device}")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1 or not scaling.is_floating_point():
            raise ValueError(
                "lora_linear: scaling tensor must be a 0-dim (or 1-element) float tensor, got "
                f"{_describe('scaling', scaling)}"
            )
    elif not isinstance(scaling, (int, float)):
        raise TypeError(f"lora_linear: scaling must be a float or a 0-dim tensor, got {type(scaling).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    if backend not in BACKENDS:
        raise ValueError(f"lora_linear: backend must be one of {BACKENDS}, got {backend!r}")
