"""Toy kernels for testing the AOT compile gate (`lorafast.aot`) independently of the real registry.

`aot_entries(arch)` returns entries that must pass the gate; `aot_entries_with_defects(arch)` adds
one entry per defect the gate must catch (spill, shared-memory overflow, a "dot" kernel without
tensor-core instructions, a compile error), so a test can prove the gate fails when it should.
The entries are the registry's own `AotEntry` records.
"""

from __future__ import annotations

from typing import Dict, List

import triton
import triton.language as tl

from lorafast.kernels.registry import AotEntry as ToyAotEntry


@triton.jit
def toy_matmul_kernel(
    a_ptr, b_ptr, c_ptr, M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[M, N] (fp32) = A[M, K] · B[K, N] with masked edges."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        a = tl.load(
            a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0,
        )
        b = tl.load(
            b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
            mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0,
        )
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
    tl.store(
        c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :] * stride_cn, acc,
        mask=(offs_m[:, None] < M) & (offs_n[None, :] < N),
    )


@triton.jit
def toy_scale_add_kernel(x_ptr, y_ptr, out_ptr, n, alpha, BLOCK: tl.constexpr):
    """out = alpha * x + y, elementwise in fp32."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    y = tl.load(y_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, alpha * x + y, mask=mask)


@triton.jit
def toy_broken_kernel(x_ptr, BLOCK: tl.constexpr):
    """Does not compile: tl.arange needs a power-of-two length."""
    offs = tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, offs)


def _matmul_signature(dtype: str) -> Dict[str, str]:
    sig = {"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": "*fp32", "M": "i32", "N": "i32"}
    sig["K"] = "i32:16"
    # Strides of contiguous row-major operands: leading strides divisible by 16, unit strides
    # specialised to the constant 1 below (what the JIT does at run time).
    sig.update(stride_am="i32:16", stride_bk="i32:16", stride_cm="i32:16")
    return sig


_UNIT_STRIDES = {"stride_ak": 1, "stride_bn": 1, "stride_cn": 1}


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages)


def _matmul(name: str, dtype: str, precision: str, configs: list, uses_dot: bool, arch: int) -> ToyAotEntry:
    return ToyAotEntry(
        name=name, fn=toy_matmul_kernel, signature=_matmul_signature(dtype),
        constexprs={**_UNIT_STRIDES, "INPUT_PRECISION": precision}, configs=configs,
        uses_dot=uses_dot, arch=arch, dtype=dtype,
    )


def aot_entries(arch: int) -> List[ToyAotEntry]:
    """Entries that compile cleanly for sm_80 and sm_90: a tensor-core matmul and an elementwise op."""
    good = [_cfg(64, 64, 32, 4, 3), _cfg(128, 64, 32, 4, 3)]
    return [
        _matmul("toy_matmul", "bf16", "ieee", good, True, arch),
        ToyAotEntry(
            name="toy_scale_add", fn=toy_scale_add_kernel,
            signature={"x_ptr": "*bf16", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "alpha": "fp32"},
            constexprs={}, configs=[triton.Config({"BLOCK": 1024}, num_warps=4, num_stages=1)],
            uses_dot=False, arch=arch, dtype="bf16",
        ),
    ]


def aot_entries_with_defects(arch: int) -> List[ToyAotEntry]:
    """`aot_entries` plus one entry per defect; each defect's name says which check must flag it."""
    return aot_entries(arch) + [
        # 64×128 fp32 accumulator on one warp = 256 registers per thread for the accumulator alone.
        _matmul("defect_spill", "bf16", "ieee", [_cfg(64, 128, 32, 1, 1)], True, arch),
        # 16 stages of 64×128 + 128×64 bf16 tiles: ≈ 256 KiB of shared memory on sm_80 and sm_90.
        _matmul("defect_smem", "bf16", "ieee", [_cfg(64, 64, 128, 8, 16)], True, arch),
        # An fp32 dot in IEEE precision runs on FMA units, not tensor cores.
        _matmul("defect_no_tensor_cores", "fp32", "ieee", [_cfg(64, 64, 32, 4, 2)], True, arch),
        ToyAotEntry(
            name="defect_compile_error", fn=toy_broken_kernel, signature={"x_ptr": "*i32"},
            constexprs={}, configs=[triton.Config({"BLOCK": 100}, num_warps=4, num_stages=1)],
            uses_dot=False, arch=arch, dtype="fp32",
        ),
    ]
