"""QLoRA (``python -m lorafast bench --quant nf4``): lorafast vs PEFT's ``lora.bnb.Linear4bit`` on an nf4
``bitsandbytes`` weight — time, bytes saved for backward, and each one's error vs a float64 reference
computed on the DEQUANTIZED weight (``bitsandbytes.functional.dequantize_4bit``), so the error measures
the LoRA path, not the quantization.

The PEFT layer is built the way PEFT builds it for a 4-bit model: a ``bnb.nn.Linear4bit`` (``Params4bit``,
nf4, compute dtype = the activation dtype) in a one-layer module marked ``is_loaded_in_4bit``, adapters
injected by PEFT. The ``lorafast`` row is a second, identical layer after ``lorafast.patch``: when patch
leaves it on PEFT's forward (no fused class for ``lora.bnb.Linear4bit`` in ``lorafast.peft.bnb``), the row is
labelled "not fused" and is PEFT's own forward. ``base`` is the ``Linear4bit`` alone (the floor).

Whether a patched layer really ran lorafast's path is checked per mode by :func:`runs_fused` (it may fall
back, e.g. on a quantization layout it does not cover). Errors are checked at p = 0 (and in eval); with
dropout the two draw different masks that cannot be read off a quantized layer, so those rows carry time
and memory only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

import lorafast
from lorafast import reference
from lorafast.bench.checks import relative_error, saved_bytes
from lorafast.bench.impls import Implementation, inference_call, training_call
from lorafast.bench.inputs import LoRAInputs, make_inputs
from lorafast.bench.timing import time_calls
from lorafast.shapes import Shape, dtype_name

# CPU-sized on CPU (bitsandbytes' CPU 4-bit matmul dequantizes per call); BERT-base and Llama-8B on CUDA.
QUANT_SHAPES = {
    "cpu": [Shape("bert-attn-cpu", 256, 768, 768), Shape("llama-attn-cpu", 64, 2048, 2048)],
    "cuda": [Shape("bert-attn", 2048, 768, 768), Shape("llama8b-attn", 8192, 4096, 4096)],
}
QUANT_IMPLEMENTATIONS = ("lorafast", "peft", "base")


@dataclass
class QuantConfig:
    """One ``--quant`` run: nf4 weights, ``dtype`` activations (= bnb compute dtype), adapters in
    ``adapter_dtype`` (None: ``dtype``)."""

    shapes: List[Shape]
    rank: int
    dropouts: List[float]
    dtype: torch.dtype
    device: torch.device
    quant_type: str = "nf4"
    adapter_dtype: Optional[torch.dtype] = None
    quick: bool = False
    cpu_budget_s: Optional[float] = None
    seed: int = 0


@dataclass
class QuantRow:
    shape: str
    M: int
    K: int
    N: int
    rank: int
    dropout: Optional[float]
    mode: str
    impl: str
    median_ms: float
    p20_ms: float
    p80_ms: float
    timer: str
    layer_class: str
    fused: Optional[bool]
    errors: Dict[str, float] = field(default_factory=dict)
    saved_bytes: Optional[int] = None
    saved_extra_bytes: Optional[int] = None


def qlora_layer(inputs: LoRAInputs, dropout_p: float, quant_type: str = "nf4", training: bool = True) -> nn.Module:
    """PEFT's LoRA layer over a ``bnb.nn.Linear4bit`` quantizing ``inputs.weight``, adapters copied from
    ``inputs``, one forward already run in the mode it will be timed in (``training``): bitsandbytes' CPU
    path repacks the weight on the first inference forward (eval, x without grad, AVX512-bf16 CPUs), which
    changes the quantization state."""
    import bitsandbytes as bnb
    from peft import LoraConfig, inject_adapter_in_model

    N, K = inputs.weight.shape
    dtype, device = inputs.x.dtype, inputs.x.device
    base = bnb.nn.Linear4bit(K, N, bias=inputs.bias is not None, compute_dtype=dtype, quant_type=quant_type)
    base.weight = bnb.nn.Params4bit(inputs.weight.detach().cpu().float(), requires_grad=False, quant_type=quant_type)
    if inputs.bias is not None:
        base.bias = nn.Parameter(inputs.bias.detach().cpu().to(dtype), requires_grad=False)
    base = base.to(device)  # quantizes on the move to CUDA; on CPU at the Params4bit construction
    holder = nn.Module()
    holder.linear = base
    holder.is_loaded_in_4bit = True  # what PEFT reads to dispatch to lora.bnb.Linear4bit
    config = LoraConfig(r=inputs.rank, lora_alpha=inputs.rank, lora_dropout=dropout_p, target_modules=["linear"])
    layer = inject_adapter_in_model(config, holder).linear
    layer.lora_A.to(dtype=inputs.lora_a.dtype)
    layer.lora_B.to(dtype=inputs.lora_b.dtype)
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(inputs.lora_a)
        layer.lora_B["default"].weight.copy_(inputs.lora_b)
    layer.scaling["default"] = inputs.scaling
    with torch.set_grad_enabled(training):
        layer.train(training)(inputs.x[:1].detach().requires_grad_(training))
    return layer


def repacked_for_cpu(layer: nn.Module) -> bool:
    """True when bitsandbytes repacked the layer's weight for CPU inference (``packing_format_for_cpu``)."""
    return bool(getattr(layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", False))


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The (N, K) weight the 4-bit layer computes with, dequantized, as float64."""
    from bitsandbytes.functional import dequantize_4bit

    weight = layer.get_base_layer().weight
    return dequantize_4bit(weight.data, weight.quant_state).to(torch.float64)


def _alive(layer: nn.Module) -> List[torch.Tensor]:
    # Parameters and the quantization state are alive anyway: not "extra" saved bytes.
    state = layer.get_base_layer().weight.quant_state
    tensors = list(layer.parameters()) + [state.absmax, state.code]
    nested = getattr(state, "state2", None)
    if nested is not None:
        tensors += [nested.absmax, nested.code]
    return [t for t in tensors if isinstance(t, torch.Tensor)]


def runs_fused(impl: Implementation, inputs: LoRAInputs, mode: str) -> bool:
    """Whether one call of a patched layer ran lorafast's path: PEFT's forward calls the base ``Linear4bit``
    module, the fused path only reads its weight. Counted by wrapping the class's ``forward`` (not a hook:
    a hooked module is one lorafast leaves to PEFT)."""
    import bitsandbytes as bnb

    calls = [0]
    original = bnb.nn.Linear4bit.forward

    def counting(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    bnb.nn.Linear4bit.forward = counting
    try:
        call = inference_call(impl, inputs.x) if mode == "fwd" else training_call(impl, inputs.x, inputs.dy)
        call()
    finally:
        bnb.nn.Linear4bit.forward = original
    return calls[0] == 0


def _implementation(name: str, layer: nn.Module) -> Implementation:
    def forward(x, training, _layer=layer):
        if _layer.training != training:
            _layer.train(training)
        return _layer(x)

    trainable = [layer.lora_A["default"].weight, layer.lora_B["default"].weight] if name != "base" else []
    return Implementation(name, forward, trainable, _alive(layer))


def _base_layer(layer: nn.Module) -> Implementation:
    base = layer.get_base_layer()
    return Implementation("base", lambda x, training: base(x), [], _alive(layer))


def _float64_outputs(inputs: LoRAInputs, weight64: torch.Tensor, mode: str, base_only: bool) -> Tuple:
    def f64(t):
        return None if t is None else t.detach().to(torch.float64)

    training = mode == "fwd+bwd"
    x = f64(inputs.x).requires_grad_(training)
    A, B = f64(inputs.lora_a).requires_grad_(training), f64(inputs.lora_b).requires_grad_(training)
    with torch.set_grad_enabled(training):
        if base_only:
            y = torch.nn.functional.linear(x, weight64, f64(inputs.bias))
        else:
            y = reference.lora_linear(x, weight64, f64(inputs.bias), A, B, inputs.scaling)
        if not training:
            return (y,)
        wrt = [x] if base_only else [x, A, B]
        return (y.detach(), *torch.autograd.grad(y, wrt, f64(inputs.dy)))


def run_quant(config: QuantConfig) -> Dict[str, object]:
    """Every shape × (eval fwd, fwd+bwd at each p) × implementation; a JSON-ready dict with ``config``,
    ``rows`` (:class:`QuantRow` dicts) and ``notes``."""
    rows: List[QuantRow] = []
    notes: List[str] = []
    for shape in config.shapes:
        inputs = make_inputs(shape, config.rank, config.dtype, config.device, config.seed,
                             adapter_dtype=config.adapter_dtype)
        # Read off a layer warmed up in training mode: a repacked (CPU inference) state dequantizes differently.
        weight64 = dequantized_weight(qlora_layer(inputs, 0.0, config.quant_type, training=True))
        for p, mode in [(None, "fwd")] + [(p, "fwd+bwd") for p in config.dropouts]:
            dropout_p = p or 0.0
            training = mode == "fwd+bwd"
            peft = qlora_layer(inputs, dropout_p, config.quant_type, training)
            fused = qlora_layer(inputs, dropout_p, config.quant_type, training)
            lorafast.patch(fused)
            impls = {"lorafast": _implementation("lorafast", fused), "peft": _implementation("peft", peft),
                     "base": _base_layer(peft)}  # fmt: skip
            for layer in (peft, fused):
                if not repacked_for_cpu(layer) and not torch.equal(weight64, dequantized_weight(layer)):
                    raise RuntimeError("--quant: two quantizations of the same weight differ; cannot compare")
            is_fused = type(fused) is not type(peft) and runs_fused(impls["lorafast"], inputs, mode)
            if not is_fused and not any(mode in n for n in notes):
                why = "patch left the class alone" if type(fused) is type(peft) else "the patched layer fell back"
                notes.append(f"{mode}: the 'lorafast' rows ran PEFT's own QLoRA forward ({why}): NOT fused.")
            if mode == "fwd":
                calls = {n: inference_call(impl, inputs.x) for n, impl in impls.items()}
            else:
                calls = {n: training_call(impl, inputs.x, inputs.dy) for n, impl in impls.items()}
            errors: Dict[str, Dict[str, float]] = {}
            for name, call in calls.items():
                if dropout_p > 0.0:
                    errors[name] = {}
                    continue
                outs = call() if mode == "fwd+bwd" else (call(),)
                refs = _float64_outputs(inputs, weight64, mode, base_only=name == "base")
                errors[name] = {k: relative_error(o, r) for k, o, r in zip(("y", "dx", "da", "db"), outs, refs)}
            timings = time_calls(calls, config.device, config.quick, config.cpu_budget_s)
            for name, impl in impls.items():
                t = timings[name]
                layer_class = type(fused if name == "lorafast" else peft.get_base_layer() if name == "base" else peft)
                row = QuantRow(
                    shape=shape.name, M=shape.M, K=shape.K, N=shape.N, rank=config.rank, dropout=p, mode=mode,
                    impl=name, median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, timer=t.timer,
                    layer_class=f"{layer_class.__module__}.{layer_class.__qualname__}",
                    fused=is_fused if name == "lorafast" else None, errors=errors[name],
                )  # fmt: skip
                if mode == "fwd+bwd":
                    row.saved_bytes, row.saved_extra_bytes = saved_bytes(impl, inputs)
                rows.append(row)
            if type(fused) is type(peft) and not any("left" in n for n in notes):
                notes.append(
                    f"lorafast.patch left {type(peft).__qualname__} on PEFT's forward: the 'lorafast' rows are "
                    "NOT fused (PEFT's own QLoRA forward), shown for the class check only."
                )
    return {
        "config": {
            "quant_type": config.quant_type, "rank": config.rank, "dtype": dtype_name(config.dtype),
            "adapter_dtype": dtype_name(config.adapter_dtype or config.dtype), "device": str(config.device),
            "shapes": [asdict(s) for s in config.shapes], "dropouts": list(config.dropouts),
        },  # fmt: skip
        "rows": [asdict(r) for r in rows],
        "notes": notes,
    }


def quant_markdown(quant: Dict[str, object]) -> str:
    """The ``## QLoRA`` section of the report."""
    cfg = quant["config"]
    lines = [
        f"## QLoRA ({cfg['quant_type']}, bitsandbytes Linear4bit)",
        "",
        f"r={cfg['rank']}, activations {cfg['dtype']}, adapters {cfg['adapter_dtype']}, {cfg['device']}. "
        "Errors ‖out−ref‖/‖ref‖ vs float64 on the dequantized weight (p = 0 and eval only). saved/extra MB as in "
        "the main table (extra: not x, a parameter nor the quantization state). ×PEFT = t / t_PEFT.",
        "",
        *[f"**{note}**" for note in quant["notes"]],
        "",
    ]
    header = ["shape", "M,K,N", "p", "mode", "impl", "ms", "×PEFT", "err y", "err dx", "err dA", "err dB",
              "saved MB", "extra MB", "fused"]
    peft_ms = {(r["shape"], r["dropout"], r["mode"]): r["median_ms"] for r in quant["rows"] if r["impl"] == "peft"}
    body = []
    for r in quant["rows"]:
        ref = peft_ms.get((r["shape"], r["dropout"], r["mode"]))
        err = {k: "—" if r["errors"].get(k) is None else f"{r['errors'][k]:.1e}" for k in ("y", "dx", "da", "db")}
        body.append([
            r["shape"], f"{r['M']},{r['K']},{r['N']}", "eval" if r["dropout"] is None else f"{r['dropout']:g}",
            r["mode"], r["impl"] if r["fused"] is not False else "lorafast (not fused)", f"{r['median_ms']:.3f}",
            "—" if not ref else f"{r['median_ms'] / ref:.2f}", *err.values(),
            "—" if r["saved_bytes"] is None else f"{r['saved_bytes'] / 1e6:.3f}",
            "—" if r["saved_extra_bytes"] is None else f"{r['saved_extra_bytes'] / 1e6:.3f}",
            {True: "yes", False: "**no**", None: "—"}[r["fused"]],
        ])  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines)
