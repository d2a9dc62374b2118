"""Every shipped kernel with its argument types and configs, for the ahead-of-time compile gate
(`python -m lorafast.aot`), which checks each one compiles for sm_80/sm_90 without spills and with
tensor-core instructions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

from lorafast.kernels.configs import GEMM, SKINNY, gpu_configs
from lorafast.kernels.lora_bwd import dx_with_lora_epilogue_kernel, lora_grad_a_kernel, lora_grad_h_kernel
from lorafast.kernels.lora_fwd import lora_expand_gemm_kernel, lora_shrink_kernel

# Each entry's compile uses the widest variant (dropout, bias, dB and db on) since it has the most
# live registers. Adapters are fp32 for 16-bit activations: PEFT's default upcast, and the cast path.
# fp16 is not listed: its compile matched bf16 in every row (registers, spills, shared memory).
AOT_DTYPES = {"bf16": "fp32", "fp32": "fp32"}
AOT_RANK_BLOCKS = (16, 64)
# Contiguous inputs are what runs: the JIT specialises a stride of 1 to the constant 1 and marks other
# integers divisible by 16 (":16"); compiling the generic i32 variant instead spilled on most configs
# because loads could not vectorise. The strided variant is only built at run time for strided inputs.
UNIT_STRIDES = {
    "stride_xk", "stride_ak", "stride_wk", "stride_hr", "stride_br", "stride_yn", "stride_dyn", "stride_dxk",
}


@dataclass(frozen=True)
class AotEntry:
    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    configs: list
    uses_dot: bool
    arch: int
    dtype: str


def _ints(*names: str) -> Dict[str, str]:
    return {n: "i32" for n in names}


def _specialise(signature: Dict[str, str]):
    """(signature, constexprs) as the JIT sees contiguous, 16-aligned problem sizes."""
    unit = {name: 1 for name in signature if name in UNIT_STRIDES}
    sig = {
        name: (kind + ":16" if kind == "i32" and name != "R" else kind)
        for name, kind in signature.items()
        if name not in unit
    }
    return sig, unit


def _entries(arch: int, dtype: str, block_r: int) -> List[AotEntry]:
    adapter = AOT_DTYPES[dtype]
    fp32 = dtype == "fp32"
    # fp32 follows torch's default (no TF32): IEEE dots run on FMA units, so no tensor-core check.
    precision = "ieee" if fp32 else "tf32"
    common = {"DOT_PRECISION": precision, "BLOCK_R": block_r}
    act, ad, f32 = f"*{dtype}", f"*{adapter}", "*fp32"
    shrink = {
        "x_ptr": act, "a_ptr": ad, "h_ptr": f32, "seed_ptr": "*i64",
        **_ints("M", "K", "R", "M_BUCKET", "stride_xm", "stride_xk", "stride_ar", "stride_ak",
                "stride_hm", "stride_hr"),
        "p": "fp32",
    }
    expand = {
        "x_ptr": act, "w_ptr": act, "bias_ptr": act, "h_ptr": f32, "b_ptr": ad, "scale_ptr": f32, "y_ptr": act,
        **_ints("M", "N", "K", "R", "M_BUCKET", "stride_xm", "stride_xk", "stride_wn", "stride_wk",
                "stride_hm", "stride_hr", "stride_bn", "stride_br", "stride_ym", "stride_yn"),
        "h_factor": "fp32",
    }
    grad_h = {
        "dy_ptr": act, "b_ptr": ad, "h_ptr": f32, "scale_ptr": f32, "dh_ptr": f32, "db_lora_ptr": f32,
        "dbias_ptr": f32,
        **_ints("M", "N", "R", "M_BUCKET", "stride_dym", "stride_dyn", "stride_bn", "stride_br",
                "stride_hm", "stride_hr"),
        "h_factor": "fp32",
    }
    dx = {
        "dy_ptr": act, "w_ptr": act, "dh_ptr": f32, "a_ptr": ad, "seed_ptr": "*i64", "dx_ptr": act,
        **_ints("M", "N", "K", "R", "M_BUCKET", "stride_dym", "stride_dyn", "stride_wn", "stride_wk",
                "stride_ar", "stride_ak", "stride_dxm", "stride_dxk"),
        "p": "fp32", "inv_keep": "fp32",
    }
    grad_a = {
        "x_ptr": act, "dh_ptr": f32, "seed_ptr": "*i64", "da_ptr": f32,
        **_ints("M", "K", "R", "M_BUCKET", "stride_xm", "stride_xk"),
        "p": "fp32", "inv_keep": "fp32",
    }
    rows = [
        ("lora_shrink", lora_shrink_kernel, shrink, {"HAS_DROPOUT": True}, SKINNY),
        ("lora_expand_gemm", lora_expand_gemm_kernel, expand, {"HAS_BIAS": True, "GROUP_M": 8}, GEMM),
        ("lora_grad_h", lora_grad_h_kernel, grad_h, {"NEED_DB_LORA": True, "NEED_DBIAS": True}, SKINNY),
        ("dx_with_lora_epilogue", dx_with_lora_epilogue_kernel, dx, {"HAS_DROPOUT": True, "GROUP_M": 8}, GEMM),
        ("lora_grad_a", lora_grad_a_kernel, grad_a, {"HAS_DROPOUT": True, "SPLIT_M": 4}, SKINNY),
    ]
    entries = []
    for name, fn, signature, extra, kind in rows:
        sig, unit = _specialise(signature)
        entries.append(AotEntry(f"{name}[r{block_r}]", fn, sig, {**common, **extra, **unit},
                                gpu_configs(kind, arch, fp32), not fp32, arch, dtype))
    return entries


def aot_entries(arch: int) -> List[AotEntry]:
    """All (kernel, dtype, rank block) variants for compute capability ``arch`` (80 or 90).

    bf16 and fp32 are compiled at rank blocks 16 and 64 (r ≤ 16 and the largest benchmarked rank).
    """
    return [e for dtype in AOT_DTYPES for block_r in AOT_RANK_BLOCKS for e in _entries(arch, dtype, block_r)]
