"""MoE experts (``python -m lorafast bench --moe [E,H,I,k,T ...]``): one Qwen3-MoE sparse block (router, top-k,
experts), fwd+bwd, LoRA r=16 on both expert weights (``gate_up_proj``, ``down_proj``) through PEFT's
``target_parameters``, against the frozen block.

Implementations, all on the same weights and one interleaved timing run per shape:

- ``frozen``: the block alone (no adapter), transformers' default experts implementation (``grouped_mm``);
- ``peft grouped_mm`` / ``peft eager``: PEFT's ParamWrapper (W + s·ΔW for every expert, then the experts forward)
  with the ``grouped_mm`` and ``eager`` experts implementations;
- ``lorafast <strategy>``: the PEFT model after ``lorafast.patch`` (``aten`` on CPU; ``auto``, ``fused``,
  ``cublas``, ``aten`` on CUDA).

Per implementation: the median step time (fwd + bwd with a fixed dY; X requires grad, as it would inside a model;
on CPU one interleaved run of all but ``peft eager``, which is timed alone afterwards),
the largest tensor any op creates during one step (views excluded; inputs and parameters are not created), and
the largest relative error ‖out−ref‖/‖ref‖ over y, dX and the four LoRA gradients against PEFT run in float64
(``eager``, as CPU grouped_mm has no float64 kernel). The frozen block's error is against the float64 frozen
block. The block's expert weights are shared by all implementations (one copy in memory).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lorafast
from lorafast.bench.checks import relative_error
from lorafast.bench.timing import time_cpu_round_robin, time_gpu

# (E, H, I, top-k, tokens): the CPU targets; the quick shape only proves the pipeline runs.
MOE_SHAPES = [(64, 1024, 512, 8, 1024), (128, 1024, 256, 8, 2048)]
QUICK_SHAPES = [(8, 64, 32, 2, 64)]
RANK = 16
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


@dataclass
class MoeConfig:
    """One ``--moe`` run."""

    shapes: Sequence[Tuple[int, int, int, int, int]]
    device: torch.device
    dtype: torch.dtype = torch.float32
    strategies: Sequence[str] = ("aten",)
    rank: int = RANK
    quick: bool = False
    cpu_budget_s: Optional[float] = None
    seed: int = 0


@dataclass
class MoeRow:
    shape: str
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    reps: int
    largest_new_tensor_bytes: int
    max_rel_err: Optional[float]
    errors: Dict[str, float] = field(default_factory=dict)


class LargestNewTensor(TorchDispatchMode):
    """Records the largest tensor (bytes and elements) any op creates; outputs sharing an input's storage (views,
    in-place results) do not count."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.numel = max(self.numel, t.numel())
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


class _Block(nn.Module):
    """Holds the sparse block as a submodule so PEFT's ``target_parameters`` reach ``block.experts``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x)


def sparse_block(E: int, H: int, inter: int, top_k: int, dtype: torch.dtype, device: torch.device, seed: int):
    """A frozen random-init Qwen3-MoE sparse block (weights ~ N(0, 0.02), router included)."""
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=inter, num_experts=E, num_experts_per_tok=top_k,
                         norm_topk_prob=True)
    cfg._experts_implementation = "grouped_mm"  # transformers' default
    torch.manual_seed(seed)
    block = Qwen3MoeSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.02)
    return _Block(block).to(device=device, dtype=dtype).requires_grad_(False)


def _sharing_base(model: nn.Module, base: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that shares ``base``'s parameters (the frozen expert weights stay one copy)."""
    return copy.deepcopy(model, memo={id(p): p for p in base.parameters()})


def peft_block(base: nn.Module, rank: int, seed: int) -> nn.Module:
    """PEFT's expert LoRA on ``base`` (shared weights), both expert weights, lora_B random (PEFT's zeros would
    hide the branch)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_sharing_base(base, base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[],
                                                                  target_parameters=TARGETS))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model


def _experts_implementation(model: nn.Module, implementation: str) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "config") and hasattr(module, "gate_up_proj"):
            module.config._experts_implementation = implementation
    return model


def _trainable(model: nn.Module) -> List[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def step_call(model: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> Callable[[], tuple]:
    """One training step: fwd, backward with dY; returns (y, dX, LoRA grads...) (grads reset first)."""
    params = _trainable(model)

    def run():
        x.grad = None
        for p in params:
            p.grad = None
        y = model(x)
        y.backward(dy)
        return (y.detach(), x.grad, *[p.grad for p in params])

    return run


def _errors(outs: tuple, refs: tuple) -> Dict[str, float]:
    names = ["y", "dx", *[f"d{i}" for i in range(len(refs) - 2)]]
    return {n: relative_error(o, r) for n, o, r in zip(names, outs, refs)}


# The eager loop is 10-20x the frozen block on CPU (40-90 s a step at the target shapes): it is timed after the
# interleaved run, once, so the ratios the issue asks for come from more rounds in the same time.
SLOW = "peft eager"


def _time(calls: Dict[str, Callable[[], object]], config: MoeConfig):
    """Timings by name: on CUDA ``do_bench`` each; on CPU one interleaved round-robin run of every call but SLOW
    (medians), then SLOW alone (one step at the target shapes)."""
    if config.device.type == "cuda":
        return {n: time_gpu(c, config.quick, cuda_graph=False) for n, c in calls.items()}
    budget = config.cpu_budget_s if config.cpu_budget_s is not None else (1.0 if config.quick else 60.0)
    timings = time_cpu_round_robin({n: c for n, c in calls.items() if n != SLOW}, min_reps=3 if config.quick else 5,
                                   max_reps=50, budget_s=budget, warmup=1)
    if SLOW in calls:
        timings.update(time_cpu_round_robin({SLOW: calls[SLOW]}, min_reps=1, max_reps=3, budget_s=budget / 4,
                                            warmup=1 if config.quick else 0))
    return timings


def run_moe(config: MoeConfig) -> Dict[str, object]:
    """Every shape: build, check against float64, measure the largest new tensor, time interleaved."""
    rows: List[MoeRow] = []
    notes: List[str] = []
    for E, H, inter, top_k, tokens in config.shapes:
        label = f"E={E} H={H} I={inter} top-{top_k} T={tokens}"
        base = sparse_block(E, H, inter, top_k, config.dtype, config.device, config.seed)
        peft = peft_block(base, config.rank, config.seed)
        models: Dict[str, nn.Module] = {"frozen": base, "peft grouped_mm": peft,
                                        "peft eager": _experts_implementation(_sharing_base(peft, base), "eager")}
        for strategy in config.strategies:
            patched = _sharing_base(peft, base)
            lorafast.patch(patched, backend=strategy)
            models[f"lorafast {strategy}"] = patched
        gen = torch.Generator().manual_seed(config.seed + 2)
        x = torch.randn(1, tokens, H, generator=gen).to(config.device, config.dtype).requires_grad_()
        dy = torch.randn(1, tokens, H, generator=gen).to(config.device, config.dtype)
        calls = {name: step_call(model, x, dy) for name, model in models.items()}
        refs = {}
        for name, model in (("frozen", base), ("lora", peft)):
            model64 = _experts_implementation(copy.deepcopy(model).double(), "eager")
            x64 = x.detach().double().requires_grad_()
            refs[name] = step_call(model64, x64, dy.double())()
            del model64
        largest, errors = {}, {}
        for name, call in calls.items():
            mode = LargestNewTensor()
            with mode:
                outs = call()
            largest[name] = mode.bytes
            errors[name] = _errors(outs, refs["frozen" if name == "frozen" else "lora"])
        from lorafast.peft.experts import FusedParamWrapper

        fused = sum(isinstance(m, FusedParamWrapper)
                    for name, model in models.items() if name.startswith("lorafast") for m in model.modules())
        if fused == 0 and config.strategies:
            notes.append(f"{label}: lorafast.patch fused no layer: the lorafast rows are PEFT's forward")
        timings = _time(calls, config)
        for name in models:
            t = timings[name]
            rows.append(MoeRow(label, name, t.median_ms, t.p20_ms, t.p80_ms, t.reps, largest[name],
                               max(errors[name].values()), errors[name]))
        del models, calls, peft, base
    return {
        "config": {"shapes": [list(s) for s in config.shapes], "dtype": str(config.dtype).replace("torch.", ""),
                   "device": str(config.device), "rank": config.rank, "strategies": list(config.strategies),
                   "threads": torch.get_num_threads()},
        "rows": [asdict(r) for r in rows],
        "notes": notes,
    }


def moe_markdown(moe: Dict[str, object]) -> str:
    """The ``## MoE experts`` section of the report."""
    cfg = moe["config"]
    lines = [
        "## MoE experts (Qwen3-MoE sparse block, LoRA on gate_up_proj + down_proj)",
        "",
        f"fwd+bwd (dX and the LoRA grads), r={cfg['rank']}, {cfg['dtype']}, {cfg['device']}, "
        f"{cfg['threads']} thread(s). ×frozen = t / t_frozen; ×PEFT = t_PEFT(grouped_mm) / t. Largest new tensor: "
        "the biggest tensor any op made during one step. Error: max ‖out−ref‖/‖ref‖ over y, dX and the LoRA "
        "grads vs PEFT in float64 (frozen: vs the float64 frozen block).",
        "",
        *[f"**{note}**" for note in moe["notes"]],
        "",
        "| shape | impl | ms (p20–p80) | ×frozen | ×PEFT | largest new tensor MB | max rel err |",
        "|---|---|---|---|---|---|---|",
    ]
    by_shape: Dict[str, Dict[str, dict]] = {}
    for r in moe["rows"]:
        by_shape.setdefault(r["shape"], {})[r["impl"]] = r
    for shape, impls in by_shape.items():
        frozen = impls.get("frozen", {}).get("median_ms")
        peft = impls.get("peft grouped_mm", {}).get("median_ms")
        for name, r in impls.items():
            ms = r["median_ms"]
            lines.append(
                f"| {shape} | {name} | {ms:.1f} ({r['p20_ms']:.1f}–{r['p80_ms']:.1f}) | "
                f"{ms / frozen:.2f} | {peft / ms:.2f} | {r['largest_new_tensor_bytes'] / 2**20:.3f} | "
                f"{r['max_rel_err']:.1e} |"
            )
    return "\n".join(lines)
