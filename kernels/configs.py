"""Launch configurations per GPU architecture, the autotune wrapper, the device guard and work splits.

Block sizes are starting points chosen from the usual Triton GEMM tables (tutorial 03) and checked
for spills / shared memory by the AOT gate (`python -m lorafast.aot`); they are not yet tuned on a
GPU (unmeasured). Under the interpreter (TRITON_INTERPRET=1) one small config runs, because the
interpreter cannot autotune over several.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import triton

# Kernel families; each has its own config table because the tiles play different roles.
GEMM = "gemm"          # Y = X·Wᵀ + LoRA epilogue: BLOCK_M × BLOCK_N output tile, BLOCK_K reduction step
DX = "dx"              # dX = dY·W + LoRA epilogue: same roles (BLOCK_N tiles dX's K columns, BLOCK_K steps over N)
SKINNY = "skinny"      # rank-r passes: shrink (M×K → M×r), dH/dB (M×N → M×r, N×r), dA (M×K → r×K)
EPILOGUE = "epilogue"  # in-place rank-r updates after a cuBLAS GEMM: Y += s·H·Bᵀ, dX += keep⊙(dH·A)/(1−p)
TWO_ACC = "two_acc"    # DoRA's GEMMs with dropout (kernels/dora_*.py): GEMM/DX roles, two BLOCK_M×BLOCK_N accumulators
DORA_SKINNY = "dora_skinny"  # DoRA's dH/dB/db/dm pass: SKINNY roles, more live operands (g⊙B, dYᵀ·H, Zb)
DORA_GEMM = "dora_gemm"  # DoRA's forward GEMM without dropout: GEMM roles, a g-scaled epilogue that also stores Zb
DORA_DX = "dora_dx"    # DoRA's dX GEMM without dropout: DX roles, g-scaled dY
MOE_SKINNY = "moe_skinny"  # MoE shrink and dA passes (kernels/moe_*.py): roles as SKINNY
MOE_DH = "moe_dh"          # MoE dH/dB/db pass (kernels/moe_bwd.py): roles as SKINNY
MOE_GEMM = "moe_gemm"      # MoE grouped GEMM with the LoRA epilogue (kernels/moe_fwd.py): roles as GEMM
MOE_DX = "moe_dx"          # MoE grouped dX GEMM with the dropout epilogue (kernels/moe_bwd.py): roles as DX


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages[, largest rank block]); GROUP_M = 8 for the GEMMs (L2 reuse of
# W). A sixth value limits a row to rank blocks up to it: the AOT gate (triton 3.9, every rank block 16–128)
# found those rows spilling above it, because the rank-r operands and accumulators (BLOCK_M × BLOCK_R fp32,
# and dB's BLOCK_N × BLOCK_R in the dH pass) grow with the rank block. Every row passes the gate (no spills,
# shared memory within the limit) at the rank blocks it is used for. Not yet timed on a GPU.
# Triton 3.6 (the oldest supported) spilled 8 B in the sm_80 128×128×32 rows above rank blocks 16 (GEMM) and 32 (dX),
# and 16 B in the fp32 skinny 16×32×16 row at rank block 128 (gate, 2026-12-03): capped there; 16×16×16 covers 128.
_TABLES = {
    GEMM: {
        # 128×256×64 at 3 stages is back for the forward: it only failed shared memory in the dX kernel,
        # whose block roles were swapped until dX got its own table.
        90: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3, 64), (64, 128, 64, 4, 4, 64), (128, 64, 64, 8, 4)],
        80: [(128, 128, 32, 8, 4, 16), (64, 128, 32, 4, 4, 64), (128, 64, 32, 4, 4, 64), (64, 128, 32, 8, 3)],
    },
    DX: {
        # 128×256×64 (8 warps, 2 stages) spilled 528 B on sm_90 with the dropout epilogue (AOT gate, r = 16):
        # replaced by 128×128×64 at 4 stages.
        90: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4)],
        80: [(128, 128, 32, 8, 4, 32), (64, 128, 32, 4, 4, 32), (128, 64, 32, 4, 4, 64), (64, 128, 32, 8, 3)],
    },
    # Skinny passes stream one big operand; BLOCK_N names the streamed dimension's tile (dH over N),
    # BLOCK_K the shrink's and dA's column tile. Every row keeps BLOCK_M·BLOCK_N and BLOCK_M·BLOCK_K ≤ 4096
    # so the split grid reaches 2 waves on 132 SMs at BERT-base (M = 2048, K = N = 768: 384 tiles); the AOT
    # gate's grid check found 64×128 and 128×64 tiles at 192 CTAs there (1.45 waves). Not timed on a GPU.
    SKINNY: {
        90: [(64, 64, 64, 4, 4, 64), (128, 32, 32, 4, 4, 32), (32, 128, 128, 4, 3, 32), (64, 64, 64, 8, 3)],
        80: [(64, 64, 64, 4, 4, 64), (128, 32, 32, 4, 4, 32), (32, 128, 64, 4, 3, 32), (64, 64, 64, 8, 3)],
    },
    # MoE (rank ≤ 64 on Triton; AOT gate, triton 3.9). Shrink and dA: the SKINNY rows, 64×64×64 w4 only up to rank
    # block 32 (it spilled 8 B at 64 on sm_80 in the MoE shrink, which also finds its expert per program).
    MOE_SKINNY: {
        90: [(64, 64, 64, 4, 4, 32), (128, 32, 32, 4, 4, 32), (32, 128, 128, 4, 3, 32), (64, 64, 64, 8, 3)],
        80: [(64, 64, 64, 4, 4, 32), (128, 32, 32, 4, 4, 32), (32, 128, 64, 4, 3, 32), (64, 64, 64, 8, 3)],
    },
    # dH/dB/db: PEFT's rank-major lora_B gives B_e a rank stride of E (a runtime value), so the B tile and dB's
    # atomics take one address per element and the SKINNY rows spilled (64×64×64 w4 at r = 64, 32×128×128 at
    # r = 32); 8 warps halve the per-thread addresses. Not timed on a GPU.
    MOE_DH: {
        90: [(64, 64, 64, 8, 3, 64), (64, 32, 64, 8, 3), (128, 32, 64, 8, 3, 64), (128, 32, 32, 4, 4, 32)],
        80: [(64, 64, 64, 8, 3, 64), (64, 32, 64, 8, 3), (128, 32, 64, 8, 3, 64), (128, 32, 32, 4, 4, 32)],
    },
    # The GEMM rows, but 128×256×64 (which spilled 160 B at rank block 64 on sm_90 in the grouped GEMM) up to 32;
    # on sm_80 128×128 w8 and 64×128 w4 up to 32 too (Triton 3.6 spilled 16 and 40 B at rank block 64, 2026-12-04).
    MOE_GEMM: {
        90: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3, 32), (64, 128, 64, 4, 4, 64), (128, 64, 64, 8, 4)],
        80: [(128, 128, 32, 8, 4, 32), (64, 128, 32, 4, 4, 32), (128, 64, 32, 4, 4, 64), (64, 128, 32, 8, 3)],
    },
    # DX's rows, but sm_80's 128×64 w4 up to rank block 32 (Triton 3.6 spilled 8 B at 64 in the grouped dX).
    MOE_DX: {
        90: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4)],
        80: [(128, 128, 32, 8, 4, 32), (64, 128, 32, 4, 4, 32), (128, 64, 32, 4, 4, 32), (64, 128, 32, 8, 3)],
    },
    # Elementwise-sized tiles with one small dot; BLOCK_K is unused.
    EPILOGUE: {
        90: [(64, 128, 16, 4, 2), (128, 128, 16, 8, 2), (64, 64, 16, 4, 2)],
        80: [(64, 128, 16, 4, 2, 64), (128, 64, 16, 8, 2), (64, 64, 16, 4, 2)],
    },
    # Two fp32 accumulators per tile: the GEMM table's 128×128 (and wider) tiles spilled on sm_90 (AOT gate,
    # dora_gemm r = 16: 40 B at 128×128×64 w8, 1,512 B at 128×256), so half-size tiles. 64×128 w4 spilled
    # 32-464 B at rank block 128 (dX and forward); 64×128 w8 s3 put 34-35 hash instructions per mask element into
    # the forward (16 mask elements per thread and step carry the row/column keys). Not timed on a GPU.
    # Triton 3.6 (gate, 2026-12-04) failed 64×128 at rank block 16 in the dropout forward, on sm_90 (8 B spilled)
    # and on sm_80 (37.8 hash instructions per mask element): dropped from both.
    TWO_ACC: {
        90: [(128, 64, 64, 8, 4), (64, 64, 64, 4, 4)],
        # At rank block 128 the first three spilled 40-952 B on sm_80 (and 64×128 put 49 hash instructions per mask
        # element in the forward); 64×32 at 3 stages passed (32×64 too, but with 32.6 at rank block 16).
        80: [(128, 64, 32, 4, 4, 64), (64, 64, 32, 4, 4, 64), (128, 64, 32, 8, 3, 64), (64, 32, 32, 4, 3)],
    },
    # GEMM's rows without 128×256 (the DoRA epilogue spilled 512 B there on sm_90, AOT gate, rank block 16).
    DORA_GEMM: {
        90: [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4, 64), (128, 64, 64, 8, 4)],
        80: [(128, 128, 32, 8, 4, 64), (64, 128, 32, 4, 4, 64), (128, 64, 32, 4, 4, 64), (64, 128, 32, 8, 3)],
    },
    # DX's rows without sm_80's 128×128×32 w8, which spilled 8 B at rank block 16 in the W-transposed (Conv1D) DoRA
    # dX with Triton 3.6 (gate, 2026-12-04).
    DORA_DX: {
        90: [(128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4)],
        80: [(64, 128, 32, 4, 4, 32), (128, 64, 32, 4, 4, 64), (64, 128, 32, 8, 3)],
    },
    # SKINNY's rows, but 64×64×64 w8 s3 spilled 40 B at rank block 128 on sm_80 in the DoRA pass (it holds g⊙B,
    # the dYᵀ·H tile and Zb besides the plain pass's operands): there 64×32×64 w8 s3 (gate: 248 registers, 0 B).
    DORA_SKINNY: {
        90: [(64, 64, 64, 4, 4, 64), (128, 32, 32, 4, 4, 32), (32, 128, 128, 4, 3, 32), (64, 64, 64, 8, 3)],
        80: [(64, 64, 64, 4, 4, 64), (128, 32, 32, 4, 4, 32), (32, 128, 64, 4, 3, 32), (64, 64, 64, 8, 3, 64),
             (64, 32, 64, 8, 3)],
    },
}
# fp32 operands are twice as wide and IEEE dots run on FMA units, so fp32 gets small tiles (64×128 and 64×64
# tiles spilled 288–8,568 B in the dH/dB and dA passes). fp32 is a correctness path for the fused GEMMs; on
# CUDA the dispatcher runs fp32 on cuBLAS (`cublas`/`aten`) by default. The 16-row tiles are for rank block 128,
# where every 32-row tile spilled on sm_80 or sm_90.
_FP32_TABLE = {
    GEMM: [(32, 64, 32, 8, 2, 64), (32, 32, 32, 4, 2, 64), (16, 32, 32, 4, 2)],
    DX: [(32, 64, 32, 8, 2, 64), (32, 32, 32, 4, 2, 64), (16, 32, 32, 4, 2)],
    SKINNY: [(32, 64, 32, 8, 2, 64), (32, 32, 32, 4, 2, 16), (16, 32, 16, 4, 2, 64), (16, 16, 16, 4, 2)],
    EPILOGUE: [(32, 64, 16, 4, 2, 16), (32, 32, 16, 4, 2, 64), (16, 32, 16, 4, 2)],
    # 32×32 w4 spilled 8 B at rank block 16 in the W-transposed dropout forward on sm_80 with Triton 3.6.
    TWO_ACC: [(32, 64, 32, 8, 2, 64), (16, 32, 32, 4, 2)],
    DORA_DX: [(32, 64, 32, 8, 2, 64), (32, 32, 32, 4, 2, 64), (16, 32, 32, 4, 2)],
    DORA_GEMM: [(32, 64, 32, 8, 2, 64), (32, 32, 32, 4, 2, 64), (16, 32, 32, 4, 2)],
    # fp32 DoRA dH/dB/dm pass: 32×64 spilled 16-136 B at rank block 16 (sm_80/sm_90), and every tile down to
    # 16×16×16 spilled at rank block 128, so above rank block 64 fp32 DoRA runs `aten` on NVIDIA
    # (lorafast.dora.functional.triton_dora_fallback).
    DORA_SKINNY: [(32, 32, 32, 4, 2, 64)],
    # 32×64 w8 spilled 8 B at rank block 64 in the MoE shrink on sm_80 with Triton 3.6.
    MOE_SKINNY: [(32, 64, 32, 8, 2, 32), (32, 32, 32, 4, 2, 16), (16, 32, 16, 4, 2)],
    MOE_DH: [(32, 64, 32, 8, 2, 64), (32, 32, 32, 4, 2, 16), (16, 32, 16, 8, 2)],
    MOE_GEMM: [(32, 64, 32, 8, 2, 64), (32, 32, 32, 4, 2, 64), (16, 32, 32, 4, 2)],
    MOE_DX: [(32, 64, 32, 8, 2, 64), (32, 32, 32, 4, 2, 64), (16, 32, 32, 4, 2)],
}
# AMD CDNA3 (MI300, gfx942; warp = 64-lane wavefront): 64 KiB of LDS per workgroup, so the NVIDIA
# tables' deep pipelines do not fit; Triton's AMD stream pipeliner runs num_stages = 2. Rows from the
# AOT gate (`--arch gfx942`: no scratch spills, LDS within 64 KiB, MFMA present); not timed on a GPU.
_AMD_TABLES = {
    GEMM: [(128, 128, 64, 8, 2), (64, 128, 64, 4, 2), (128, 64, 64, 4, 2)],
    DX: [(128, 128, 64, 8, 2, 64), (64, 128, 64, 4, 2), (128, 64, 64, 4, 2)],
    SKINNY: [(64, 64, 64, 4, 2), (128, 32, 32, 4, 2, 32), (32, 128, 128, 4, 2, 32)],
    EPILOGUE: [(64, 128, 16, 4, 2), (128, 64, 16, 8, 2, 32), (64, 64, 16, 4, 2, 32)],
    TWO_ACC: [(128, 64, 64, 4, 2), (64, 128, 64, 4, 2), (64, 64, 64, 4, 2)],
    # 64×64×64 w4 spilled 36 B at rank block 128 with Triton 3.6 (gate, 2026-12-04); there 32×32×64 w4, the one
    # clean on 3.6 and 3.9 (64×64 w8 spilled 712 B on 3.6; 32×64 and 64×32 w4 72 and 184 B on 3.9).
    DORA_SKINNY: [(64, 64, 64, 4, 2, 64), (128, 32, 32, 4, 2, 32), (32, 128, 128, 4, 2, 32), (32, 32, 64, 4, 2)],
    DORA_DX: [(128, 128, 64, 8, 2, 64), (64, 128, 64, 4, 2), (128, 64, 64, 4, 2)],
    # 128×64 w4 spilled 24 B at rank block 128 in the DoRA forward (gfx942 gate).
    DORA_GEMM: [(128, 128, 64, 8, 2), (64, 128, 64, 4, 2), (128, 64, 64, 4, 2, 64)],
    # 4 warps for the shrink (8-warp rows cost 60.4 instructions per mask element there), 8 for dH (spills).
    MOE_SKINNY: [(64, 64, 64, 4, 2), (128, 32, 32, 4, 2, 32), (32, 128, 128, 4, 2, 32)],
    MOE_DH: [(64, 64, 64, 8, 2), (64, 32, 64, 8, 2, 32), (128, 32, 32, 4, 2, 32)],
    MOE_GEMM: [(128, 128, 64, 8, 2), (64, 128, 64, 4, 2), (128, 64, 64, 4, 2)],
    MOE_DX: [(128, 128, 64, 8, 2, 64), (64, 128, 64, 4, 2), (128, 64, 64, 4, 2)],
}
_AMD_FP32_TABLE = {
    GEMM: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    DX: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    SKINNY: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    EPILOGUE: [(32, 64, 16, 4, 2), (32, 32, 16, 4, 2)],
    TWO_ACC: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    DORA_SKINNY: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    DORA_GEMM: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    DORA_DX: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    MOE_SKINNY: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    # 32×64 spilled 116 B at rank block 64 in the MoE dH pass with Triton 3.6 (gate, 2026-12-04).
    MOE_DH: [(32, 64, 32, 4, 2, 32), (32, 32, 32, 4, 2)],
    MOE_GEMM: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
    MOE_DX: [(32, 64, 32, 4, 2), (32, 32, 32, 4, 2)],
}
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}


def configs(kind: str, arch: Union[int, str], fp32: bool = False, block_r: int = 16) -> List[triton.Config]:
    """Configs to run with: the GPU autotune list, or the interpreter's single config."""
    if interpreting():
        return [triton.Config(dict(_INTERPRETER_CONFIG), num_warps=4, num_stages=1)]
    return gpu_configs(kind, arch, fp32, block_r)


def gpu_configs(kind: str, arch: Union[int, str], fp32: bool = False, block_r: int = 16) -> List[triton.Config]:
    """Autotune candidates for a kernel family on compute capability ``arch`` (80, 90, ...) or an AMD
    target (``"gfx942"``, what `device_arch` returns on ROCm) at rank block ``block_r``; ``fp32``: the
    operands are fp32 (the smaller-tile table)."""
    if isinstance(arch, str):
        rows = (_AMD_FP32_TABLE if fp32 else _AMD_TABLES)[kind]
    elif fp32:
        rows = _FP32_TABLE[kind]
    else:
        table = _TABLES[kind]
        rows = table[90] if arch >= 90 else table[80]
    return [_cfg(row[3], row[4], BLOCK_M=row[0], BLOCK_N=row[1], BLOCK_K=row[2])
            for row in rows if len(row) < 6 or block_r <= row[5]]


@functools.cache
def _arch_of(index: int) -> Union[int, str]:
    import torch

    if torch.version.hip:
        # ROCm reports a CUDA-like capability (9, 4) for MI300: use the gfx target name instead.
        return torch.cuda.get_device_properties(index).gcnArchName.split(":")[0]
    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def device_arch(device) -> Union[int, str]:
    """Compute capability as an int (90 for H100), the gfx target on ROCm ("gfx942"); 80 under the interpreter."""
    if interpreting():
        return 80
    return _arch_of(_index(device))


@functools.cache
def _sm_count(index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(index).multi_processor_count


# The interpreter has no SMs; a small count makes the split paths (atomics into zeroed outputs) run in tests.
INTERPRETER_SMS = 2


def num_sms(device) -> int:
    """Streaming multiprocessors of ``device`` (132 on an H100 SXM); INTERPRETER_SMS under the interpreter."""
    if interpreting():
        return INTERPRETER_SMS
    return _sm_count(_index(device))


def _index(device) -> int:
    import torch

    index = device.index if device.index is not None else None
    return torch.cuda.current_device() if index is None else index


def device_guard(device):
    """Context that makes ``device`` current for a launch: Triton launches on the *current* CUDA device
    and stream, not on the tensors' device, so a model on cuda:1 without ``set_device(1)`` would run its
    kernels on cuda:0 (reading cuda:1 memory unordered). A no-op on CPU and when already current."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    import torch

    if device.index is None or device.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def split_for(outer_tiles: int, inner_tiles: int, device) -> int:
    """How many programs share one output tile along a streamed dimension (split-K / split-N / split-M),
    so that the grid has at least two programs per SM (the skinny passes otherwise launch one program
    per row block: 32 CTAs at M=2048 on a 132-SM H100). 1 under ``torch.use_deterministic_algorithms``:
    a split sums partial results with fp32 atomics in a run-dependent order."""
    import torch

    if torch.are_deterministic_algorithms_enabled():
        return 1
    want = triton.cdiv(2 * num_sms(device), max(outer_tiles, 1))
    return max(1, min(want, inner_tiles))


# Triton >= 3.2 can keep autotune results in its on-disk cache, so a new process does not re-time
# every shape with device syncs (issue: autotune results were not persisted).
_AUTOTUNE_KWARGS = (
    {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
)


@functools.cache
def _autotuned(fn, kind: str, arch: Union[int, str], fp32: bool, key: Sequence[str], reset_to_zero: Sequence[str],
               restore: Sequence[str], block_r: int = 16):
    return triton.autotune(
        configs=configs(kind, arch, fp32, block_r), key=list(key), reset_to_zero=list(reset_to_zero) or None,
        restore_value=list(restore) or None, **_AUTOTUNE_KWARGS,
    )(fn)


def launch(
    fn,
    kind: str,
    device,
    grid: Callable[[Dict], tuple],
    args: Sequence,
    key: Sequence[str] = ("M_BUCKET", "N", "K"),
    reset_to_zero: Sequence[str] = (),
    *,
    restore: Sequence[str] = (),
    fp32: bool = False,
    **constexprs,
) -> None:
    """Launch ``fn`` on ``device`` with the arch's autotuned config (or the interpreter's single config).

    Every Triton launch of the package goes through here (the bench stubs it to count launches).
    ``key``: the runtime arguments the autotuner keys on; the rank block (``BLOCK_R``) is always added,
    so a config tuned at r ≤ 16 is not reused at r = 128. ``reset_to_zero``: outputs the kernel
    accumulates into with atomics (zeroed again before each autotune trial). ``restore``: tensors the
    kernel updates in place (copied before tuning and restored after each trial, so the update lands
    once). ``fp32``: the dot operands are fp32 (selects the fp32 config table). After the autotuner has
    chosen a config for a key, later launches with that key go through the cached compiled handle (below).
    """
    if interpreting():
        cfg = configs(kind, 80)[0]
        fn[lambda meta: grid({**meta, **cfg.kwargs})](
            *args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
        return
    full_key = (*key, "BLOCK_R") if "BLOCK_R" in constexprs else tuple(key)
    kernel = _autotuned(fn, kind, device_arch(device), fp32, full_key, tuple(reset_to_zero), tuple(restore),
                        constexprs.get("BLOCK_R", 16))
    with device_guard(device):
        handles = _handles_for(kernel, full_key) if FAST_LAUNCH else None
        if handles is None:
            kernel[grid](*args, **constexprs)
        else:
            handles.launch(device, grid, args, constexprs)


# ---- cached compiled handles (issue 10) --------------------------------------------------------------
# A launch through triton.autotune + the JIT's argument binding costs ~16–19 µs of Python per call on a GPU
# host; a compiled kernel's own launcher ~2–4 µs (KERNELS.md; not measured here). Once the autotuner has
# chosen a config for a key, later launches with the same key and argument specialisation go straight to
# that compiled kernel: ``compiled[(g0, g1, g2)](*launch_args)``, the call JITFunction.run makes. Read against
# the source of triton 3.0–3.9 (CompiledKernel.__getitem__, JITFunction.run, Autotuner.run):
# - the argument list is what the compiled kernel's launcher was generated from, ``compiled.src.signature``:
#   every parameter in order, constexprs included, on triton >= 3.3 (JITFunction.run passes
#   ``*bound_args.values()``); the non-constexpr parameters only on 3.0–3.2 (``*non_constexpr_vals``);
# - the grid is a 3-tuple (the JIT pads it with 1s); the grid function gets every argument by name plus the
#   config's values, as the JIT's ``grid(bound_args)`` does;
# - ``Autotuner.run`` returns what ``JITFunction.run`` returns (the compiled kernel, or on 3.5+ possibly a future
#   of it) and sets ``best_config``;
# - specialisation: ints on ==1 / %16 / width, pointers on 16-byte alignment (all versions) and, on ROCm
#   (triton >= 3.2, buffer ops), on whether the tensor's storage fits in 2 GiB: the key covers all of these.
# tests/test_launch_compat.py runs the real JITFunction/Autotuner/CompiledKernel of the installed triton with
# a recording driver and checks that a handle passes the launcher what the JIT passes. Any exception at a
# handle's use turns the cache off for that kernel with one warning, and the autotuner path runs instead.
# LORAFAST_FAST_LAUNCH=0 turns it off.
FAST_LAUNCH = os.environ.get("LORAFAST_FAST_LAUNCH", "1") != "0"


class _Uncacheable(Exception):
    pass


def _arg_signature(arg) -> object:
    """What the JIT specialises on for one argument (a superset: a finer key only costs a cache miss)."""
    kind = type(arg)
    if kind is bool or arg is None or kind is float:
        return kind
    if kind is int:
        return int, arg == 1, arg % 16 == 0, -(2**31) <= arg < 2**31, arg < 2**63
    if hasattr(arg, "data_ptr") and hasattr(arg, "dtype"):
        return arg.dtype, arg.data_ptr() % 16 == 0
    raise _Uncacheable(kind)


_INT32_MAX = 2**31 - 1


def _arg_signature_rocm(arg) -> object:
    """`_arg_signature` plus what Triton's AMD backend specialises a tensor on: storage within 2 GiB (buffer ops
    with 32-bit offsets, ``HIPBackend.is_within_2gb``). A handle compiled for a small tensor must not run a large
    one."""
    signature = _arg_signature(arg)
    storage = getattr(arg, "untyped_storage", None)
    return signature if storage is None else (signature, storage().nbytes() <= _INT32_MAX)


def _launch_parameters(compiled, names: Sequence[str]) -> Optional[frozenset]:
    """The parameter names the compiled kernel's launcher takes, or None for all of them (triton >= 3.3).

    The launcher is generated from ``compiled.src.signature``: all parameters on triton >= 3.3, the runtime
    (non-constexpr) ones on 3.0–3.2. Without a readable signature, assume the newer form (a wrong guess fails at
    the first launch, which falls back to the autotuner with a warning)."""
    signature = getattr(getattr(compiled, "src", None), "signature", None)
    if not isinstance(signature, dict) or not all(isinstance(k, str) for k in signature):
        return None
    passed = frozenset(signature)
    return None if passed.issuperset(names) else passed


class _Handle:
    """The compiled kernel of the chosen config, with the tail of its argument list (the parameters after the
    launch's positional arguments) and, where the launcher takes only some positional arguments (triton 3.0–3.2
    leave constexprs out), their indices."""

    __slots__ = ("compiled", "tail", "names", "meta", "keep")

    def __init__(self, compiled, tail: tuple, names: Sequence[str], meta: Dict[str, object],
                 keep: Optional[Sequence[int]] = None):
        self.compiled, self.tail, self.names, self.meta, self.keep = compiled, tail, names, meta, keep

    def __call__(self, grid, args: Sequence) -> None:
        # The grid function sees what the JIT gives it: every argument by name plus the config's values.
        g = grid({**dict(zip(self.names, args)), **self.meta}) if callable(grid) else grid
        n = len(g)
        passed = args if self.keep is None else [args[i] for i in self.keep]
        self.compiled[(g[0], g[1] if n > 1 else 1, g[2] if n > 2 else 1)](*passed, *self.tail)


class _HandleCache:
    """Per autotuned kernel: (device, autotune key values, argument specialisation, constexprs) → _Handle."""

    def __init__(self, kernel, params: Sequence, key: Sequence[str]):
        self.kernel = kernel
        self.params = list(params)
        self.names = [p.name for p in self.params]
        self.key_index = tuple(self.names.index(k) for k in key if k in self.names)
        self.handles: Dict[tuple, _Handle] = {}
        self.disabled = False
        import torch

        self.arg_signature = _arg_signature_rocm if torch.version.hip else _arg_signature

    def _key(self, device, args: Sequence, constexprs: Dict[str, object]):
        arg_signature = self.arg_signature
        try:
            signature = tuple(arg_signature(a) for a in args)
        except _Uncacheable:
            return None
        where = _index(device) if device.type == "cuda" else str(device)
        values = tuple(args[i] for i in self.key_index if i < len(args))
        return where, values, signature, tuple(sorted(constexprs.items()))

    def _remember(self, key, compiled, config, args: Sequence, constexprs: Dict[str, object]) -> None:
        if compiled is None or config is None:
            return
        if hasattr(compiled, "result"):  # an asynchronous compile's future
            compiled = compiled.result()
        given = {**constexprs, **config.kwargs}
        passed = _launch_parameters(compiled, self.names)
        tail = []
        for param in self.params[len(args):]:
            if passed is not None and param.name not in passed:
                continue
            if param.name in given:
                tail.append(given[param.name])
            elif param.default is not inspect.Parameter.empty:
                tail.append(param.default)
            else:
                return  # cannot rebuild the argument list: stay on the autotuner path for this key
        keep = None
        if passed is not None and not passed.issuperset(self.names[:len(args)]):
            keep = tuple(i for i, name in enumerate(self.names[:len(args)]) if name in passed)
        self.handles[key] = _Handle(compiled, tuple(tail), self.names[:len(args)], given, keep)

    def launch(self, device, grid, args: Sequence, constexprs: Dict[str, object]) -> None:
        key = None if self.disabled else self._key(device, args, constexprs)
        handle = self.handles.get(key) if key is not None else None
        if handle is not None:
            try:
                handle(grid, args)
                return
            except Exception as exc:  # any API difference: back to the path that always works
                self.disabled = True
                self.handles.clear()
                name = getattr(getattr(self.kernel, "base_fn", None), "__name__", type(self.kernel).__name__)
                warnings.warn(
                    f"lorafast: cached launch of {name} failed ({type(exc).__name__}: {exc}); "
                    "launching it through triton.autotune from now on",
                    RuntimeWarning, stacklevel=3,
                )
                # fall through: the autotuner path below
        compiled = self.kernel.run(*args, grid=grid, warmup=False, **constexprs)
        if key is not None and not self.disabled:
            self._remember(key, compiled, getattr(self.kernel, "best_config", None), args, constexprs)


_HANDLE_CACHES: Dict[int, tuple] = {}


def _handles_for(kernel, key: Sequence[str]) -> Optional[_HandleCache]:
    """The handle cache of an autotuned kernel, or None when it does not look like triton's Autotuner over a
    JITFunction (the tests' stand-ins): those launch as ``kernel[grid](...)``."""
    entry = _HANDLE_CACHES.get(id(kernel))
    if entry is None or entry[0] is not kernel:
        jit = getattr(kernel, "fn", None)
        while jit is not None and not hasattr(jit, "params"):
            jit = getattr(jit, "fn", None)
        usable = jit is not None and callable(getattr(kernel, "run", None))
        # The entry keeps the kernel alive, so its id is not reused while the entry exists.
        entry = (kernel, _HandleCache(kernel, jit.params, key) if usable else None)
        _HANDLE_CACHES[id(kernel)] = entry
    return entry[1]


def m_bucket(M: int) -> int:
    """Autotune key for M: the next power of two (capped), so varying sequence lengths reuse tunings."""
    # int.bit_length, not triton.next_power_of_2 (a ConstexprFunction in triton 3.9: ~10 µs a call on CPU).
    return min(1 << (max(M, 1) - 1).bit_length(), 1 << 16)


def rank_block(r: int) -> int:
    """The rank dimension padded for tl.dot: a power of two >= 16 (masked loads fill the pad)."""
    return max(16, 1 << (max(r, 1) - 1).bit_length())
