"""Strategies of the grouped (MoE experts) op: ``aten``, ``fused``, ``cublas`` — the same names, aliases and
fallback rules as the dense op's (:mod:`lorafast.strategies`), one contract:

    forward(x, weight, transposed, bias, offsets, lora_a, lora_b, scaling, seed, dropout_p) -> (y, h)
    backward(grad_y, x, weight, transposed, offsets, lora_a, lora_b, h, scaling, seed, dropout_p,
             need_dx, need_da, need_db_lora, need_dbias) -> (dx, da, db_lora, dbias)

x (S, K) rows sorted by expert, weight (E, N, K) (``transposed``: (E, K, N)) in x's dtype, bias (E, N) or None,
offsets (E,) int cumulative row counts, lora_a (E·r, K), lora_b (N, r·E) in PEFT's ParamWrapper layouts;
saved for backward: x, H (S×r, fp32 — fp64 for fp64 x) and the seed; the mask regenerated, never stored (the
kernels' hash on CUDA in every strategy, so the choice never changes which inputs are dropped); dA, dB come back
in lora_A's / lora_B's layouts, db as (E, N), all in the accumulation dtype.

- ``fused``: Triton grouped GEMMs over an (expert, row-tile) schedule with the LoRA work in their epilogues.
- ``cublas``: torch's grouped GEMM for the base products, Triton kernels for the LoRA side work.
- ``aten``: torch ops (CPU default; GPU-safe fallback).
"""

from __future__ import annotations

from lorafast.strategies import module_getter

# get(name): the MoE module of strategy ``name`` (a STRATEGIES entry or an alias).
get = module_getter("lorafast.moe.strategies")
