"""Shared test helpers: per-dtype tolerances, relative-error checks with diagnostics, inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lorafast.tolerances import REL_TOL  # the rule is explained there


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (NaN if out has non-finite values)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("nan")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def describe_mismatch(out: torch.Tensor, ref: torch.Tensor, limit: int = 5) -> str:
    """First mismatching elements, NaN/inf counts and the relative error, for assertion messages."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    lines = [
        f"shape {tuple(out.shape)} dtype {out.dtype}: rel err {rel_err(out, ref):.3e}, "
        f"nan {int(torch.isnan(out64).sum())}, inf {int(torch.isinf(out64).sum())}"
    ]
    diff = (out64 - ref64).abs()
    diff[torch.isnan(diff)] = float("inf")
    flat = diff.flatten()
    worst = flat.topk(min(limit, flat.numel())).indices
    for idx in worst.tolist():
        pos = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), out64.shape))
        lines.append(f"  at {pos}: got {out64[pos].item():.6g}, expected {ref64[pos].item():.6g}")
    return "\n".join(lines)


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, lowp: Optional[torch.Tensor] = None,
                 what: str = "") -> None:
    """Check ``out`` against the float64 ``ref``: rel err ≤ 2·rel err(lowp) + REL_TOL[dtype]."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    budget = REL_TOL[dtype] + (2.0 * rel_err(lowp, ref) if lowp is not None else 0.0)
    err = rel_err(out, ref)
    assert err <= budget, f"{what}: rel err {err:.3e} > {budget:.3e}\n{describe_mismatch(out, ref)}"


@dataclass
class LoraInputs:
    """One random problem: x (..., K), weight (N, K), bias (N,) | None, lora_a (r, K), lora_b (N, r)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float

    def args(self):
        return self.x, self.weight, self.bias, self.lora_a, self.lora_b, self.scaling

    def leaves(self):
        """The tensors that get gradients: x, bias (if any), lora_a, lora_b."""
        return [t for t in (self.x, self.bias, self.lora_a, self.lora_b) if t is not None]

    def to64(self) -> LoraInputs:
        """A float64 detached copy with the same requires_grad flags (the reference's inputs)."""
        def cp(t):
            return None if t is None else t.detach().double().requires_grad_(t.requires_grad)

        return LoraInputs(cp(self.x), cp(self.weight), cp(self.bias), cp(self.lora_a), cp(self.lora_b), self.scaling)


def make_inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=None, bias=True, device="cpu", lead=(),
                scaling=0.75) -> LoraInputs:
    """Fresh random inputs with O(1) outputs; lora_b is random (not PEFT's zeros) so the LoRA term
    is exercised. ``lead`` adds leading batch dims to x (x is (*lead, M, K) then)."""
    adapter_dtype = adapter_dtype or dtype
    x = torch.randn(*lead, M, K, device=device).to(dtype).requires_grad_()
    weight = (torch.randn(N, K, device=device) / K**0.5).to(dtype)
    b = (torch.randn(N, device=device) * 0.1).to(dtype).requires_grad_() if bias else None
    lora_a = (torch.randn(r, K, device=device) / K**0.5).to(adapter_dtype).requires_grad_()
    lora_b = (torch.randn(N, r, device=device) / r**0.5).to(adapter_dtype).requires_grad_()
    return LoraInputs(x, weight, b, lora_a, lora_b, scaling)
