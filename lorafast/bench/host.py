"""Host cost (``python -m lorafast bench --host``): Python/dispatch µs per call and device launches per
call, on CPU, for lorafast and PEFT on one tiny layer where the math is negligible.

Default setup (issue 10): one PEFT LoRA layer 64→64, r=8, x 16×64, fp32, 1 torch thread, p ∈ {0, 0.1}.
Modes: ``fwd`` is a training-mode forward recorded by autograd (dropout p), ``fwd+bwd`` that forward
plus ``autograd.grad`` for x, A and B. Variants:

* ``peft`` — PEFT's ``lora.Linear`` (the baseline of every ratio);
* ``patch:<strategy>`` — the same PEFT layer after ``lorafast.patch(layer, backend=<strategy>)``;
* ``op:<strategy>`` — :func:`lorafast.lora_linear` called directly with ``backend=<strategy>``.

The Triton strategies (``fused``, ``cublas``) run with every Triton launch stubbed to a no-op that
only counts (outputs are garbage; the timing is the host work around the launches, without the launch
itself: Triton's argument binding, several µs a launch on a GPU, is not in these numbers). On CPU their
launchers need ``TRITON_INTERPRET=1`` for their host-side planning; it is set while measuring.

Launches per call: Triton launches (counted by the stub) plus ATen ops that run a kernel, counted with a
``TorchDispatchMode`` (views, ``detach``, ``empty*`` and other metadata-only ops excluded; the raw op
count is kept too). Timing: all variants round-robin (start rotated), median per variant; the load
average is recorded before and after.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lorafast
from lorafast.bench.impls import peft_available, peft_layer
from lorafast.bench.inputs import LoRAInputs, make_inputs
from lorafast.bench.timing import load_average, time_cpu_round_robin
from lorafast.shapes import Shape

# Targets of issue 10, printed beside the measured ratios (lorafast / PEFT), and issue 21's for p = 0.
TARGET_HOST_RATIO = 0.8  # host µs per fwd+bwd
TARGET_LAUNCH_RATIO = 0.7  # device launches per fwd+bwd
TARGET_LAUNCH_RATIO_P0 = 0.6  # device launches per fwd+bwd at p = 0 (issue 21: the zero-fill trims)
TRITON_STRATEGIES = ("fused", "cublas")
# ATen ops that launch no device kernel: metadata, aliasing and uninitialised allocation.
_NO_KERNEL_OPS = frozenset(
    {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "detach", "alias", "lift_fresh",
     "_unsafe_view", "view", "t", "transpose", "permute", "expand", "as_strided", "reshape", "unsqueeze",
     "squeeze", "slice", "select", "_reshape_alias", "set_", "resize_", "sym_size", "sym_stride", "sym_numel",
     "is_same_size", "_local_scalar_dense", "unbind", "split"}
)  # fmt: skip


@dataclass(frozen=True)
class HostConfig:
    """The host-cost setup; defaults are issue 10's."""

    M: int = 16
    K: int = 64
    N: int = 64
    rank: int = 8
    dropouts: Tuple[float, ...] = (0.0, 0.1)
    threads: int = 1
    strategies: Tuple[str, ...] = ("aten", "fused", "cublas")
    quick: bool = False
    budget_s: Optional[float] = None  # timing seconds per (p, mode) group; default 2 (quick 0.3)


class LaunchCounter(TorchDispatchMode):
    """Counts the ATen ops dispatched while active (``ops``: every op by name; ``kernels``: those that can
    launch a device kernel, see ``_NO_KERNEL_OPS``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in _NO_KERNEL_OPS)


@contextlib.contextmanager
def stubbed_triton_launches(counter: List[int]) -> Iterator[None]:
    """Replace ``lorafast.kernels.configs.launch`` (and every kernels module's imported copy of it) by a
    no-op that adds 1 to ``counter[0]``; sets ``TRITON_INTERPRET=1`` so the launchers plan on CPU."""
    from lorafast.kernels import configs, lora_bwd, lora_fwd  # noqa: F401  (imported so their `launch` is patched)

    original = configs.launch

    def launch(*args, **kwargs) -> None:
        counter[0] += 1

    patched = [m for name, m in list(sys.modules.items())
               if name.startswith("lorafast.kernels") and getattr(m, "launch", None) is original]  # fmt: skip
    saved_env = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    for module in patched:
        module.launch = launch
    try:
        yield
    finally:
        for module in patched:
            module.launch = original
        if saved_env is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def _variants(config: HostConfig, p: float) -> Tuple[Dict[str, Tuple[str, Callable]], LoRAInputs]:
    """({name: (description, forward(x) in training mode)} over the same weights, the inputs)."""
    inputs = make_inputs(Shape("host", config.M, config.K, config.N), config.rank, torch.float32, "cpu", seed=0)
    W, b, A, B, s = inputs.weight, inputs.bias, inputs.lora_a, inputs.lora_b, inputs.scaling
    variants: Dict[str, Tuple[str, Callable]] = {}
    if peft_available():
        layer = peft_layer(inputs, p).train()
        variants["peft"] = ("PEFT lora.Linear", layer)
        for strategy in config.strategies:
            patched = peft_layer(inputs, p).train()
            lorafast.patch(patched, backend=strategy)
            state = "" if type(patched).__module__.startswith("lorafast") else " (NOT patched: PEFT's forward)"
            variants[f"patch:{strategy}"] = (f"lorafast.patch(PEFT layer), backend={strategy}{state}", patched)
    for strategy in config.strategies:

        def op(x, _backend=strategy):
            return lorafast.lora_linear(x, W, b, A, B, s, dropout_p=p, training=True, backend=_backend)

        variants[f"op:{strategy}"] = (f"lorafast.lora_linear(backend={strategy})", op)
    return variants, inputs


def _call(forward: Callable, x: torch.Tensor, dy: torch.Tensor, trainable: List[torch.Tensor], mode: str):
    def fwd():
        return forward(x)

    def fwd_bwd():
        y = forward(x)
        return torch.autograd.grad(y, [x, *trainable], dy)

    return fwd if mode == "fwd" else fwd_bwd


def _trainable(forward) -> List[torch.Tensor]:
    if isinstance(forward, torch.nn.Module):
        return [forward.lora_A["default"].weight, forward.lora_B["default"].weight]
    return []


@dataclass
class HostRow:
    """One variant at one p and mode. ``launches`` = ``triton_launches`` + ``aten_kernels``."""

    variant: str
    description: str
    p: float
    mode: str
    host_us: float
    p20_us: float
    p80_us: float
    reps: int
    launches: int
    triton_launches: int
    aten_kernels: int
    aten_ops: int
    host_vs_peft: Optional[float] = None
    launches_vs_peft: Optional[float] = None


def measure_host(config: HostConfig = HostConfig()) -> Dict[str, object]:
    """Host µs and launches per call for every variant, p and mode; a JSON-ready dict with ``config``,
    ``rows`` (:class:`HostRow` dicts), ``targets``, ``torch_threads``, ``load_average_before/after``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    load_before = load_average()
    rows: List[HostRow] = []
    budget = config.budget_s if config.budget_s is not None else (0.3 if config.quick else 2.0)
    min_reps, max_reps = (20, 2000) if config.quick else (100, 20000)
    counter = [0]
    strategies_used = tuple(config.strategies)
    try:
        with stubbed_triton_launches(counter), torch.random.fork_rng():
            for p in config.dropouts:
                variants, inputs = _variants(config, p)
                x = inputs.x.detach().requires_grad_(True)
                for mode in ("fwd", "fwd+bwd"):
                    calls = {}
                    for name, (_, forward) in variants.items():
                        trainable = _trainable(forward) or [inputs.lora_a, inputs.lora_b]
                        calls[name] = _call(forward, x, inputs.dy, trainable, mode)
                    counts = {}
                    for name, call in calls.items():
                        call()  # first call: one-time work (scale cache, lazy imports) is not per-call cost
                        counter[0] = 0
                        with LaunchCounter() as ops:
                            call()
                        counts[name] = (counter[0], ops.kernels, sum(ops.ops.values()))
                    timings = time_cpu_round_robin(calls, min_reps, max_reps, budget, warmup=3)
                    for name, t in timings.items():
                        triton, kernels, n_ops = counts[name]
                        rows.append(HostRow(
                            variant=name, description=variants[name][0], p=p, mode=mode, host_us=t.median_ms * 1e3,
                            p20_us=t.p20_ms * 1e3, p80_us=t.p80_ms * 1e3, reps=t.reps, launches=triton + kernels,
                            triton_launches=triton, aten_kernels=kernels, aten_ops=n_ops,
                        ))  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    baseline = {(r.p, r.mode): r for r in rows if r.variant == "peft"}
    for row in rows:
        peft = baseline.get((row.p, row.mode))
        if peft is not None and row.variant != "peft":
            row.host_vs_peft = row.host_us / peft.host_us
            row.launches_vs_peft = row.launches / peft.launches if peft.launches else None
    return {
        "config": dict(asdict(config), strategies=list(strategies_used), dropouts=list(config.dropouts)),
        "rows": [asdict(r) for r in rows],
        "targets": {"host_fwd_bwd_vs_peft": TARGET_HOST_RATIO, "launches_fwd_bwd_vs_peft": TARGET_LAUNCH_RATIO,
                    "launches_fwd_bwd_vs_peft_p0": TARGET_LAUNCH_RATIO_P0},
        "torch_threads": config.threads,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "stubbed": list(TRITON_STRATEGIES),
    }


def _launch_target(targets: Dict[str, float], p: float) -> float:
    """The launch-ratio target at dropout ``p`` (reports written before issue 21 have no p = 0 entry)."""
    if p == 0.0 and "launches_fwd_bwd_vs_peft_p0" in targets:
        return targets["launches_fwd_bwd_vs_peft_p0"]
    return targets["launches_fwd_bwd_vs_peft"]


def _verdict(value: Optional[float], target: float, mode: str) -> str:
    if value is None:
        return "—"
    text = f"{value:.2f}"
    if mode != "fwd+bwd":
        return text
    return f"{text} ({'met' if value <= target else 'not met'})"


def host_markdown(host: Dict[str, object]) -> str:
    """The ``## Host cost`` section of the report."""
    cfg = host["config"]
    lines = [
        "## Host cost (CPU)",
        "",
        f"One layer {cfg['K']}→{cfg['N']}, r={cfg['rank']}, x {cfg['M']}×{cfg['K']} fp32, "
        f"{host['torch_threads']} torch thread(s); interleaved medians; load average "
        f"{host['load_average_before']} before, {host['load_average_after']} after. fwd = training-mode forward "
        "(autograd records), fwd+bwd = forward + grads of x, A, B. launches = Triton launches + ATen ops that run "
        f"a kernel. {', '.join(host['stubbed'])}: every Triton launch stubbed to a no-op (timing only; the launch's "
        f"own cost is not included). Targets (fwd+bwd vs PEFT): host ≤ {host['targets']['host_fwd_bwd_vs_peft']}×, "
        f"launches ≤ {host['targets']['launches_fwd_bwd_vs_peft']}× "
        f"({host['targets'].get('launches_fwd_bwd_vs_peft_p0', host['targets']['launches_fwd_bwd_vs_peft'])}× at "
        "p = 0).",
        "",
    ]
    header = ["p", "mode", "variant", "host µs", "p20–p80 µs", "launches", "triton", "aten kernels", "aten ops",
              "host ×PEFT", "launches ×PEFT"]
    body = []
    for r in host["rows"]:
        body.append([
            f"{r['p']:g}", r["mode"], f"`{r['variant']}`", f"{r['host_us']:.1f}",
            f"{r['p20_us']:.1f}–{r['p80_us']:.1f}",
            str(r["launches"]), str(r["triton_launches"]), str(r["aten_kernels"]), str(r["aten_ops"]),
            _verdict(r["host_vs_peft"], host["targets"]["host_fwd_bwd_vs_peft"], r["mode"]),
            _verdict(r["launches_vs_peft"], _launch_target(host["targets"], r["p"]), r["mode"]),
        ])  # fmt: skip
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cells) + " |" for cells in body]
    descriptions = {r["variant"]: r["description"] for r in host["rows"]}
    lines += out + [""] + [f"- `{name}`: {text}" for name, text in descriptions.items()]
    return "\n".join(lines)
