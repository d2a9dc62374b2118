"""transformers' experts forward with each LoRA-targeted projection through the grouped op.

transformers 5 runs a MoE block's experts (``@use_experts_implementation`` classes: Qwen3-MoE, Mixtral, OLMoE,
DeepSeek-V3, gpt-oss, ...) through its experts interface: the router and top-k are the block's; the experts
module gets ``(hidden_states (T, H), top_k_index (T, k), top_k_weights (T, k))``. :func:`experts_forward` is the
interface's ``grouped_mm`` forward step for step — sort the T·k token slots by expert, gather, the up (``gate_up_proj``
or ``up_proj``) projection, the module's own ``_apply_gate`` (or ``act_fn``), the ``down_proj`` projection, the
optional post-expert norm, routing weights, restore order, sum over k — where a projection with an adapter runs
:func:`lorafast.moe.grouped_lora_linear` on the raw expert weight instead of a grouped GEMM on W + s·ΔW, and a
projection without one runs the interface's own grouped linear. The ``eager`` and ``batched_mm`` implementations
compute the same products (transformers treats the three as interchangeable); their summation order differs.
"""

from __future__ import annotations

from typing import Dict, NamedTuple, Optional, Union

import torch

from lorafast.moe.functional import grouped_lora_linear

# The expert weights the interface's forward reads (by has_gate): up/gate-up first, then down.
UP_NAMES = ("gate_up_proj", "up_proj")
DOWN_NAME = "down_proj"
PROJECTION_NAMES = (*UP_NAMES, DOWN_NAME)


class ExpertLora(NamedTuple):
    """The adapter of one expert weight: lora_a (E·r, K) and lora_b (N, r·E) in PEFT's ParamWrapper layouts,
    the scaling s (float or 0-dim tensor) and the dropout p in effect (0 outside training)."""

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: Union[float, torch.Tensor]
    dropout_p: float = 0.0


def is_experts_module(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a transformers experts-interface module (``@use_experts_implementation``) with the
    attributes :func:`experts_forward` reads."""
    needed = ("has_gate", "has_bias", "is_transposed", "num_experts", "_apply_gate", "config")
    return all(hasattr(module, name) for name in needed) and hasattr(module, DOWN_NAME)


def _grouped_linear_frozen():
    from transformers.integrations.moe import _grouped_linear

    return _grouped_linear


def _project(experts, name: str, x: torch.Tensor, offsets: torch.Tensor, expert_ids: torch.Tensor,
             lora: Optional[ExpertLora], backend: str) -> torch.Tensor:
    weight = getattr(experts, name)
    bias = getattr(experts, name + "_bias") if experts.has_bias else None
    if lora is None:  # the interface's own grouped linear (and its torch.compile fallback op)
        return _grouped_linear_frozen()(x, weight, offsets, bias=None if bias is None else bias[expert_ids],
                                        is_transposed=experts.is_transposed)
    return grouped_lora_linear(
        x.to(weight.dtype), weight, bias, offsets, lora.lora_a, lora.lora_b, lora.scaling, lora.dropout_p,
        training=lora.dropout_p > 0.0, backend=backend, transposed=bool(experts.is_transposed),
    )


def experts_forward(
    experts: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    lora: Dict[str, ExpertLora],
    backend: str = "auto",
) -> torch.Tensor:
    """The experts module's output with LoRA on the projections named in ``lora``.

    Args:
        experts: a transformers experts-interface module (see :func:`is_experts_module`), its weights plain
            parameters (no parametrization active), not expert-parallel.
        hidden_states: (T, H); top_k_index: (T, k) int expert ids; top_k_weights: (T, k) routing weights.
        lora: expert weight name (``gate_up_proj`` / ``up_proj`` / ``down_proj``) → its :class:`ExpertLora`.
        backend: the grouped op's strategy (see :func:`lorafast.moe.grouped_lora_linear`).

    Returns:
        (T, H) in hidden_states' dtype.
    """
    if experts._is_expert_parallel:
        raise ValueError("lorafast experts_forward: expert-parallel experts modules are not supported")
    device = hidden_states.device
    num_top_k = top_k_index.size(-1)
    num_tokens, hidden_dim = hidden_states.shape
    num_experts = experts.num_experts
    sample_weights = top_k_weights.reshape(-1)
    expert_ids = top_k_index.reshape(-1)
    expert_ids_g, perm = torch.sort(expert_ids)
    selected = hidden_states[perm // num_top_k]
    sample_weights_g = sample_weights[perm]
    # histc, as the interface does (bincount breaks CUDA graphs; histc has no integer CPU kernel).
    histc_input = expert_ids_g.float() if device.type in ("cpu", "mps") else expert_ids_g.int()
    tokens_per_expert = torch.histc(histc_input, bins=num_experts, min=0, max=num_experts - 1)
    offsets = torch.cumsum(tokens_per_expert, dim=0, dtype=torch.int32)

    up_name = UP_NAMES[0] if experts.has_gate else UP_NAMES[1]
    proj = _project(experts, up_name, selected, offsets, expert_ids_g, lora.get(up_name), backend)
    proj = experts._apply_gate(proj) if experts.has_gate else experts.act_fn(proj)
    proj = _project(experts, DOWN_NAME, proj, offsets, expert_ids_g, lora.get(DOWN_NAME), backend)
    if experts.has_post_expert_norm:
        proj = experts.post_expert_norm(proj)
    weighted = proj * sample_weights_g.unsqueeze(-1)
    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = torch.arange(perm.size(0), device=device)
    weighted = weighted[inv_perm]
    return weighted.view(num_tokens, num_top_k, hidden_dim).sum(dim=1).to(hidden_states.dtype)
