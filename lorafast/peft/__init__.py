"""PEFT drop-in: run PEFT's LoRA layers through lorafast's fused ops.

``patch(model)`` changes the class of every PEFT LoRA layer lorafast covers, in place, to a subclass that
overrides only ``forward`` (and the name it prints as); ``unpatch`` restores the class; ``register(config)``
makes ``get_peft_model`` build the fused class directly. Parameters, buffers, submodules, state_dict keys,
saved adapter files and merge/unload behaviour stay PEFT's own, and whatever a fused layer does not cover
falls back to PEFT's ``forward``, visibly (one warning per reason, an INFO line per layer).

Layout: :mod:`lorafast.peft.core` (fallbacks, the adapter walk, hooks; knows no layer kind), one module per
PEFT layer kind (:mod:`~lorafast.peft.linear` for ``lora.Linear``, :mod:`~lorafast.peft.bnb` for
bitsandbytes' 4-bit ``Linear4bit``, :mod:`~lorafast.peft.experts` for ``ParamWrapper`` on MoE experts),
and :mod:`~lorafast.peft.patching`, the one module that knows them all.
"""

from lorafast.peft.core import AdapterParts, Fallback, adapter_parts
from lorafast.peft.experts import FusedParamWrapper, set_expert_dropout
from lorafast.peft.linear import FusedLoraLinear
from lorafast.peft.patching import fused_classes, patch, register, unpatch

__all__ = ["AdapterParts", "Fallback", "FusedLoraLinear", "FusedParamWrapper", "adapter_parts", "fused_classes",
           "patch", "register", "set_expert_dropout", "unpatch"]
