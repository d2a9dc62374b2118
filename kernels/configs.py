"""Launch configurations per GPU architecture, and the autotune wrapper.

Block sizes are starting points chosen from the usual Triton GEMM tables (tutorial 03) and checked
for spills / shared memory by the AOT gate (`python -m lorafast.aot`); they are not yet tuned on a
GPU (unmeasured). Under the interpreter (TRITON_INTERPRET=1) one small config runs, because the
interpreter cannot autotune over several.
"""

from __future__ import annotations

import functools
import os
from typing import Callable, Dict, List, Sequence

import triton

GEMM = "gemm"      # Y = X·Wᵀ (+ LoRA epilogue), dX = dY·W (+ LoRA epilogue)
SKINNY = "skinny"  # rank-r passes: shrink (M×K → M×r), dH/dB (M×N → M×r, N×r), dA (M×K → r×K)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); GROUP_M = 8 everywhere for L2 reuse of W. Every row passes
# the AOT gate (no spills, shared memory within the limit) at rank blocks 16 and 64; rows that spilled
# at 4 warps (sm_80 128×128×32, sm_90 128×64×64) were moved to 8 warps, sm_90 128×256×64 to 2 stages
# (3 stages needed 295,936 B of shared memory in the dX kernel). Not yet timed on a GPU.
_GEMM_TABLE = {
    90: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 2), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4)],
    80: [(128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4)],
}
# Skinny passes stream one big operand; BLOCK_N names the streamed dimension's tile.
_SKINNY_TABLE = {
    90: [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4)],
    80: [(64, 128, 32, 8, 3), (128, 64, 32, 8, 4), (64, 64, 64, 4, 4)],
}
# fp32 operands are twice as wide and IEEE dots run on FMA units, so fp32 gets small tiles: these two
# rows are the ones the AOT gate found spill-free at rank block 64 on both arches (64×128 and 64×64
# tiles spilled 288–8,568 B in the dH/dB and dA passes). fp32 is a correctness path, not a fast one.
_FP32_TABLE = {
    GEMM: [(32, 64, 32, 8, 2), (32, 32, 32, 4, 2)],
    SKINNY: [(32, 64, 32, 8, 2), (32, 32, 32, 4, 2)],
}
_INTERPRETER_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32}


def configs(kind: str, arch: int, fp32: bool = False) -> List[triton.Config]:
    """Configs to run with: the GPU autotune list, or the interpreter's single config."""
    if interpreting():
        return [triton.Config(dict(_INTERPRETER_CONFIG), num_warps=4, num_stages=1)]
    return gpu_configs(kind, arch, fp32)


def gpu_configs(kind: str, arch: int, fp32: bool = False) -> List[triton.Config]:
    """Autotune candidates for a kernel family on compute capability ``arch`` (80, 90, ...);
    ``fp32``: the operands are fp32 (the smaller-tile table)."""
    if fp32:
        rows = _FP32_TABLE[kind]
    else:
        table = _GEMM_TABLE if kind == GEMM else _SKINNY_TABLE
        rows = table[90] if arch >= 90 else table[80]
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk) for bm, bn, bk, w, s in rows]


def device_arch(device) -> int:
    """Compute capability as an int (90 for H100); 80 under the interpreter."""
    if interpreting():
        return 80
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return major * 10 + minor


@functools.cache
def _autotuned(fn, kind: str, arch: int, fp32: bool, key: Sequence[str], reset_to_zero: Sequence[str]):
    return triton.autotune(
        configs=configs(kind, arch, fp32), key=list(key), reset_to_zero=list(reset_to_zero) or None
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
    fp32: bool = False,
    **constexprs,
) -> None:
    """Launch ``fn`` with the arch's autotuned config (or the interpreter's single config);
    ``fp32``: the dot operands are fp32 (selects the fp32 config table)."""
    if interpreting():
        cfg = configs(kind, 80)[0]
        fn[lambda meta: grid({**meta, **cfg.kwargs})](
            *args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
        return
    kernel = _autotuned(fn, kind, device_arch(device), fp32, tuple(key), tuple(reset_to_zero))
    kernel[grid](*args, **constexprs)


def m_bucket(M: int) -> int:
    """Autotune key for M: the next power of two (capped), so varying sequence lengths reuse tunings."""
    return min(triton.next_power_of_2(max(M, 1)), 1 << 16)


def rank_block(r: int) -> int:
    """The rank dimension padded for tl.dot: a power of two >= 16 (masked loads fill the pad)."""
    return max(16, triton.next_power_of_2(r))
