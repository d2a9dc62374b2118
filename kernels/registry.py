"""Every shipped kernel with its argument types and configs, for the ahead-of-time compile gate
(`python -m lorafast.aot`), which checks each one compiles for sm_80/sm_90 (and AMD gfx942) without
spills, with tensor-core (MFMA) instructions, without memory fences, with a cheap dropout hash and a
grid that fills the GPU at the reference shapes.

`aot_entries(arch)` is the full matrix (7 kernels × bf16/fp32 × rank blocks 16/32/64/128, plus the
QLoRA kernels of `lorafast.kernels.dequant` and the MoE kernels of `moe_aot_entries`); `aot_entries_ci(arch)`
is the representative subset the default test suite compiles (see its docstring).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union
from unittest import mock

from lorafast.kernels.configs import (
    DORA_DX,
    DORA_GEMM,
    DORA_SKINNY,
    DX,
    EPILOGUE,
    GEMM,
    MOE_DH,
    MOE_DX,
    MOE_GEMM,
    MOE_SKINNY,
    SKINNY,
    TWO_ACC,
    gpu_configs,
)
from lorafast.kernels.dequant import dequant_4bit_kernel, gemm_4bit_kernel
from lorafast.kernels.lora_bwd import (
    dx_lora_add_kernel,
    dx_with_lora_epilogue_kernel,
    lora_grad_a_kernel,
    lora_grad_h_kernel,
)
from lorafast.kernels.lora_fwd import lora_expand_add_kernel, lora_expand_gemm_kernel, lora_shrink_kernel

# Each entry's compile uses the widest variant (dropout, bias, dB and db on) since it has the most
# live registers. Adapters are fp32 for 16-bit activations: PEFT's default upcast, and the cast path.
# fp16 is not listed: its compile matched bf16 in every row (registers, spills, shared memory).
AOT_DTYPES = {"bf16": "fp32", "fp32": "fp32"}
# r ≤ 128 runs on Triton (larger ranks fall back to torch): every rank block the launchers can pick.
AOT_RANK_BLOCKS = (16, 32, 64, 128)
# Contiguous inputs are what runs: the JIT specialises a stride of 1 to the constant 1 and marks other
# integers divisible by 16 (":16"); compiling the generic i32 variant instead spilled on most configs
# because loads could not vectorise. The strided variant is only built at run time for strided inputs.
UNIT_STRIDES = {"stride_xk", "stride_ak", "stride_wk", "stride_br", "stride_yn", "stride_dyn", "stride_dxk"}
# Arguments the JIT does not specialise (do_not_specialize, or a rank that is rarely a multiple of 16).
UNSPECIALISED = {"R", "mask_threshold"}
FLOAT_SCALARS = {"h_factor", "inv_keep"}

# Reference shapes (M, K, N) for the grid check: BERT-base, Llama-8B attention projections, Llama-8B MLP up.
REFERENCE_SHAPES: Dict[str, Tuple[int, int, int]] = {
    "bert_2048x768x768": (2048, 768, 768),
    "llama_8192x4096x4096": (8192, 4096, 4096),
    "llama_8192x4096x14336": (8192, 4096, 14336),
}
# The skinny passes must launch at least this many waves of one CTA per SM at the reference shapes.
SKINNY_MIN_WAVES = 2.0

GridFn = Callable[[Dict[str, object], Tuple[int, int, int], int], Tuple[int, ...]]


@dataclass(frozen=True)
class AotEntry:
    """One kernel variant for the gate.

    ``signature``: argument name → Triton type (``"*bf16"``, ``"i32"``, ``"i32:16"`` for a multiple of 16,
    ``"fp32"``); ``constexprs``: the constexpr values (and unit strides); constexpr parameters with a
    default in the kernel may be left out. ``arch``: compute capability (80, 90) or an AMD target
    (``"gfx942"``). Optional checks: ``launch_grid(meta, (M, K, N), num_sms)`` gives the launcher's grid for a
    config at a shape (CTAs are reported for every reference shape; fewer than ``min_waves`` waves of
    ``num_sms`` CTAs fail); ``dropout_flag`` names the constexpr that switches the dropout mask on (the gate
    compiles it off too and reports the mask's instructions per element over the ``mask_tile`` config keys,
    whose product is the mask elements one loop step computes); ``allow_membar`` exempts a kernel from the
    no-fence check.
    """

    name: str
    fn: object
    signature: Dict[str, str]
    constexprs: Dict[str, object]
    configs: list
    uses_dot: bool
    arch: Union[int, str]
    dtype: str
    launch_grid: Optional[GridFn] = None
    min_waves: float = 0.0
    dropout_flag: str = ""
    mask_tile: Tuple[str, ...] = ()
    allow_membar: bool = False


def _signature(names: Sequence[str], pointers: Dict[str, str]) -> Dict[str, str]:
    """Triton types of a kernel's runtime arguments as the JIT sees contiguous, 16-aligned tensors
    (unit strides are left out: they become constexprs)."""
    sig = {}
    for name in names:
        if name in UNIT_STRIDES:
            continue
        if name in pointers:
            sig[name] = pointers[name]
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        elif name in UNSPECIALISED:
            sig[name] = "i32"
        else:
            sig[name] = "i32:16"
    return sig


def _parameters(fn) -> List[Tuple[str, bool]]:
    """(name, is constexpr) of a @triton.jit kernel's parameters, in order; from the Python function, so it
    also works on the interpreter's objects (TRITON_INTERPRET=1)."""
    py = getattr(fn, "fn", fn)
    return [(name, "constexpr" in str(p.annotation)) for name, p in inspect.signature(py).parameters.items()]


def _runtime_args(fn) -> List[str]:
    """The kernel's non-constexpr parameters, in order."""
    return [name for name, constexpr in _parameters(fn) if not constexpr]


def _units(fn) -> Dict[str, int]:
    return {name: 1 for name, _ in _parameters(fn) if name in UNIT_STRIDES}


# ---- the launchers' own grids, captured with meta tensors (no GPU, no memory) -------------------------

def _meta(shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def _launcher_calls(M: int, K: int, N: int, act, r: int = 16) -> Dict[str, Callable[[], object]]:
    """One call of each launcher on meta tensors of the given shape; the gate stubs `launch` to read the grid."""
    import torch

    from lorafast.kernels import lora_bwd, lora_fwd

    f32 = torch.float32
    x, w, bias, a, b = _meta((M, K), act), _meta((N, K), act), _meta((N,), act), _meta((r, K), f32), _meta((N, r), f32)
    h, dy, seed, scale = _meta((M, r), f32), _meta((M, N), act), _meta((1,), torch.int64), _meta((), f32)
    return {
        "lora_shrink": lambda: lora_fwd.lora_shrink(x, a, seed, 0.1),
        "lora_expand_gemm": lambda: lora_fwd.lora_expand_gemm(x, w, bias, h, b, scale),
        "lora_expand_add": lambda: lora_fwd.lora_expand_add(dy, h, b, scale),
        "lora_grad_h": lambda: lora_bwd.lora_grad_h(dy, b, h, scale, 1.0, True, True),
        "dx_with_lora_epilogue": lambda: lora_bwd.dx_with_lora_epilogue(dy, w, h, a, seed, 0.1),
        "dx_lora_add": lambda: lora_bwd.dx_lora_add(x, h, a, seed, 0.1),
        "lora_grad_a": lambda: lora_bwd.lora_grad_a(x, h, seed, 0.1),
    }


def launcher_grid(kernel: str, meta: Dict[str, object], shape: Tuple[int, int, int], num_sms: int,
                  dtype: str = "bf16") -> Tuple[int, ...]:
    """The grid ``kernel``'s launcher computes for a config (``meta``: its block sizes) at ``shape`` = (M, K, N)
    on a GPU with ``num_sms`` SMs: the launcher runs on meta tensors with `launch` stubbed to capture its grid
    function and `num_sms` patched (so `split_for` sees the real rule with that SM count)."""
    import torch

    from lorafast.kernels import configs, lora_bwd, lora_fwd

    captured = []

    def capture(fn, kind, device, grid, args, *rest, **kwargs):
        captured.append(grid)

    act = torch.bfloat16 if dtype == "bf16" else torch.float32
    with contextlib.ExitStack() as stack:
        for module in (lora_fwd, lora_bwd):
            stack.enter_context(mock.patch.object(module, "launch", capture))
        stack.enter_context(mock.patch.object(configs, "num_sms", lambda device: num_sms))
        _launcher_calls(*shape, act)[kernel]()
        if len(captured) != 1:
            raise RuntimeError(f"{kernel}: expected one launch, saw {len(captured)}")
        return tuple(int(g) for g in captured[0](dict(meta)))


def _grid_fn(kernel: str, dtype: str) -> GridFn:
    return lambda meta, shape, num_sms: launcher_grid(kernel, meta, shape, num_sms, dtype)


# ---- entries ------------------------------------------------------------------------------------------

def _entries(arch: Union[int, str], dtype: str, block_r: int) -> List[AotEntry]:
    adapter = AOT_DTYPES[dtype]
    fp32 = dtype == "fp32"
    # fp32 follows torch's default (no TF32): IEEE dots run on FMA units, so no tensor-core check. 16-bit dots
    # take "ieee" too, as at run time (kernels/dtypes.dot_precision: the only value every AMD backend accepts).
    common = {"DOT_PRECISION": "ieee", "BLOCK_R": block_r}
    act, ad, f32, i64 = f"*{dtype}", f"*{adapter}", "*fp32", "*i64"
    pointers = {
        "x_ptr": act, "w_ptr": act, "bias_ptr": act, "y_ptr": act, "dy_ptr": act, "dx_ptr": act,
        "a_ptr": ad, "b_ptr": ad, "seed_ptr": i64,
        "h_ptr": f32, "dh_ptr": f32, "da_ptr": f32, "scale_ptr": f32, "db_lora_ptr": f32, "dbias_ptr": f32,
    }
    # (name, kernel, constexprs, config family the launcher uses, skinny?, mask tile)
    rows = [
        ("lora_shrink", lora_shrink_kernel, {"HAS_DROPOUT": True}, SKINNY, True, ("BLOCK_M", "BLOCK_K")),
        ("lora_expand_gemm", lora_expand_gemm_kernel, {"HAS_BIAS": True, "GROUP_M": 8}, GEMM, False, ()),
        ("lora_expand_add", lora_expand_add_kernel, {}, EPILOGUE, False, ()),
        ("lora_grad_h", lora_grad_h_kernel, {"NEED_DB_LORA": True, "NEED_DBIAS": True}, SKINNY, True, ()),
        ("dx_with_lora_epilogue", dx_with_lora_epilogue_kernel, {"HAS_DROPOUT": True, "GROUP_M": 8}, DX, False,
         ("BLOCK_M", "BLOCK_N")),
        ("dx_lora_add", dx_lora_add_kernel, {"HAS_DROPOUT": True}, EPILOGUE, False, ("BLOCK_M", "BLOCK_N")),
        ("lora_grad_a", lora_grad_a_kernel, {"HAS_DROPOUT": True}, SKINNY, True, ("BLOCK_M", "BLOCK_K")),
    ]
    entries = []
    for name, fn, extra, kind, skinny, mask_tile in rows:
        entries.append(AotEntry(
            f"{name}[r{block_r}]", fn, _signature(_runtime_args(fn), pointers), {**common, **extra, **_units(fn)},
            gpu_configs(kind, arch, fp32, block_r), not fp32, arch, dtype,
            launch_grid=_grid_fn(name, dtype), min_waves=SKINNY_MIN_WAVES if skinny else 0.0,
            dropout_flag="HAS_DROPOUT" if mask_tile else "", mask_tile=mask_tile,
        ))
    return entries


def _dequant_entries(arch: Union[int, str]) -> List[AotEntry]:
    """The QLoRA kernels' entries for compute capability ``arch`` (CUDA targets only): the dequant kernel (plain
    and nested absmax, bf16 output; fp16/fp32 outputs differ only in the final store) and the 4-bit GEMM."""
    if not isinstance(arch, int):
        return []
    entries = []
    for nested in (False, True):
        signature = {
            "packed_ptr": "*u8", "absmax_ptr": "*u8" if nested else "*fp32", "code_ptr": "*fp32",
            "nested_code_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "offset_ptr": "*fp32", "out_ptr": "*i16",
            "numel": "i32:16", "blocksize": "i32:16", "nested_blocksize": "i32:16",
        }
        name = "dequant_4bit[nested]" if nested else "dequant_4bit"
        entries.append(AotEntry(name, dequant_4bit_kernel, signature, {"NESTED": nested, "OUT_BF16": True},
                                gpu_configs(EPILOGUE, arch), False, arch, "bf16"))
    # bf16 only: the fp32 variant (IEEE dots, a correctness path never offered by the dispatcher) spilled in the
    # gate on the fp32 tables (8-24 B on sm_80).
    for dtype in ("bf16",):
        fp32 = dtype == "fp32"
        signature = {
            "x_ptr": f"*{dtype}", "packed_ptr": "*u8", "absmax_ptr": "*fp32", "code_ptr": "*fp32",
            "bias_ptr": f"*{dtype}", "y_ptr": f"*{dtype}",
            "M": "i32:16", "N": "i32:16", "K": "i32:16", "M_BUCKET": "i32:16", "blocksize": "i32:16",
            "stride_xm": "i32:16", "stride_ym": "i32:16",
        }
        constexprs = {"stride_xk": 1, "stride_yn": 1, "HAS_BIAS": True, "GROUP_M": 8,
                      "DOT_PRECISION": "ieee"}
        # fp32: IEEE dots on FMA units (torch's default precision), so no tensor-core check there.
        entries.append(AotEntry("gemm_4bit", gemm_4bit_kernel, signature, constexprs,
                                gpu_configs(EPILOGUE, arch, fp32), not fp32, arch, dtype))
    return entries


def aot_entries(arch: Union[int, str]) -> List[AotEntry]:
    """All (kernel, dtype, rank block) variants for ``arch`` (80, 90 or "gfx942"), plus the dequant and MoE kernels."""
    lora = [e for dtype in AOT_DTYPES for block_r in AOT_RANK_BLOCKS for e in _entries(arch, dtype, block_r)]
    return lora + _dequant_entries(arch) + moe_aot_entries(arch)


# The default test suite's subset (2 CPU cores, a few minutes at most): sm_90 compiles every config of bf16
# at rank block 128 (the most live registers, the wgmma path) and of fp32 at 128 (the spill-prone fp32
# tables at their widest); sm_80 (bf16, r = 16, where sm_90 falls back to HMMA) and gfx942 (bf16, r = 64)
# compile the first config of each kernel.
_CI_SUBSET = {90: (("bf16", 128, None), ("fp32", 128, None)), 80: (("bf16", 16, 1),)}
_CI_SUBSET_AMD = (("bf16", 64, 1),)


def aot_entries_ci(arch: Union[int, str]) -> List[AotEntry]:
    """The representative subset the default test suite compiles (`_CI_SUBSET`), plus the dequant kernels;
    the CLI (`python -m lorafast.aot`) compiles all of `aot_entries`."""
    subset = _CI_SUBSET_AMD if isinstance(arch, str) else _CI_SUBSET.get(arch, (("bf16", 16, 1),))
    lora = [
        dataclasses.replace(e, configs=e.configs[:n]) if n else e
        for dtype, block_r, n in subset for e in _entries(arch, dtype, block_r)
    ]
    return lora + _dequant_entries(arch) + moe_aot_entries_ci(arch)


# ---- DoRA (issue 19) and W read transposed (GPT-2 Conv1D, fan_in_fan_out) ------------------------------------

def _dora_launcher_calls(M: int, K: int, N: int, act, r: int = 16) -> Dict[str, Callable[[], object]]:
    """One call of each DoRA launcher on meta tensors (the gate stubs `launch` to read the grid)."""
    import torch

    from lorafast.kernels import dora_bwd, dora_fwd, dora_norm

    f32 = torch.float32
    x, w, bias, a, b = _meta((M, K), act), _meta((N, K), act), _meta((N,), act), _meta((r, K), f32), _meta((N, r), f32)
    h, dy, seed, scale, vec = _meta((M, r), f32), _meta((M, N), act), _meta((1,), torch.int64), _meta((), f32), \
        _meta((N,), f32)
    outs = (_meta((N, r), f32), vec, vec)
    return {
        "dora_norm": lambda: dora_norm.dora_norm(w, a, b, vec, scale, None),
        "dora_gemm": lambda: dora_fwd.dora_gemm(x, w, bias, h, b, vec, scale, seed, 0.1),
        "dora_expand": lambda: dora_fwd.dora_expand(dy, dy, bias, h, b, vec, scale, 0.1),
        "dropout_apply": lambda: dora_fwd.dropout_apply(x, seed, 0.1),
        "dora_grad_h": lambda: dora_bwd.dora_grad_h(dy, dy, b, h, vec, vec, scale, 0.1, True, outs),
        "dora_dx": lambda: dora_bwd.dora_dx(dy, w, vec, h, a, seed, 0.1),
        "dora_dx_add": lambda: dora_bwd.dora_dx_add(x, x, h, a, seed, 0.1),
    }


def dora_launcher_grid(kernel: str, meta: Dict[str, object], shape: Tuple[int, int, int], num_sms: int,
                       dtype: str = "bf16") -> Tuple[int, ...]:
    """:func:`launcher_grid` for the DoRA launchers (kernels/dora_*.py)."""
    import torch

    from lorafast.kernels import configs, dora_bwd, dora_fwd, dora_norm

    captured = []

    def capture(fn, kind, device, grid, args, *rest, **kwargs):
        captured.append(grid)

    act = torch.bfloat16 if dtype == "bf16" else torch.float32
    with contextlib.ExitStack() as stack:
        for module in (dora_fwd, dora_bwd, dora_norm):
            stack.enter_context(mock.patch.object(module, "launch", capture))
        stack.enter_context(mock.patch.object(configs, "num_sms", lambda device: num_sms))
        _dora_launcher_calls(*shape, act)[kernel]()
        if len(captured) != 1:
            raise RuntimeError(f"{kernel}: expected one launch, saw {len(captured)}")
        return tuple(int(g) for g in captured[0](dict(meta)))


def _transposed_w(signature: Dict[str, str], constexprs: Dict[str, object]) -> Tuple[Dict[str, str], Dict]:
    """The variant the JIT builds for W read as a Conv1D weight's ``.t()`` view: stride_wn = 1, stride_wk = N."""
    signature = {k: v for k, v in signature.items() if k != "stride_wn"}
    signature["stride_wk"] = "i32:16"
    constexprs = {k: v for k, v in constexprs.items() if k != "stride_wk"}
    return signature, {**constexprs, "stride_wn": 1}


def _dora_entries(arch: Union[int, str], dtype: str, block_r: int) -> List[AotEntry]:
    from lorafast.kernels.dora_bwd import dora_dx_add_kernel, dora_dx_kernel, dora_grad_h_kernel
    from lorafast.kernels.dora_fwd import dora_expand_kernel, dora_gemm_kernel, dropout_apply_kernel
    from lorafast.kernels.dora_norm import dora_norm_kernel

    adapter = AOT_DTYPES[dtype]
    fp32 = dtype == "fp32"
    # "ieee" for every dtype, as at run time (kernels/dtypes.dot_precision; see _entries).
    common = {"DOT_PRECISION": "ieee", "BLOCK_R": block_r}
    act, ad, f32 = f"*{dtype}", f"*{adapter}", "*fp32"
    pointers = {
        "x_ptr": act, "w_ptr": act, "bias_ptr": act, "y_ptr": act, "dy_ptr": act, "dx_ptr": act, "zb_ptr": act,
        "part_ptr": act, "out_ptr": act, "a_ptr": ad, "b_ptr": ad, "seed_ptr": "*i64",
        "h_ptr": f32, "dh_ptr": f32, "scale_ptr": f32, "db_lora_ptr": f32, "dbias_ptr": f32, "dm_ptr": f32,
        "g_ptr": f32, "inv_norm_ptr": f32, "m_ptr": f32,
    }
    units = {"stride_zn", "stride_pk", "stride_ok"}  # the DoRA kernels' own unit strides (contiguous Zb, part, out)
    # (name, kernel, constexprs, config family, fp32 config table?, min waves, twin flag, mask tile, uses tensor cores)
    rows = [
        ("dora_norm", dora_norm_kernel, {"BLOCK_R": block_r}, SKINNY, True, 0.0, "", (), False),
        ("dora_gemm", dora_gemm_kernel, {**common, "HAS_BIAS": True, "HAS_DROPOUT": False, "GROUP_M": 8}, DORA_GEMM,
         fp32, 0.0, "", (), not fp32),
        ("dora_gemm_dropout", dora_gemm_kernel, {**common, "HAS_BIAS": True, "HAS_DROPOUT": True, "GROUP_M": 8},
         TWO_ACC, fp32, 0.0, "HASH_MASK", ("BLOCK_M", "BLOCK_K"), not fp32),
        ("dora_expand", dora_expand_kernel, {**common, "HAS_BIAS": False, "HAS_DROPOUT": True}, EPILOGUE, fp32, 0.0,
         "", (), not fp32),
        ("dropout_apply", dropout_apply_kernel, {}, EPILOGUE, fp32, 0.0, "HASH_MASK", ("BLOCK_M", "BLOCK_N"), False),
        ("dora_grad_h", dora_grad_h_kernel, {**common, "NEED_DH": True, "NEED_DB_LORA": True, "NEED_DBIAS": True,
                                             "NEED_DM": True}, DORA_SKINNY, fp32, SKINNY_MIN_WAVES, "", (), not fp32),
        ("dora_dx", dora_dx_kernel, {**common, "HAS_DROPOUT": False, "GROUP_M": 8}, DORA_DX, fp32, 0.0, "", (),
         not fp32),
        ("dora_dx_dropout", dora_dx_kernel, {**common, "HAS_DROPOUT": True, "GROUP_M": 8}, TWO_ACC, fp32, 0.0,
         "HASH_MASK", ("BLOCK_M", "BLOCK_N"), not fp32),
        ("dora_dx_add", dora_dx_add_kernel, common, EPILOGUE, fp32, 0.0, "HASH_MASK", ("BLOCK_M", "BLOCK_N"),
         not fp32),
    ]
    entries = []
    for name, fn, constexprs, kind, fp32_table, min_waves, flag, mask_tile, tensor_cores in rows:
        if name == "dropout_apply" and block_r != DORA_RANK_BLOCKS[0]:
            continue  # no rank-r operand: one rank block covers it
        if not gpu_configs(kind, arch, fp32_table, block_r):
            continue  # no config at this rank block: the launchers run `aten` there (dora.functional)
        names = _runtime_args(fn)
        signature = {k: v for k, v in _signature(names, pointers).items() if k not in units}
        consts = {**constexprs, **_units(fn), **{u: 1 for u in units if u in names}}
        launcher = name.replace("_dropout", "")
        entries.append(AotEntry(
            f"{name}[r{block_r}]", fn, signature, consts, gpu_configs(kind, arch, fp32_table, block_r), tensor_cores,
            arch, dtype, min_waves=min_waves, dropout_flag=flag, mask_tile=mask_tile,
            launch_grid=lambda meta, shape, sms, _n=launcher, _d=dtype: dora_launcher_grid(_n, meta, shape, sms, _d),
        ))
        if name in ("dora_norm", "dora_gemm", "dora_dx", "dora_gemm_dropout", "dora_dx_dropout"):
            # W read transposed: GPT-2's Conv1D weight
            t_signature, t_consts = _transposed_w(signature, consts)
            entries.append(dataclasses.replace(entries[-1], name=f"{name}[r{block_r},wT]", signature=t_signature,
                                               constexprs=t_consts))
    return entries


def _plain_transposed_w_entries(arch: Union[int, str], dtype: str, block_r: int) -> List[AotEntry]:
    """The plain op's two GEMMs as they compile for a Conv1D layer (fan_in_fan_out: W read through ``.t()``)."""
    return [
        dataclasses.replace(e, name=e.name.replace("]", ",wT]"),
                            signature=_transposed_w(e.signature, e.constexprs)[0],
                            constexprs=_transposed_w(e.signature, e.constexprs)[1])
        for e in _entries(arch, dtype, block_r) if e.name.split("[")[0] in ("lora_expand_gemm", "dx_with_lora_epilogue")
    ]


DORA_RANK_BLOCKS = (16, 128)  # the extremes: rank 16 (the common case) and 128 (the most live registers)


def dora_aot_entries(arch: Union[int, str]) -> List[AotEntry]:
    """The DoRA kernels (kernels/dora_*.py) and the W-transposed (Conv1D) variants of the plain and DoRA GEMMs,
    bf16 and fp32 at rank blocks 16 and 128: ``python -m lorafast.aot --entries
    lorafast.kernels.registry:dora_aot_entries --arch 80 --arch 90 --arch gfx942``."""
    return [e for dtype in AOT_DTYPES for block_r in DORA_RANK_BLOCKS
            for e in (*_dora_entries(arch, dtype, block_r), *_plain_transposed_w_entries(arch, dtype, block_r))]



# ---- MoE experts (issue 20): the grouped kernels of lorafast.kernels.moe_fwd / moe_bwd -----------------------

# Per-expert ranks above 64 run `aten` (lorafast.moe.functional.MAX_TRITON_RANK): the rank blocks the kernels use.
MOE_RANK_BLOCKS = (16, 32, 64)
# Grid-check stand-in for the expert count: the reference shapes' (M, K, N) read as (S token slots, K, N).
MOE_GRID_EXPERTS = 64
# Unit strides of contiguous operands in the MoE kernels: lora_B's column stride (B_e's rank stride is then E, a
# runtime value) and the bias's; the weight's unit stride depends on its layout (below).
_MOE_UNITS = {"stride_xk", "stride_ak", "stride_yn", "stride_dyn", "stride_dxk", "stride_bc", "stride_biasn"}
# (E, N, K) transformers layout: unit K stride; (E, K, N) gpt-oss layout: unit N stride.
_MOE_WEIGHT_UNITS = {"nk": "stride_wk", "kn": "stride_wn"}


def _moe_launcher_calls(S: int, K: int, N: int, act, r: int = 16) -> Dict[str, Callable[[], object]]:
    import torch

    from lorafast.kernels import moe_bwd, moe_fwd

    E, f32 = MOE_GRID_EXPERTS, torch.float32
    x, w, bias = _meta((S, K), act), _meta((E, N, K), act), _meta((E, N), act)
    a, b, h, dy = _meta((E * r, K), f32), _meta((N, r * E), f32), _meta((S, r), f32), _meta((S, N), act)
    offsets, seed, scale = _meta((E,), torch.int32), _meta((1,), torch.int64), _meta((), f32)
    return {
        "moe_shrink": lambda: moe_fwd.moe_shrink(x, a, offsets, seed, 0.1),
        "moe_lora_gemm": lambda: moe_fwd.moe_lora_gemm(x, w, False, bias, offsets, h, b, scale),
        "moe_expand_add": lambda: moe_fwd.moe_expand_add(dy, bias, offsets, h, b, scale),
        "moe_grad_h": lambda: moe_bwd.moe_grads(dy, x, offsets, a, b, h, scale, seed, 0.1, False, True, True),
        "moe_grad_a": lambda: moe_bwd.moe_grads(dy, x, offsets, a, b, h, scale, seed, 0.1, True, False, False),
        "moe_dx": lambda: moe_bwd.moe_dx(dy, w, False, offsets, h, a, seed, 0.1),
        "moe_dx_lora_add": lambda: moe_bwd.moe_dx_lora_add(x, offsets, h, a, seed, 0.1),
    }


def moe_launcher_grid(kernel: str, meta: Dict[str, object], shape: Tuple[int, int, int], num_sms: int,
                      dtype: str = "bf16") -> Tuple[int, ...]:
    """The grid a MoE launcher computes for a config at ``shape`` = (S, K, N) with MOE_GRID_EXPERTS experts (as
    :func:`launcher_grid`), its row axis counting only the row tiles with work (see below)."""
    import torch

    from lorafast.kernels import configs, moe_bwd, moe_fwd

    captured = []

    def capture(fn, kind, device, grid, args, *rest, **kwargs):
        captured.append((fn, grid))

    act = torch.bfloat16 if dtype == "bf16" else torch.float32
    with contextlib.ExitStack() as stack:
        for module in (moe_fwd, moe_bwd):
            stack.enter_context(mock.patch.object(module, "launch", capture))
        stack.enter_context(mock.patch.object(configs, "num_sms", lambda device: num_sms))
        _moe_launcher_calls(*shape, act)[kernel]()
        fn_name = kernel + "_kernel"
        grids = [grid for fn, grid in captured if getattr(getattr(fn, "fn", fn), "__name__", "") == fn_name]
        if len(grids) != 1:
            raise RuntimeError(f"{kernel}: expected one launch of {fn_name}, saw {len(grids)}")
        grid = [int(g) for g in grids[0](dict(meta))]
    # The row axis is launched at its bound cdiv(S, BLOCK_M) + E + 1; count the tiles that carry rows when every
    # expert's count is a multiple of BLOCK_M (the rest exit at once), so the waves check judges real work.
    grid[0] -= MOE_GRID_EXPERTS + 1
    return tuple(grid)


def _moe_entries(arch: Union[int, str], dtype: str, block_r: int) -> List[AotEntry]:
    from lorafast.kernels.moe_bwd import moe_dx_kernel, moe_dx_lora_add_kernel, moe_grad_a_kernel, moe_grad_h_kernel
    from lorafast.kernels.moe_fwd import moe_expand_add_kernel, moe_lora_gemm_kernel, moe_shrink_kernel

    fp32 = dtype == "fp32"
    common = {"DOT_PRECISION": "ieee", "BLOCK_R": block_r, "BLOCK_E": 256}  # as at run time (see _entries)
    act, ad = f"*{dtype}", f"*{AOT_DTYPES[dtype]}"
    pointers = {
        "x_ptr": act, "w_ptr": act, "bias_ptr": act, "y_ptr": act, "dy_ptr": act, "dx_ptr": act,
        "a_ptr": ad, "b_ptr": ad, "seed_ptr": "*i64", "offsets_ptr": "*i32",
        "h_ptr": "*fp32", "dh_ptr": "*fp32", "da_ptr": "*fp32", "scale_ptr": "*fp32", "db_lora_ptr": "*fp32",
        "dbias_ptr": "*fp32",
    }
    # (name, kernel, constexprs, config family, skinny?, mask tile, weight layouts)
    rows = [
        ("moe_shrink", moe_shrink_kernel, {"HAS_DROPOUT": True}, MOE_SKINNY, True, ("BLOCK_M", "BLOCK_K"), ("",)),
        ("moe_lora_gemm", moe_lora_gemm_kernel, {"HAS_BIAS": True}, MOE_GEMM, False, (), ("nk", "kn")),
        ("moe_expand_add", moe_expand_add_kernel, {"HAS_BIAS": True}, EPILOGUE, False, (), ("",)),
        ("moe_grad_h", moe_grad_h_kernel, {"NEED_DB_LORA": True, "NEED_DBIAS": True}, MOE_DH, True, (), ("",)),
        ("moe_dx", moe_dx_kernel, {"HAS_DROPOUT": True}, MOE_DX, False, ("BLOCK_M", "BLOCK_N"), ("nk", "kn")),
        ("moe_dx_lora_add", moe_dx_lora_add_kernel, {"HAS_DROPOUT": True}, EPILOGUE, False, ("BLOCK_M", "BLOCK_N"),
         ("",)),
        ("moe_grad_a", moe_grad_a_kernel, {"HAS_DROPOUT": True}, MOE_SKINNY, True, ("BLOCK_M", "BLOCK_K"), ("",)),
    ]
    entries = []
    for name, fn, extra, kind, skinny, mask_tile, layouts in rows:
        for layout in layouts:
            units = _MOE_UNITS | ({_MOE_WEIGHT_UNITS[layout]} if layout else set())
            params = _runtime_args(fn)
            signature = {}
            for param in params:
                if param in units:
                    continue
                if param in pointers:
                    signature[param] = pointers[param]
                elif param in FLOAT_SCALARS:
                    signature[param] = "fp32"
                elif param in UNSPECIALISED or param == "E":
                    signature[param] = "i32"
                else:
                    signature[param] = "i32:16"
            label = f"{name}[{layout},r{block_r}]" if layout else f"{name}[r{block_r}]"
            entries.append(AotEntry(
                label, fn, signature, {**common, **extra, **{u: 1 for u in units if u in params}},
                gpu_configs(kind, arch, fp32, block_r), not fp32, arch, dtype,
                launch_grid=lambda meta, shape, sms, _n=name, _d=dtype: moe_launcher_grid(_n, meta, shape, sms, _d),
                min_waves=SKINNY_MIN_WAVES if skinny else 0.0,
                dropout_flag="HAS_DROPOUT" if mask_tile else "", mask_tile=mask_tile,
            ))
    return entries


def moe_aot_entries(arch: Union[int, str]) -> List[AotEntry]:
    """Every MoE kernel × bf16/fp32 × rank block 16/32/64 (weight layouts (E, N, K) and (E, K, N) for the two grouped
    GEMMs): ``python -m lorafast.aot --entries lorafast.kernels.registry:moe_aot_entries``."""
    return [e for dtype in AOT_DTYPES for block_r in MOE_RANK_BLOCKS for e in _moe_entries(arch, dtype, block_r)]


def moe_aot_entries_ci(arch: Union[int, str]) -> List[AotEntry]:
    """The MoE kernels' share of the CI subset: bf16 at rank block 64, the first config of each, sm_90 only."""
    if arch != 90:
        return []
    return [dataclasses.replace(e, configs=e.configs[:1]) for e in _moe_entries(arch, "bf16", 64)]
