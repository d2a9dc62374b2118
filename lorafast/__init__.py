"""lorafast — fused LoRA linear layers for PyTorch.

Public API::

    lorafast.lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p=0.0,
                         training=False, backend="auto")
    lorafast.reference.lora_linear(...)      # plain PyTorch oracle, same signature
    lorafast.dora_linear(x, weight, bias, lora_a, lora_b, magnitude, scaling, ...)   # DoRA, PEFT's math
    lorafast.LoRALinear(...), lorafast.LoRALinear.from_linear(linear, ...)
    lorafast.patch(peft_model), lorafast.unpatch(peft_model)   # PEFT drop-in
    lorafast.tune(model, *example_inputs)    # pre-time backend="auto"'s strategies for a model's shapes (CUDA)
    lorafast.set_adapter_precision("fp32")   # PEFT's precision for fp32 adapters on a 16-bit base (Triton paths)
    lorafast.grouped_lora_linear(x, weight, bias, offsets, lora_a, lora_b, scaling, ...)   # MoE experts, no ΔW
    lorafast.set_expert_dropout(peft_model, p)   # dropout on patched expert LoRA (PEFT rejects it)
"""

from lorafast import reference
from lorafast.dispatch import tune
from lorafast.dora import dora_linear
from lorafast.functional import lora_linear
from lorafast.kernels.dtypes import set_adapter_precision
from lorafast.modules import LoRALinear
from lorafast.moe import grouped_lora_linear
from lorafast.version import __version__


def patch(model, **kwargs):
    """Swap every eligible PEFT ``lora.Linear`` in ``model`` for the fused layer; returns the count.

    See :func:`lorafast.peft.patch`.
    """
    from lorafast.peft import patch as _patch

    return _patch(model, **kwargs)


def unpatch(model):
    """Restore PEFT's own ``lora.Linear`` class on every patched layer; returns the count.

    See :func:`lorafast.peft.unpatch`.
    """
    from lorafast.peft import unpatch as _unpatch

    return _unpatch(model)


def set_expert_dropout(model, p: float) -> int:
    """Dropout ``p`` on the LoRA input of every patched MoE expert projection (PEFT's ParamWrapper rejects
    ``lora_dropout``); returns the count. See :func:`lorafast.peft.set_expert_dropout`.
    """
    from lorafast.peft import set_expert_dropout as _set

    return _set(model, p)


__all__ = [
    "LoRALinear", "dora_linear", "grouped_lora_linear", "lora_linear", "patch", "reference", "set_adapter_precision",
    "set_expert_dropout", "tune", "unpatch", "__version__",
]
