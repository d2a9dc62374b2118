"""The PEFT glue's core: fallback reasons and their reporting, the walk over a layer's active adapters, hook
detection, and the small helpers every fused PEFT layer kind shares. It knows no layer kind: each kind's module
(:mod:`lorafast.peft.linear`, :mod:`lorafast.peft.bnb`, ...) imports this and nothing of its siblings, and
:mod:`lorafast.peft.patching` is the one place that knows them all.
"""

from __future__ import annotations

import functools
import logging
import operator
import warnings
from typing import Callable, NamedTuple, Optional, Union

import torch
from peft.tuners.lora.layer import VARIANT_KWARG_KEYS, LoraLayer
from torch import nn
from torch.nn.modules import module as _torch_module

from lorafast.strategies import BACKENDS

logger = logging.getLogger("lorafast.peft")

# Plain attributes a patched layer carries (not parameters/buffers/submodules, so PEFT never sees them as
# adapter state): the backend it runs, its name in the model (for fallback reports), its current plan.
BACKEND_ATTR = "_lorafast_backend"
NAME_ATTR = "_lorafast_name"
PLAN_ATTR = "_lorafast_plan"
# Module states where PEFT's forward is already only the base layer (or per-sample): a debug line, no warning.
QUIET_REASONS = frozenset(
    {"adapters disabled", "adapters merged", "adapter_names mixed batch", "no active adapter on this layer",
     "meta tensors", "empty input"}
)
# Forward keywords PEFT pops before calling the base layer (only LoRA variants read the second kind).
IGNORED_KWARGS = frozenset({"adapter_names", *VARIANT_KWARG_KEYS})
_warned_reasons: set[str] = set()
_logged_layer_reasons: set[tuple[str, str]] = set()


class Fallback(NamedTuple):
    """Why a call runs PEFT's own forward."""

    reason: str  # a fixed category: warned once per process
    detail: str = ""  # layer-specific specifics for the log line


def call_fallback(args: tuple, kwargs: dict) -> Optional[Fallback]:
    """Why a forward call's extra arguments need PEFT's forward, or None (only keywords PEFT pops)."""
    if kwargs.get("adapter_names") is not None:
        return Fallback("adapter_names mixed batch")
    if args or not IGNORED_KWARGS.issuperset(kwargs):
        extra = f"{len(args)} positional, keywords {sorted(set(kwargs) - IGNORED_KWARGS)}"
        return Fallback("extra forward arguments", extra)
    return None


class AdapterParts(NamedTuple):
    """The active adapters of a LoRA layer as the fused op takes them (lists in adapter order)."""

    names: list
    lora_a: list  # lora_A[name].weight, (r_i, K)
    lora_b: list  # lora_B[name].weight, (N, r_i)
    lora_biases: list  # lora_B[name].bias or None (PEFT's lora_bias)
    scalings: list  # float or 0-dim tensor
    dropout_ps: list  # p in effect (0 when the dropout module is in eval or an Identity)
    # The registered VariantSupport of a LoRA variant's adapter (the only active one), or None: vanilla LoRA.
    variant: Optional[VariantSupport] = None


class VariantSupport:
    """How the fused layer kinds run the adapters of one LoRA variant (e.g. DoRA): the variant's own module
    (:mod:`lorafast.peft.dora`) subclasses this and registers it with :func:`register_variant`, so the layer
    kinds reach it through this core without importing their siblings. Defaults: not supported (PEFT's forward).
    """

    def plan_key(self, layer: LoraLayer, name: str) -> tuple:
        """What the variant reads from ``layer`` for adapter ``name`` (module/parameter identities and metadata):
        part of the layer's plan key, so a change re-plans."""
        return ()

    def held_modules(self, layer: LoraLayer, name: str) -> list:
        """The variant's modules a fused call bypasses (their hooks, or a replaced forward, mean fall back)."""
        return []

    def linear_op(self, layer: LoraLayer, name: str, weight: torch.Tensor) -> Union[Fallback, Callable]:
        """For a dense base (weight (N, K), possibly a transposed view): the op to call as
        ``op(x, weight, bias, lora_a, lora_b, scaling, dropout_p, *, backend)`` (the plain layer's
        ``fused_forward`` signature) with the variant's own tensors bound, or why it cannot run fused."""
        return Fallback("LoRA variant not supported on this layer", type(self).__name__)

    def quant_op(self, layer: LoraLayer, name: str) -> Union[Fallback, Callable]:
        """For a 4-bit base: the op to call as ``op(call, backend)`` on a :class:`lorafast.qlora.QLoraCall` (the
        plain 4-bit layer's ``qlora_linear`` signature), or why it cannot run fused."""
        return Fallback("LoRA variant not supported on this layer", type(self).__name__)


_VARIANTS: dict[type, VariantSupport] = {}


def register_variant(variant_type: type, support: VariantSupport) -> None:
    """Fused layers run adapters whose ``layer.lora_variant[name]`` is exactly ``variant_type`` through
    ``support`` (called by :func:`lorafast.peft.patching.fused_classes`, the one place that knows every kind)."""
    _VARIANTS[variant_type] = support


def variant_support(variant: object) -> Optional[VariantSupport]:
    """The registered support for a ``lora_variant`` entry (exact type), or None."""
    return _VARIANTS.get(type(variant))


def adapter_parts(layer: LoraLayer) -> Union[Fallback, AdapterParts]:
    """The active adapters of ``layer`` (a PEFT LoRA layer: lora.Linear or a quantized one), or why the fused op
    cannot run them: none active, an unregistered LoRA variant or a variant adapter among several active ones, a
    non-plain lora_A/lora_B/dropout module, hooks on them, dropout p = 1, several adapters with dropout (PEFT draws
    a mask per adapter), a scaling tensor that is not 0-dim. The one walk over the adapters, shared by the fused
    layer kinds."""
    modules = layer._modules
    lora_A, lora_B, lora_dropout = modules["lora_A"], modules["lora_B"], modules["lora_dropout"]
    active = [name for name in layer.active_adapters if name in lora_A]
    if not active:
        return Fallback("no active adapter on this layer")
    support = None
    for name in active:
        if name in layer.lora_variant:
            variant = layer.lora_variant[name]
            support = variant_support(variant)
            if support is None:
                return Fallback("LoRA variant (DoRA, aLoRA, ...)", f"{type(variant).__name__} on adapter {name!r}")
            if len(active) > 1:
                # PEFT applies each adapter in turn (a variant's scale g sees only its own adapter): not one op.
                return Fallback("several active adapters with a LoRA variant (DoRA, ...)",
                                f"{type(variant).__name__} on adapter {name!r} of {active}")
    parts = AdapterParts(active, [], [], [], [], [], support)
    for name in active:
        a_module, b_module, dropout = lora_A[name], lora_B[name], lora_dropout[name]
        if type(a_module) is not nn.Linear or type(b_module) is not nn.Linear:
            return Fallback("lora_A/lora_B is not a plain nn.Linear")
        if type(dropout) is nn.Dropout:
            parts.dropout_ps.append(dropout.p if dropout.training else 0.0)
        elif type(dropout) is nn.Identity:
            parts.dropout_ps.append(0.0)
        else:
            return Fallback("dropout module is not nn.Dropout/nn.Identity", type(dropout).__name__)
        if has_hooks(a_module) or has_hooks(b_module) or has_hooks(dropout):
            return Fallback("module hooks or a replaced forward")
        parts.lora_a.append(a_module.weight)
        parts.lora_b.append(b_module.weight)
        parts.lora_biases.append(b_module.bias)
        parts.scalings.append(layer.scaling[name])
    if any(p >= 1.0 for p in parts.dropout_ps):
        return Fallback("dropout p = 1 (the LoRA branch is all zeros)")
    if len(active) > 1 and any(p > 0.0 for p in parts.dropout_ps):
        return Fallback("several active adapters with dropout in training")
    if any(isinstance(s, torch.Tensor) and s.dim() != 0 for s in parts.scalings):
        return Fallback("scaling is a tensor that is not 0-dim")
    return parts


def fold_lora_bias(
    base_bias: Optional[torch.Tensor],
    lora_biases: list[Optional[torch.Tensor]],
    scalings: list[Union[float, torch.Tensor]],
    dtype: torch.dtype,
) -> Optional[torch.Tensor]:
    """Base bias plus Σ s_i·b_Bi (PEFT's ``lora_B`` bias is scaled with the LoRA branch and does not see
    dropout), as one (N,) vector in ``dtype`` — the same term PEFT's merge adds to the base bias."""
    terms = [b * s for b, s in zip(lora_biases, scalings) if b is not None]
    if not terms:
        return base_bias
    total = functools.reduce(torch.add, terms)
    if base_bias is not None:
        total = total + base_bias
    return total.to(dtype)


def adapter_names(active: Union[str, list]) -> tuple:
    """PEFT's ``_active_adapter`` (a name or a list of names) as a tuple of names."""
    return (active,) if type(active) is str else tuple(active)


tensor_meta_c = operator.attrgetter("dtype", "device", "shape")  # one C call per tensor for a plan key


def tensor_meta(t: torch.Tensor) -> tuple:
    """(dtype, device, shape) of ``t`` under torch.compile, which cannot trace ``attrgetter``."""
    return (t.dtype, t.device, t.shape)


def hook_dicts(module: nn.Module) -> tuple:
    """The module's own hook registries (mutated in place by ``register_*_hook`` and handle removal)."""
    return (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks, module._backward_pre_hooks)


def has_hooks(module: nn.Module) -> bool:
    """Whether a hook is registered on ``module`` or its ``forward`` was replaced on the instance."""
    return any(hook_dicts(module)) or "forward" in module.__dict__


def has_global_hooks() -> bool:
    """Whether a global module hook (``register_module_forward_hook`` and kin) is registered."""
    return bool(
        _torch_module._global_forward_hooks
        or _torch_module._global_forward_pre_hooks
        or _torch_module._global_backward_hooks
        or _torch_module._global_backward_pre_hooks
    )


def hooked(hook_dicts_held: tuple, module_dicts: tuple) -> bool:
    """Whether a global hook, a hook in one of the held registries, or a replaced ``forward`` in one of the held
    module ``__dict__``s is present (one C-level any() over the registries, for a per-call check)."""
    if has_global_hooks() or any(hook_dicts_held):
        return True
    for module_dict in module_dicts:
        if "forward" in module_dict:
            return True
    return False


def report_fallback(layer: nn.Module, fallback: Fallback) -> None:
    """Make a fallback visible: a debug line for QUIET_REASONS; else one INFO line per layer and reason and one
    warning per reason and process."""
    name = getattr(layer, NAME_ATTR, None) or f"<{type(layer).__name__} at {id(layer):#x}>"
    key = (name, fallback.reason)
    if key in _logged_layer_reasons:
        return
    _logged_layer_reasons.add(key)
    detail = f" ({fallback.detail})" if fallback.detail else ""
    if fallback.reason in QUIET_REASONS:
        logger.debug("lorafast: %s runs PEFT's forward: %s%s", name, fallback.reason, detail)
        return
    logger.info("lorafast: %s falls back to PEFT's forward: %s%s", name, fallback.reason, detail)
    if fallback.reason not in _warned_reasons:
        _warned_reasons.add(fallback.reason)
        warnings.warn(
            f"lorafast: {name} falls back to PEFT's (unfused) forward: {fallback.reason}{detail}. "
            "Other layers falling back for this reason are logged at INFO level by 'lorafast.peft'.",
            stacklevel=3,
        )


def reset_fallback_reports() -> None:
    """Forget which fallbacks were warned and logged (tests)."""
    _warned_reasons.clear()
    _logged_layer_reasons.clear()


def check_backend(backend: str) -> None:
    """A ValueError naming ``backend`` unless it is one of BACKENDS."""
    if backend not in BACKENDS:
        raise ValueError(f"lorafast.peft: backend must be one of {BACKENDS}, got {backend!r}")
