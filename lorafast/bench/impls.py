"""The LoRA layers the bench compares, all over the same weights, and the calls it times.

* ``lorafast``  — :func:`lorafast.lora_linear` with the run's ``--backend`` (default "auto");
* ``fused`` / ``cublas`` / ``aten`` — :func:`lorafast.lora_linear` forced to one strategy
  (:mod:`lorafast.strategies`), so each is timed on its own beside what "auto" picks;
* ``peft``      — PEFT's ``lora.Linear`` around an ``nn.Linear`` (adapters in ``inputs``' adapter dtype);
* ``reference`` — :func:`lorafast.reference.lora_linear`, the plain-PyTorch oracle;
* ``base``      — the frozen ``F.linear`` alone: the floor no LoRA layer can beat.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import lorafast
from lorafast import reference
from lorafast.bench.inputs import LoRAInputs
from lorafast.strategies import STRATEGIES

IMPLEMENTATIONS = ("lorafast", "peft", "reference", "base")
MODES = ("fwd", "fwd+bwd")


@dataclass
class Implementation:
    """A LoRA layer under test: ``forward(x, training) -> y``, the tensors whose gradients a training
    step takes besides x (``trainable``: A then B), and every weight tensor it holds (``weights``)."""

    name: str
    forward: Callable[[torch.Tensor, bool], torch.Tensor]
    trainable: List[torch.Tensor]
    weights: List[torch.Tensor]


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def peft_layer(inputs: LoRAInputs, dropout_p: float) -> nn.Module:
    """PEFT's ``lora.Linear`` around an ``nn.Linear`` holding the same weights, adapters copied in (in
    their own dtype: fp32 adapters on a bf16 base are PEFT's upcast).

    Built through ``inject_adapter_in_model`` on a one-layer module, which works across PEFT
    versions (the ``lora.Linear`` constructor's signature has changed)."""
    from peft import LoraConfig, inject_adapter_in_model

    N, K = inputs.weight.shape
    holder = nn.Module()
    holder.linear = nn.Linear(K, N, bias=inputs.bias is not None, device=inputs.x.device, dtype=inputs.x.dtype)
    config = LoraConfig(r=inputs.rank, lora_alpha=inputs.rank, lora_dropout=dropout_p, target_modules=["linear"])
    layer = inject_adapter_in_model(config, holder).linear
    layer.to(dtype=inputs.x.dtype)
    layer.lora_A.to(dtype=inputs.lora_a.dtype)
    layer.lora_B.to(dtype=inputs.lora_b.dtype)
    with torch.no_grad():
        layer.base_layer.weight.copy_(inputs.weight)
        if inputs.bias is not None:
            layer.base_layer.bias.copy_(inputs.bias)
        layer.lora_A["default"].weight.copy_(inputs.lora_a)
        layer.lora_B["default"].weight.copy_(inputs.lora_b)
    layer.scaling["default"] = inputs.scaling
    return layer


def _lorafast(name: str, inputs: LoRAInputs, dropout_p: float, backend: str) -> Implementation:
    W, b, A, B, s = inputs.weight, inputs.bias, inputs.lora_a, inputs.lora_b, inputs.scaling

    def forward(x, training):
        # lorafast.lora_linear looked up per call, so a test can swap it for a broken one.
        return lorafast.lora_linear(x, W, b, A, B, s, dropout_p=dropout_p, training=training, backend=backend)

    return Implementation(name, forward, [A, B], [W, b, A, B])


def build_implementations(
    inputs: LoRAInputs, dropout_p: float, backend: str = "auto", names: Sequence[str] = IMPLEMENTATIONS
) -> Dict[str, Implementation]:
    """The implementations in ``names`` (IMPLEMENTATIONS or STRATEGIES entries) over the same weights
    (PEFT is skipped if not installed)."""
    W, b, A, B, s = inputs.weight, inputs.bias, inputs.lora_a, inputs.lora_b, inputs.scaling
    impls: Dict[str, Implementation] = {}
    for name in names:
        if name == "lorafast":
            impls[name] = _lorafast(name, inputs, dropout_p, backend)
        elif name in STRATEGIES:
            impls[name] = _lorafast(name, inputs, dropout_p, name)
        elif name == "reference":

            def forward(x, training, _p=dropout_p):
                return reference.lora_linear(x, W, b, A, B, s, dropout_p=_p, training=training)

            impls[name] = Implementation(name, forward, [A, B], [W, b, A, B])
        elif name == "base":
            impls[name] = Implementation(name, lambda x, training: F.linear(x, W, b), [], [W, b])
        elif name == "peft":
            if not peft_available():
                continue
            layer = peft_layer(inputs, dropout_p)

            def forward(x, training, _layer=layer):
                if _layer.training != training:  # flip the mode only when it changes: no per-call cost
                    _layer.train(training)
                return _layer(x)

            params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            impls[name] = Implementation(name, forward, params, list(layer.parameters()))
        else:
            raise ValueError(f"unknown implementation {name!r}; expected one of {IMPLEMENTATIONS + STRATEGIES}")
    return impls


def inference_call(impl: Implementation, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``fwd`` mode: one inference forward (no graph, no dropout)."""

    def call() -> torch.Tensor:
        with torch.no_grad():
            return impl.forward(x, False)

    return call


def training_call(impl: Implementation, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, ...]]:
    """``fwd+bwd`` mode: forward with dropout, then gradients of X and the trainable tensors.

    Returns ``(y, dX, *d trainable)``; ``autograd.grad`` leaves no ``.grad`` to accumulate."""
    x_leaf = x.detach().requires_grad_(True)

    def call() -> Tuple[torch.Tensor, ...]:
        y = impl.forward(x_leaf, True)
        grads = torch.autograd.grad(y, [x_leaf, *impl.trainable], dy)
        return (y.detach(), *grads)

    return call
