"""AOT compile gate: compile every shipped Triton kernel config for sm_80 / sm_90 / gfx942 without a GPU.

Usage::

    python -m lorafast.aot --arch 80 --arch 90 [--arch gfx942] [--json gate.json] [--jobs 2]
           [--entries lorafast.kernels.registry:aot_entries] [--kernel NAME] [--dtype bf16]

For every entry of the kernel registry (``aot_entries(arch)``) and every autotune config it lists, the
kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` (AMD:
``GPUTarget("hip", "gfx942", 64)``) and inspected. NVIDIA: the cubin through Triton's bundled
``cuobjdump``: registers, spill bytes (stack + local memory), shared memory (``metadata.shared``, what
Triton asks the driver for), the tensor-core instructions in the SASS (HMMA on sm_80; HGMMA, or HMMA, on
sm_90) and GPU-scope memory fences (``MEMBAR`` other than ``MEMBAR.ALL.CTA``). AMD: the AMDGCN
assembly's metadata: VGPR/SGPR spill counts and the private (scratch) segment, LDS
(``.group_segment_fixed_size``, limit 64 KiB), MFMA instructions, and cache write-back/invalidate fences
(``buffer_wbl2``/``buffer_inv``, what an acq_rel atomic becomes). The exit status is non-zero on any
compile error, spill, shared memory/LDS over the limit, an entry flagged ``uses_dot`` without tensor-
core/MFMA instructions, a fence in a kernel not marked ``allow_membar``, a dropout hash over
``HASH_MAX_INSTR_PER_ELEMENT`` instructions per mask element, or a skinny pass with fewer than
``min_waves`` waves at a reference shape.

Dropout hash cost (entries with ``dropout_flag``): the same (kernel, config) is compiled with the flag
off too, and

    instructions per mask element = (static instructions with the mask − without it)
                                    / (mask elements per thread per loop step)

where mask elements per thread per loop step = product of the entry's ``mask_tile`` config keys
(BLOCK_M·BLOCK_K for the shrink and dA passes, which regenerate one X tile per step; BLOCK_M·BLOCK_N
for the dX epilogues, which compute one tile per program) / (num_warps · warp size). A static count
is what one loop step executes, plus the once-per-program row/column key hashes and any change in
register allocation, so it slightly overstates the per-element cost (a row key is shared by a whole
row of the tile).

Grid check (entries with ``launch_grid``): for each config, the launcher's own grid function (the
launcher runs on meta tensors with ``launch`` stubbed, ``num_sms`` patched) gives the CTA count at
each of the registry's ``REFERENCE_SHAPES``; waves = CTAs / SMs with SMs = 132 (H100 SXM) for the
CUDA targets (304 CUs, MI300X, for gfx942: reported, not judged). An entry with ``min_waves`` fails
below that many waves on a CUDA target.

Specialisation: the gate compiles the variant the JIT builds for contiguous, 16-byte-aligned torch
tensors. Pointer arguments get ``tt.divisibility=16``; an integer argument typed ``"i32:16"`` (or
``"i64:16"``) gets the same hint; an argument the JIT would see as the constant 1 (a unit stride)
belongs in the entry's ``constexprs`` (``{"stride_xk": 1}``), exactly as the JIT specialises it.

The compiler cannot run while ``TRITON_INTERPRET=1`` (``@triton.jit`` then returns interpreter
objects), so the command line re-executes itself without that variable when it is set.
Works with triton 3.0-3.9 (`_ast_source` builds the ASTSource form each takes); run with 3.0, 3.6 and 3.9.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import inspect
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

DEFAULT_ENTRIES = "lorafast.kernels.registry:aot_entries"

# cudaDevAttrMaxSharedMemoryPerBlockOptin: the most dynamic shared memory one block may request.
SMEM_LIMIT_BYTES: Dict[int, int] = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# LDS per workgroup on CDNA2/CDNA3.
LDS_LIMIT_BYTES: Dict[str, int] = {"gfx90a": 65536, "gfx942": 65536}
# SMs (CUs) the grid check counts waves against.
GRID_SMS: Dict[str, int] = {"cuda": 132, "hip": 304}
# Ceiling on the dropout hash's instructions per mask element (definition in the module docstring), judged
# on the 16-bit (tensor-core) rows, the path whose speed the hash is for. The per-element work is ~11 (one
# xor, one mix32, a compare and the select); the static count adds the per-tile row/column keys. Measured
# with triton 3.9 over every shipped bf16 row (424-config run): 17.0-26.0 on sm_80, 18.6-25.7 on sm_90,
# 0.9-50.3 on gfx942 (64-lane waves hold half the elements per lane, so the per-row keys weigh more; the
# dA pass rehashes its rows every step). fp32 rows (small tiles: few elements per thread to spread the key
# hashes over) are reported only: up to 38.5 on CUDA, 93 on gfx942. A Philox mask (tl.rand) measured
# 62.7 / 74.6 on the same toy kernel (sm_90 / gfx942): `defect_philox_dropout` is the check's control.
# A twin compile can come out larger than the masked one (different pipelining or unrolling): a negative
# difference is reported as a note, not a cost.
HASH_MAX_INSTR_PER_ELEMENT: Dict[str, float] = {"cuda": 32.0, "hip": 60.0}

_TC_SASS_OPS = ("HGMMA", "HMMA")
_RESOURCE_RE = re.compile(
    r"Function\s+(?P<name>\S+):\s*\n\s*REG:(?P<reg>\d+)\s+STACK:(?P<stack>\d+)\s+SHARED:(?P<shared>\d+)"
    r"\s+LOCAL:(?P<local>\d+)"
)
# One SASS instruction per line: "/*0080*/   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;"
_SASS_INSTR_RE = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?P<op>[^;]*?);", re.MULTILINE)
# An AMDGCN instruction line: indented mnemonic (s_*, v_*, global_*, buffer_*, ds_*, ...), no directive.
_GCN_INSTR_RE = re.compile(r"^\s+(?P<op>[a-z][a-z0-9_]*)(?:\s|$)", re.MULTILINE)
_GCN_FENCE_OPS = ("buffer_wbl2", "buffer_inv", "buffer_wbinvl1", "global_wb", "global_inv")


def is_amd(arch: Union[int, str]) -> bool:
    """True for an AMD target name (``"gfx942"``); CUDA targets are compute capabilities (80, 90)."""
    return isinstance(arch, str)


def arch_label(arch: Union[int, str]) -> str:
    return arch if is_amd(arch) else f"sm_{arch}"


def parse_arch(text: str) -> Union[int, str]:
    """``--arch`` value: a compute capability in SMEM_LIMIT_BYTES or an AMD target in LDS_LIMIT_BYTES."""
    if text.isdigit() and int(text) in SMEM_LIMIT_BYTES:
        return int(text)
    if text in LDS_LIMIT_BYTES:
        return text
    known = [str(a) for a in sorted(SMEM_LIMIT_BYTES)] + sorted(LDS_LIMIT_BYTES)
    raise argparse.ArgumentTypeError(f"unknown arch {text!r}; expected one of {', '.join(known)}")


@dataclass
class GateRow:
    """One compiled (kernel, config, arch) and what the gate found in its binary."""

    kernel: str
    config: str
    arch: Union[int, str]
    dtype: str
    uses_dot: bool
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None
    smem_bytes: Optional[int] = None
    tc_instructions: Optional[int] = None
    tc_op: str = ""
    ptx_mma: Optional[int] = None
    instructions: Optional[int] = None
    membar: Optional[int] = None
    allow_membar: bool = False
    hash_instr_per_element: Optional[float] = None
    ctas: Dict[str, int] = field(default_factory=dict)
    waves: Dict[str, float] = field(default_factory=dict)
    min_waves: float = 0.0
    compile_s: float = 0.0
    error: str = ""
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def judge(self) -> None:
        """Fill ``problems`` (gate failures) and ``notes`` (worth a look, not failures)."""
        self.problems, self.notes = [], []
        if self.error:
            self.problems.append("compile error: " + self.error.strip().splitlines()[-1][:200])
            return
        amd = is_amd(self.arch)
        if self.spill_bytes:
            what = "scratch (VGPR/SGPR spills, private segment)" if amd else "stack+local"
            self.problems.append(f"spills {self.spill_bytes} B ({what})")
        limit = LDS_LIMIT_BYTES.get(self.arch) if amd else SMEM_LIMIT_BYTES.get(self.arch)
        if limit is not None and self.smem_bytes is not None and self.smem_bytes > limit:
            what = "LDS" if amd else "shared memory"
            self.problems.append(f"{what} {self.smem_bytes} B > {arch_label(self.arch)} limit {limit} B")
        if self.uses_dot and not self.tc_instructions:
            self.problems.append("uses_dot but no " + ("MFMA" if amd else "tensor-core") + " instruction")
        if not amd and self.uses_dot and self.arch >= 90 and self.tc_instructions and self.tc_op != "HGMMA":
            self.notes.append("dot compiled to HMMA (mma.sync), not wgmma")
        if self.membar and not self.allow_membar:
            what = "cache write-back/invalidate fence" if amd else "MEMBAR"
            self.problems.append(f"{self.membar} {what} instruction(s) (an atomic without sem='relaxed'?)")
        ceiling = HASH_MAX_INSTR_PER_ELEMENT["hip" if amd else "cuda"]
        cost = self.hash_instr_per_element
        if cost is not None and cost < 0:
            self.notes.append(f"dropout-off twin compiled {-cost:.1f} instructions/element larger: no hash cost")
        elif cost is not None and cost > ceiling and self.dtype in ("bf16", "fp16"):
            self.problems.append(f"dropout hash {cost:.1f} instructions/element > {ceiling:g}")
        if self.min_waves and not amd:
            for shape, waves in self.waves.items():
                if waves < self.min_waves:
                    self.problems.append(f"{shape}: {self.ctas[shape]} CTAs = {waves:.2f} waves < {self.min_waves:g}")


def config_label(config) -> str:
    """A readable, stable name for a ``triton.Config``: block sizes, warps, stages."""
    parts = [f"{k}={v}" for k, v in config.kwargs.items()]
    parts.append(f"w{config.num_warps}")
    parts.append(f"s{config.num_stages}")
    if getattr(config, "num_ctas", 1) not in (1, None):
        parts.append(f"ctas{config.num_ctas}")
    if getattr(config, "maxnreg", None):
        parts.append(f"maxnreg{config.maxnreg}")
    return ",".join(parts)


def load_entries(spec: str, arch: Union[int, str]) -> list:
    """Call the entries function named by ``spec`` ("pkg.module:func" or "path/to/file.py:func")."""
    module_name, _, func_name = spec.rpartition(":")
    if not module_name or not func_name:
        raise ValueError(f"--entries must look like 'module:function' or 'file.py:function', got {spec!r}")
    if module_name.endswith(".py"):
        path = Path(module_name).resolve()
        synthetic = "_lorafast_aot_entries_" + re.sub(r"\W", "_", str(path))
        module = sys.modules.get(synthetic)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(synthetic, path)
            if file_spec is None or file_spec.loader is None:
                raise ImportError(f"cannot load entries file {path}")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[synthetic] = module
            file_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    return list(getattr(module, func_name)(arch))


def _jit_function(fn):
    """The raw JITFunction behind ``fn`` (unwraps triton.autotune / triton.heuristics wrappers)."""
    from triton.runtime.jit import JITFunction

    while not isinstance(fn, JITFunction):
        inner = getattr(fn, "fn", None)
        if inner is None:
            raise TypeError(f"{fn!r} is not a @triton.jit function (is TRITON_INTERPRET=1 set?)")
        fn = inner
    return fn


def _ast_source(fn, signature: Dict[str, str], constexprs: Dict[str, object], attrs: dict):
    """Build an ASTSource across triton versions.

    ``signature`` names every parameter ("constexpr" for the constexpr ones), ``attrs`` maps ``(index,)`` to
    ``[["tt.divisibility", 16]]``: the form of triton >= 3.3, passed as is. Triton 3.0-3.2 take the old form,
    built here: ``constants=`` instead of ``constexprs=``, a signature of the runtime parameters only (what their
    JITFunction.run passes) and an ``AttrsDescriptor`` holding the divisible parameters' indices.
    """
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    if "constants" in params:
        runtime = {name: ty for name, ty in signature.items() if ty != "constexpr"}
        divisible = sorted(key[0] for key, props in attrs.items() if ["tt.divisibility", 16] in props)
        return ASTSource(fn, runtime, constants=constexprs, attrs=_attrs_descriptor(divisible))
    raise RuntimeError("unsupported triton version: ASTSource takes neither constexprs nor constants")


def _attrs_descriptor(divisible: List[int]):
    """Triton 3.0-3.2's AttrsDescriptor marking the parameters at ``divisible`` (indices) as 16-divisible."""
    try:  # triton 3.2: properties by name, set and then exposed as slots
        from triton.backends.compiler import AttrsDescriptor

        descriptor = AttrsDescriptor()
        descriptor.arg_properties["tt.divisibility"] = list(divisible)
        descriptor._init_slots()
        return descriptor
    except ImportError:  # triton 3.0, 3.1: a dataclass of index sets
        from triton.compiler.compiler import AttrsDescriptor

        return AttrsDescriptor(divisible_by_16=set(divisible), equal_to_1=set())


def _constexpr_defaults(fn) -> Dict[str, object]:
    """constexpr parameters of ``fn`` that have a default value (what the JIT fills when a launch omits them)."""
    defaults = {}
    for param in fn.params:
        if param.is_constexpr and param.default is not inspect.Parameter.empty:
            defaults[param.name] = param.default
    return defaults


def build_source(entry, config, overrides: Optional[Dict[str, object]] = None):
    """The ASTSource the JIT would build for ``entry`` launched with ``config`` on aligned tensors.

    constexpr parameters the entry leaves out take the kernel's default values (so a new defaulted
    constexpr does not break the gate); ``overrides`` replace constexpr values (the gate's dropout-off variant).
    """
    fn = _jit_function(entry.fn)
    given = {**entry.constexprs, **config.kwargs, **(overrides or {})}
    constexprs = {**{k: v for k, v in _constexpr_defaults(fn).items() if k not in entry.signature}, **given}
    names = list(fn.arg_names)
    unknown = sorted((set(entry.signature) | set(given)) - set(names))
    missing = [n for n in names if n not in entry.signature and n not in constexprs]
    if unknown or missing:
        raise ValueError(
            f"entry {entry.name}: signature/constexprs do not match {fn.__name__}({', '.join(names)}): "
            f"unknown {unknown}, missing {missing}"
        )
    signature: Dict[str, str] = {}
    attrs: Dict[Tuple[int, ...], list] = {}
    for index, name in enumerate(names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty, _, hint = entry.signature[name].partition(":")
        signature[name] = ty
        if ty.startswith("*") or hint == "16":
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif hint:
            raise ValueError(f"entry {entry.name}, argument {name}: only the ':16' hint exists, got {hint!r}")
    return fn, _ast_source(fn, signature, constexprs, attrs)


def _cuobjdump() -> str:
    try:
        from triton import knobs

        return knobs.nvidia.cuobjdump.path
    except (ImportError, AttributeError):
        import triton

        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def sass_stats(sass: str) -> Dict[str, object]:
    """Instruction count (NOPs excluded), MEMBAR count and tensor-core op counts of a SASS listing."""
    ops = []
    for m in _SASS_INSTR_RE.finditer(sass):
        words = m["op"].split()
        if words and words[0].startswith("@"):  # a predicate guard: "@P0 BRA ..."
            words = words[1:]
        if words:
            ops.append(words[0])
    return {
        "instructions": sum(1 for op in ops if op != "NOP"),
        # GPU/system-scope fences only: MEMBAR.ALL.CTA is the CTA-local fence Triton emits before a wgmma
        # reads registers written to shared memory (fence.proxy.async), not an atomic's acq_rel fence.
        "membar": sum(1 for op in ops if op.startswith("MEMBAR") and not op.endswith(".CTA")),
        "tc_counts": {name: sum(1 for op in ops if op.startswith(name + ".")) for name in _TC_SASS_OPS},
    }


def inspect_cubin(cubin: bytes, kernel_name: str) -> Dict[str, object]:
    """Registers, stack/local/static-shared bytes, instruction/MEMBAR/tensor-core counts from a cubin."""
    tool = _cuobjdump()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([tool, "--dump-resource-usage", path], check=True, capture_output=True,
                               text=True)
        sass = subprocess.run([tool, "-sass", path], check=True, capture_output=True, text=True).stdout
    functions = {m["name"]: m for m in _RESOURCE_RE.finditer(usage.stdout)}
    if not functions:
        raise RuntimeError(f"cannot parse cuobjdump resource usage:\n{usage.stdout}")
    main = functions.get(kernel_name) or next(iter(functions.values()))
    # Local memory of noinline callees is spilled state too; count every function in the cubin.
    spill = sum(int(m["stack"]) + int(m["local"]) for m in functions.values())
    return {"regs": int(main["reg"]), "spill_bytes": spill, "static_smem": int(main["shared"]), **sass_stats(sass)}


def _gcn_field(asm: str, name: str) -> Optional[int]:
    found = re.findall(rf"^\s*\.?{re.escape(name)}:?\s+(\d+)", asm, re.MULTILINE)
    return max(int(v) for v in found) if found else None


def inspect_amdgcn(asm: str) -> Dict[str, object]:
    """VGPRs, spills (VGPR + SGPR spill counts in 4-byte slots, plus the private segment), LDS, instruction,
    fence and MFMA counts from AMDGCN assembly (``compiled.asm["amdgcn"]``)."""
    body = asm.split(".end_amdgcn_kernel")[0] if ".end_amdgcn_kernel" in asm else asm
    ops = [m["op"] for m in _GCN_INSTR_RE.finditer(body)]
    vgpr_spill = _gcn_field(asm, ".vgpr_spill_count") or 0
    sgpr_spill = _gcn_field(asm, ".sgpr_spill_count") or 0
    private = _gcn_field(asm, ".private_segment_fixed_size") or 0
    return {
        "regs": _gcn_field(asm, ".vgpr_count"),
        "spill_bytes": max(4 * (vgpr_spill + sgpr_spill), private),
        "lds": _gcn_field(asm, ".group_segment_fixed_size") or 0,
        "instructions": len(ops),
        "membar": sum(1 for op in ops if op.startswith(_GCN_FENCE_OPS)),
        "tc_counts": {"MFMA": sum(1 for op in ops if op.startswith("v_mfma"))},
    }


def _compile(entry, config, overrides: Optional[Dict[str, object]] = None):
    """(compiled kernel, inspection dict) for one (entry, config) on ``entry.arch``."""
    import triton
    from triton.backends.compiler import GPUTarget

    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if getattr(config, "num_ctas", 1) not in (1, None):
        options["num_ctas"] = config.num_ctas
    if getattr(config, "maxnreg", None):
        options["maxnreg"] = config.maxnreg
    _, src = build_source(entry, config, overrides)
    amd = is_amd(entry.arch)
    target = GPUTarget("hip", entry.arch, 64) if amd else GPUTarget("cuda", entry.arch, 32)
    # ptxas failures print the whole PTX to stdout; the exception already carries the ptxas log.
    with contextlib.redirect_stdout(io.StringIO()):
        kernel = triton.compile(src, target=target, options=options)
    found = inspect_amdgcn(kernel.asm["amdgcn"]) if amd else inspect_cubin(kernel.asm["cubin"], kernel.metadata.name)
    return kernel, found


def mask_elements_per_thread(entry, config) -> float:
    """Mask elements one thread computes per loop step: the product of ``entry.mask_tile``'s config values
    over the program's threads (num_warps × warp size)."""
    elements = 1
    for name in entry.mask_tile:
        elements *= int(config.kwargs[name])
    return elements / (config.num_warps * (64 if is_amd(entry.arch) else 32))


def compile_entry_config(entry, config) -> GateRow:
    """Compile one (entry, config) for ``entry.arch`` (and its dropout-off twin) and fill a judged GateRow."""
    row = GateRow(kernel=entry.name, config=config_label(config), arch=entry.arch, dtype=entry.dtype,
                  uses_dot=bool(entry.uses_dot), allow_membar=bool(getattr(entry, "allow_membar", False)),
                  min_waves=float(getattr(entry, "min_waves", 0.0) or 0.0))
    start = time.perf_counter()
    try:
        kernel, found = _compile(entry, config)
        flag = getattr(entry, "dropout_flag", "")
        if flag and getattr(entry, "mask_tile", ()):
            _, off = _compile(entry, config, {flag: False})
            row.hash_instr_per_element = round(
                (found["instructions"] - off["instructions"]) / mask_elements_per_thread(entry, config), 2
            )
    except Exception as exc:  # every failure becomes a gate row; the gate reports them all at once
        row.error = f"{type(exc).__name__}: {exc}"[-4000:]
        row.compile_s = time.perf_counter() - start
        row.judge()
        return row
    row.compile_s = time.perf_counter() - start
    row.regs = found["regs"]
    row.spill_bytes = found["spill_bytes"]
    row.instructions = found["instructions"]
    row.membar = found["membar"]
    counts = found["tc_counts"]
    row.tc_instructions = sum(counts.values())
    row.tc_op = "+".join(op for op in counts if counts[op]) or "-"
    if is_amd(entry.arch):
        row.smem_bytes = max(int(kernel.metadata.shared), found["lds"])
    else:
        # metadata.shared is the dynamic allocation Triton requests at launch (and what Triton itself
        # compares with the device limit); static shared memory, if ptxas placed any, comes on top.
        row.smem_bytes = int(kernel.metadata.shared) + found["static_smem"]
        ptx = kernel.asm["ptx"]
        row.ptx_mma = ptx.count("mma.sync") + ptx.count("wgmma.mma_async")
    row.judge()
    return row


def grid_report(entry, config) -> Tuple[Dict[str, int], Dict[str, float]]:
    """CTAs and waves of ``entry``'s launcher grid for ``config`` at each reference shape."""
    from lorafast.kernels.registry import REFERENCE_SHAPES

    sms = GRID_SMS["hip" if is_amd(entry.arch) else "cuda"]
    meta = {**entry.constexprs, **config.kwargs}
    ctas, waves = {}, {}
    for label, shape in REFERENCE_SHAPES.items():
        n = 1
        for g in entry.launch_grid(meta, shape, sms):
            n *= g
        ctas[label] = n
        waves[label] = round(n / sms, 2)
    return ctas, waves


_WORKER_ENTRIES: Dict[Tuple[str, Union[int, str]], list] = {}


def _quiet_triton_warnings() -> None:
    # Triton 3.9 warns once per process that the FP-fusion default will change; it is noise here.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _compile_job(spec: str, arch: Union[int, str], entry_index: int, config_index: int) -> GateRow:
    _quiet_triton_warnings()
    key = (spec, arch)
    if key not in _WORKER_ENTRIES:
        _WORKER_ENTRIES[key] = load_entries(spec, arch)
    entry = _WORKER_ENTRIES[key][entry_index]
    return compile_entry_config(entry, entry.configs[config_index])


def run_gate(arches: Sequence[Union[int, str]], entries_spec: str = DEFAULT_ENTRIES, jobs: int = 2,
             name_filter: str = "", dtypes: Sequence[str] = ()) -> List[GateRow]:
    """Compile every (entry, config) for every arch; rows come back in registry order, with the grid check.

    ``name_filter`` (a substring of the entry name) and ``dtypes`` narrow the run, for iterating on
    one kernel; the gate proper runs everything.
    """
    _quiet_triton_warnings()
    work, grids = [], []
    for arch in arches:
        for entry_index, entry in enumerate(load_entries(entries_spec, arch)):
            if name_filter not in entry.name or (dtypes and entry.dtype not in dtypes):
                continue
            if entry.arch != arch:
                raise ValueError(f"aot_entries({arch!r}) returned {entry.name} for arch {entry.arch!r}")
            if not entry.configs:
                raise ValueError(f"entry {entry.name} ({arch_label(arch)}, {entry.dtype}) lists no configs")
            for i, config in enumerate(entry.configs):
                work.append((entries_spec, arch, entry_index, i))
                grids.append(grid_report(entry, config) if getattr(entry, "launch_grid", None) else None)
    rows = _run_jobs(work, jobs)
    for row, grid in zip(rows, grids):
        if grid is not None:
            row.ctas, row.waves = grid
            row.judge()
    return rows


def _run_jobs(work: list, jobs: int) -> List[GateRow]:
    """Compile every job in ``jobs`` worker processes; a job that kills its process becomes a failed row.

    A compiler crash (a segfault in libtriton: triton 3.0 has them) breaks the whole pool. The unfinished jobs
    then run one worker at a time until the crash recurs, which names the job (a row with the error), and the
    rest go back to ``jobs`` workers. With ``jobs`` <= 1 the jobs run in this process (a crash ends the gate).
    """
    if jobs <= 1 or len(work) <= 1:
        return [_compile_job(*job) for job in work]
    rows: List[Optional[GateRow]] = [None] * len(work)
    todo, workers = list(range(len(work))), jobs
    while todo:
        # spawn, not fork: the parent has imported triton/torch, whose threads do not survive a fork.
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [(i, pool.submit(_compile_job, *work[i])) for i in todo]
            for i, future in futures:
                try:
                    rows[i] = future.result()
                except BrokenProcessPool:
                    break
        todo = [i for i in todo if rows[i] is None]
        if todo and workers == 1:
            rows[todo[0]] = _crashed_row(*work[todo[0]])
            todo, workers = todo[1:], jobs
        elif todo:
            workers = 1
    return rows


def _crashed_row(entries_spec: str, arch: Union[int, str], entry_index: int, config_index: int) -> GateRow:
    entry = load_entries(entries_spec, arch)[entry_index]
    config = entry.configs[config_index]
    row = GateRow(kernel=entry.name, config=config_label(config), arch=entry.arch, dtype=entry.dtype,
                  uses_dot=bool(entry.uses_dot), error="compiler process crashed (killed by a signal)")
    row.judge()
    return row


def format_table(rows: Sequence[GateRow]) -> str:
    """A fixed-width table: one line per compiled config, problems and notes in the last column."""
    header = ("kernel", "dtype", "arch", "config", "regs", "spill", "smem", "tc", "instr", "hash/el", "min CTAs",
              "time", "status")
    lines = [header]
    for r in rows:
        notes = f" ({'; '.join(r.notes)})" if r.notes else ""
        status = "; ".join(r.problems) if r.problems else "ok" + notes
        lines.append((
            r.kernel, r.dtype, arch_label(r.arch), r.config,
            "-" if r.regs is None else str(r.regs),
            "-" if r.spill_bytes is None else str(r.spill_bytes),
            "-" if r.smem_bytes is None else str(r.smem_bytes),
            "-" if r.tc_instructions is None else f"{r.tc_op}x{r.tc_instructions}",
            "-" if r.instructions is None else str(r.instructions),
            "-" if r.hash_instr_per_element is None else f"{r.hash_instr_per_element:.1f}",
            "-" if not r.ctas else f"{min(r.ctas.values())} ({min(r.waves.values()):.1f}w)",
            f"{r.compile_s:.1f}s", status,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines
    )


def grid_table(rows: Sequence[GateRow]) -> str:
    """CTAs (waves) per reference shape for every (kernel, config) with a grid check, one CUDA arch only."""
    cuda = sorted({r.arch for r in rows if r.ctas and not is_amd(r.arch)})
    chosen = [r for r in rows if r.ctas and cuda and r.arch == cuda[-1]]
    if not chosen:
        return ""
    shapes = list(chosen[0].ctas)
    lines = [f"CTAs (waves of {GRID_SMS['cuda']} SMs) per reference shape, {arch_label(cuda[-1])}:",
             "  ".join(["kernel", "dtype", "config", *shapes])]
    seen = set()
    for r in chosen:
        base = r.kernel.split("[")[0]
        if (base, r.dtype, r.config) in seen:  # the grid does not depend on the rank block
            continue
        seen.add((base, r.dtype, r.config))
        cells = [f"{r.ctas[s]} ({r.waves[s]:.2f})" for s in shapes]
        lines.append("  ".join([base, r.dtype, r.config, *cells]))
    return "\n".join(lines)


def summarise(rows: Sequence[GateRow]) -> Dict[str, object]:
    """Counts per arch, failures, and the dropout hash's instructions/element range per arch."""
    out: Dict[str, object] = {}
    for arch in dict.fromkeys(r.arch for r in rows):
        mine = [r for r in rows if r.arch == arch]
        hashes = [r.hash_instr_per_element for r in mine if r.hash_instr_per_element is not None]
        out[arch_label(arch)] = {
            "configs": len(mine), "failed": sum(1 for r in mine if r.problems),
            "hash_instr_per_element": {"min": min(hashes), "median": sorted(hashes)[len(hashes) // 2],
                                       "max": max(hashes)} if hashes else None,
            "membar_rows": sum(1 for r in mine if r.membar),
        }
    return out


def _without_interpreter_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns 0 when every config passes, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m lorafast.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=parse_arch, action="append",
                        help="compute capability (80, 86, 89, 90) or AMD target (gfx942, gfx90a) to compile "
                             "for (repeatable; default: 80 and 90)")
    parser.add_argument("--json", type=Path, help="write the rows and a summary to this file")
    parser.add_argument("--entries", default=DEFAULT_ENTRIES,
                        help="'module:function' or 'file.py:function' giving entries (default: %(default)s)",
                        metavar="SPEC")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="compile processes (default: %(default)s)")
    parser.add_argument("--kernel", default="", help="only entries whose name contains this")
    parser.add_argument("--dtype", action="append", default=[], help="only this dtype (repeatable)")
    args = parser.parse_args(argv)
    arches = args.arch or [80, 90]

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # @triton.jit returns interpreter objects when this is set; compile in a clean process.
        raw = list(sys.argv[1:] if argv is None else argv)
        cmd = [sys.executable, "-m", "lorafast.aot", *raw]
        return subprocess.run(cmd, env=_without_interpreter_env()).returncode

    import triton

    start = time.perf_counter()
    rows = run_gate(arches, args.entries, args.jobs, args.kernel, args.dtype)
    if not rows:
        print("no entries matched", file=sys.stderr)
        return 1
    wall = time.perf_counter() - start
    failed = [r for r in rows if r.problems]
    print(format_table(rows))
    grids = grid_table(rows)
    if grids:
        print("\n" + grids)
    summary = summarise(rows)
    for arch, info in summary.items():
        h = info["hash_instr_per_element"]
        hash_text = (f"; dropout hash {h['min']:.1f}-{h['max']:.1f} instructions/element "
                     f"(median {h['median']:.1f})") if h else ""
        print(f"{arch}: {info['configs']} configs, {info['failed']} failed{hash_text}")
    print(f"\n{len(rows)} configs compiled for {', '.join(arch_label(a) for a in arches)} with triton "
          f"{triton.__version__} in {wall:.1f}s wall ({args.jobs} processes); {len(failed)} failed.")
    if args.json:
        report = {
            "triton_version": triton.__version__, "arches": arches, "jobs": args.jobs,
            "wall_s": round(wall, 2), "passed": not failed,
            "smem_limit_bytes": {arch_label(a): (LDS_LIMIT_BYTES[a] if is_amd(a) else SMEM_LIMIT_BYTES[a])
                                 for a in arches},
            "hash_max_instr_per_element": HASH_MAX_INSTR_PER_ELEMENT, "grid_sms": GRID_SMS,
            "summary": summary,
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(report, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    # Run through the importable module so pickled rows and jobs name `lorafast.aot`, not `__main__`.
    from lorafast.aot import main as _main

    sys.exit(_main())
