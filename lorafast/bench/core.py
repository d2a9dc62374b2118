"""The run: for every shape × rank × dropout, check then time every implementation (see the package
docstring for the order of work and the modes)."""

from __future__ import annotations

import datetime
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import lorafast
from lorafast import dispatch, roofline, strategies
from lorafast.bench.checks import TOLERANCE, check_implementation, gpu_peak_bytes, passes, saved_bytes
from lorafast.bench.host import HostConfig, measure_host
from lorafast.bench.impls import (
    IMPLEMENTATIONS,
    build_implementations,
    inference_call,
    peft_available,
    training_call,
)
from lorafast.bench.inputs import LoRAInputs, make_inputs
from lorafast.bench.timing import load_average, time_calls
from lorafast.shapes import Shape, dtype_name


@dataclass
class BenchConfig:
    """What ``python -m lorafast bench`` runs; see :func:`lorafast.bench.cli.add_arguments` for each field.

    ``strategies``: the lorafast strategies timed on their own beside ``lorafast`` (None: all that run
    on ``device``, see :func:`default_strategies`). ``adapter_dtype``: lora_a/lora_b dtype (None: ``dtype``).
    ``host``: also measure host cost (:mod:`lorafast.bench.host`) into ``report["host"]``."""

    shapes: List[Shape]
    ranks: List[int]
    dropouts: List[float]
    dtype: torch.dtype
    device: torch.device
    backend: str = "auto"
    quick: bool = False
    cuda_graphs: bool = False
    seed: int = 0
    implementations: Tuple[str, ...] = IMPLEMENTATIONS
    strategies: Optional[Tuple[str, ...]] = None
    adapter_dtype: Optional[torch.dtype] = None
    host: bool = False
    progress: bool = True
    cpu_budget_s: Optional[float] = None
    graph_max_mnk: int = 2**33
    options: Dict[str, object] = field(default_factory=dict)  # the CLI flags, recorded in the report


@dataclass
class Result:
    """One implementation in one configuration and mode. ``strategy``: what a lorafast row ran."""

    shape: str
    M: int
    K: int
    N: int
    rank: int
    dropout: Optional[float]  # None for fwd (inference: dropout plays no part)
    mode: str
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    timer: str
    errors: Dict[str, float] = field(default_factory=dict)
    correct: Optional[bool] = None
    saved_bytes: Optional[int] = None
    saved_extra_bytes: Optional[int] = None
    peak_bytes: Optional[int] = None
    predicted_ms: Optional[float] = None
    strategy: Optional[str] = None


def default_strategies(device: torch.device) -> Tuple[str, ...]:
    """The strategies that run on ``device``: all on CUDA; ``aten`` on CPU (the Triton ones run there
    only in Triton's interpreter, a correctness tool with no meaningful speed)."""
    return strategies.STRATEGIES if device.type == "cuda" else ("aten",)


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU model and core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def versions() -> Dict[str, Optional[str]]:
    """torch, CUDA, triton, peft, bitsandbytes, lorafast and Python versions (None: not installed)."""
    found: Dict[str, Optional[str]] = {"torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "peft", "bitsandbytes"):
        try:
            found[name] = __import__(name).__version__
        except Exception:  # not installed, or a broken install: report, don't fail
            found[name] = None
    found["lorafast"] = lorafast.__version__
    found["python"] = platform.python_version()
    return found


def environment(config: BenchConfig) -> Dict[str, object]:
    """Device, versions, revision, date and load for the JSON header."""
    return {
        "device": str(config.device),
        "device_name": device_description(config.device),
        **versions(),
        "source_revision": source_revision(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype_name(config.dtype),
        "adapter_dtype": dtype_name(config.adapter_dtype or config.dtype),
        "adapter_precision": _adapter_precision(),
        "backend": config.backend,
        "backend_resolved": _resolved_backend(config),
        "strategies": list(config.strategies if config.strategies is not None else default_strategies(config.device)),
        "quick": config.quick,
        "cuda_graphs": config.cuda_graphs,
        "seed": config.seed,
        "cpu_budget_s": config.cpu_budget_s,
        "options": config.options,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": load_average(),
    }


def source_revision() -> Optional[str]:
    """``git describe --always --dirty`` of the checkout lorafast is imported from (None outside one)."""
    import subprocess

    package_dir = os.path.dirname(os.path.abspath(lorafast.__file__))
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=package_dir, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _adapter_precision() -> Optional[str]:
    # The Triton strategies' rank-r dot precision for fp32 adapters on 16-bit x (kernels need triton).
    try:
        from lorafast.kernels.dtypes import adapter_precision

        return adapter_precision()
    except Exception as exc:  # triton missing or a bad $LORAFAST_ADAPTER_PRECISION: reported, not fatal
        return f"unknown ({describe_exception(exc)})"


def _resolved_backend(config: BenchConfig) -> str:
    try:
        probe = torch.empty(1, 1, device=config.device, dtype=config.dtype)
        return dispatch.resolve(config.backend, probe, probe, probe, 0.0, (False,) * 4)
    except Exception as exc:  # reported, not fatal: the bench's own calls will raise if it matters
        return f"unknown ({exc})"


def strategy_ran(backend: str, inputs: LoRAInputs, dropout_p: float, mode: str) -> Optional[str]:
    """The strategy a lorafast call with ``backend`` ran on ``inputs`` (for "auto" on CUDA: the
    dispatcher's cached choice, so ask after the call ran). None if it cannot be told."""
    needs = (True, True, True, False) if mode == "fwd+bwd" else (False,) * 4
    p = dropout_p if mode == "fwd+bwd" else 0.0
    try:
        return dispatch.resolve(backend, inputs.x, inputs.weight, inputs.lora_a, p, needs)
    except Exception:  # e.g. an explicit Triton strategy on a CPU without the interpreter
        return None


def _groups(config: BenchConfig) -> List[Tuple[Shape, int, Optional[float], str]]:
    groups = []
    for shape in config.shapes:
        for rank in config.ranks:
            groups.append((shape, rank, None, "fwd"))
            for p in config.dropouts:
                groups.append((shape, rank, p, "fwd+bwd"))
    return groups


def predicted_ms(
    device_name: Optional[str], dtype: torch.dtype, shape: Shape, rank: int, p: Optional[float], mode: str
) -> Dict[str, float]:
    """Roofline milliseconds per implementation on a modelled GPU (``{}`` for a CPU or another GPU).

    The reference runs PEFT's op sequence, so it gets PEFT's prediction."""
    ceilings = roofline.ceilings_for_device_name(device_name) if device_name else None
    if ceilings is None or dtype_name(dtype) not in ceilings.matmul_flops:
        return {}
    ms = roofline.predict(shape.M, shape.K, shape.N, rank, p or 0.0, mode, dtype_name(dtype), ceilings)["ms"]
    return {"lorafast": ms["lorafast"], "peft": ms["peft"], "reference": ms["peft"], "base": ms["base"]}


def describe_exception(exc: BaseException) -> str:
    """``Type: first line of the message``, at most 300 characters."""
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def format_errors(errors: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.1e}" for k, v in errors.items() if k in ("y", "dx", "da", "db"))


def _measure_group(
    config: BenchConfig,
    inputs: LoRAInputs,
    shape: Shape,
    rank: int,
    p: Optional[float],
    mode: str,
    impl_names: Sequence[str],
    failures: List[str],
) -> List[Result]:
    """Check, then time, every implementation in one configuration and mode.

    An implementation that raises (a kernel that fails to compile on this GPU, say) is reported in
    ``failures`` with no timing, and the others still run."""
    dropout_p = p if p is not None else 0.0
    label = f"{shape.name} r={rank} {mode}" + (f" p={p:g}" if p is not None else "")
    impls = build_implementations(inputs, dropout_p, config.backend, impl_names)
    errors: Dict[str, Dict[str, float]] = {}
    reference_cache: Dict[Tuple, Tuple[torch.Tensor, ...]] = {}
    for name in list(impls):
        backend = name if name in strategies.STRATEGIES else config.backend
        try:
            errors[name] = check_implementation(name, inputs, dropout_p, mode, backend, config.seed, reference_cache)
        except Exception as exc:  # one broken implementation must not hide the others' numbers
            failures.append(f"{name} {label}: raised {describe_exception(exc)}")
            del impls[name]
    reference_errors = errors.get("reference")
    if mode == "fwd":
        calls = {n: inference_call(impl, inputs.x) for n, impl in impls.items()}
    else:
        calls = {n: training_call(impl, inputs.x, inputs.dy) for n, impl in impls.items()}
    use_graph = config.cuda_graphs and shape.M * shape.K * shape.N <= config.graph_max_mnk
    timings = time_calls(calls, config.device, config.quick, config.cpu_budget_s, use_graph)

    gpu_name = torch.cuda.get_device_name(config.device) if config.device.type == "cuda" else None
    predicted = predicted_ms(gpu_name, config.dtype, shape, rank, p, mode)
    results = []
    for name, impl in impls.items():
        t = timings[name]
        ok = passes(errors[name], reference_errors if name != "reference" else None, config.dtype)
        if not ok:
            failures.append(
                f"{name} {label}: errors {format_errors(errors[name])} above {TOLERANCE[config.dtype]:g} "
                f"+ 2 × reference's ({format_errors(reference_errors or {})})"
            )
        ran = None
        if name == "lorafast" or name in strategies.STRATEGIES:
            ran = strategy_ran(config.backend if name == "lorafast" else name, inputs, dropout_p, mode)
        result = Result(
            shape=shape.name, M=shape.M, K=shape.K, N=shape.N, rank=rank, dropout=p, mode=mode, impl=name,
            median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps, timer=t.timer,
            errors=errors[name], correct=ok, predicted_ms=predicted.get(name), strategy=ran,
        )  # fmt: skip
        if mode == "fwd+bwd":
            result.saved_bytes, result.saved_extra_bytes = saved_bytes(impl, inputs)
        if config.device.type == "cuda":
            result.peak_bytes = gpu_peak_bytes(calls[name])
        results.append(result)
    return results


def implementation_names(config: BenchConfig) -> List[str]:
    """config.implementations (PEFT dropped, with a message, when not installed) then the strategies."""
    names = [n for n in config.implementations if n != "peft" or peft_available()]
    if "peft" in config.implementations and "peft" not in names:
        print("lorafast bench: peft is not installed; skipping the PEFT baseline", file=sys.stderr)
    chosen = config.strategies if config.strategies is not None else default_strategies(config.device)
    return names + [s for s in chosen if s not in names]


def run_benchmark(
    config: BenchConfig, on_group_done: Optional[Callable[[Dict[str, object]], None]] = None
) -> Dict[str, object]:
    """Check, measure and time every configuration; returns the JSON-ready report: ``environment``,
    ``results`` (a list of :class:`Result` dicts), ``failures``, ``complete`` and, with ``config.host``,
    ``host`` (:func:`lorafast.bench.host.measure_host`).

    ``on_group_done(partial_report)`` runs after each configuration (the CLI saves it, so a run cut
    short by a time limit still leaves its numbers)."""
    from tqdm.auto import tqdm

    impl_names = implementation_names(config)
    report: Dict[str, object] = {"environment": environment(config), "results": [], "failures": [], "complete": False}
    groups = _groups(config)
    bar = tqdm(total=len(groups), desc="lorafast bench", disable=not config.progress, file=sys.stderr)
    current: Tuple[Optional[Shape], Optional[int]] = (None, None)
    inputs: Optional[LoRAInputs] = None
    for shape, rank, p, mode in groups:
        bar.set_postfix_str(f"{shape.name} r={rank} {mode}" + (f" p={p:g}" if p is not None else ""))
        if current != (shape, rank):
            inputs = None  # free the previous shape's tensors before allocating the next
            if config.device.type == "cuda":
                torch.cuda.empty_cache()
            inputs = make_inputs(shape, rank, config.dtype, config.device, config.seed,
                                 adapter_dtype=config.adapter_dtype)
            current = (shape, rank)
        results = _measure_group(config, inputs, shape, rank, p, mode, impl_names, report["failures"])
        report["results"].extend(asdict(r) for r in results)
        if on_group_done is not None:
            on_group_done(report)
        bar.update(1)
    bar.close()
    if config.host:
        report["host"] = measure_host(HostConfig(quick=config.quick))
    report["complete"] = True
    return report
