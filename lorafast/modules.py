"""`LoRALinear`: a drop-in nn.Module around the fused functional op."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lorafast.functional import lora_linear


def lora_scaling(r: int, lora_alpha: float, use_rslora: bool = False) -> float:
    """PEFT's LoRA scale: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r


class LoRALinear(nn.Module):
    """``y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ`` with a frozen base weight and trainable A, B.

    Shapes: x (..., in_features) → y (..., out_features); weight (out, in), bias (out,),
    lora_A (r, in), lora_B (out, r). Initialised like PEFT: A kaiming-uniform(a=√5), B zeros,
    so a fresh layer equals its base linear.

    Args:
        in_features, out_features: K and N.
        r: LoRA rank (≥ 1). lora_alpha: alpha; scaling = alpha/r (alpha/√r with use_rslora).
        lora_dropout: dropout probability on the LoRA input (training only).
        bias: create a (frozen) bias. backend: "auto" | "triton" | "torch".
        device, dtype: factory kwargs for all parameters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        bias: bool = True,
        use_rslora: bool = False,
        backend: str = "auto",
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRALinear: r must be >= 1, got {r}")
        if not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"LoRALinear: lora_dropout must be in [0, 1), got {lora_dropout}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.r = r
        self.lora_alpha = lora_alpha
        self.lora_dropout = lora_dropout
        self.use_rslora = use_rslora
        self.backend = backend
        self.scaling = lora_scaling(r, lora_alpha, use_rslora)
        self.merged = False
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **factory))
        self._reset_base_parameters()
        self.reset_lora_parameters()

    def _reset_base_parameters(self) -> None:
        # Same init as nn.Linear, so a LoRALinear built from scratch is a sensible base.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A kaiming-uniform(a=√5), B zeros (the layer starts as its base)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        r: int = 8,
        lora_alpha: float = 8,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        backend: str = "auto",
    ) -> LoRALinear:
        """Wrap an existing ``nn.Linear``: its weight and bias are shared (same Parameter objects),
        frozen, and the LoRA factors are created on its device and dtype."""
        layer = cls(
            linear.in_features,
            linear.out_features,
            r=r,
            lora_alpha=lora_alpha,
            lora_dropout=lora_dropout,
            bias=False,
            use_rslora=use_rslora,
            backend=backend,
            device="meta",
            dtype=linear.weight.dtype,
        )
        layer.weight = linear.weight
        layer.weight.requires_grad_(False)
        layer.bias = linear.bias
        if layer.bias is not None:
            layer.bias.requires_grad_(False)
        factory = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        layer.lora_A = nn.Parameter(torch.empty(r, linear.in_features, **factory))
        layer.lora_B = nn.Parameter(torch.empty(linear.out_features, r, **factory))
        layer.reset_lora_parameters()
        return layer

    def _delta_weight(self) -> torch.Tensor:
        """s·B·A (N×K) in fp32 or wider, for merge/unmerge."""
        compute = torch.promote_types(self.lora_B.dtype, torch.float32)
        return (self.lora_B.to(compute) @ self.lora_A.to(compute)) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """Fold s·B·A into the base weight (inference); forward then skips the LoRA branch."""
        if self.merged:
            return
        merged = self.weight.to(self._delta_weight().dtype) + self._delta_weight()
        self.weight.copy_(merged.to(self.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge` (exact up to the base weight's rounding)."""
        if not self.merged:
            return
        unmerged = self.weight.to(self._delta_weight().dtype) - self._delta_weight()
        self.weight.copy_(unmerged.to(self.weight.dtype))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) → (..., out_features) in x's dtype."""
        if self.merged:
            return nn.functional.linear(x, self.weight, self.bias)
        return lora_linear(
            x,
            self.weight,
            self.bias,
            self.lora_A,
            self.lora_B,
            self.scaling,
            dropout_p=self.lora_dropout,
            training=self.training,
            backend=self.backend,
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"lora_alpha={self.lora_alpha}, lora_dropout={self.lora_dropout}, "
            f"bias={self.bias is not None}, use_rslora={self.use_rslora}, backend={self.backend!r}"
        )
