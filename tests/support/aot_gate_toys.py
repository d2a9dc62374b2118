"""Toy kernels for the AOT gate's newer checks (`lorafast.aot`): memory fences, the dropout hash's
instructions per element, the grid's waves at the reference shapes, and AMD (gfx942) spills / LDS.

`aot_entries(arch)` returns one clean entry and one planted defect per check; each defect's name says
which check must flag it (see tests/test_aot.py). CUDA targets get the fence/hash/grid toys, gfx942 the
same plus an LDS overflow and a register spill.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import List, Union

import triton
import triton.language as tl

from lorafast.kernels.dropout import dropout_col_keys, dropout_keep, dropout_row_keys
from lorafast.kernels.registry import AotEntry


def _sibling(name: str):
    # The gate loads this file by path (tests/ is not a package on its sys.path): load the sibling the same way.
    spec = importlib.util.spec_from_file_location(f"_aot_gate_toys_{name}", Path(__file__).with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


toy_matmul_kernel = _sibling("aot_toy_kernels").toy_matmul_kernel


@triton.jit
def toy_atomic_sum_kernel(x_ptr, out_ptr, n, SEM: tl.constexpr, BLOCK: tl.constexpr):
    """out[i] += x[i] with an fp32 atomic of memory order SEM."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.atomic_add(out_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask, sem=SEM)


@triton.jit(do_not_specialize=["threshold"])
def toy_dropout_rowsum_kernel(
    x_ptr, seed_ptr, out_ptr, M, K, stride_xm, threshold, p,
    HAS_DROPOUT: tl.constexpr, PHILOX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[m] = Σₖ drop(X)[m, k]: the mask from the package's hash, or (PHILOX) from tl.rand per element."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    seed = tl.load(seed_ptr)
    row_keys = dropout_row_keys(seed, offs_m)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
        if HAS_DROPOUT:
            if PHILOX:
                keep = tl.rand(seed.to(tl.int32), offs_m[:, None] * K + offs_k[None, :]) >= p
            else:
                keep = dropout_keep(row_keys, dropout_col_keys(seed, offs_k), threshold)
            x = tl.where(keep, x, 0.0)
        acc += x
    tl.store(out_ptr + offs_m, tl.sum(acc, axis=1), mask=offs_m < M)


def _cfg(num_warps: int = 4, num_stages: int = 1, **blocks: int) -> triton.Config:
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


def _atomic(name: str, sem: str, arch) -> AotEntry:
    return AotEntry(
        name=name, fn=toy_atomic_sum_kernel, signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32"},
        constexprs={"SEM": sem}, configs=[_cfg(BLOCK=1024)], uses_dot=False, arch=arch, dtype="fp32",
    )


def _dropout(name: str, philox: bool, arch) -> AotEntry:
    return AotEntry(
        name=name, fn=toy_dropout_rowsum_kernel,
        signature={"x_ptr": "*bf16", "seed_ptr": "*i64", "out_ptr": "*fp32", "M": "i32:16", "K": "i32:16",
                   "stride_xm": "i32:16", "threshold": "i32", "p": "fp32"},
        constexprs={"HAS_DROPOUT": True, "PHILOX": philox}, configs=[_cfg(BLOCK_M=64, BLOCK_K=64)],
        uses_dot=False, arch=arch, dtype="bf16", dropout_flag="HAS_DROPOUT", mask_tile=("BLOCK_M", "BLOCK_K"),
    )


def _row_blocks(meta, shape, num_sms):
    """A grid of one program per BLOCK_M rows: 32 CTAs at M = 2048 with BLOCK_M = 64 (the pre-split shrink)."""
    return (triton.cdiv(shape[0], meta["BLOCK_M"]),)


def _row_blocks_split_k(meta, shape, num_sms):
    """Row blocks × enough K splits for two programs per SM."""
    rows = triton.cdiv(shape[0], meta["BLOCK_M"])
    return rows, triton.cdiv(2 * num_sms, rows)


def _matmul(name: str, config: triton.Config, arch) -> AotEntry:
    return AotEntry(
        name=name, fn=toy_matmul_kernel,
        signature={"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "M": "i32", "N": "i32", "K": "i32:16",
                   "stride_am": "i32:16", "stride_bk": "i32:16", "stride_cm": "i32:16"},
        constexprs={"stride_ak": 1, "stride_bn": 1, "stride_cn": 1, "INPUT_PRECISION": "ieee"},
        configs=[config], uses_dot=True, arch=arch, dtype="bf16",
    )


def aot_entries(arch: Union[int, str]) -> List[AotEntry]:
    """Clean toys and one planted defect per new check."""
    grid_cfg = [_cfg(BLOCK_M=64, BLOCK_K=64)]
    entries = [
        _atomic("toy_atomic_relaxed", "relaxed", arch),
        _atomic("defect_membar", "acq_rel", arch),
        _dropout("toy_dropout_hash", False, arch),
        _dropout("defect_philox_dropout", True, arch),
        AotEntry(name="toy_grid_split", fn=toy_dropout_rowsum_kernel,
                 signature=_dropout("", False, arch).signature, constexprs={"HAS_DROPOUT": False, "PHILOX": False},
                 configs=grid_cfg, uses_dot=False, arch=arch, dtype="bf16",
                 launch_grid=_row_blocks_split_k, min_waves=2.0),
        AotEntry(name="defect_small_grid", fn=toy_dropout_rowsum_kernel,
                 signature=_dropout("", False, arch).signature, constexprs={"HAS_DROPOUT": False, "PHILOX": False},
                 configs=grid_cfg, uses_dot=False, arch=arch, dtype="bf16",
                 launch_grid=_row_blocks, min_waves=2.0),
    ]
    if isinstance(arch, str):
        entries += [
            _matmul("toy_matmul_amd", _cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32), arch),
            # 128×128 tiles at K step 256: 128 KiB of bf16 operand tiles > 64 KiB of LDS.
            _matmul("defect_lds", _cfg(8, 2, BLOCK_M=128, BLOCK_N=128, BLOCK_K=256), arch),
            # A 256×128 fp32 accumulator on one 64-lane wave: 512 registers per lane for it alone.
            _matmul("defect_spill_amd", _cfg(1, 1, BLOCK_M=256, BLOCK_N=128, BLOCK_K=16), arch),
        ]
    return entries


class _CrashingKernel:
    """Stands in for a kernel whose compile kills the compiling process, as a libtriton segfault does."""

    __name__ = "crashing_kernel"

    @property
    def fn(self):
        import os
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


def crash_entries(arch: Union[int, str]) -> List[AotEntry]:
    """Two clean toys around one entry whose compile kills its worker process."""
    clean = _atomic("toy_atomic_relaxed", "relaxed", arch)
    crash = AotEntry(name="defect_compiler_crash", fn=_CrashingKernel(), signature=clean.signature,
                     constexprs={"SEM": "relaxed"}, configs=clean.configs, uses_dot=False, arch=arch, dtype="fp32")
    return [clean, crash, _atomic("toy_atomic_relaxed_after", "relaxed", arch)]
