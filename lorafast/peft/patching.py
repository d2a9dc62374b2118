"""``patch`` / ``unpatch`` / ``register``: the one module that knows every fused PEFT layer kind.

Each kind's module maps PEFT's class to its fused subclass; this module collects those maps (a kind whose
optional dependency is missing, e.g. bitsandbytes, is skipped) and swaps classes in place.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Optional

from peft import LoraConfig
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer, dispatch_default
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from lorafast.peft import dora, experts
from lorafast.peft.core import BACKEND_ATTR, NAME_ATTR, PLAN_ATTR, check_backend, register_variant
from lorafast.peft.linear import FusedLoraLinear

# Per-kind eligibility beyond the class (a ParamWrapper is fused only on a transformers experts module).
_ELIGIBLE = {experts.FusedParamWrapper: experts.eligible}


def _swap_in(layer: nn.Module, backend: str, name: Optional[str], fused_class: type) -> None:
    layer.__class__ = fused_class
    setattr(layer, BACKEND_ATTR, backend)
    setattr(layer, NAME_ATTR, name)


@functools.cache
def fused_classes() -> dict[type, type]:
    """PEFT class → its lorafast subclass: plain ``lora.Linear``, ``ParamWrapper`` on MoE experts
    (:mod:`lorafast.peft.experts`) plus the 4-bit layer of :mod:`lorafast.peft.bnb` (imported lazily, as it needs
    bitsandbytes, and skipped when it cannot be). Also wires the LoRA variants the fused layers run (DoRA,
    :mod:`lorafast.peft.dora`) into the core."""
    for variant_type, support in dora.VARIANTS.items():
        register_variant(variant_type, support)
    classes: dict[type, type] = {PeftLoraLinear: FusedLoraLinear, **experts.FUSED_CLASSES}
    try:
        from lorafast.peft import bnb
    except ImportError:
        return classes
    classes.update(bnb.FUSED_CLASSES)
    return classes


def _always(module: nn.Module) -> bool:
    return True


def patch(model: nn.Module, backend: str = "auto") -> int:
    """Make every PEFT LoRA layer in ``model`` that lorafast covers (``lora.Linear`` over ``nn.Linear`` or GPT-2's
    ``Conv1D``, bitsandbytes' 4-bit ``Linear4bit``, plain LoRA or DoRA adapters; ``ParamWrapper`` on transformers'
    MoE experts from ``target_parameters``) run the fused op; changes nothing else.

    Swaps the layers' class in place (no new parameters, buffers or submodules; state_dict keys and
    saved adapters are unchanged). Idempotent: already-patched layers are skipped, but take the new
    ``backend``. Call again after ``add_adapter``/``load_adapter`` targets new layers.

    Args:
        model: a ``PeftModel`` or any module containing PEFT LoRA layers.
        backend: "auto" | "fused" | "cublas" | "aten" (or the aliases "triton" | "torch"), as
            :func:`lorafast.lora_linear` takes it.

    Returns:
        The number of layers newly patched by this call (0 on a second call).
    """
    check_backend(backend)
    classes = fused_classes()
    fused = frozenset(classes.values())
    patched = 0
    ineligible: dict[str, int] = {}
    for name, module in model.named_modules():
        fused_class = classes.get(type(module))
        if fused_class is not None and not _ELIGIBLE.get(fused_class, _always)(module):
            fused_class = None
        if fused_class is not None:
            _swap_in(module, backend, name, fused_class)
            patched += 1
        elif type(module) in fused:
            setattr(module, BACKEND_ATTR, backend)
        elif isinstance(module, LoraLayer):
            kind = type(module).__module__ + "." + type(module).__qualname__
            ineligible[kind] = ineligible.get(kind, 0) + 1
    if ineligible:
        kinds = ", ".join(f"{count}× {kind}" for kind, count in sorted(ineligible.items()))
        warnings.warn(
            f"lorafast.patch: these LoRA layers are not plain peft lora.Linear and stay on PEFT: {kinds}",
            stacklevel=2,
        )
    return patched


def unpatch(model: nn.Module) -> int:
    """Restore PEFT's own class (``lora.Linear``, or the quantized layer class) on every patched layer of
    ``model``.

    Returns:
        The number of layers restored.
    """
    peft_class_of = {fused: peft for peft, fused in fused_classes().items()}
    restored = 0
    for module in model.modules():
        peft_class = peft_class_of.get(type(module))
        if peft_class is not None:
            module.__class__ = peft_class
            for attr in (BACKEND_ATTR, NAME_ATTR, PLAN_ATTR, experts.DROPOUT_ATTR):
                module.__dict__.pop(attr, None)
            restored += 1
    return restored


def register(config: LoraConfig, backend: str = "auto") -> LoraConfig:
    """Make ``get_peft_model`` / ``PeftModel.from_pretrained(..., config=config)`` build fused layers.

    Registers a dispatcher through PEFT's (experimental) ``LoraConfig._register_custom_module``: layers
    whose base is exactly ``nn.Linear`` become :class:`FusedLoraLinear`; every other layer (quantized
    ``nn.Linear`` subclasses, Conv1D, embeddings, ...) goes to PEFT's own dispatchers. The registration
    lives on this config object only; it is not saved to ``adapter_config.json``.

    Args:
        config: the ``LoraConfig`` to extend (modified in place).
        backend: "auto" | "fused" | "cublas" | "aten" (or an alias), passed to :func:`lorafast.lora_linear`.

    Returns:
        ``config``, for chaining.
    """
    check_backend(backend)
    fused_classes()  # wires the LoRA variants (DoRA) the fused layers run
    config._register_custom_module({nn.Linear: functools.partial(_dispatch_fused_linear, backend=backend)})
    return config


def _dispatch_fused_linear(
    target: nn.Module, adapter_name: str, config: LoraConfig, *, backend: str, **kwargs: Any
) -> Optional[nn.Module]:
    """PEFT custom-module dispatcher; returning None hands the layer to PEFT's next dispatcher."""
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if type(base) is not nn.Linear:
        return None
    layer = dispatch_default(target, adapter_name, config=config, **kwargs)
    if type(layer) is PeftLoraLinear:
        _swap_in(layer, backend, kwargs.get("target_name"), FusedLoraLinear)
    return layer
