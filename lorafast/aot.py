"""AOT compile gate: compile every shipped Triton kernel config for sm_80 / sm_90 without a GPU.

Usage::

    python -m lorafast.aot --arch 80 --arch 90 [--json gate.json] [--jobs 2]
           [--entries lorafast.kernels.registry:aot_entries] [--kernel NAME] [--dtype bf16]

For every entry of the kernel registry (``aot_entries(arch)``) and every autotune config it lists,
the kernel is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``
and the cubin is inspected with Triton's bundled ``cuobjdump``: registers, spill bytes
(stack + local memory), shared memory (``metadata.shared``, what Triton asks the driver for) and the
tensor-core instructions in the SASS (HMMA on sm_80; HGMMA, or HMMA, on sm_90). The exit status is
non-zero on any compile error, spill, shared memory over the arch's per-block opt-in limit, or an
entry flagged ``uses_dot`` whose SASS has no tensor-core instruction.

Specialisation: the gate compiles the variant the JIT builds for contiguous, 16-byte-aligned torch
tensors. Pointer arguments get ``tt.divisibility=16``; an integer argument typed ``"i32:16"`` (or
``"i64:16"``) gets the same hint; an argument the JIT would see as the constant 1 (a unit stride)
belongs in the entry's ``constexprs`` (``{"stride_xk": 1}``), exactly as the JIT specialises it.

The compiler cannot run while ``TRITON_INTERPRET=1`` (``@triton.jit`` then returns interpreter
objects), so the command line re-executes itself without that variable when it is set.
Needs triton >= 3.2 (the ``ASTSource(fn, signature, constexprs, attrs)`` form); checked with 3.9.
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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

DEFAULT_ENTRIES = "lorafast.kernels.registry:aot_entries"

# cudaDevAttrMaxSharedMemoryPerBlockOptin: the most dynamic shared memory one block may request.
SMEM_LIMIT_BYTES: Dict[int, int] = {80: 166912, 86: 101376, 89: 101376, 90: 232448}

_TC_SASS_OPS = ("HGMMA", "HMMA")
_RESOURCE_RE = re.compile(
    r"Function\s+(?P<name>\S+):\s*\n\s*REG:(?P<reg>\d+)\s+STACK:(?P<stack>\d+)\s+SHARED:(?P<shared>\d+)"
    r"\s+LOCAL:(?P<local>\d+)"
)


@dataclass
class GateRow:
    """One compiled (kernel, config, arch) and what the gate found in its cubin."""

    kernel: str
    config: str
    arch: int
    dtype: str
    uses_dot: bool
    regs: Optional[int] = None
    spill_bytes: Optional[int] = None
    smem_bytes: Optional[int] = None
    tc_instructions: Optional[int] = None
    tc_op: str = ""
    ptx_mma: Optional[int] = None
    compile_s: float = 0.0
    error: str = ""
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def judge(self) -> None:
        """Fill ``problems`` (gate failures) and ``notes`` (worth a look, not failures)."""
        if self.error:
            self.problems.append("compile error: " + self.error.strip().splitlines()[-1][:200])
            return
        if self.spill_bytes:
            self.problems.append(f"spills {self.spill_bytes} B (stack+local)")
        limit = SMEM_LIMIT_BYTES.get(self.arch)
        if limit is not None and self.smem_bytes is not None and self.smem_bytes > limit:
            self.problems.append(f"shared memory {self.smem_bytes} B > sm_{self.arch} limit {limit} B")
        if self.uses_dot and not self.tc_instructions:
            self.problems.append("uses_dot but no tensor-core instruction in SASS")
        if self.uses_dot and self.arch >= 90 and self.tc_instructions and self.tc_op != "HGMMA":
            self.notes.append("dot compiled to HMMA (mma.sync), not wgmma")


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


def load_entries(spec: str, arch: int) -> list:
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
    """Build an ASTSource across triton versions (the constexpr keyword was renamed over time)."""
    from triton.compiler import ASTSource

    params = inspect.signature(ASTSource.__init__).parameters
    if "constexprs" in params:
        return ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    if "constants" in params:
        return ASTSource(fn, signature, constants=constexprs, attrs=attrs)
    raise RuntimeError("unsupported triton version: ASTSource takes neither constexprs nor constants")


def build_source(entry, config):
    """The ASTSource the JIT would build for ``entry`` launched with ``config`` on aligned tensors."""
    fn = _jit_function(entry.fn)
    constexprs = {**entry.constexprs, **config.kwargs}
    names = list(fn.arg_names)
    unknown = sorted((set(entry.signature) | set(constexprs)) - set(names))
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


def inspect_cubin(cubin: bytes, kernel_name: str) -> Dict[str, object]:
    """Registers, stack/local/static-shared bytes and tensor-core op counts from a cubin."""
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
    counts = {op: len(re.findall(rf"\b{op}\.", sass)) for op in _TC_SASS_OPS}
    return {
        "regs": int(main["reg"]),
        "spill_bytes": spill,
        "static_smem": int(main["shared"]),
        "tc_counts": counts,
    }


def compile_entry_config(entry, config) -> GateRow:
    """Compile one (entry, config) for ``entry.arch`` and fill a judged GateRow."""
    import triton
    from triton.backends.compiler import GPUTarget

    row = GateRow(kernel=entry.name, config=config_label(config), arch=entry.arch, dtype=entry.dtype,
                  uses_dot=bool(entry.uses_dot))
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    if getattr(config, "num_ctas", 1) not in (1, None):
        options["num_ctas"] = config.num_ctas
    if getattr(config, "maxnreg", None):
        options["maxnreg"] = config.maxnreg
    start = time.perf_counter()
    try:
        fn, src = build_source(entry, config)
        # ptxas failures print the whole PTX to stdout; the exception already carries the ptxas log.
        with contextlib.redirect_stdout(io.StringIO()):
            kernel = triton.compile(src, target=GPUTarget("cuda", entry.arch, 32), options=options)
        found = inspect_cubin(kernel.asm["cubin"], kernel.metadata.name)
    except Exception as exc:  # every failure becomes a gate row; the gate reports them all at once
        row.error = f"{type(exc).__name__}: {exc}"[-4000:]
        row.compile_s = time.perf_counter() - start
        row.judge()
        return row
    row.compile_s = time.perf_counter() - start
    row.regs = found["regs"]
    row.spill_bytes = found["spill_bytes"]
    # metadata.shared is the dynamic allocation Triton requests at launch (and what Triton itself
    # compares with the device limit); static shared memory, if ptxas placed any, comes on top.
    row.smem_bytes = int(kernel.metadata.shared) + found["static_smem"]
    counts = found["tc_counts"]
    row.tc_instructions = sum(counts.values())
    row.tc_op = "+".join(op for op in _TC_SASS_OPS if counts[op]) or "-"
    ptx = kernel.asm["ptx"]
    row.ptx_mma = ptx.count("mma.sync") + ptx.count("wgmma.mma_async")
    row.judge()
    return row


_WORKER_ENTRIES: Dict[Tuple[str, int], list] = {}


def _quiet_triton_warnings() -> None:
    # Triton 3.9 warns once per process that the FP-fusion default will change; it is noise here.
    warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")


def _compile_job(spec: str, arch: int, entry_index: int, config_index: int) -> GateRow:
    _quiet_triton_warnings()
    key = (spec, arch)
    if key not in _WORKER_ENTRIES:
        _WORKER_ENTRIES[key] = load_entries(spec, arch)
    entry = _WORKER_ENTRIES[key][entry_index]
    return compile_entry_config(entry, entry.configs[config_index])


def run_gate(arches: Sequence[int], entries_spec: str = DEFAULT_ENTRIES, jobs: int = 2,
             name_filter: str = "", dtypes: Sequence[str] = ()) -> List[GateRow]:
    """Compile every (entry, config) for every arch; rows come back in registry order.

    ``name_filter`` (a substring of the entry name) and ``dtypes`` narrow the run, for iterating on
    one kernel; the gate proper runs everything.
    """
    _quiet_triton_warnings()
    work = []
    for arch in arches:
        for entry_index, entry in enumerate(load_entries(entries_spec, arch)):
            if name_filter not in entry.name or (dtypes and entry.dtype not in dtypes):
                continue
            if entry.arch != arch:
                raise ValueError(f"aot_entries({arch}) returned {entry.name} for arch {entry.arch}")
            if not entry.configs:
                raise ValueError(f"entry {entry.name} (sm_{arch}, {entry.dtype}) lists no configs")
            work.extend((entries_spec, arch, entry_index, i) for i in range(len(entry.configs)))
    if jobs <= 1 or len(work) <= 1:
        return [_compile_job(*job) for job in work]
    # spawn, not fork: the parent has imported triton/torch, whose threads do not survive a fork.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_compile_job, *job) for job in work]
        return [f.result() for f in futures]


def format_table(rows: Sequence[GateRow]) -> str:
    """A fixed-width table: one line per compiled config, problems and notes in the last column."""
    header = ("kernel", "dtype", "arch", "config", "regs", "spill", "smem", "tc", "time", "status")
    lines = [header]
    for r in rows:
        notes = f" ({'; '.join(r.notes)})" if r.notes else ""
        status = "; ".join(r.problems) if r.problems else "ok" + notes
        lines.append((
            r.kernel, r.dtype, f"sm_{r.arch}", r.config,
            "-" if r.regs is None else str(r.regs),
            "-" if r.spill_bytes is None else str(r.spill_bytes),
            "-" if r.smem_bytes is None else str(r.smem_bytes),
            "-" if r.tc_instructions is None else f"{r.tc_op}x{r.tc_instructions}",
            f"{r.compile_s:.1f}s", status,
        ))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line[:-1], widths)) + "  " + line[-1] for line in lines
    )


def _without_interpreter_env() -> Dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point; returns 0 when every config passes, 1 otherwise."""
    parser = argparse.ArgumentParser(prog="python -m lorafast.aot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, action="append", choices=sorted(SMEM_LIMIT_BYTES),
                        help="compute capability to compile for (repeatable; default: 80 and 90)")
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
    print(f"\n{len(rows)} configs compiled for {', '.join(f'sm_{a}' for a in arches)} with triton "
          f"{triton.__version__} in {wall:.1f}s wall ({args.jobs} processes); {len(failed)} failed.")
    if args.json:
        summary = {
            "triton_version": triton.__version__, "arches": arches, "jobs": args.jobs,
            "wall_s": round(wall, 2), "passed": not failed,
            "smem_limit_bytes": {a: SMEM_LIMIT_BYTES[a] for a in arches},
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    # Run through the importable module so pickled rows and jobs name `lorafast.aot`, not `__main__`.
    from lorafast.aot import main as _main

    sys.exit(_main())
