"""``python -m lorafast bench``: correctness, speed and memory of lorafast against PEFT and the floor.

For every shape × rank × dropout it compares four implementations with the same weights:

* ``lorafast``  — :func:`lorafast.lora_linear` (``--backend``, default "auto");
* ``peft``      — PEFT's ``lora.Linear`` built around an ``nn.Linear`` (adapters in x's dtype);
* ``reference`` — :func:`lorafast.reference.lora_linear`, the plain-PyTorch oracle;
* ``base``      — the frozen ``F.linear`` alone: the floor no LoRA layer can beat.

Order of work per configuration: first correctness (each implementation's output and gradients vs
a float64 reference, relative norm ‖out−ref‖/‖ref‖; with dropout the implementation's own mask is
recovered by a probe and replayed in the reference), then bytes saved for backward, then timing.

Modes: ``fwd`` is inference (``training=False``, under ``torch.no_grad``; dropout plays no part, so
it is timed once per shape and rank); ``fwd+bwd`` is a training step (``training=True``, dropout
``p``, ``torch.autograd.grad`` for X, A and B with a fixed random dY — no ``.grad`` accumulation).

Timers: on CUDA ``triton.testing.do_bench`` (median and 20/80% quantiles, L2 flushed between runs),
optionally CUDA graphs for small shapes (``--cuda-graphs``); on CPU the implementations run
round-robin (start rotated each round) and each one's median of ``time.perf_counter`` is taken.

Memory: ``saved`` counts every unique storage packed for backward (``saved_tensors_hooks``),
``saved extra`` only those that are not x nor a weight (those are alive anyway); GPU ``peak`` is
``max_memory_allocated`` during one call minus what was allocated before it (the inputs).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

import lorafast
from lorafast import reference, roofline
from lorafast.tolerances import REL_TOL

IMPLEMENTATIONS = ("lorafast", "peft", "reference", "base")
MODES = ("fwd", "fwd+bwd")

# Relative-norm error allowed vs float64: TOLERANCE[dtype] + 2 × the error of the plain-PyTorch
# reference run in the same dtype (flash-attention's rule); one table for the tests and the bench.
TOLERANCE = REL_TOL

_DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class Shape:
    """One linear layer: M rows of activations (batch × sequence), K inputs, N outputs."""

    name: str
    M: int
    K: int
    N: int


SHAPE_PRESETS: Dict[str, List[Shape]] = {
    # BERT-base: batch 16 × 128 tokens; attention projections and the FFN up-projection.
    "bert": [Shape("bert-attn", 2048, 768, 768), Shape("bert-ffn-up", 2048, 768, 3072)],
    # Llama-3-8B: 8192 tokens per step; attention projections and the MLP up/gate projection.
    "llama": [Shape("llama8b-attn", 8192, 4096, 4096), Shape("llama8b-mlp-up", 8192, 4096, 14336)],
}


def parse_shapes(tokens: Sequence[str]) -> List[Shape]:
    """Shapes from preset names (``bert``, ``llama``, comma lists of them) or ``M,K,N`` / ``MxKxN``."""
    shapes: List[Shape] = []
    for token in tokens:
        parts = [part for part in re.split(r"[,x]", token.strip()) if part]
        if len(parts) == 3 and all(part.isdigit() for part in parts):
            M, K, N = (int(part) for part in parts)
            if min(M, K, N) < 1:
                raise ValueError(f"--shapes: M, K, N must be >= 1, got {token!r}")
            shapes.append(Shape(f"{M}x{K}x{N}", M, K, N))
            continue
        for name in token.split(","):
            name = name.strip().lower()
            if name not in SHAPE_PRESETS:
                raise ValueError(f"--shapes: unknown shape {name!r}; use one of {sorted(SHAPE_PRESETS)} or M,K,N")
            shapes.extend(SHAPE_PRESETS[name])
    return shapes


def parse_dtype(name: str) -> torch.dtype:
    """``fp32``/``bf16``/``fp16`` (or the long names) → torch dtype."""
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"--dtype: expected one of {sorted(_DTYPES)}, got {name!r}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------
# One setup function for every run (this CLI, the pytest-benchmark suite and the tests).


@dataclass
class LoRAInputs:
    """Random inputs of one LoRA layer: x (M, K), weight (N, K), bias (N,), lora_a (r, K) and
    lora_b (N, r) as leaves requiring grad, scaling s, and the upstream gradient dy (M, N)."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: float
    dy: torch.Tensor

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


def make_inputs(
    shape: Shape, rank: int, dtype: torch.dtype, device: torch.device, seed: int = 0, bias: bool = True
) -> LoRAInputs:
    """Fresh random inputs (never zeros: lora_b is random too, unlike PEFT's init) with unit-scale
    outputs, drawn from a private generator so the caller's RNG state is left alone. x and dy are
    (M, K) and (M, N) 2-D: M stands for the flattened batch × sequence dims."""
    # Drawn on the device itself: the Llama shapes hold ~10^8 elements, slow to draw on a CPU.
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*size: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * scale).to(dtype)

    M, K, N = shape.M, shape.K, shape.N
    return LoRAInputs(
        x=randn(M, K),
        weight=randn(N, K, scale=K**-0.5),
        bias=randn(N, scale=0.1) if bias else None,
        lora_a=randn(rank, K, scale=K**-0.5).requires_grad_(True),
        lora_b=randn(N, rank, scale=rank**-0.5).requires_grad_(True),
        scaling=2.0,
        dy=randn(M, N),
    )


@dataclass
class Implementation:
    """A LoRA layer under test: ``forward(x, training) -> y``, the tensors whose gradients a training
    step takes besides x (``trainable``: A then B), and every weight tensor it holds (``weights``)."""

    name: str
    forward: Callable[[torch.Tensor, bool], torch.Tensor]
    trainable: List[torch.Tensor]
    weights: List[torch.Tensor]


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def _peft_layer(inputs: LoRAInputs, dropout_p: float) -> nn.Module:
    """PEFT's ``lora.Linear`` around an ``nn.Linear`` holding the same weights, adapters copied in.

    Built through ``inject_adapter_in_model`` on a one-layer module, which works across PEFT
    versions (the ``lora.Linear`` constructor's signature has changed)."""
    from peft import LoraConfig, inject_adapter_in_model

    N, K = inputs.weight.shape
    holder = nn.Module()
    holder.linear = nn.Linear(K, N, bias=inputs.bias is not None, device=inputs.x.device, dtype=inputs.x.dtype)
    config = LoraConfig(r=inputs.rank, lora_alpha=inputs.rank, lora_dropout=dropout_p, target_modules=["linear"])
    layer = inject_adapter_in_model(config, holder).linear
    layer.to(dtype=inputs.x.dtype)
    with torch.no_grad():
        layer.base_layer.weight.copy_(inputs.weight)
        if inputs.bias is not None:
            layer.base_layer.bias.copy_(inputs.bias)
        layer.lora_A["default"].weight.copy_(inputs.lora_a)
        layer.lora_B["default"].weight.copy_(inputs.lora_b)
    layer.scaling["default"] = inputs.scaling
    return layer


def build_implementations(
    inputs: LoRAInputs, dropout_p: float, backend: str = "auto", names: Sequence[str] = IMPLEMENTATIONS
) -> Dict[str, Implementation]:
    """The implementations in ``names`` over the same weights (PEFT is skipped if not installed)."""
    W, b, A, B, s = inputs.weight, inputs.bias, inputs.lora_a, inputs.lora_b, inputs.scaling
    impls: Dict[str, Implementation] = {}
    for name in names:
        if name == "lorafast":

            def forward(x, training, _p=dropout_p):
                return lorafast.lora_linear(x, W, b, A, B, s, dropout_p=_p, training=training, backend=backend)

            impls[name] = Implementation(name, forward, [A, B], [W, b, A, B])
        elif name == "reference":

            def forward(x, training, _p=dropout_p):
                return reference.lora_linear(x, W, b, A, B, s, dropout_p=_p, training=training)

            impls[name] = Implementation(name, forward, [A, B], [W, b, A, B])
        elif name == "base":
            impls[name] = Implementation(name, lambda x, training: F.linear(x, W, b), [], [W, b])
        elif name == "peft":
            if not peft_available():
                continue
            layer = _peft_layer(inputs, dropout_p)

            def forward(x, training, _layer=layer):
                if _layer.training != training:  # flip the mode only when it changes: no per-call cost
                    _layer.train(training)
                return _layer(x)

            params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
            impls[name] = Implementation(name, forward, params, list(layer.parameters()))
        else:
            raise ValueError(f"unknown implementation {name!r}; expected one of {IMPLEMENTATIONS}")
    return impls


def inference_call(impl: Implementation, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """``fwd`` mode: one inference forward (no graph, no dropout)."""

    def call() -> torch.Tensor:
        with torch.no_grad():
            return impl.forward(x, False)

    return call


def training_call(impl: Implementation, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], Tuple[torch.Tensor, ...]]:
    """``fwd+bwd`` mode: forward with dropout, then gradients of X and the trainable tensors.

    Returns ``(y, dX, *d trainable)``; ``autograd.grad`` leaves no ``.grad`` to accumulate."""
    x_leaf = x.detach().requires_grad_(True)

    def call() -> Tuple[torch.Tensor, ...]:
        y = impl.forward(x_leaf, True)
        grads = torch.autograd.grad(y, [x_leaf, *impl.trainable], dy)
        return (y.detach(), *grads)

    return call


# ----------------------------------------------------------------------------------------------
# Correctness


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64 (inf when out has a NaN/inf or the shapes differ)."""
    if out.shape != ref.shape:
        return math.inf
    out64, ref64 = out.detach().to(torch.float64), ref.detach().to(torch.float64)
    if not torch.isfinite(out64).all():
        return math.inf
    denom = ref64.norm().item()
    return (out64 - ref64).norm().item() / (denom if denom > 0 else 1.0)


def _probe_inputs(inputs: LoRAInputs) -> LoRAInputs:
    # With W = 0 and A, B, dY, s > 0: dX = keep ⊙ (dH·A)/(1−p) with dH·A > 0 everywhere, so the
    # nonzeros of dX are exactly the implementation's dropout keep-mask.
    def positive(t: torch.Tensor) -> torch.Tensor:
        gen = torch.Generator(device=t.device).manual_seed(1)
        return (torch.rand(t.shape, generator=gen, device=t.device) + 0.5).to(t.dtype)

    return replace(
        inputs,
        weight=torch.zeros_like(inputs.weight),
        lora_a=positive(inputs.lora_a).requires_grad_(True),
        lora_b=positive(inputs.lora_b).requires_grad_(True),
        dy=positive(inputs.dy),
    )


def recover_dropout_mask(name: str, inputs: LoRAInputs, dropout_p: float, backend: str, seed: int) -> torch.Tensor:
    """The (M, K) keep-mask that implementation ``name`` draws after ``torch.manual_seed(seed)``.

    Dropout masks are pure functions of the RNG state and the shape, so a probe call with the same
    seed and shapes draws the same mask; see :func:`_probe_inputs` for how it is read off dX."""
    probe = _probe_inputs(inputs)
    impl = build_implementations(probe, dropout_p, backend, names=[name])[name]
    call = training_call(impl, probe.x, probe.dy)
    torch.manual_seed(seed)
    dx = call()[1]
    return dx != 0


def float64_reference(
    inputs: LoRAInputs, dropout_p: float, training: bool, mask: Optional[torch.Tensor], base_only: bool
) -> Tuple[torch.Tensor, ...]:
    """(y, dX, dA, dB) in float64 (y, dX for ``base_only``; y alone when not ``training``)."""

    def f64(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.detach().to(torch.float64)

    x = f64(inputs.x).requires_grad_(training)
    W, b = f64(inputs.weight), f64(inputs.bias)
    A, B = f64(inputs.lora_a).requires_grad_(training), f64(inputs.lora_b).requires_grad_(training)
    with torch.set_grad_enabled(training):
        if base_only:
            y = F.linear(x, W, b)
        else:
            y = reference.lora_linear(x, W, b, A, B, inputs.scaling, dropout_p, training, dropout_mask=mask)
        if not training:
            return (y,)
        wrt = [x] if base_only else [x, A, B]
        return (y.detach(), *torch.autograd.grad(y, wrt, f64(inputs.dy)))


GRAD_NAMES = ("y", "dx", "da", "db")


def check_implementation(
    name: str,
    inputs: LoRAInputs,
    dropout_p: float,
    mode: str,
    backend: str = "auto",
    seed: int = 0,
    reference_cache: Optional[Dict[Tuple, Tuple[torch.Tensor, ...]]] = None,
) -> Dict[str, float]:
    """Relative errors of implementation ``name`` vs float64 for one mode, plus the dropout keep
    fraction seen (``keep``, ``fwd+bwd`` with p > 0 only). Keys: y, dx, da, db (those that apply).

    ``reference_cache`` (a dict the caller keeps per inputs and mode) reuses the float64 results
    across implementations when no dropout mask is involved; float64 matmuls dominate on a CPU."""
    impl = build_implementations(inputs, dropout_p, backend, names=[name])[name]
    training = mode == "fwd+bwd"
    torch.manual_seed(seed)
    outs = training_call(impl, inputs.x, inputs.dy)() if training else (inference_call(impl, inputs.x)(),)
    mask = None
    errors: Dict[str, float] = {}
    if training and dropout_p > 0.0 and name != "base":
        mask = recover_dropout_mask(name, inputs, dropout_p, backend, seed)
        errors["keep"] = mask.float().mean().item()
    key = (name == "base", mode, dropout_p)
    if mask is None and reference_cache is not None and key in reference_cache:
        refs = reference_cache[key]
    else:
        refs = float64_reference(inputs, dropout_p, training, mask, base_only=name == "base")
        if mask is None and reference_cache is not None:
            reference_cache[key] = refs
    for grad_name, out, ref in zip(GRAD_NAMES, outs, refs):
        errors[grad_name] = relative_error(out, ref)
    return errors


def passes(errors: Dict[str, float], reference_errors: Optional[Dict[str, float]], dtype: torch.dtype) -> bool:
    """Every error ≤ TOLERANCE[dtype] + 2 × the same-dtype reference's error (when given)."""
    for key in GRAD_NAMES:
        if key not in errors:
            continue
        limit = TOLERANCE[dtype]
        if reference_errors is not None and key in reference_errors:
            limit += 2.0 * reference_errors[key]
        if not errors[key] <= limit:  # also catches NaN
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Memory


def saved_bytes(impl: Implementation, inputs: LoRAInputs) -> Tuple[int, int]:
    """(all bytes saved for backward, the part that is not x nor a weight) for one training forward.

    Counts unique storages packed through ``saved_tensors_hooks``, so a tensor saved twice or a view
    of x counts once (and x not at all in the second number)."""
    storages: Dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    x_leaf = inputs.x.detach().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = impl.forward(x_leaf, True)
    alive = {t.untyped_storage().data_ptr() for t in [inputs.x, *impl.weights] if t is not None}
    del y
    total = sum(storages.values())
    extra = sum(nbytes for ptr, nbytes in storages.items() if ptr not in alive)
    return total, extra


def gpu_peak_bytes(call: Callable[[], object]) -> int:
    """Peak CUDA memory allocated during one call, above what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    out = call()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return int(peak)


# ----------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    timer: str


def _quantile(sorted_values: List[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def time_cpu_round_robin(
    calls: Dict[str, Callable[[], object]], min_reps: int, max_reps: int, budget_s: float, warmup: int = 1
) -> Dict[str, Timing]:
    """Interleaved ``perf_counter`` timing: each round runs every call once, the starting call rotated
    so no implementation always runs first; stops after ``budget_s`` once ``min_reps`` are done."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    samples: Dict[str, List[float]] = {name: [] for name in names}
    start = time.perf_counter()
    for rep in range(max_reps):
        if rep >= min_reps and time.perf_counter() - start > budget_s:
            break
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            t0 = time.perf_counter()
            calls[name]()
            samples[name].append(time.perf_counter() - t0)
    timings = {}
    for name, values in samples.items():
        ms = sorted(v * 1e3 for v in values)
        timings[name] = Timing(statistics.median(ms), _quantile(ms, 0.2), _quantile(ms, 0.8), len(ms), "perf_counter")
    return timings


def time_gpu(call: Callable[[], object], quick: bool, cuda_graph: bool) -> Timing:
    """``triton.testing.do_bench`` median and 20/80% quantiles; with ``cuda_graph`` the calls are
    replayed from a CUDA graph (falls back to plain launches if capture fails, and says so)."""
    from triton.testing import do_bench, do_bench_cudagraph

    warmup, rep = (10, 40) if quick else (25, 100)
    quantiles = [0.5, 0.2, 0.8]
    if cuda_graph:
        try:
            median, p20, p80 = do_bench_cudagraph(call, rep=rep, quantiles=quantiles)
            return Timing(median, p20, p80, -1, "do_bench_cudagraph")
        except Exception as exc:  # capture fails for ops that sync or allocate on the host
            timer = f"do_bench (cuda graph failed: {type(exc).__name__})"
    else:
        timer = "do_bench"
    median, p20, p80 = do_bench(call, warmup=warmup, rep=rep, quantiles=quantiles)
    return Timing(median, p20, p80, -1, timer)


# ----------------------------------------------------------------------------------------------
# The run


@dataclass
class BenchConfig:
    """What ``python -m lorafast bench`` runs; see :func:`add_arguments` for the meaning of each."""

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
    progress: bool = True
    cpu_budget_s: Optional[float] = None
    graph_max_mnk: int = 2**33
    options: Dict[str, object] = field(default_factory=dict)  # the CLI flags, recorded in the report


@dataclass
class Result:
    """One implementation in one configuration and mode."""

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


def environment(config: BenchConfig) -> Dict[str, object]:
    """Device, versions and date for the JSON header."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    try:
        import peft

        peft_version = peft.__version__
    except ImportError:
        peft_version = None
    return {
        "device": str(config.device),
        "device_name": device_description(config.device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "peft": peft_version,
        "lorafast": lorafast.__version__,
        "source_revision": source_revision(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dtype": dtype_name(config.dtype),
        "backend": config.backend,
        "backend_resolved": _resolved_backend(config),
        "quick": config.quick,
        "cuda_graphs": config.cuda_graphs,
        "seed": config.seed,
        "cpu_budget_s": config.cpu_budget_s,
        "options": config.options,
        "torch_threads": torch.get_num_threads(),
        # Other processes on the cores disturb CPU timings (OpenMP threads wait on each other).
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
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


def _resolved_backend(config: BenchConfig) -> str:
    try:
        from lorafast.strategies import resolve

        probe = torch.empty(1, 1, device=config.device, dtype=config.dtype)
        return resolve(config.backend, probe, probe, probe, 0.0, (False,) * 4)
    except Exception as exc:  # reported, not fatal: the bench's own calls will raise if it matters
        return f"unknown ({exc})"


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


def _describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


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
        try:
            errors[name] = check_implementation(
                name, inputs, dropout_p, mode, config.backend, config.seed, reference_cache
            )
        except Exception as exc:  # one broken implementation must not hide the others' numbers
            failures.append(f"{name} {label}: raised {_describe_exception(exc)}")
            del impls[name]
    reference_errors = errors.get("reference")
    if mode == "fwd":
        calls = {n: inference_call(impl, inputs.x) for n, impl in impls.items()}
    else:
        calls = {n: training_call(impl, inputs.x, inputs.dy) for n, impl in impls.items()}

    if config.device.type == "cuda":
        use_graph = config.cuda_graphs and shape.M * shape.K * shape.N <= config.graph_max_mnk
        timings = {n: time_gpu(call, config.quick, use_graph) for n, call in calls.items()}
    else:
        min_reps, max_reps = (3, 20) if config.quick else (11, 200)
        budget = config.cpu_budget_s if config.cpu_budget_s is not None else (0.5 if config.quick else 4.0)
        timings = time_cpu_round_robin(calls, min_reps, max_reps, budget, warmup=1 if config.quick else 2)

    gpu_name = torch.cuda.get_device_name(config.device) if config.device.type == "cuda" else None
    predicted = predicted_ms(gpu_name, config.dtype, shape, rank, p, mode)
    results = []
    for name, impl in impls.items():
        t = timings[name]
        ok = passes(errors[name], reference_errors if name != "reference" else None, config.dtype)
        if not ok:
            failures.append(
                f"{name} {label}: errors {_format_errors(errors[name])} above {TOLERANCE[config.dtype]:g} "
                f"+ 2 × reference's ({_format_errors(reference_errors or {})})"
            )
        result = Result(
            shape=shape.name, M=shape.M, K=shape.K, N=shape.N, rank=rank, dropout=p, mode=mode, impl=name,
            median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, reps=t.reps, timer=t.timer,
            errors=errors[name], correct=ok, predicted_ms=predicted.get(name),
        )  # fmt: skip
        if mode == "fwd+bwd":
            result.saved_bytes, result.saved_extra_bytes = saved_bytes(impl, inputs)
        if config.device.type == "cuda":
            result.peak_bytes = gpu_peak_bytes(calls[name])
        results.append(result)
    return results


def run_benchmark(
    config: BenchConfig, on_group_done: Optional[Callable[[Dict[str, object]], None]] = None
) -> Dict[str, object]:
    """Check, measure and time every configuration; returns the JSON-ready report: ``environment``,
    ``results`` (a list of :class:`Result` dicts), ``failures`` and ``complete``.

    ``on_group_done(partial_report)`` runs after each configuration (the CLI saves it, so a run cut
    short by a time limit still leaves its numbers)."""
    from tqdm.auto import tqdm

    impl_names = [n for n in config.implementations if n != "peft" or peft_available()]
    if "peft" in config.implementations and "peft" not in impl_names:
        print("lorafast bench: peft is not installed; skipping the PEFT baseline", file=sys.stderr)
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
            inputs = make_inputs(shape, rank, config.dtype, config.device, config.seed)
            current = (shape, rank)
        results = _measure_group(config, inputs, shape, rank, p, mode, impl_names, report["failures"])
        report["results"].extend(asdict(r) for r in results)
        if on_group_done is not None:
            on_group_done(report)
        bar.update(1)
    bar.close()
    report["complete"] = True
    return report


# ----------------------------------------------------------------------------------------------
# Reporting


def _format_errors(errors: Dict[str, float]) -> str:
    return " ".join(f"{k}={v:.1e}" for k, v in errors.items() if k in GRAD_NAMES)


def _index(results: List[Dict[str, object]]) -> Dict[Tuple, Dict[str, Dict[str, object]]]:
    table: Dict[Tuple, Dict[str, Dict[str, object]]] = {}
    for row in results:
        key = (row["shape"], row["M"], row["K"], row["N"], row["rank"], row["dropout"], row["mode"])
        table.setdefault(key, {})[row["impl"]] = row
    return table


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return numerator / denominator


def summary_rows(report: Dict[str, object]) -> List[Dict[str, object]]:
    """One row per configuration and mode: each implementation's median and the ratios
    (speedup vs PEFT = t_peft / t_lorafast; overhead vs the floor = t / t_base; measured and predicted)."""
    rows = []
    for key, by_impl in _index(report["results"]).items():
        shape, M, K, N, rank, p, mode = key
        ms = {name: row["median_ms"] for name, row in by_impl.items()}
        pred = {name: row["predicted_ms"] for name, row in by_impl.items()}
        rows.append(
            {
                "shape": shape,
                "M": M,
                "K": K,
                "N": N,
                "rank": rank,
                "dropout": p,
                "mode": mode,
                "ms": ms,
                "speedup_vs_peft": _ratio(ms.get("peft"), ms.get("lorafast")),
                "lorafast_vs_base": _ratio(ms.get("lorafast"), ms.get("base")),
                "peft_vs_base": _ratio(ms.get("peft"), ms.get("base")),
                "predicted_speedup_vs_peft": _ratio(pred.get("peft"), pred.get("lorafast")),
                "predicted_lorafast_vs_base": _ratio(pred.get("lorafast"), pred.get("base")),
                "predicted_peft_vs_base": _ratio(pred.get("peft"), pred.get("base")),
                "correct": all(row["correct"] for row in by_impl.values()),
            }
        )
    return rows


def _fmt(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _table(header: List[str], lines: List[List[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out.extend("| " + " | ".join(cells) + " |" for cells in lines)
    return "\n".join(out)


def markdown_report(report: Dict[str, object]) -> str:
    """The markdown written to ``<stem>.md`` and printed on stdout."""
    env = report["environment"]
    rows = summary_rows(report)
    has_prediction = any(row["predicted_speedup_vs_peft"] is not None for row in rows)
    timer = sorted({r["timer"] for r in report["results"]})
    lines = [
        f"# lorafast bench — {env['device_name']}",
        "",
        f"{env['date']} · torch {env['torch']} · triton {env['triton']} · peft {env['peft']} · "
        f"dtype {env['dtype']} · lorafast backend {env['backend']} → {env['backend_resolved']} · "
        f"timer {', '.join(timer)} · source {env.get('source_revision')}",
        "",
    ]
    if env["device"] == "cpu":
        lines += [
            f"CPU: {env['torch_threads']} torch threads; 1-min load average at start {env['load_average_1min']}.",
            "",
        ]
    if not report.get("complete", True):
        lines += ["**Partial report: the run was cut short; the rows below are those finished.**", ""]
    lines += [
        "Medians in ms. speedup vs PEFT = t_PEFT / t_lorafast (> 1: lorafast faster); "
        "×base = t / t_base, the frozen linear alone (the floor, ≥ 1 expected). "
        "fwd = inference (no grad); fwd+bwd = training step with dropout p, grads of x, A, B.",
        "",
    ]
    header = [
        "shape",
        "M,K,N",
        "r",
        "p",
        "mode",
        "lorafast",
        "PEFT",
        "reference",
        "base",
        "speedup vs PEFT",
        "lorafast ×base",
        "PEFT ×base",
    ]
    if has_prediction:
        header += ["pred. speedup", "pred. lorafast ×base", "pred. PEFT ×base"]
    body = []
    for row in rows:
        ms = row["ms"]
        cells = [
            row["shape"],
            f"{row['M']},{row['K']},{row['N']}",
            str(row["rank"]),
            "eval" if row["dropout"] is None else f"{row['dropout']:g}",
            row["mode"],
            *(_fmt(ms.get(name), ".3f") for name in IMPLEMENTATIONS),
            _fmt(row["speedup_vs_peft"], ".2f"),
            _fmt(row["lorafast_vs_base"], ".2f"),
            _fmt(row["peft_vs_base"], ".2f"),
        ]
        if has_prediction:
            cells += [
                _fmt(row["predicted_speedup_vs_peft"], ".2f"),
                _fmt(row["predicted_lorafast_vs_base"], ".2f"),
                _fmt(row["predicted_peft_vs_base"], ".2f"),
            ]
        body.append(cells)
    lines += [_table(header, body), ""]

    lines += [
        "## Correctness and memory",
        "",
        "Relative error ‖out−ref‖/‖ref‖ vs float64 (dropout: each implementation's own mask, recovered and "
        "replayed). saved = unique storages saved for backward; extra = those that are not x nor a weight.",
        "",
    ]
    header = [
        "shape",
        "r",
        "p",
        "mode",
        "impl",
        "err y",
        "err dx",
        "err dA",
        "err dB",
        "ok",
        "saved MB",
        "extra MB",
        "peak MB",
    ]
    body = []
    for row in report["results"]:
        errors = row["errors"]
        body.append(
            [
                row["shape"],
                str(row["rank"]),
                "eval" if row["dropout"] is None else f"{row['dropout']:g}",
                row["mode"],
                row["impl"],
                *(_fmt(errors.get(k), ".1e") for k in GRAD_NAMES),
                "yes" if row["correct"] else "**NO**",
                _fmt(None if row["saved_bytes"] is None else row["saved_bytes"] / 1e6, ".2f"),
                _fmt(None if row["saved_extra_bytes"] is None else row["saved_extra_bytes"] / 1e6, ".2f"),
                _fmt(None if row["peak_bytes"] is None else row["peak_bytes"] / 1e6, ".2f"),
            ]
        )
    lines += [_table(header, body), ""]
    if report["failures"]:
        lines += ["## Correctness failures", ""] + [f"- {failure}" for failure in report["failures"]] + [""]
    return "\n".join(lines)


def plot_speedups(report: Dict[str, object], path: str) -> Optional[str]:
    """PNG bar chart of the measured speedup vs PEFT per configuration, with the ceiling
    t_PEFT / t_base (what a LoRA layer as cheap as the frozen linear would get). Returns the path,
    or None (with a message) when matplotlib is missing or there is no PEFT baseline."""
    rows = [row for row in summary_rows(report) if row["speedup_vs_peft"] is not None]
    if not rows:
        print("lorafast bench: no PEFT baseline measured; no plot", file=sys.stderr)
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("lorafast bench: matplotlib is not installed; skipping the plot", file=sys.stderr)
        return None
    labels = [
        f"{row['shape']}\nr={row['rank']} {row['mode']}" + ("" if row["dropout"] is None else f" p={row['dropout']:g}")
        for row in rows
    ]
    positions = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.8 * len(rows)), 4.5))
    ax.bar([i - 0.2 for i in positions], [row["speedup_vs_peft"] for row in rows], width=0.4, label="lorafast")
    ax.bar(
        [i + 0.2 for i in positions],
        [row["peft_vs_base"] for row in rows],
        width=0.4,
        label="ceiling: frozen linear alone",
        alpha=0.5,
    )
    if any(row["predicted_speedup_vs_peft"] is not None for row in rows):
        ax.scatter(
            list(positions),
            [row["predicted_speedup_vs_peft"] for row in rows],
            color="black",
            marker="_",
            s=200,
            label="roofline prediction",
            zorder=3,
        )
    ax.axhline(1.0, color="gray", linewidth=0.8)
    ax.set_xticks(list(positions))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("speedup vs PEFT (t_PEFT / t)")
    env = report["environment"]
    ax.set_title(f"lorafast vs PEFT — {env['device_name']}, {env['dtype']}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def output_stem(report: Dict[str, object]) -> str:
    """``<device>-<date>``, e.g. ``nvidia-h100-80gb-hbm3-2026-11-23-1402`` or ``cpu-2026-11-23-1402``."""
    env = report["environment"]
    device = env["device_name"] if env["device"].startswith("cuda") else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    stamp = datetime.datetime.fromisoformat(env["date"]).strftime("%Y-%m-%d-%H%M")
    return f"{slug}-{stamp}"


def write_report(
    report: Dict[str, object], out_dir: str, stem: Optional[str] = None, plot: bool = True
) -> Dict[str, Optional[str]]:
    """Write ``<stem>.json``, ``<stem>.md`` and (with ``plot``) ``<stem>.png`` under ``out_dir``;
    returns the paths (``png`` None when not drawn)."""
    os.makedirs(out_dir, exist_ok=True)
    stem = stem or output_stem(report)
    paths: Dict[str, Optional[str]] = {
        "json": os.path.join(out_dir, stem + ".json"),
        "md": os.path.join(out_dir, stem + ".md"),
    }
    payload = _finite_or_none(dict(report, summary=summary_rows(report)))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, allow_nan=False)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown_report(report))
    paths["png"] = plot_speedups(report, os.path.join(out_dir, stem + ".png")) if plot else None
    return paths


def _finite_or_none(value: object) -> object:
    # Strict JSON has no inf/NaN: a non-finite error or time is written as null.
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's flags."""
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="presets (bert, llama) or M,K,N; default: bert on CPU, bert llama on CUDA",
    )
    parser.add_argument(
        "--rank",
        type=int,
        nargs="+",
        default=None,
        help="LoRA ranks; default 8 16 64 (--quick: 8 on CPU, 16 on CUDA)",
    )
    parser.add_argument("--dropout", type=float, nargs="+", default=None, help="dropout p values; default 0 0.1")
    parser.add_argument("--dtype", default=None, help="fp32 | bf16 | fp16; default bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--device", default=None, help="cuda | cpu | cuda:N; default cuda when available")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "fused", "cublas", "aten", "triton", "torch"],
        help="lorafast strategy (default auto: the fastest measured on this GPU, aten on CPU)",
    )
    parser.add_argument("--quick", action="store_true", help="fewer ranks and repeats (~30 s on a 2-core CPU)")
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="on CUDA, time small shapes (M·K·N ≤ 2^33) by CUDA-graph replay",
    )
    parser.add_argument(
        "--cpu-budget", type=float, default=None, help="CPU: seconds of timing per configuration (default 4, quick 0.5)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="directory for <device>-<date>.{json,md,png}")
    parser.add_argument("--name", default=None, help="file stem instead of <device>-<date>")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Fill the device-dependent defaults documented in :func:`add_arguments`."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    dtype = parse_dtype(args.dtype or ("bf16" if on_gpu else "fp32"))
    shapes = parse_shapes(args.shapes or (["bert", "llama"] if on_gpu else ["bert"]))
    if args.rank:
        ranks = args.rank
    elif args.quick:
        ranks = [16] if on_gpu else [8]
    else:
        ranks = [8, 16, 64]
    dropouts = args.dropout if args.dropout is not None else [0.0, 0.1]
    for p in dropouts:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"--dropout: p must be in [0, 1), got {p}")
    for r in ranks:
        if r < 1:
            raise ValueError(f"--rank: r must be >= 1, got {r}")
    return BenchConfig(
        shapes=shapes,
        ranks=ranks,
        dropouts=dropouts,
        dtype=dtype,
        device=device,
        backend=args.backend,
        quick=args.quick,
        cuda_graphs=args.cuda_graphs,
        seed=args.seed,
        progress=not args.no_progress,
        cpu_budget_s=args.cpu_budget,
        options={k: v for k, v in vars(args).items() if k not in ("module", "command")},
    )


def run(args: argparse.Namespace) -> int:
    """Run the bench for parsed ``args``; exit status 1 if any implementation failed its check."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
    except ValueError as exc:  # a bad flag: one line, like argparse's own errors
        print(f"lorafast bench: error: {exc}", file=sys.stderr)
        return 2
    if config.device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > 0.5 * cores:
            print(
                f"lorafast bench: load average {load:.1f} on {cores} cores; CPU timings will be disturbed",
                file=sys.stderr,
            )
    stem = args.name
    on_group_done = None
    if args.out:

        def on_group_done(partial: Dict[str, object]) -> None:
            write_report(partial, args.out, stem or output_stem(partial), plot=False)

    report = run_benchmark(config, on_group_done)
    print(markdown_report(report))
    if args.out:
        paths = write_report(report, args.out, stem or output_stem(report))
        print("wrote " + ", ".join(path for path in paths.values() if path))
    if report["failures"]:
        print(f"lorafast bench: {len(report['failures'])} correctness failure(s)", file=sys.stderr)
        return 1
    return 0
