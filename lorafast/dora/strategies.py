"""The DoRA strategies by name: ``aten`` (:mod:`lorafast.dora.aten`), ``fused`` and ``cublas`` (Triton,
:mod:`lorafast.dora.fused`, :mod:`lorafast.dora.cublas`), imported on first use.

Every strategy module has the same three functions and one contract (see :mod:`lorafast.dora.aten` for the
math; saved for backward: x, H (M×r fp32), Zb (M×N, x's dtype), g and 1/‖·‖ (N, fp32) and the seed; the
dropout mask regenerated from the seed, the same bits as the plain LoRA op's on each device):

    norm(weight, lora_a, lora_b, magnitude, scaling, row_sq) -> (g, inv_norm, row_sq)
    forward(x, weight, bias, lora_a, lora_b, g, scaling, seed, dropout_p) -> (y, h, zb)
    backward(grad_y, x, weight, lora_a, lora_b, h, zb, g, inv_norm, scaling, seed, dropout_p,
             need_dx, need_da, need_db_lora, need_dbias, need_dm) -> (dx, da, db_lora, dbias, dm)

``row_sq`` is the frozen ‖W‖² (N,) when cached, else None: the aten strategy's factored norm needs it and returns
it for the cache; the Triton norm (:mod:`lorafast.kernels.dora_norm`) sums (W + s·B·A)² tile by tile, needs none
and returns ``row_sq`` as given. The names and aliases are the plain op's (:mod:`lorafast.strategies`).
"""

from __future__ import annotations

from lorafast.strategies import module_getter

# get(name): the DoRA module of strategy ``name`` (a STRATEGIES entry or an alias).
get = module_getter("lorafast.dora")
