"""PEFT's DoRA (``LoraConfig(use_dora=True)``: ``layer.lora_variant[name]`` is a ``DoraLinearVariant``) on the fused
DoRA op, for the layer kinds that support LoRA variants: ``lora.Linear`` over ``nn.Linear`` or GPT-2's ``Conv1D``
(:mod:`lorafast.peft.linear`, via :func:`lorafast.dora.functional.run`) and ``lora.bnb.Linear4bit``
(:mod:`lorafast.peft.bnb`, via :func:`lorafast.dora.quant.qdora_linear`).

This module imports the core and nothing of its siblings: :class:`DoraSupport` is a
:class:`lorafast.peft.core.VariantSupport` that :mod:`lorafast.peft.patching` registers for
``DoraLinearVariant``; the layer kinds reach it through :func:`lorafast.peft.core.variant_support`.

PEFT's semantics kept: one active adapter (several active adapters with a DoRA one fall back to PEFT, visibly,
in :func:`lorafast.peft.core.adapter_parts`); dropout applies only when the layer trains (PEFT's DoRA takes the
no-dropout form ``base_result = result`` whenever ``not module.training``); the norm is detached; the magnitude
(``lora_magnitude_vector[name].weight``) gets its gradient in its own dtype. Merged or disabled adapters run
PEFT's forward (decided before this module is asked). Falls back, with one warning per reason: a magnitude
module that is not exactly PEFT's ``DoraLinearLayer`` or carries hooks, a ``lora_B`` bias (PEFT rejects
``lora_bias`` with DoRA), a magnitude of the wrong shape, dtype or device.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Union

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from peft.tuners.lora.layer import LoraLayer
from peft.tuners.lora.variants import DoraLinearVariant

from lorafast import reference
from lorafast.dora import functional as dora_functional
from lorafast.functional import op_scale, scale_tensor
from lorafast.peft.core import Fallback, VariantSupport, has_hooks, tensor_meta, tensor_meta_c
from lorafast.validation import check_lora_linear_args


def _magnitude_module(layer: LoraLayer, name: str) -> Optional[torch.nn.Module]:
    return layer._modules["lora_magnitude_vector"]._modules.get(name)


class DoraSupport(VariantSupport):
    """DoRA adapters on the fused layers (see the module docstring)."""

    def plan_key(self, layer: LoraLayer, name: str) -> tuple:
        module = _magnitude_module(layer, name)
        if module is None:
            return (None,)
        weight = module._parameters.get("weight")
        meta = tensor_meta if torch.compiler.is_compiling() else tensor_meta_c
        # layer.training: PEFT's DoRA drops out only in training mode, whatever the dropout module's own mode.
        return (layer.training, type(module), id(module), id(weight), None if weight is None else meta(weight))

    def held_modules(self, layer: LoraLayer, name: str) -> list:
        module = _magnitude_module(layer, name)
        return [] if module is None else [module]

    def _magnitude(self, layer: LoraLayer, name: str, n_out: int, device: torch.device
                   ) -> Union[Fallback, torch.Tensor]:
        """The magnitude parameter the op reads, or why it cannot."""
        module = _magnitude_module(layer, name)
        if type(module) is not DoraLinearLayer:
            return Fallback("DoRA magnitude module is not PEFT's DoraLinearLayer", type(module).__name__)
        if has_hooks(module):
            return Fallback("module hooks or a replaced forward")
        if layer._modules["lora_B"][name].bias is not None:
            return Fallback("DoRA with a lora_B bias")
        magnitude = module._parameters.get("weight")
        if magnitude is None or not magnitude.is_floating_point() or tuple(magnitude.shape) != (n_out,):
            shape = None if magnitude is None else (tuple(magnitude.shape), magnitude.dtype)
            return Fallback("DoRA magnitude is not a float (out_features,) tensor", f"{shape}, out {n_out}")
        if magnitude.device != device:
            return Fallback("input, base weight and adapters not all on one device")
        return magnitude

    def linear_op(self, layer: LoraLayer, name: str, weight: torch.Tensor) -> Union[Fallback, Callable]:
        magnitude = self._magnitude(layer, name, weight.shape[0], weight.device)
        if isinstance(magnitude, Fallback):
            return magnitude
        return functools.partial(fused_dora_forward, magnitude=magnitude, training=layer.training)

    def quant_op(self, layer: LoraLayer, name: str) -> Union[Fallback, Callable]:
        base = layer.get_base_layer()
        magnitude = self._magnitude(layer, name, base.out_features, base.weight.device)
        if isinstance(magnitude, Fallback):
            return magnitude
        from lorafast.dora.quant import qdora_linear  # bitsandbytes: imported with the 4-bit layer only

        def op(call, backend: str) -> torch.Tensor:
            if not layer.training and call.dropout_p:
                call = call._replace(dropout_p=0.0)
            return qdora_linear(call, magnitude, base.weight, backend)

        return op


def fused_dora_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    dropout_p: float,
    *,
    backend: str,
    magnitude: torch.Tensor,
    training: bool,
) -> torch.Tensor:
    """The DoRA op for a planned call (:mod:`lorafast.peft.linear`'s ``fused_forward`` signature, with the
    magnitude and the layer's training mode bound): what :func:`lorafast.dora_linear` does, less the checks the
    plan made once. x (..., K) in weight's dtype; weight (N, K), possibly a Conv1D weight's ``.t()`` view.
    Returns (..., N) in x's dtype. One module-level name, so tests can count the fused calls."""
    K = weight.shape[1]
    if x.shape[-1] != K or x.dim() == 0:
        check_lora_linear_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p, backend)  # raises
    p = dropout_p if training else 0.0
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.shape[0] == 0:
        return reference.dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling, p, p > 0.0)
    scale = scale_tensor(scaling, x2)
    strategy = dora_functional.choose_strategy(backend, x2, weight, bias, lora_a, lora_b, magnitude, scale, p)
    return dora_functional.run(x2, x.shape[:-1], weight, bias, lora_a, lora_b, magnitude,
                               op_scale(scaling, scale, strategy), p, strategy)


SUPPORT = DoraSupport()
VARIANTS = {DoraLinearVariant: SUPPORT}
"""PEFT variant class → its support, registered by :func:`lorafast.peft.patching.fused_classes`."""
