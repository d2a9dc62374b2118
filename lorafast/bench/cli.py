"""``python -m lorafast bench`` flags and the command itself."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, Optional

import torch

from lorafast import strategies
from lorafast.bench.core import BenchConfig, default_strategies, environment, run_benchmark
from lorafast.bench.host import HostConfig, measure_host
from lorafast.bench.quant import QUANT_SHAPES, QuantConfig, run_quant
from lorafast.bench.report import markdown_report, output_stem, write_report
from lorafast.shapes import parse_dtype, parse_shapes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's flags."""
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        help="presets (bert, llama) or M,K,N; default: bert on CPU, bert llama on CUDA (--quant: its own)",
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
    parser.add_argument(
        "--adapter-dtype", default=None, help="lora_A/lora_B dtype, e.g. fp32 on a bf16 model (PEFT's upcast)"
    )
    parser.add_argument(
        "--adapter-precision",
        default=None,
        choices=["fp32", "compute"],
        help="Triton strategies, fp32 adapters on 16-bit x: rank-r dots in fp32 (PEFT's) or in x's dtype "
        "(lorafast.kernels.dtypes.set_adapter_precision; default: $LORAFAST_ADAPTER_PRECISION, else compute)",
    )
    parser.add_argument("--device", default=None, help="cuda | cpu | cuda:N; default cuda when available")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=list(strategies.BACKENDS),
        help="lorafast strategy of the 'lorafast' rows (default auto: the fastest measured on this GPU, aten on CPU)",
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        choices=[*strategies.STRATEGIES, "none"],
        help="strategies also timed on their own (default: all that run on the device — fused cublas aten on "
        "CUDA, aten on CPU); 'none' for none",
    )
    parser.add_argument(
        "--host",
        action="store_true",
        help="only the host-cost section: host µs and launches per call on CPU vs PEFT (tiny layer, 1 thread)",
    )
    parser.add_argument("--no-host", action="store_true", help="leave the host-cost section out of the report")
    parser.add_argument(
        "--quant", default=None, choices=["nf4"], help="only the QLoRA comparison (bitsandbytes 4-bit) vs PEFT"
    )
    parser.add_argument(
        "--dora",
        action="store_true",
        help="only the DoRA comparison (issue 19): PEFT DoRA, lorafast DoRA (patched layer and per strategy), PEFT "
        "and lorafast LoRA, the frozen base; default shapes 2048,768,768 r=8 and 512,2048,5632 r=16 on CPU",
    )
    parser.add_argument(
        "--moe",
        nargs="*",
        default=None,
        metavar="E,H,I,K,T",
        help="only the MoE experts comparison: a Qwen3-MoE sparse block (E experts, hidden H, expert width I, "
        "top-K, T tokens), fwd+bwd, frozen vs PEFT target_parameters vs lorafast; default shapes "
        "64,1024,512,8,1024 128,1024,256,8,2048 (--quick: 8,64,32,2,64)",
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
    parser.add_argument("--name", default=None, help="file stem instead of <device>-<date>[-host|-nf4]")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _strategies(args: argparse.Namespace, device: torch.device):
    if args.strategies is None:
        return default_strategies(device)
    chosen = tuple(s for s in args.strategies if s != "none")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        needs_cuda = [s for s in chosen if s in strategies.TRITON_STRATEGIES]
        if needs_cuda:
            raise ValueError(
                f"--strategies: {', '.join(needs_cuda)} need CUDA (on CPU only in Triton's interpreter, "
                "TRITON_INTERPRET=1 before triton is imported); on CPU use aten"
            )
    return chosen


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    """Fill the device-dependent defaults documented in :func:`add_arguments`."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    if on_gpu and not torch.cuda.is_available():
        raise ValueError("--device cuda requested but torch.cuda.is_available() is False")
    dtype = parse_dtype(args.dtype or ("bf16" if on_gpu else "fp32"))
    adapter_dtype = parse_dtype(args.adapter_dtype, "--adapter-dtype") if args.adapter_dtype else None
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
    if sum(bool(flag) for flag in (args.host, args.quant, getattr(args, "dora", False))) > 1:
        raise ValueError("--host, --quant and --dora: choose one")
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
        strategies=_strategies(args, device),
        adapter_dtype=adapter_dtype,
        host=not args.no_host,
        progress=not args.no_progress,
        cpu_budget_s=args.cpu_budget,
        options={k: v for k, v in vars(args).items() if k not in ("module", "command")},
    )


def _host_only(config: BenchConfig) -> Dict[str, object]:
    report = {"environment": environment(config), "results": [], "failures": [], "complete": False}
    report["host"] = measure_host(HostConfig(quick=config.quick, budget_s=config.cpu_budget_s))
    report["complete"] = True
    return report


def _quant_only(config: BenchConfig, args: argparse.Namespace) -> Dict[str, object]:
    shapes = config.shapes if args.shapes else QUANT_SHAPES["cuda" if config.device.type == "cuda" else "cpu"]
    quant = QuantConfig(
        shapes=shapes, rank=config.ranks[0], dropouts=config.dropouts, dtype=config.dtype, device=config.device,
        quant_type=args.quant, adapter_dtype=config.adapter_dtype, quick=config.quick,
        cpu_budget_s=config.cpu_budget_s, seed=config.seed,
    )  # fmt: skip
    report = {"environment": environment(config), "results": [], "failures": [], "complete": False}
    report["quant"] = run_quant(quant)
    report["complete"] = True
    return report


def _dora_only(config: BenchConfig, args: argparse.Namespace) -> Dict[str, object]:
    from lorafast.bench.dora import DORA_CASES, DoraConfig, run_dora

    on_gpu = config.device.type == "cuda"
    if args.shapes:
        cases = [(shape, rank) for shape in config.shapes for rank in config.ranks]
    else:
        cases = [(shape, args.rank[0]) if args.rank else (shape, rank)
                 for shape, rank in DORA_CASES["cuda" if on_gpu else "cpu"]]
    dora = DoraConfig(
        cases=cases, dropouts=config.dropouts, dtype=config.dtype, device=config.device,
        strategies=config.strategies, backend=config.backend, adapter_dtype=config.adapter_dtype,
        quick=config.quick, cpu_budget_s=config.cpu_budget_s, seed=config.seed,
    )  # fmt: skip
    report = {"environment": environment(config), "results": [], "failures": [], "complete": False}
    report["dora"] = run_dora(dora)
    report["complete"] = True
    return report


def _moe_only(config: BenchConfig, args: argparse.Namespace) -> Dict[str, object]:
    from lorafast.bench.moe import MOE_SHAPES, QUICK_SHAPES, MoeConfig, run_moe

    shapes = []
    for text in args.moe:
        parts = text.split(",")
        if len(parts) != 5 or not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ValueError(f"--moe: expected E,H,I,K,T (positive integers), got {text!r}")
        shapes.append(tuple(int(p) for p in parts))
    moe = MoeConfig(
        shapes=shapes or (QUICK_SHAPES if config.quick else MOE_SHAPES), device=config.device, dtype=config.dtype,
        strategies=("auto", *config.strategies) if config.device.type == "cuda" else config.strategies,
        rank=config.ranks[0] if args.rank else 16, quick=config.quick, cpu_budget_s=config.cpu_budget_s,
        seed=config.seed,
    )  # fmt: skip
    report = {"environment": environment(config), "results": [], "failures": [], "complete": False}
    report["moe"] = run_moe(moe)
    report["complete"] = True
    return report


def run(args: argparse.Namespace) -> int:
    """Run the bench for parsed ``args``; exit status 1 if any implementation failed its check."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        config = config_from_args(args)
        if args.quant:
            import bitsandbytes  # noqa: F401
        if args.adapter_precision:
            from lorafast.kernels.dtypes import set_adapter_precision

            set_adapter_precision(args.adapter_precision)
    except (ValueError, ImportError) as exc:  # a bad flag: one line, like argparse's own errors
        print(f"lorafast bench: error: {exc}", file=sys.stderr)
        return 2
    if config.device.type == "cpu" and hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > 0.5 * cores:
            print(
                f"lorafast bench: load average {load:.1f} on {cores} cores; CPU timings will be disturbed",
                file=sys.stderr,
            )
    moe = getattr(args, "moe", None) is not None
    suffix = ("-host" if args.host else f"-{args.quant}" if args.quant else "-dora" if args.dora
              else "-moe" if moe else "")
    stem: Optional[str] = args.name
    if args.host:
        report = _host_only(config)
    elif args.quant:
        report = _quant_only(config, args)
    elif args.dora:
        report = _dora_only(config, args)
    elif moe:
        try:
            report = _moe_only(config, args)
        except ValueError as exc:
            print(f"lorafast bench: error: {exc}", file=sys.stderr)
            return 2
    else:
        on_group_done = None
        if args.out:

            def on_group_done(partial: Dict[str, object]) -> None:
                write_report(partial, args.out, stem or output_stem(partial) + suffix, plot=False)

        report = run_benchmark(config, on_group_done)
    print(markdown_report(report))
    if args.out:
        paths = write_report(report, args.out, stem or output_stem(report) + suffix)
        print("wrote " + ", ".join(path for path in paths.values() if path))
    if report["failures"]:
        print(f"lorafast bench: {len(report['failures'])} correctness failure(s)", file=sys.stderr)
        return 1
    return 0
