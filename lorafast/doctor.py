"""``python -m lorafast doctor [--quick] [--json PATH] [--strategies ...]``: what lorafast does on this machine, as a
report to attach to an issue (like ``python -m bitsandbytes`` or ``torch.utils.collect_env``).

1. Versions: lorafast, torch, triton, CUDA/HIP and the driver, bitsandbytes, peft, transformers, Python.
2. Device: name, SM/CU count, memory (or the CPU).
3. Compile: every registered kernel (``lorafast.kernels.registry``) compiled for the live GPU by the AOT gate
   (``python -m lorafast.aot``, in a subprocess): registers, spills, shared memory and the gate's findings.
   ``--quick`` compiles the gate's representative subset (every kernel, fewer configs). Without a GPU: skipped
   with ``--quick``; otherwise the subset is compiled for sm_90 as a stand-in, and labelled so (``"live": false``).
4. Checks: each strategy × {fp32, bf16, fp16} × {p = 0, p = 0.1} at small odd shapes, y and every gradient
   (dX, dA, dB, db) against a float64 reference with the strategy's own dropout mask, by the tests' rule
   (error ≤ 2 × the same math in PyTorch at the low precision + the floor of :mod:`lorafast.tolerances`), and the
   mask's keep fraction. Every case is called twice and both calls are checked: on a GPU the first call
   autotunes, the second runs through the cached compiled handles (``lorafast.kernels.configs``).
5. Timings: the strategies at a BERT and a Llama shape and what ``backend="auto"`` would choose there, by the
   dispatcher itself (timing and verification, :mod:`lorafast.dispatch`) with a temporary cache (yours is left
   alone). On CPU ``auto`` runs ``aten`` without timing: the aten step is timed instead, at CPU-sized M.
6. The strategy cache of this version triple: its path, how many choices, and any candidate verification rejected.

Writes everything as JSON with ``--json PATH``: ``{"versions", "device", "compile", "checks": [{"op", "strategy",
"dtype", "adapter_dtype", "dropout", "shape", "call", "errors", "budgets", "keep", "ok"}, ...], "timings",
"strategy_cache", "ok"}``. Exit status 1 when a check fails or a kernel does not compile.

Without a GPU the Triton strategies run in Triton's CPU interpreter: the doctor re-executes itself with
``TRITON_INTERPRET=1`` (which must be set before triton is imported) and installs the bf16 fixes of
:mod:`lorafast.interpreter`. ``--quick`` takes well under two minutes on 2 CPU cores.

Adding an op's cases (DoRA, MoE experts): write ``my_cases(quick, device) -> List[Case]`` whose cases' ``check``
call :func:`check_calls` with a step function, a float64 reference and a low-precision reference (see
:func:`lora_cases`), and add it to :data:`CASE_FAMILIES`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from lorafast import dispatch, ops, reference, strategies, version
from lorafast.dropout import keep_mask
from lorafast.tolerances import REL_TOL

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DROPOUTS = (0.0, 0.1)
CALLS = 2  # the second call of a case runs through the cached compiled handles on a GPU
# The keep fraction of a case's mask may be this many binomial standard deviations from 1 − p.
KEEP_SIGMAS = 5.0
# (M, K, N, r): odd sizes, so every kernel runs masked edge tiles. --quick: the first only.
LORA_SHAPES = ((37, 45, 29, 5), (1, 33, 17, 1), (130, 96, 80, 16))
# Timing shapes (name, M, K, N): BERT-base attention and Llama-3-8B attention, bf16, r = 16 on a GPU. On CPU the
# aten step is timed at a smaller M (CPU_TIMING_M, quick / full), which the report states.
TIMING_SHAPES = (("bert", 2048, 768, 768), ("llama", 8192, 4096, 4096))
TIMING_RANK = 16
CPU_TIMING_M = {"bert": (512, 2048), "llama": (128, 512)}
# The gate's representative subset (--quick) and the full matrix.
GATE_ENTRIES = {True: "lorafast.kernels.registry:aot_entries_ci", False: "lorafast.kernels.registry:aot_entries"}
STAND_IN_ARCH = 90


# ------------------------------------------------------------------------------------------------- versions

def _dist_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver_version() -> Optional[str]:
    """The NVIDIA driver (nvidia-smi) or, failing that, what the CUDA runtime reports."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    get = getattr(torch._C, "_cuda_getDriverVersion", None)
    if get is not None and torch.cuda.is_available():
        code = int(get())
        return f"CUDA driver API {code // 1000}.{code % 1000 // 10}"
    return None


def versions() -> Dict[str, Optional[str]]:
    """Versions of lorafast and what it runs with (None: not installed / not applicable). Read from the installed
    distributions' metadata, so nothing heavy (bitsandbytes, transformers) is imported."""
    found: Dict[str, Optional[str]] = {
        "lorafast": version.__version__,
        "torch": torch.__version__,
        "triton": _dist_version("triton") or _dist_version("pytorch-triton-rocm"),
        "cuda": torch.version.cuda,
        "hip": getattr(torch.version, "hip", None),
        "driver": _driver_version(),
    }
    for name in ("bitsandbytes", "peft", "transformers"):
        found[name] = _dist_version(name)
    found["python"] = platform.python_version()
    found["platform"] = platform.platform()
    return found


# --------------------------------------------------------------------------------------------------- device

def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info() -> Dict[str, object]:
    """The GPU torch sees (name, arch, SMs/CUs, memory), or the CPU."""
    if not torch.cuda.is_available():
        return {"type": "cpu", "name": _cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                "gpu": None}
    index = torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    hip = bool(getattr(torch.version, "hip", None))
    return {
        "type": "cuda", "index": index, "count": torch.cuda.device_count(), "name": props.name,
        "arch": props.gcnArchName.split(":")[0] if hip else f"sm_{props.major}{props.minor}",
        "sm_count": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
    }


def gate_arch() -> Tuple[Optional[object], bool, str]:
    """(the AOT gate's --arch for this machine, whether it is the live device, why not when None)."""
    from lorafast.aot import LDS_LIMIT_BYTES, SMEM_LIMIT_BYTES

    if not torch.cuda.is_available():
        return STAND_IN_ARCH, False, "no GPU"
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    if getattr(torch.version, "hip", None):
        arch = props.gcnArchName.split(":")[0]
        known = arch in LDS_LIMIT_BYTES
    else:
        arch = props.major * 10 + props.minor
        known = arch in SMEM_LIMIT_BYTES
    if not known:
        return None, True, f"the compile gate has no limits for {arch} (it knows {sorted(SMEM_LIMIT_BYTES)} and " \
                           f"{sorted(LDS_LIMIT_BYTES)})"
    return arch, True, ""


# -------------------------------------------------------------------------------------------------- compile

def compile_report(quick: bool) -> Dict[str, object]:
    """Compile the registered kernels for the live GPU with the AOT gate, in a subprocess (the compiler cannot run
    under TRITON_INTERPRET); without a GPU: skipped with ``quick``, else the subset for sm_90 as a stand-in."""
    if importlib.util.find_spec("triton") is None:
        return {"skipped": "triton is not installed", "ok": True}
    arch, live, why = gate_arch()
    if arch is None:
        return {"skipped": why, "ok": True, "live": live}
    if not live and quick:
        return {"skipped": "no GPU: nothing to compile for (without --quick the kernels are compiled for sm_90 as a "
                           "stand-in)", "ok": True, "live": False}
    subset = quick or not live  # a stand-in compile is a sample: the representative subset
    with tempfile.TemporaryDirectory() as tmp:
        out_json = os.path.join(tmp, "gate.json")
        cmd = [sys.executable, "-m", "lorafast.aot", "--arch", str(arch), "--entries", GATE_ENTRIES[subset],
               "--json", out_json, "--jobs", str(min(8, os.cpu_count() or 1))]
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = time.perf_counter() - start
        if not os.path.exists(out_json):
            return {"target": str(arch), "live": live, "ok": False, "command": " ".join(cmd[1:]),
                    "error": (done.stderr or done.stdout)[-3000:]}
        with open(out_json, encoding="utf-8") as f:
            gate = json.load(f)
    keep = ("kernel", "dtype", "config", "regs", "spill_bytes", "smem_bytes", "tc_op", "tc_instructions", "error",
            "problems", "notes")
    rows = [{k: row.get(k) for k in keep} for row in gate["rows"]]
    errors = [r for r in rows if r["error"]]
    return {
        "target": str(arch) if isinstance(arch, str) else f"sm_{arch}", "live": live,
        "entries": "subset" if subset else "all", "triton": gate.get("triton_version"), "wall_s": round(wall, 1),
        "configs": len(rows), "compile_errors": len(errors),
        "gate_problems": sum(1 for r in rows if r["problems"] and not r["error"]),
        "ok": not errors, "command": "python " + " ".join(cmd[1:]), "rows": rows,
    }


def _kernel_summary(rows: Sequence[Dict[str, object]]) -> List[str]:
    """One line per (kernel, dtype): configs, max registers, spills, max shared memory, findings."""
    groups: Dict[Tuple[str, str], List[Dict[str, object]]] = {}
    for row in rows:
        groups.setdefault((str(row["kernel"]).split("[")[0], str(row["dtype"])), []).append(row)
    lines = []
    for (kernel, dtype), group in groups.items():
        compiled = [r for r in group if not r["error"]]
        regs = max((r["regs"] or 0 for r in compiled), default=0)
        spills = sum(r["spill_bytes"] or 0 for r in compiled)
        smem = max((r["smem_bytes"] or 0 for r in compiled), default=0)
        findings = sorted({p for r in group for p in r["problems"]})
        status = "ok" if not findings else "; ".join(findings)[:160]
        lines.append(f"  {kernel:24s} {dtype:5s} {len(group):3d} configs  regs ≤ {regs:3d}  spills {spills:5d} B  "
                     f"smem ≤ {smem // 1024:3d} KiB  {status}")
    return lines


# --------------------------------------------------------------------------------------------------- checks

@dataclass(frozen=True)
class Case:
    """One correctness case of an op: ``check()`` runs it CALLS times and returns one :class:`CallResult` a call."""

    op: str
    strategy: str
    dtype: torch.dtype
    adapter_dtype: torch.dtype
    dropout: float
    shape: str
    check: Callable[[], List[CallResult]]


@dataclass
class CallResult:
    """Relative errors of one call's outputs vs float64, the budget of each, the mask's keep fraction."""

    errors: Dict[str, float]
    budgets: Dict[str, float]
    keep: Optional[float] = None
    keep_ok: bool = True
    exception: str = ""

    @property
    def ok(self) -> bool:
        return not self.exception and self.keep_ok and all(
            self.errors[name] <= self.budgets[name] for name in self.errors)  # NaN fails


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf for a NaN/inf in ``out`` or a shape mismatch)."""
    if out.shape != ref.shape:
        return float("inf")
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not bool(torch.isfinite(out64).all()):
        return float("inf")
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


Outputs = Dict[str, torch.Tensor]


def check_calls(step: Callable[[], Outputs], reference64: Outputs, lowp: Outputs, dtype: torch.dtype,
                mask: Optional[torch.Tensor] = None, p: float = 0.0, calls: int = CALLS) -> List[CallResult]:
    """Run ``step`` ``calls`` times; judge each call's outputs by the tests' rule (tests/utils.py ``assert_close``):
    ‖out − ref64‖/‖ref64‖ ≤ REL_TOL[dtype] + 2 × the same for ``lowp`` (the same math by PyTorch in the low
    precision). ``mask``: the bool keep-mask the references replayed, whose keep fraction must be within
    KEEP_SIGMAS binomial deviations of 1 − p (a mask that keeps everything would hide a dropout bug)."""
    budgets = {name: REL_TOL[dtype] + 2.0 * relative_error(lowp[name], ref) for name, ref in reference64.items()}
    keep, keep_ok = None, True
    if mask is not None:
        keep = mask.float().mean().item()
        keep_ok = abs(keep - (1.0 - p)) <= KEEP_SIGMAS * (p * (1.0 - p) / mask.numel()) ** 0.5
    results = []
    for _ in range(calls):
        try:
            outputs = step()
        except Exception as exc:  # a kernel that fails on this device is a failed check, not a crash
            results.append(CallResult({}, budgets, exception=f"{type(exc).__name__}: {exc}"[:500]))
            continue
        errors = {name: relative_error(outputs[name], ref) for name, ref in reference64.items()}
        results.append(CallResult(errors, budgets, keep, keep_ok))
    return results


def strategy_mask(strategy: str, seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The (M, K) bool keep-mask ``strategy`` draws for ``seed``: the kernels' hash for the Triton strategies (and
    aten on CUDA), aten's generator mask on CPU."""
    if strategy == "aten":
        return strategies.get("aten").dropout_keep_mask(seed, M, K, p, torch.float32) != 0
    return keep_mask(seed, M, K, p)


def _lora_reference(x, weight, bias, lora_a, lora_b, scaling, p, mask, dy) -> Outputs:
    """PEFT's math (lorafast.reference) on these tensors, with their dtypes: y and the grads of x, A, B, bias."""
    leaves = [t.detach().requires_grad_(True) for t in (x, lora_a, lora_b, bias)]
    y = reference.lora_linear(leaves[0], weight, leaves[3], leaves[1], leaves[2], scaling, p, training=p > 0,
                              dropout_mask=mask)
    dx, da, db, dbias = torch.autograd.grad(y, leaves, dy.to(y.dtype))
    return {"y": y.detach(), "dx": dx, "da": da, "db": db, "dbias": dbias}


def check_lora(strategy: str, dtype: torch.dtype, adapter_dtype: torch.dtype, p: float, shape: Tuple[int, ...],
               device: torch.device) -> List[CallResult]:
    """One LoRA case: ``strategy`` through the autograd function (lorafast.ops), y and dX, dA, dB, db."""
    from lorafast import functional
    from lorafast.bench.inputs import make_inputs
    from lorafast.shapes import Shape

    M, K, N, r = shape
    inp = make_inputs(Shape("doctor", M, K, N), r, dtype, device, seed=M * 1000 + K, adapter_dtype=adapter_dtype,
                      scaling=0.75)
    seed = torch.full((1,), 0x5EED + M, dtype=torch.int64, device=device) if p > 0 else None
    mask = strategy_mask(strategy, seed, M, K, p) if p > 0 else None
    args = (inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, inp.scaling, p, mask, inp.dy)
    ref64 = _lora_reference(*(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                              for t in args))
    lowp = _lora_reference(*args)
    scale = functional.op_scale(inp.scaling, functional.scale_tensor(inp.scaling, inp.x), strategy)

    def step() -> Outputs:
        x, a, b, bias = (t.detach().requires_grad_(True) for t in (inp.x, inp.lora_a, inp.lora_b, inp.bias))
        y = ops.apply_function(x, inp.weight, bias, a, b, scale, seed, p, strategy)
        dx, da, db, dbias = torch.autograd.grad(y, [x, a, b, bias], inp.dy)
        return {"y": y, "dx": dx, "da": da, "db": db, "dbias": dbias}

    return check_calls(step, ref64, lowp, dtype, mask, p)


def available_strategies(device: torch.device) -> Dict[str, str]:
    """{strategy: "" if it can run here, else why not}."""
    triton_ok = strategies.triton_available()
    why = {}
    for name in strategies.STRATEGIES:
        if name not in strategies.TRITON_STRATEGIES:
            why[name] = ""
        elif not triton_ok:
            why[name] = "triton is not installed"
        elif device.type != "cuda" and not strategies.interpreting():
            why[name] = "no GPU and TRITON_INTERPRET is not set"
        else:
            why[name] = ""
    return why


def lora_cases(quick: bool, device: torch.device, only: Sequence[str] = ()) -> List[Case]:
    """strategy × dtype × p (× shape, adapter dtype without --quick). Adapters fp32 (PEFT's default upcast on a
    16-bit base); without --quick also in the activation dtype."""
    cases = []
    for strategy, why in available_strategies(device).items():
        if (only and strategy not in only) or why:
            continue
        for dtype in DTYPES.values():
            adapters = [torch.float32] if quick or dtype == torch.float32 else [torch.float32, dtype]
            for shape in LORA_SHAPES[:1] if quick else LORA_SHAPES:
                for adapter_dtype in adapters:
                    for p in DROPOUTS:
                        label = f"{shape[0]}x{shape[1]}x{shape[2]} r{shape[3]}"
                        cases.append(Case("lora", strategy, dtype, adapter_dtype, p, label, lambda s=strategy,
                                          d=dtype, a=adapter_dtype, q=p, sh=shape: check_lora(s, d, a, q, sh, device)))
    return cases


# One entry per op: (quick, device, strategies filter) -> cases. DoRA / MoE add theirs here.
CASE_FAMILIES: Dict[str, Callable[[bool, torch.device, Sequence[str]], List[Case]]] = {"lora": lora_cases}


def _dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def run_checks(quick: bool, device: torch.device, only: Sequence[str] = ()) -> List[Dict[str, object]]:
    """Every case of every family, as JSON-ready dicts (one per call), printed as they finish."""
    entries = []
    for family in CASE_FAMILIES.values():
        for case in family(quick, device, only):
            try:
                results = case.check()
            except Exception as exc:  # the case's setup or reference failed: a failed check, reported
                results = [CallResult({}, {}, exception=f"{type(exc).__name__}: {exc}"[:500])]
            for call, result in enumerate(results, start=1):
                entry = {
                    "op": case.op, "strategy": case.strategy, "dtype": _dtype_name(case.dtype),
                    "adapter_dtype": _dtype_name(case.adapter_dtype), "dropout": case.dropout, "shape": case.shape,
                    "call": call, "errors": result.errors, "budgets": result.budgets, "keep": result.keep,
                    "ok": result.ok,
                }
                if result.exception:
                    entry["exception"] = result.exception
                entries.append(entry)
                print(_check_line(entry), flush=True)
    return entries


def _check_line(e: Dict[str, object]) -> str:
    head = (f"  {e['op']:5s} {e['strategy']:7s} {e['dtype']:4s} A:{e['adapter_dtype']:4s} p={e['dropout']:<4g} "
            f"{e['shape']:14s} call {e['call']}  {'ok  ' if e['ok'] else 'FAIL'}")
    if "exception" in e:
        return f"{head}  {e['exception']}"
    worst = " ".join(f"{k} {v:.1e}/{e['budgets'][k]:.1e}" for k, v in e["errors"].items())
    keep = f"  keep {e['keep']:.3f}" if e["keep"] is not None else ""
    return f"{head}  {worst}{keep}"


# -------------------------------------------------------------------------------------------------- timings

def _timing_problem(M: int, K: int, N: int, dtype: torch.dtype, p: float, device: torch.device):
    from lorafast import functional
    from lorafast.bench.inputs import make_inputs
    from lorafast.shapes import Shape

    inp = make_inputs(Shape("t", M, K, N), TIMING_RANK, dtype, device, seed=0, with_dy=False)
    needs = (True, True, True, False)  # x, A, B train; the base (and its bias) is frozen
    scale = functional.scale_tensor(inp.scaling, inp.x)
    make_run = dispatch.step_runner(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, scale, p, needs)
    key = dispatch.StrategyKey.for_call(inp.x, inp.weight, inp.lora_a, p, *needs)
    return key, make_run


def _gpu_timing(name: str, M: int, K: int, N: int, p: float, device: torch.device) -> Dict[str, object]:
    """The dispatcher's own choice for this key (timing + verification) with a temporary cache file."""
    dtype = torch.bfloat16
    key, make_run = _timing_problem(M, K, N, dtype, p, device)
    times: Dict[str, float] = {}
    inner = dispatch.get_timer()

    def recording(candidate, run):
        times[candidate] = inner(candidate, run)
        return times[candidate]

    saved_dir = os.environ.get(dispatch.ENV_CACHE_DIR)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ[dispatch.ENV_CACHE_DIR] = tmp
        dispatch.clear()
        dispatch.set_timer(recording)
        try:
            choice = dispatch.select(key, dispatch.auto_candidates(dtype), make_run, dispatch.DEFAULT_CUDA)
            rejected = dispatch.rejections().get(key.as_string(), {})
        finally:
            dispatch.set_timer(inner)
            dispatch.clear()
            if saved_dir is None:
                os.environ.pop(dispatch.ENV_CACHE_DIR, None)
            else:
                os.environ[dispatch.ENV_CACHE_DIR] = saved_dir
    return {"shape": name, "M": M, "K": K, "N": N, "rank": TIMING_RANK, "dtype": "bf16", "dropout": p,
            "step": "fwd+bwd (dX, dA, dB)", "times_ms": times, "auto": choice, "rejected": rejected,
            "timer": "CUDA events, median"}


def _cpu_timing(name: str, M: int, K: int, N: int, p: float, quick: bool) -> Dict[str, object]:
    key, make_run = _timing_problem(M, K, N, torch.float32, p, torch.device("cpu"))
    run = make_run("aten")
    run()
    samples = []
    for _ in range(3 if quick else 5):
        start = time.perf_counter()
        run()
        samples.append((time.perf_counter() - start) * 1e3)
    return {"shape": name, "M": M, "K": K, "N": N, "rank": TIMING_RANK, "dtype": "fp32", "dropout": p,
            "step": "fwd+bwd (dX, dA, dB)", "times_ms": {"aten": statistics.median(samples)},
            "auto": "aten (on CPU auto runs aten without timing)", "rejected": {},
            "timer": f"perf_counter, median of {len(samples)}, {torch.get_num_threads()} torch threads"}


def run_timings(quick: bool, device: torch.device) -> List[Dict[str, object]]:
    entries = []
    for name, M, K, N in TIMING_SHAPES:
        for p in (0.1,) if quick else DROPOUTS:
            try:
                if device.type == "cuda":
                    entry = _gpu_timing(name, M, K, N, p, device)
                else:
                    entry = _cpu_timing(name, CPU_TIMING_M[name][0 if quick else 1], K, N, p, quick)
            except Exception as exc:  # e.g. out of memory on a small GPU: reported, the doctor goes on
                entries.append({"shape": name, "dropout": p, "error": f"{type(exc).__name__}: {exc}"[:500]})
                print(f"  {name:6s} p={p:g}: failed ({entries[-1]['error']})", flush=True)
                continue
            entries.append(entry)
            times = "  ".join(f"{k} {v:.3f} ms" + (" (REJECTED)" if k in entry["rejected"] else "")
                              for k, v in entry["times_ms"].items())
            print(f"  {name:6s} {entry['M']}x{K}x{N} r{TIMING_RANK} {entry['dtype']} p={p:g}: {times}  → auto: "
                  f"{entry['auto']}", flush=True)
    return entries


# ---------------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``doctor`` subcommand's flags."""
    parser.add_argument("--quick", action="store_true",
                        help="one shape per case, the gate's kernel subset, smaller CPU timings (< 2 min on 2 cores)")
    parser.add_argument("--json", default=None, metavar="PATH", help="write the report as JSON to PATH")
    parser.add_argument("--strategies", nargs="+", default=None, choices=list(strategies.STRATEGIES),
                        help="check only these strategies (default: all that can run here)")


def _argv(args: argparse.Namespace) -> List[str]:
    argv = ["--quick"] if args.quick else []
    if args.json:
        argv += ["--json", os.path.abspath(args.json)]
    if args.strategies:
        argv += ["--strategies", *args.strategies]
    return argv


def _needs_interpreter() -> bool:
    return (not torch.cuda.is_available() and importlib.util.find_spec("triton") is not None
            and os.environ.get("TRITON_INTERPRET", "0") != "1")


def _section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def run(args: argparse.Namespace) -> int:
    """Run the doctor; 0 when every check passes and every kernel compiles, else 1."""
    if _needs_interpreter():
        # TRITON_INTERPRET is read when triton is imported: run the doctor again in a process that has it.
        print("lorafast doctor: no GPU; running the Triton strategies in Triton's CPU interpreter "
              "(re-executing with TRITON_INTERPRET=1)", flush=True)
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", "lorafast", "doctor", *_argv(args)], env=env).returncode
    if strategies.interpreting() and strategies.triton_available():
        from lorafast.interpreter import install_bf16_dot_shim, install_version_shims

        install_version_shims()  # old interpreters first: the bf16 probes use string constexpr annotations
        install_bf16_dot_shim()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    start = time.perf_counter()
    report: Dict[str, object] = {"doctor": {"quick": args.quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}

    _section("versions")
    report["versions"] = versions()
    print("  " + ", ".join(f"{k} {v}" for k, v in report["versions"].items() if v is not None and k != "platform"))
    _section("device")
    report["device"] = device_info()
    dev = report["device"]
    if dev["type"] == "cpu":
        how = ("The Triton strategies run in Triton's CPU interpreter (a correctness check, no speed)."
               if strategies.interpreting() else "triton is not installed: only aten runs.")
        print(f"  no GPU (torch.cuda.is_available() is False); CPU: {dev['name']}, {dev['cores']} cores. {how}")
    else:
        print(f"  {dev['name']} ({dev['arch']}, {dev['sm_count']} SMs/CUs, {dev['memory_gib']} GiB), "
              f"device {dev['index']} of {dev['count']}")

    _section("compile (AOT gate: registers, spills, shared memory)")
    report["compile"] = compile_report(args.quick)
    comp = report["compile"]
    if "skipped" in comp:
        print(f"  skipped: {comp['skipped']}")
    elif "rows" not in comp:
        print(f"  FAILED to run the gate ({comp['command']}):\n{comp['error']}")
    else:
        where = "" if comp["live"] else " (no GPU: sm_90 as a stand-in for a real device)"
        print(f"  {comp['configs']} configs for {comp['target']}{where} in {comp['wall_s']} s: "
              f"{comp['compile_errors']} compile errors, {comp['gate_problems']} with gate findings")
        print("\n".join(_kernel_summary(comp["rows"])))

    _section(f"checks (y, dX, dA, dB, db vs float64, error/budget; budget = 2 × PyTorch in the same dtype + "
             f"floor; each case called {CALLS}×)")
    why_not = {k: v for k, v in available_strategies(device).items() if v}
    for name, why in why_not.items():
        print(f"  {name}: skipped ({why})")
    report["checks"] = run_checks(args.quick, device, args.strategies or ())
    failed = [c for c in report["checks"] if not c["ok"]]
    print(f"  {len(report['checks'])} checks, {len(failed)} failed")

    _section("timings (what backend='auto' runs)")
    report["timings"] = run_timings(args.quick, device)

    _section("strategy cache")
    report["strategy_cache"] = {"path": str(dispatch.cache_path()), "choices": len(dispatch.cached_choices()),
                                "rejected": dispatch.rejections()}
    cache = report["strategy_cache"]
    print(f"  {cache['path']}: {cache['choices']} choices, {len(cache['rejected'])} keys with rejected candidates")
    for key, entry in cache["rejected"].items():
        for name, numbers in entry.items():
            print(f"  REJECTED {name} at {key}: {numbers}")

    report["ok"] = not failed and bool(comp.get("ok", True))
    report["doctor"]["wall_s"] = round(time.perf_counter() - start, 1)
    verdict = "ok" if report["ok"] else "FAILED: " + ", ".join(
        filter(None, [f"{len(failed)} check(s)" if failed else "", "" if comp.get("ok", True) else "compile"]))
    print(f"\nlorafast doctor: {verdict} ({report['doctor']['wall_s']} s)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {args.json} (attach it to your issue)")
    return 0 if report["ok"] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m lorafast.doctor``: the same as ``python -m lorafast doctor``."""
    parser = argparse.ArgumentParser(prog="python -m lorafast doctor", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


__all__ = ["CASE_FAMILIES", "Case", "CallResult", "check_calls", "lora_cases", "main", "run"]

if __name__ == "__main__":
    raise SystemExit(main())
