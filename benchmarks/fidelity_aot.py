"""Compile-gate entries for the adapter-precision estimate (issue 9): every bf16 kernel at rank block 16,
as it runs with fp32 adapters in "compute" precision (adapter tiles cast to bf16, the shipped default) and in
"fp32" precision with IEEE and with TF32 dots (what PEFT's fp32 matmul runs without / with allow_tf32).

    python -m lorafast.aot --arch 90 --entries benchmarks/fidelity_aot.py:entries --json fidelity_aot.json

Compare the rows of one kernel: instruction count, registers, spills, and whether the rank-r dot still uses
tensor cores (HGMMA/HMMA count; the base GEMMs' own dots keep theirs). No GPU needed; the numbers are
static (SASS), not timings. ``LORAFAST_FIDELITY_AOT_ALL_CONFIGS=1`` compiles every autotune config
instead of the first of each family.
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Union

from lorafast.kernels import registry
from lorafast.kernels.configs import SKINNY, gpu_configs

VARIANTS = {
    "compute": {"LORA_FP32": False},
    "fp32-ieee": {"LORA_FP32": True, "LORA_PRECISION": "ieee"},
    "fp32-tf32": {"LORA_FP32": True, "LORA_PRECISION": "tf32"},
}


def entries(arch: Union[int, str], block_r: int = 16) -> List[object]:
    """The registry's bf16 entries (fp32 adapters) in each adapter-precision variant, with the config table
    the launchers pick (skinny passes with an IEEE rank-r dot take the fp32 table: dtypes.skinny_fp32_tiles)."""
    all_configs = os.environ.get("LORAFAST_FIDELITY_AOT_ALL_CONFIGS", "0") == "1"
    out = []
    for entry in registry._entries(arch, "bf16", block_r):
        for variant, constexprs in VARIANTS.items():
            # IEEE skinny passes have no 16-bit dot left: no tensor-core instruction is expected there.
            skinny_ieee = variant == "fp32-ieee" and entry.min_waves > 0
            configs = gpu_configs(SKINNY, arch, fp32=True) if skinny_ieee else entry.configs
            out.append(dataclasses.replace(
                entry, name=f"{entry.name}<{variant}>", constexprs={**entry.constexprs, **constexprs},
                configs=configs if all_configs else configs[:1],
                uses_dot=entry.uses_dot and not skinny_ieee,
            ))
    return out
