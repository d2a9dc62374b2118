"""The layer shapes and dtype names the bench and the roofline model both speak of.

A leaf module (torch only), so :mod:`lorafast.roofline` and :mod:`lorafast.bench` share it without
importing each other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Shape:
    """One linear layer: M rows of activations (batch × sequence), K inputs, N outputs."""

    name: str
    M: int
    K: int
    N: int


SHAPE_PRESETS: Dict[str, List[Shape]] = {
    # BERT-base: batch 16 × 128 tokens; attention projections and the FFN up-projection.
    "bert": [Shape("bert-attn", 2048, 768, 768), Shape("bert-ffn-up", 2048, 768, 3072)],
    # Llama-3-8B: 8192 tokens per step; attention projections and the MLP up/gate projection.
    "llama": [Shape("llama8b-attn", 8192, 4096, 4096), Shape("llama8b-mlp-up", 8192, 4096, 14336)],
}


def parse_shapes(tokens: Sequence[str]) -> List[Shape]:
    """Shapes from preset names (``bert``, ``llama``, comma lists of them) or ``M,K,N`` / ``MxKxN``."""
    shapes: List[Shape] = []
    for token in tokens:
        parts = [part for part in re.split(r"[,x]", token.strip()) if part]
        if len(parts) == 3 and all(part.isdigit() for part in parts):
            M, K, N = (int(part) for part in parts)
            if min(M, K, N) < 1:
                raise ValueError(f"--shapes: M, K, N must be >= 1, got {token!r}")
            shapes.append(Shape(f"{M}x{K}x{N}", M, K, N))
            continue
        for name in token.split(","):
            name = name.strip().lower()
            if name not in SHAPE_PRESETS:
                raise ValueError(f"--shapes: unknown shape {name!r}; use one of {sorted(SHAPE_PRESETS)} or M,K,N")
            shapes.extend(SHAPE_PRESETS[name])
    return shapes


def parse_dtype(name: str, flag: str = "--dtype") -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (or the long names) → torch dtype; ``flag`` names the option in errors."""
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"{flag}: expected one of {sorted(_DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` → ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")
