"""Expert row groups of one grouped call, and the adapters' per-expert views.

Tokens arrive sorted by expert: expert e owns rows ``offsets[e-1]:offsets[e]`` (``offsets`` is transformers'
``cumsum(histc(...))``); rows at or past ``offsets[-1]`` belong to no expert (expert-parallel sentinels) and get
zeros in every output the op writes. PEFT's ``ParamWrapper`` stores the adapters of all E experts in two
``nn.Linear``s: lora_A (E·r, K) expert-major, so A_e = rows e·r … e·r+r−1, a contiguous slice; lora_B (N, r·E)
rank-major, so B_e = columns e, e+E, e+2E, … — a strided view, read as such (never reshape-copied) by the Triton
kernels.
"""

from __future__ import annotations

from typing import List, Optional

import torch


class Groups:
    """The row ranges of one call: ``offsets`` as the int32 tensor ``torch.nn.functional.grouped_mm`` takes, and
    (on demand, one device-to-host copy) the bounds ``[0, offsets[0], …, offsets[-1]]`` as python ints."""

    __slots__ = ("offsets", "rows", "_bounds")

    def __init__(self, offsets: torch.Tensor, rows: int):
        self.offsets = offsets if offsets.dtype == torch.int32 else offsets.to(torch.int32)
        self.rows = rows
        self._bounds: Optional[List[int]] = None

    @property
    def num_experts(self) -> int:
        return self.offsets.shape[0]

    def bounds(self) -> List[int]:
        """[0, offsets...] as python ints (a host sync on CUDA, read once per call)."""
        if self._bounds is None:
            self._bounds = [0, *self.offsets.tolist()]
        return self._bounds


def expert_rank(lora_a: torch.Tensor, num_experts: int) -> int:
    """r from lora_A's (E·r, K) shape."""
    return lora_a.shape[0] // num_experts


def a_per_expert(lora_a: torch.Tensor, num_experts: int) -> torch.Tensor:
    """lora_A (E·r, K) as (E, r, K): a view (expert-major rows)."""
    return lora_a.unflatten(0, (num_experts, -1))


def b_per_expert(lora_b: torch.Tensor, num_experts: int) -> torch.Tensor:
    """lora_B (N, r·E) as (E, N, r) with B_e[n, j] = lora_B[n, j·E + e]: a strided view, no copy."""
    return lora_b.unflatten(1, (-1, num_experts)).permute(2, 0, 1)


def weight_kn(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The expert weight as (E, K, N) — a view of transformers' (E, N, K) or gpt-oss's (E, K, N) parameter."""
    return weight if transposed else weight.transpose(1, 2)


def weight_nk(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The expert weight as (E, N, K) — a view."""
    return weight.transpose(1, 2) if transposed else weight


def out_features(weight: torch.Tensor, transposed: bool) -> int:
    """N of an expert weight in either layout."""
    return weight.shape[2] if transposed else weight.shape[1]
