"""Shared test helpers: per-dtype tolerances, relative-error checks with diagnostics, inputs."""

from __future__ import annotations

from typing import Optional

import torch

from lorafast.bench.inputs import LoRAInputs
from lorafast.bench.inputs import make_inputs as _make_inputs
from lorafast.shapes import Shape
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


# One input builder for the tests and the bench (lorafast.bench.inputs); the tests' call form below.
LoraInputs = LoRAInputs


def make_inputs(M, K, N, r, dtype=torch.float32, adapter_dtype=None, bias=True, device="cpu", lead=(),
                scaling=0.75) -> LoRAInputs:
    """Fresh random inputs with O(1) outputs from the global generator (tests seed it); x and bias require
    grad. ``lead`` adds leading batch dims to x (x is (*lead, M, K) then). See
    :func:`lorafast.bench.inputs.make_inputs`."""
    return _make_inputs(Shape(f"{M}x{K}x{N}", M, K, N), r, dtype, device, seed=None, bias=bias,
                        adapter_dtype=adapter_dtype, lead=lead, scaling=scaling, requires_grad=True, with_dy=False)


def plant_wrong_strategy(monkeypatch, name: str, what: str) -> None:
    """Make strategy ``name`` wrong: ``"y"`` 1 % too large, or ``"da"`` with its first row's contributions lost
    (what a lost split partial looks like)."""
    from lorafast import strategies

    impl = strategies.get(name)
    if what == "y":
        real = impl.forward

        def forward(*args):
            y, h = real(*args)
            return y * 1.01, h

        monkeypatch.setattr(impl, "forward", forward)
    else:
        real = impl.backward

        def backward(*args):
            dx, da, db, dbias = real(*args)
            da = da.clone()
            da[0] = 0.0
            return dx, da, db, dbias

        monkeypatch.setattr(impl, "backward", backward)
