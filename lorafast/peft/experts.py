"""PEFT's ``ParamWrapper`` (``LoraConfig(target_parameters=[...])``) on transformers' experts modules, fused.

PEFT targets a 3-D expert weight (``gate_up_proj`` (E, 2I, H), ``down_proj`` (E, H, I); gpt-oss's transposed
(E, H, 2I) / (E, I, H)) by wrapping the experts module in a ``ParamWrapper`` per targeted parameter (nested when
several are) whose forward registers a parametrization W → W + s·ΔW for all E experts (a ``baddbmm`` over E×N×K
for one adapter, an einsum-built ΔW for several) and calls the experts module, so autograd then builds a dense
E×N×K weight gradient. :class:`FusedParamWrapper` runs the chain's experts forward with each targeted projection
through :func:`lorafast.moe.grouped_lora_linear` instead: W read in place, A/B read in PEFT's layouts, no
E×N×K tensor made in forward or backward. The block's router and top-k stay the model's; the gate activation
(``_apply_gate`` / ``act_fn``) and the post-expert norm are the module's own (:mod:`lorafast.moe.experts`).

Beyond PEFT: PEFT rejects ``lora_dropout`` on ParamWrapper; :func:`set_expert_dropout` turns on dropout of each
projection's LoRA input for lorafast's forward (the mask is regenerated in backward, never stored). It lives on
the layer only, not in the LoraConfig, so saved adapter files stay ones vanilla PEFT loads.

Anything else (adapters disabled or merged, hooks on the bypassed modules, another parametrization active, a
non-experts or expert-parallel module, an unknown experts implementation, extra forward arguments) runs PEFT's
own forward, visibly (:func:`lorafast.peft.core.report_fallback`).
"""

from __future__ import annotations

from typing import Any, List, Optional, Union

import torch
from peft.tuners.lora.layer import ParamWrapper
from torch import nn
from torch.nn.utils import parametrize

from lorafast.moe.experts import PROJECTION_NAMES, ExpertLora, experts_forward, is_experts_module
from lorafast.peft.core import (
    BACKEND_ATTR,
    Fallback,
    adapter_names,
    has_global_hooks,
    has_hooks,
    report_fallback,
)

# The p of lorafast's expert-LoRA dropout on a wrapper (a plain attribute: not adapter state, not saved).
DROPOUT_ATTR = "_lorafast_expert_dropout"
# Experts implementations whose math experts_forward reproduces (None: a standalone experts module).
SUPPORTED_IMPLEMENTATIONS = frozenset({"grouped_mm", "eager", "batched_mm", None})
QUIET = frozenset({"adapters disabled", "adapters merged", "experts weight parametrized by an outer PEFT layer"})


def wrapper_chain(layer: ParamWrapper) -> tuple[List[ParamWrapper], nn.Module]:
    """(the ParamWrappers from ``layer`` down, the module they wrap)."""
    chain = [layer]
    base = layer.base_layer
    while isinstance(base, ParamWrapper):
        chain.append(base)
        base = base.base_layer
    return chain, base


def eligible(layer: ParamWrapper) -> bool:
    """Whether ``layer`` wraps (possibly through other ParamWrappers) a transformers experts module."""
    return is_experts_module(wrapper_chain(layer)[1])


def _adapter(wrapper: ParamWrapper, num_experts: int) -> Union[Fallback, Optional[ExpertLora]]:
    """The active adapters of one wrapper as one :class:`ExpertLora` (None: none active here), or why not."""
    lora_A, lora_B = wrapper.lora_A, wrapper.lora_B
    names = [n for n in adapter_names(wrapper.active_adapter) if n in lora_A]
    if not names:
        return None
    a_list, b_list = [], []
    for name in names:
        a_mod, b_mod = lora_A[name], lora_B[name]
        if type(a_mod) is not nn.Linear or type(b_mod) is not nn.Linear or b_mod.bias is not None:
            return Fallback("lora_A/lora_B is not a plain nn.Linear")
        if has_hooks(a_mod) or has_hooks(b_mod) or has_hooks(wrapper.lora_dropout[name]):
            return Fallback("module hooks or a replaced forward")
        scaling = wrapper.scaling[name]
        if isinstance(scaling, torch.Tensor) and scaling.dim() != 0:
            return Fallback("scaling is a tensor that is not 0-dim")
        a_list.append(a_mod.weight)
        b_list.append(b_mod.weight if len(names) == 1 else b_mod.weight * scaling)
    p = float(wrapper.__dict__.get(DROPOUT_ATTR, 0.0)) if wrapper.training else 0.0
    if len(names) == 1:
        return ExpertLora(a_list[0], b_list[0], wrapper.scaling[names[0]], p)
    # Σ_i s_i·B_i·A_i per expert = one adapter of rank Σ r_i: A rows [A_1,e; A_2,e; ...] per expert, B columns in
    # the same rank order (PEFT's rank-major layout), scales folded into B.
    K, N = a_list[0].shape[1], b_list[0].shape[0]
    lora_a = torch.cat([a.view(num_experts, -1, K) for a in a_list], dim=1).reshape(-1, K)
    lora_b = torch.cat([b.view(N, -1, num_experts) for b in b_list], dim=1).reshape(N, -1)
    return ExpertLora(lora_a, lora_b, 1.0, p)


class FusedParamWrapper(ParamWrapper):
    """PEFT ``ParamWrapper`` whose forward runs the experts with the grouped LoRA op when it can.

    Never constructed directly: :func:`lorafast.patch` sets a ParamWrapper's ``__class__`` to this. Called as
    PEFT's: ``(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))`` → (T, H) in hidden_states' dtype.
    It handles its whole chain (nested wrappers below it and the experts module); parameters, state_dict keys,
    adapter files, merge and ``repr`` stay PEFT's.
    """

    def _get_name(self) -> str:
        return ParamWrapper.__name__

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        plan = self._fused_call(x, args, kwargs)
        if isinstance(plan, Fallback):
            if plan.reason not in QUIET:
                report_fallback(self, plan)
            return super().forward(x, *args, **kwargs)
        experts, lora = plan
        backend = self.__dict__.get(BACKEND_ATTR, "auto")
        return experts_forward(experts, x, args[0], args[1], lora, backend=backend)

    def _fused_call(self, x: torch.Tensor, args: tuple, kwargs: dict):
        """(experts module, {weight name: ExpertLora}) for this call, or the Fallback saying why PEFT runs it."""
        if kwargs or len(args) != 2:
            return Fallback("extra forward arguments", f"{len(args)} positional, keywords {sorted(kwargs)}")
        chain, experts = wrapper_chain(self)
        if any(w.disable_adapters for w in chain):
            return Fallback("adapters disabled")
        if any(w.merged for w in chain):
            return Fallback("adapters merged")
        if not is_experts_module(experts):
            return Fallback("not a transformers experts module", type(experts).__name__)
        if parametrize.is_parametrized(experts):
            return Fallback("experts weight parametrized by an outer PEFT layer")
        if experts._is_expert_parallel:
            return Fallback("expert-parallel experts module")
        implementation = getattr(experts.config, "_experts_implementation", None)
        if implementation not in SUPPORTED_IMPLEMENTATIONS:
            return Fallback("experts implementation not reproduced by lorafast", repr(implementation))
        if has_global_hooks() or any(has_hooks(m) for m in (*chain[1:], experts)):
            return Fallback("module hooks or a replaced forward")
        if not x.is_floating_point():
            return Fallback("input is not floating point", str(x.dtype))
        lora = {}
        for wrapper in chain:
            name = wrapper.parameter_name
            if name not in PROJECTION_NAMES:
                return Fallback("targeted parameter is not an expert projection weight", name)
            adapter = _adapter(wrapper, experts.num_experts)
            if isinstance(adapter, Fallback):
                return adapter
            if adapter is not None:
                lora[name] = adapter
        return experts, lora


# PEFT recognises ParamWrappers by class *name* (tuners_utils: finding the wrapper an added adapter joins, and the
# check that a wrapped module is not another tuner layer), to avoid an import cycle: with its own name, add_adapter /
# load_adapter on a patched model would refuse. __qualname__ (type repr, pickling) stays FusedParamWrapper.
FusedParamWrapper.__name__ = ParamWrapper.__name__
FUSED_CLASSES = {ParamWrapper: FusedParamWrapper}


def set_expert_dropout(model: nn.Module, p: float) -> int:
    """Dropout with probability ``p`` on the LoRA input of every fused expert projection of ``model`` (in
    training mode), a lorafast extension: PEFT's ParamWrapper rejects ``lora_dropout``.

    Each projection draws its own mask over its (token slot, feature) inputs — a token routed to k experts is
    dropped independently in each, as a per-expert ``nn.Dropout`` would — regenerated from a seed in backward,
    never stored. With several adapters active on one weight they share the mask. The setting is a plain
    attribute of the patched layers (not saved; adapter files keep ``lora_dropout=0`` and load in vanilla PEFT):
    call this after :func:`lorafast.patch` (again after patching new layers). ``p = 0`` turns it off.

    Returns:
        The number of layers set.
    """
    p = float(p)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"set_expert_dropout: p must be in [0, 1), got {p}")
    count = 0
    for module in model.modules():
        if isinstance(module, FusedParamWrapper):
            module.__dict__[DROPOUT_ATTR] = p
            count += 1
    if count == 0:
        raise ValueError("set_expert_dropout: no patched expert layer in the model (call lorafast.patch first)")
    return count
