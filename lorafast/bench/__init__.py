"""``python -m lorafast bench``: correctness, speed and memory of lorafast against PEFT and the floor.

For every shape × rank × dropout it compares, over the same weights, ``lorafast`` (the run's
``--backend``), each lorafast strategy on its own (``fused``, ``cublas``, ``aten``; ``--strategies``),
PEFT's ``lora.Linear``, the plain-PyTorch ``reference`` and the frozen ``base`` linear (the floor):
first correctness (output and gradients vs float64; with dropout each implementation's own mask is
recovered and replayed), then bytes saved for backward, then timing. Modes: ``fwd`` is inference
(``training=False``, no grad), ``fwd+bwd`` a training step (dropout ``p``, grads of X, A and B).
The report also has a host-cost section (``--host`` alone: only it) and, with ``--quant nf4``, the QLoRA
comparison instead of the sweep; ``--moe`` runs the MoE experts comparison instead (a Qwen3-MoE sparse block:
frozen, PEFT's ``target_parameters`` LoRA, lorafast).

Modules: ``inputs`` (the one input builder, shared with the tests), ``impls`` (the layers and calls),
``checks`` (errors, saved bytes), ``timing``, ``core`` (the run), ``report`` (markdown, JSON, plot),
``host`` (host µs and launches), ``quant`` (QLoRA), ``moe`` (MoE experts), ``cli`` (flags). Shapes live in
:mod:`lorafast.shapes`, shared with :mod:`lorafast.roofline` (which does not import the bench).
"""

import lorafast  # noqa: F401  (bench.lorafast: tests swap lorafast.lora_linear through it)
from lorafast.bench.checks import (
    GRAD_NAMES,
    TOLERANCE,
    check_implementation,
    float64_reference,
    gpu_peak_bytes,
    passes,
    recover_dropout_mask,
    relative_error,
    saved_bytes,
)
from lorafast.bench.cli import add_arguments, config_from_args, run
from lorafast.bench.core import BenchConfig, Result, default_strategies, environment, predicted_ms, run_benchmark
from lorafast.bench.impls import (
    IMPLEMENTATIONS,
    MODES,
    Implementation,
    build_implementations,
    inference_call,
    peft_available,
    peft_layer,
    training_call,
)
from lorafast.bench.inputs import LoRAInputs, make_inputs
from lorafast.bench.report import markdown_report, output_stem, plot_speedups, summary_rows, write_report
from lorafast.bench.timing import Timing, time_cpu_round_robin, time_gpu
from lorafast.shapes import SHAPE_PRESETS, Shape, dtype_name, parse_dtype, parse_shapes

__all__ = [
    "BenchConfig", "GRAD_NAMES", "IMPLEMENTATIONS", "Implementation", "LoRAInputs", "MODES", "Result",
    "SHAPE_PRESETS", "Shape", "TOLERANCE", "Timing", "add_arguments", "build_implementations",
    "check_implementation", "config_from_args", "default_strategies", "dtype_name", "environment",
    "float64_reference", "gpu_peak_bytes", "inference_call", "make_inputs", "markdown_report", "output_stem",
    "parse_dtype", "parse_shapes", "passes", "peft_available", "peft_layer", "plot_speedups", "predicted_ms",
    "recover_dropout_mask", "relative_error", "run", "run_benchmark", "saved_bytes", "summary_rows",
    "time_cpu_round_robin", "time_gpu", "training_call", "write_report",
]  # fmt: skip
