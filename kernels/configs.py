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
from typing import Callable, Dict, List, Sequence

import triton

# Kernel families; each has its own config table because the tiles play different roles.
GEMM = "gemm"          # Y = X·Wᵀ + LoRA epilogue: BLOCK_M × BLOCK_N output tile, BLOCK_K reduction step
DX = "dx"              # dX = dY·W + LoRA epilogue: same roles (BLOCK_N tiles dX's K columns, BLOCK_K steps over N)
SKINNY = "skinny"      # rank-r passes: shrink (M×K → M×r), dH/dB (M×N → M×r, N×r), dA (M×K → r×K)
EPILOGUE = "epilogue"  # in-place rank-r updates after a cuBLAS GEMM: Y += s·H·Bᵀ, dX += keep⊙(dH·A)/(1−p)


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _cfg(num_warps: int, num_stages: int, **blocks: int) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


# (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages); GROUP_M = 8 for the GEMMs (L2 reuse of W). Every row passes
# the AOT gate (no spills, shared memory within the limit). Not yet timed on a GPU.
_TABLES = {
    GEMM: {
        # 128×256×64 at 3 stages is back for the forward: it only failed shared memory in the dX kernel,
        # whose block roles were swapped until dX got its own table.
        90: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4)],
        80: [(128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4)],
    },
    DX: {
        90: [(128, 128, 64, 8, 3), (128, 256, 64, 8, 2), (64, 128, 64, 4, 4), (128, 64, 64, 8, 4)],
        80: [(128, 128, 32, 8, 4), (64, 128, 32, 4, 4), (128, 64, 32, 4, 4)],
    },
    # Skinny passes stream one big operand; BLOCK_N names the streamed dimension's tile (dH over N),
    # BLOCK_K the shrink's and dA's column tile.
    SKINNY: {
        90: [(64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (64, 64, 64, 4, 4)],
        80: [(64, 128, 32, 8, 3), (128, 64, 32, 8, 4), (64, 64, 64, 4, 4)],
    },
    # Elementwise-sized tiles with one small dot; BLOCK_K is unused.
    EPILOGUE: {
        90: [(64, 128, 16, 4, 2), (128, 128, 16, 8, 2), (64, 64, 16, 4, 2)],
        80: [(64, 128, 16, 4, 2), (128, 64, 16, 8, 2), (64, 64, 16, 4, 2)],
    },
}
# fp32 operands are twice as wide and IEEE dots run on FMA units, so fp32 gets small tiles: these rows
# are the ones the AOT gate found spill-free at rank block 64 on both arches (64×128 and 64×64 tiles
# spilled 288–8,568 B in the dH/dB and dA passes). fp32 is a correctness path for the fused GEMMs; on
# CUDA the dispatcher runs fp32 on cuBLAS (`cublas`/`aten`) by default.
_FP32_TABLE = {
    GEMM: [(32, 64, 32, 8, 2), (32, 32, 32, 4, 2)],
    DX: [(32, 64, 32, 8, 2), (32, 32, 32, 4, 2)],
    SKINNY: [(32, 64, 32, 8, 2), (32, 32, 32, 4, 2)],
    EPILOGUE: [(32, 64, 16, 4, 2), (32, 32, 16, 4, 2)],
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
        table = _TABLES[kind]
        rows = table[90] if arch >= 90 else table[80]
    return [_cfg(w, s, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk) for bm, bn, bk, w, s in rows]


@functools.cache
def _arch_of(index: int) -> int:
    import torch

    major, minor = torch.cuda.get_device_capability(index)
    return major * 10 + minor


def device_arch(device) -> int:
    """Compute capability as an int (90 for H100); 80 under the interpreter."""
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
def _autotuned(fn, kind: str, arch: int, fp32: bool, key: Sequence[str], reset_to_zero: Sequence[str],
               restore: Sequence[str]):
    return triton.autotune(
        configs=configs(kind, arch, fp32), key=list(key), reset_to_zero=list(reset_to_zero) or None,
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
    once). ``fp32``: the dot operands are fp32 (selects the fp32 config table).
    """
    if interpreting():
        cfg = configs(kind, 80)[0]
        fn[lambda meta: grid({**meta, **cfg.kwargs})](
            *args, **constexprs, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        )
        return
    full_key = (*key, "BLOCK_R") if "BLOCK_R" in constexprs else tuple(key)
    kernel = _autotuned(fn, kind, device_arch(device), fp32, full_key, tuple(reset_to_zero), tuple(restore))
    with device_guard(device):
        kernel[grid](*args, **constexprs)


def m_bucket(M: int) -> int:
    """Autotune key for M: the next power of two (capped), so varying sequence lengths reuse tunings."""
    return min(triton.next_power_of_2(max(M, 1)), 1 << 16)


def rank_block(r: int) -> int:
    """The rank dimension padded for tl.dot: a power of two >= 16 (masked loads fill the pad)."""
    return max(16, triton.next_power_of_2(r))
