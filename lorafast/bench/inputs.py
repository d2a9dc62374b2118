"""The one input builder of the project: the bench, the pytest-benchmark suite and the tests all use it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

import torch

from lorafast.shapes import Shape


@dataclass
class LoRAInputs:
    """Random inputs of one LoRA layer.

    x (*lead, M, K), weight (N, K), bias (N,) or None, lora_a (r, K) and lora_b (N, r) (leaves
    requiring grad), scaling s, and dy (*lead, M, N), the upstream gradient (None when not drawn).
    """

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dy: Optional[torch.Tensor] = None

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]

    def args(self) -> tuple:
        """``(x, weight, bias, lora_a, lora_b, scaling)``: the positional arguments of ``lora_linear``."""
        return self.x, self.weight, self.bias, self.lora_a, self.lora_b, self.scaling

    def leaves(self) -> List[torch.Tensor]:
        """The tensors that get gradients: x, bias (if any), lora_a, lora_b."""
        return [t for t in (self.x, self.bias, self.lora_a, self.lora_b) if t is not None and t.requires_grad]

    def to64(self) -> LoRAInputs:
        """A float64 detached copy with the same requires_grad flags (the reference's inputs)."""

        def cp(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

        return LoRAInputs(cp(self.x), cp(self.weight), cp(self.bias), cp(self.lora_a), cp(self.lora_b), self.scaling,
                          cp(self.dy))


def make_inputs(
    shape: Shape,
    rank: int,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    seed: Optional[int] = 0,
    bias: bool = True,
    *,
    adapter_dtype: Optional[torch.dtype] = None,
    lead: Sequence[int] = (),
    scaling: float = 2.0,
    requires_grad: bool = False,
    with_dy: bool = True,
) -> LoRAInputs:
    """Fresh random inputs with unit-scale outputs (never zeros: lora_b is random too, unlike PEFT's init).

    Draw order: x, weight, bias, lora_a, lora_b, dy. ``seed``: drawn from a private generator on
    ``device`` (the caller's RNG is left alone; on the device because the Llama shapes hold ~10^8
    elements, slow to draw on a CPU); ``None`` draws from the global generator (tests that seed it).
    ``adapter_dtype``: dtype of lora_a/lora_b (default ``dtype``; fp32 on a bf16 model is PEFT's upcast).
    ``lead``: leading batch dims of x and dy. ``requires_grad``: x and bias also require grad (the tests'
    leaves; the bench takes gradients of fresh leaves instead). ``with_dy``: draw dy.
    """
    device = torch.device(device)
    gen = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype

    def randn(*size: int, scale: float = 1.0, to: torch.dtype = dtype) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * scale).to(to)

    M, K, N = shape.M, shape.K, shape.N
    x = randn(*lead, M, K).requires_grad_(requires_grad)
    weight = randn(N, K, scale=K**-0.5)
    b = randn(N, scale=0.1).requires_grad_(requires_grad) if bias else None
    lora_a = randn(rank, K, scale=K**-0.5, to=adapter_dtype).requires_grad_(True)
    lora_b = randn(N, rank, scale=rank**-0.5, to=adapter_dtype).requires_grad_(True)
    dy = randn(*lead, M, N) if with_dy else None
    return LoRAInputs(x, weight, b, lora_a, lora_b, scaling, dy)
