"""DoRA (``python -m lorafast bench --dora``): PEFT's DoRA layer, lorafast's (the patched PEFT layer, and
:func:`lorafast.dora_linear` per strategy), PEFT's and lorafast's plain LoRA and the frozen base, over the same
weights, in one interleaved timing run per (shape, rank, p): time, bytes saved for backward, the largest tensor a
fwd+bwd allocates (an N×K one is the dense B·A or W + s·B·A that lorafast's DoRA avoids), and each one's error
against a float64 reference of its own math (DoRA rows: :func:`lorafast.reference.dora_linear`).

Errors: at p = 0 for every row; with dropout only for the lorafast rows, whose mask is replayed from the seed (PEFT's
``nn.Dropout`` mask cannot be read back). The magnitude starts ±5% off PEFT's init (m = ‖W + s·B·A‖, so g = 1
exactly there and g − 1 would be untested). The targets of issue 19 are printed under the table (ratios from this
one run; medians).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorafast
from lorafast import functional, reference
from lorafast.bench.checks import relative_error, saved_bytes
from lorafast.bench.impls import Implementation, training_call
from lorafast.bench.inputs import LoRAInputs, make_inputs
from lorafast.bench.timing import load_average, time_calls
from lorafast.dropout import keep_mask
from lorafast.shapes import Shape, dtype_name
from lorafast.strategies import aten

# (shape, rank) pairs of issue 19: BERT-base attention on the CPU and a Llama-sized MLP slice that fits the 2-core
# VM; on CUDA BERT-base and Llama-3-8B's attention projection.
DORA_CASES = {
    "cpu": [(Shape("bert-attn", 2048, 768, 768), 8), (Shape("llama-mlp-cpu", 512, 2048, 5632), 16)],
    "cuda": [(Shape("bert-attn", 2048, 768, 768), 8), (Shape("llama8b-attn", 8192, 4096, 4096), 16)],
}
OURS, OUR_LORA, PEFT_DORA = "lorafast-dora", "lorafast-lora", "peft-dora"


@dataclass
class DoraConfig:
    """One ``--dora`` run. ``strategies``: the lorafast DoRA strategies timed on their own (``dora-<name>`` rows)."""

    cases: List[Tuple[Shape, int]]
    dropouts: List[float]
    dtype: torch.dtype
    device: torch.device
    strategies: Sequence[str] = ("aten",)
    backend: str = "auto"
    adapter_dtype: Optional[torch.dtype] = None
    quick: bool = False
    cpu_budget_s: Optional[float] = None
    seed: int = 0


@dataclass
class DoraRow:
    shape: str
    M: int
    K: int
    N: int
    rank: int
    dropout: float
    mode: str
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str
    errors: Dict[str, float] = field(default_factory=dict)
    saved_bytes: Optional[int] = None
    saved_extra_bytes: Optional[int] = None
    largest_alloc: Optional[List[int]] = None
    nk_allocs: Optional[int] = None


def peft_layer(inputs: LoRAInputs, dropout_p: float, use_dora: bool) -> nn.Module:
    """PEFT's ``lora.Linear`` (DoRA or plain) around an ``nn.Linear`` holding ``inputs``' weights; for DoRA the
    magnitude is PEFT's init times 1 ± 5% (a fixed generator)."""
    from peft import LoraConfig, inject_adapter_in_model

    N, K = inputs.weight.shape
    holder = nn.Module()
    holder.linear = nn.Linear(K, N, bias=inputs.bias is not None, device=inputs.x.device, dtype=inputs.x.dtype)
    with torch.no_grad():
        holder.linear.weight.copy_(inputs.weight)
        if inputs.bias is not None:
            holder.linear.bias.copy_(inputs.bias)
    config = LoraConfig(r=inputs.rank, lora_alpha=inputs.rank, lora_dropout=dropout_p, target_modules=["linear"],
                        use_dora=use_dora, init_lora_weights=False)
    layer = inject_adapter_in_model(config, holder).linear
    layer.lora_A.to(dtype=inputs.lora_a.dtype)
    layer.lora_B.to(dtype=inputs.lora_b.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inputs.lora_a)
        layer.lora_B["default"].weight.copy_(inputs.lora_b)
    layer.scaling["default"] = inputs.scaling
    if use_dora:
        magnitude = layer.lora_magnitude_vector["default"].weight
        gen = torch.Generator(device=magnitude.device).manual_seed(7)
        with torch.no_grad():
            norm = reference.dora_weight_norm(inputs.weight.double(), inputs.lora_a.double(), inputs.lora_b.double(),
                                              inputs.scaling)
            spread = 1 + 0.05 * (2 * torch.rand(N, generator=gen, device=magnitude.device, dtype=torch.float64) - 1)
            magnitude.copy_(norm * spread)
    return layer.train()


def _trainable(layer: nn.Module) -> List[torch.Tensor]:
    names = ["lora_A", "lora_B"] + (["lora_magnitude_vector"] if layer.lora_magnitude_vector else [])
    return [getattr(layer, n)["default"].weight for n in names]


def _layer_impl(name: str, layer: nn.Module) -> Implementation:
    def forward(x, training, _layer=layer):
        if _layer.training != training:
            _layer.train(training)
        return _layer(x)

    return Implementation(name, forward, _trainable(layer), list(layer.parameters()))


def _op_impl(strategy: str, layer: nn.Module, dropout_p: float) -> Implementation:
    """lorafast.dora_linear forced to ``strategy`` on the DoRA layer's own tensors."""
    base = layer.base_layer
    A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    m, s = layer.lora_magnitude_vector["default"].weight, layer.scaling["default"]

    def forward(x, training):
        return lorafast.dora_linear(x, base.weight, base.bias, A, B, m, s, dropout_p, training, backend=strategy)

    return Implementation(f"dora-{strategy}", forward, [A, B, m], list(layer.parameters()))


def build(inputs: LoRAInputs, dropout_p: float, backend: str, strategy_rows: Sequence[str]
          ) -> Dict[str, Implementation]:
    """The implementations of one configuration, all over ``inputs``' weights."""
    peft_dora = peft_layer(inputs, dropout_p, use_dora=True)
    peft_lora = peft_layer(inputs, dropout_p, use_dora=False)
    ours_dora, ours_lora = copy.deepcopy(peft_dora), copy.deepcopy(peft_lora)
    assert lorafast.patch(ours_dora, backend=backend) == 1 and lorafast.patch(ours_lora, backend=backend) == 1
    W, b = inputs.weight, inputs.bias
    impls = {PEFT_DORA: _layer_impl(PEFT_DORA, peft_dora), OURS: _layer_impl(OURS, ours_dora)}
    for name in strategy_rows:
        impls[f"dora-{name}"] = _op_impl(name, ours_dora, dropout_p)
    impls["peft-lora"] = _layer_impl("peft-lora", peft_lora)
    impls[OUR_LORA] = _layer_impl(OUR_LORA, ours_lora)
    impls["base"] = Implementation("base", lambda x, training: F.linear(x, W, b), [], [t for t in (W, b) if
                                                                                          t is not None])
    return impls


def _dora_parts(impl: Implementation) -> Optional[tuple]:
    """(W, b, A, B, m) when ``impl`` has a magnitude (a DoRA row)."""
    return tuple(impl.weights[:2]) + tuple(impl.trainable) if len(impl.trainable) == 3 else None


def float64_errors(name: str, impl: Implementation, inputs: LoRAInputs, dropout_p: float, seed: int
                   ) -> Dict[str, float]:
    """Relative errors of one fwd+bwd vs float64 (y, dx, then each trainable tensor's grad), with the lorafast
    rows' dropout mask replayed; {} for PEFT rows with dropout (their mask is not recoverable)."""
    if dropout_p > 0.0 and not (name.startswith("lorafast") or name.startswith("dora-")):
        return {}
    torch.manual_seed(seed)
    outs = training_call(impl, inputs.x, inputs.dy)()
    mask = None
    if dropout_p > 0.0:
        torch.manual_seed(seed)
        M, K = inputs.x.reshape(-1, inputs.x.shape[-1]).shape
        drawn = functional._dropout_seed(inputs.x.device)  # what the op drew after the same manual_seed
        # Every strategy draws the kernels' hash mask on CUDA; the aten strategy its generator mask on CPU.
        mask = keep_mask(drawn, M, K, dropout_p) if inputs.x.is_cuda else \
            aten.dropout_keep_mask(drawn, M, K, dropout_p, torch.float32).bool()
        mask = mask.reshape(inputs.x.shape)

    def f64(t):
        return None if t is None else t.detach().to(torch.float64)

    x = f64(inputs.x).requires_grad_()
    dora = _dora_parts(impl)
    if name == "base":
        y = F.linear(x, f64(inputs.weight), f64(inputs.bias))
        wrt = [x]
    elif dora is not None:
        W, b, A, B, m = (f64(t) for t in dora)
        A, B, m = A.requires_grad_(), B.requires_grad_(), m.requires_grad_()
        y = reference.dora_linear(x, W, b, A, B, m, inputs.scaling, dropout_p, dropout_p > 0.0, dropout_mask=mask)
        wrt = [x, A, B, m]
    else:
        A, B = (f64(t).requires_grad_() for t in impl.trainable)
        y = reference.lora_linear(x, f64(inputs.weight), f64(inputs.bias), A, B, inputs.scaling, dropout_p,
                                  dropout_p > 0.0, dropout_mask=mask)
        wrt = [x, A, B]
    refs = (y.detach(), *torch.autograd.grad(y, wrt, f64(inputs.dy)))
    names = ("y", "dx", "da", "db", "dm")
    return {k: relative_error(o, r) for k, o, r in zip(names, outs, refs)}


class _Allocations(TorchDispatchMode):
    """The largest tensor allocated, and the count of N×K-sized ones (an output not sharing an input's storage)."""

    def __init__(self, n_k: Tuple[int, int]):
        super().__init__()
        self.n_k = sorted(n_k)
        self.largest: List[int] = []
        self.largest_numel = 0
        self.nk = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                if sorted(t.shape) == self.n_k:
                    self.nk += 1
                if t.numel() > self.largest_numel:
                    self.largest_numel, self.largest = t.numel(), list(t.shape)
        return out


def allocations(impl: Implementation, inputs: LoRAInputs) -> Tuple[List[int], int]:
    """(shape of the largest tensor, number of N×K tensors) one fwd+bwd allocates (after a warm-up call)."""
    call = training_call(impl, inputs.x, inputs.dy)
    call()
    mode = _Allocations(tuple(inputs.weight.shape))
    with mode:
        call()
    return mode.largest, mode.nk


def run_dora(config: DoraConfig) -> Dict[str, object]:
    """Every (shape, rank) × p: build, check, measure memory, time all rows interleaved. A JSON-ready dict with
    ``config``, ``rows`` (:class:`DoraRow` dicts), ``targets`` (issue 19's checks per configuration) and ``load``."""
    rows: List[DoraRow] = []
    loads = [load_average()]
    for shape, rank in config.cases:
        inputs = make_inputs(shape, rank, config.dtype, config.device, config.seed,
                             adapter_dtype=config.adapter_dtype)
        for p in config.dropouts:
            impls = build(inputs, p, config.backend, config.strategies)
            errors = {name: float64_errors(name, impl, inputs, p, config.seed) for name, impl in impls.items()}
            memory = {name: saved_bytes(impl, inputs) for name, impl in impls.items()}
            allocs = {name: allocations(impl, inputs) for name, impl in impls.items() if "dora" in name}
            calls = {name: training_call(impl, inputs.x, inputs.dy) for name, impl in impls.items()}
            timings = time_calls(calls, config.device, config.quick, config.cpu_budget_s)
            loads.append(load_average())
            for name in impls:
                t = timings[name]
                largest, nk = allocs.get(name, (None, None))
                rows.append(DoraRow(shape.name, shape.M, shape.K, shape.N, rank, p, "fwd+bwd", name, t.median_ms,
                                    t.p20_ms, t.p80_ms, t.timer, errors[name], *memory[name], largest, nk))
    return {
        "config": {"cases": [[asdict(s), r] for s, r in config.cases], "dropouts": list(config.dropouts),
                   "dtype": dtype_name(config.dtype), "device": str(config.device), "backend": config.backend,
                   "adapter_dtype": dtype_name(config.adapter_dtype or config.dtype),
                   "strategies": list(config.strategies)},
        "rows": [asdict(r) for r in rows],
        "targets": targets([asdict(r) for r in rows]),
        "load": [round(v, 2) for v in loads if v is not None],
    }


def targets(rows: List[Dict[str, object]]) -> List[Dict[str, object]]:
    """Issue 19's CPU targets per (shape, rank, p), from the rows of one interleaved run: p = 0: ours ≤ 1.1× our
    LoRA and ≥ 1.25× (BERT) / 1.5× (the Llama shape) faster than PEFT's DoRA; p > 0: ours ≤ our LoRA + the frozen
    base, ≥ 1.25× PEFT's DoRA; saved beyond x and W ≤ half of PEFT's DoRA; no N×K tensor per call."""
    by_key: Dict[tuple, Dict[str, Dict[str, object]]] = {}
    for r in rows:
        by_key.setdefault((r["shape"], r["rank"], r["dropout"]), {})[r["impl"]] = r
    out = []
    for (shape, rank, p), impls in by_key.items():
        ours, lora, peft, base = impls[OURS], impls[OUR_LORA], impls[PEFT_DORA], impls["base"]
        speedup = peft["median_ms"] / ours["median_ms"]
        if p == 0.0:
            need = 1.25 if "bert" in shape else 1.5
            time_check = {"ours/our LoRA": round(ours["median_ms"] / lora["median_ms"], 3), "limit": 1.1,
                          "met": ours["median_ms"] <= 1.1 * lora["median_ms"]}
        else:
            need = 1.25
            floor = lora["median_ms"] + base["median_ms"]
            time_check = {"ours − (our LoRA + base) ms": round(ours["median_ms"] - floor, 2),
                          "met": ours["median_ms"] <= floor}
        out.append({
            "shape": shape, "rank": rank, "dropout": p, **time_check,
            "PEFT DoRA / ours": round(speedup, 3), "speedup needed": need, "speedup met": speedup >= need,
            "saved extra ours / PEFT": round(ours["saved_extra_bytes"] / peft["saved_extra_bytes"], 3),
            "saved met": ours["saved_extra_bytes"] <= 0.5 * peft["saved_extra_bytes"],
            "N×K tensors per call (ours)": ours["nk_allocs"], "N×K tensors per call (PEFT DoRA)": peft["nk_allocs"],
        })
    return out


def dora_markdown(dora: Dict[str, object]) -> str:
    """The ``## DoRA`` section of the report."""
    cfg = dora["config"]
    lines = [
        "## DoRA (issue 19)",
        "",
        f"{cfg['dtype']} activations, adapters {cfg['adapter_dtype']}, {cfg['device']}, lorafast backend "
        f"{cfg['backend']}. fwd+bwd medians of one interleaved run per (shape, p); load average "
        f"{', '.join(str(v) for v in dora['load'])}. ×PEFT DoRA = t / t_PEFT-DoRA. Errors vs float64 of each row's "
        "own math (— : PEFT with dropout, mask not recoverable). extra MB: saved for backward beyond x and the "
        "weights. largest: the largest tensor one fwd+bwd allocates; N×K: how many (N, K)-shaped ones.",
        "",
    ]
    header = ["shape", "r", "p", "impl", "ms", "×PEFT DoRA", "×our LoRA", "err y", "err dx", "err dA", "err dB",
              "err dm", "extra MB", "largest", "N×K"]
    ref = {(r["shape"], r["dropout"], r["impl"]): r["median_ms"] for r in dora["rows"]}
    body = []
    for r in dora["rows"]:
        peft, lora = ref[(r["shape"], r["dropout"], PEFT_DORA)], ref[(r["shape"], r["dropout"], OUR_LORA)]
        err = ["—" if r["errors"].get(k) is None else f"{r['errors'][k]:.1e}" for k in ("y", "dx", "da", "db", "dm")]
        body.append([
            r["shape"], str(r["rank"]), f"{r['dropout']:g}", r["impl"], f"{r['median_ms']:.1f}",
            f"{r['median_ms'] / peft:.2f}", f"{r['median_ms'] / lora:.2f}", *err,
            "—" if r["saved_extra_bytes"] is None else f"{r['saved_extra_bytes'] / 2**20:.1f}",
            "—" if r["largest_alloc"] is None else "×".join(str(d) for d in r["largest_alloc"]),
            "—" if r["nk_allocs"] is None else str(r["nk_allocs"]),
        ])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    lines += ["", "Targets (issue 19):", ""]
    for t in dora["targets"]:
        checks = ", ".join(f"{k} {v}" for k, v in t.items() if k not in ("shape", "rank", "dropout"))
        lines.append(f"- {t['shape']} r={t['rank']} p={t['dropout']:g}: {checks}")
    return "\n".join(lines)

