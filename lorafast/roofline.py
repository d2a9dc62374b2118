"""Roofline model of one LoRA linear layer: FLOPs, minimum bytes and predicted time per kernel.

The one place this math lives: ``python -m lorafast bench`` prints its prediction beside each GPU
measurement, and ``benchmarks/roofline.py`` prints it as a table. It sits inside the package (not
under ``benchmarks/``) because the bench command must work from an installed wheel.

Model. Each implementation is a list of kernels; a kernel's time is
``max(flops / matmul_peak, bytes / bandwidth)`` — every operand read once and every result written
once (the *minimum* traffic; L2 reuse inside a GEMM is assumed perfect) — and a plan's time is the
sum over its kernels plus ``launch_s`` per kernel (a guess at the per-op cost, unmeasured here:
the GPU suite calibrates it). Three plans, per direction:

* ``base`` — the frozen ``F.linear`` alone, the floor: ``Y = X·Wᵀ + b``; backward ``dX = dY·W``.
* ``lorafast`` — the fused plan of KERNELS.md (F1): shrink ``H = drop(X)·Aᵀ``; GEMM with the rank-r
  epilogue; backward: one pass over dY for dH and dB, ``dX`` GEMM with the LoRA epilogue (mask
  regenerated), ``dA = dHᵀ·drop(X)``. H and dH are stored as fp32; the dropout mask is never stored.
* ``peft`` — PEFT's eager ``lora.Linear`` (and ``lorafast.reference``, the same graph): base GEMM,
  dropout (copy + 1-byte mask), two skinny GEMMs, the M×N delta written, scaled and added; backward
  replays each op and accumulates the two gradients of X.

Modes: ``"fwd"`` is inference (``training=False``: no dropout, no graph); ``"fwd+bwd"`` is a
training step with dropout ``p`` and gradients for X, A and B (W and b frozen).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from lorafast.shapes import parse_shapes  # the bench's shape names, so both speak of the same shapes

MODES = ("fwd", "fwd+bwd")
IMPLEMENTATIONS = ("lorafast", "peft", "base")

# Bytes of H and dH (M×r): KERNELS.md keeps them in fp32 whatever the activation dtype.
_FP32_BYTES = 4
_MASK_BYTES = 1  # torch's native_dropout stores a bool mask

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class DeviceCeilings:
    """Throughput ceilings of one GPU: dense matmul FLOP/s per dtype and memory bytes/s."""

    name: str
    matmul_flops: Dict[str, float]
    bandwidth: float
    launch_s: float = 4e-6
    source: str = ""


# bf16: 798 TFLOP/s (H100) and 788 (H200) measured on 8192³ products on this workplace's machines;
# copy bandwidth measured at ~3.0 TB/s (H100) and ~4.3 TB/s (H200), counting read + write.
# fp32 is the datasheet's non-tensor-core rate (torch leaves TF32 off for matmuls by default).
H100 = DeviceCeilings(
    name="H100",
    matmul_flops={"bfloat16": 790e12, "float16": 790e12, "float32": 60e12},
    bandwidth=3.0e12,
    source="bf16 GEMM 798 TFLOP/s and copy 3.0 TB/s measured on an H100 80GB HBM3; fp32 from datasheet",
)
H200 = DeviceCeilings(
    name="H200",
    matmul_flops={"bfloat16": 790e12, "float16": 790e12, "float32": 60e12},
    bandwidth=4.3e12,
    source="bf16 GEMM 788 TFLOP/s and copy 4.3 TB/s measured on an H200; fp32 from datasheet",
)
DEVICES = {"h100": H100, "h200": H200}


def ceilings_for_device_name(device_name: str) -> Optional[DeviceCeilings]:
    """Ceilings for a ``torch.cuda.get_device_name()`` string, or None for an unmodelled device."""
    lowered = device_name.lower()
    for key, ceilings in DEVICES.items():
        if key in lowered:
            return ceilings
    return None


@dataclass(frozen=True)
class Kernel:
    """One kernel launch: its arithmetic and the fewest bytes it must move through device memory."""

    name: str
    flops: float
    bytes: float

    def seconds(self, ceilings: DeviceCeilings, dtype: str) -> float:
        """Roofline time of this kernel alone (no launch cost)."""
        return max(self.flops / ceilings.matmul_flops[dtype], self.bytes / ceilings.bandwidth)


@dataclass
class Plan:
    """An implementation's kernels for one shape and mode."""

    impl: str
    mode: str
    kernels: List[Kernel] = field(default_factory=list)

    def add(self, name: str, flops: float, nbytes: float) -> None:
        self.kernels.append(Kernel(name, float(flops), float(nbytes)))

    @property
    def flops(self) -> float:
        return sum(k.flops for k in self.kernels)

    @property
    def bytes(self) -> float:
        return sum(k.bytes for k in self.kernels)

    def seconds(self, ceilings: DeviceCeilings, dtype: str, with_launch: bool = True) -> float:
        """Predicted time: the sum of per-kernel rooflines plus ``launch_s`` per kernel."""
        total = sum(k.seconds(ceilings, dtype) for k in self.kernels)
        return total + (len(self.kernels) * ceilings.launch_s if with_launch else 0.0)


def _check_args(M: int, K: int, N: int, r: int, p: float, mode: str, dtype: str) -> None:
    if mode not in MODES:
        raise ValueError(f"roofline: mode must be one of {MODES}, got {mode!r}")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"roofline: dtype must be one of {tuple(_DTYPE_BYTES)}, got {dtype!r}")
    if min(M, K, N) < 0 or r < 1 or not 0.0 <= p < 1.0:
        raise ValueError(f"roofline: need M, K, N >= 0, r >= 1, 0 <= p < 1; got {(M, K, N, r, p)}")


def base_plan(M: int, K: int, N: int, mode: str, dtype: str, bias: bool = True) -> Plan:
    """The floor: the frozen linear alone (forward GEMM; backward ``dX = dY·W``)."""
    _check_args(M, K, N, 1, 0.0, mode, dtype)
    e = _DTYPE_BYTES[dtype]
    plan = Plan("base", mode)
    plan.add("gemm Y=XWᵀ+b", 2 * M * N * K, e * (M * K + N * K + M * N + (N if bias else 0)))
    if mode == "fwd+bwd":
        plan.add("gemm dX=dY·W", 2 * M * N * K, e * (M * N + N * K + M * K))
    return plan


def lorafast_plan(M: int, K: int, N: int, r: int, p: float, mode: str, dtype: str, bias: bool = True) -> Plan:
    """KERNELS.md plan F1: shrink + GEMM-with-epilogue forward; three backward kernels.

    Dropout costs no bytes: the mask is a function of (seed, m, k) regenerated in registers.
    """
    _check_args(M, K, N, r, p, mode, dtype)
    e, h = _DTYPE_BYTES[dtype], _FP32_BYTES
    plan = Plan("lorafast", mode)
    plan.add("shrink H=drop(X)Aᵀ", 2 * M * K * r, e * (M * K + r * K) + h * M * r)
    plan.add(
        "gemm Y=XWᵀ+b+s·HBᵀ",
        2 * M * N * K + 2 * M * N * r,
        e * (M * K + N * K + N * r + M * N + (N if bias else 0)) + h * M * r,
    )
    if mode == "fwd+bwd":
        plan.add("dY pass: dH=s·dY·B, dB=s·dYᵀH", 4 * M * N * r, e * (M * N + 2 * N * r) + h * 2 * M * r)
        plan.add(
            "gemm dX=dY·W+mask⊙(dH·A)",
            2 * M * N * K + 2 * M * K * r,
            e * (M * N + N * K + r * K + M * K) + h * M * r,
        )
        plan.add("dA=dHᵀ·drop(X)", 2 * M * K * r, e * (M * K + r * K) + h * M * r)
    return plan


def peft_plan(M: int, K: int, N: int, r: int, p: float, mode: str, dtype: str, bias: bool = True) -> Plan:
    """PEFT's eager ``lora.Linear`` (one adapter, adapters in the activation dtype), op by op."""
    _check_args(M, K, N, r, p, mode, dtype)
    e = _DTYPE_BYTES[dtype]
    training = mode == "fwd+bwd"
    dropout = training and p > 0.0
    plan = Plan("peft", mode)
    plan.add("gemm Y=XWᵀ+b", 2 * M * N * K, e * (M * K + N * K + M * N + (N if bias else 0)))
    if dropout:
        plan.add("dropout: Xd, mask", M * K, e * 2 * M * K + _MASK_BYTES * M * K)
    plan.add("lora_A: H=Xd·Aᵀ", 2 * M * K * r, e * (M * K + r * K + M * r))
    plan.add("lora_B: D=H·Bᵀ", 2 * M * N * r, e * (M * r + N * r + M * N))
    plan.add("D*s", M * N, e * 2 * M * N)
    plan.add("Y+D", M * N, e * 3 * M * N)
    if training:
        plan.add("dD=dY*s", M * N, e * 2 * M * N)
        plan.add("dH=dD·B", 2 * M * N * r, e * (M * N + N * r + M * r))
        plan.add("dB=dDᵀ·H", 2 * M * N * r, e * (M * N + M * r + N * r))
        plan.add("dXd=dH·A", 2 * M * K * r, e * (M * r + r * K + M * K))
        plan.add("dA=dHᵀ·Xd", 2 * M * K * r, e * (M * r + M * K + r * K))
        if dropout:
            plan.add("dropout bwd", M * K, e * 2 * M * K + _MASK_BYTES * M * K)
        plan.add("gemm dX=dY·W", 2 * M * N * K, e * (M * N + N * K + M * K))
        plan.add("dX accumulate", M * K, e * 3 * M * K)
    return plan


def plans(M: int, K: int, N: int, r: int, p: float, mode: str, dtype: str, bias: bool = True) -> Dict[str, Plan]:
    """The three plans (``lorafast``, ``peft``, ``base``) for one configuration."""
    return {
        "lorafast": lorafast_plan(M, K, N, r, p, mode, dtype, bias),
        "peft": peft_plan(M, K, N, r, p, mode, dtype, bias),
        "base": base_plan(M, K, N, mode, dtype, bias),
    }


def predict(
    M: int,
    K: int,
    N: int,
    r: int,
    p: float,
    mode: str,
    dtype: str,
    ceilings: DeviceCeilings,
    bias: bool = True,
) -> Dict[str, object]:
    """Predicted times (ms) and ratios for one configuration on one device.

    Returns a dict: ``ms`` {impl: predicted milliseconds}, ``flops`` and ``bytes`` {impl: total},
    ``kernels`` {impl: launch count}, ``speedup_vs_peft`` (t_peft / t_lorafast), ``lorafast_vs_base``
    and ``peft_vs_base`` (t / t_base), and ``device``.
    """
    by_impl = plans(M, K, N, r, p, mode, dtype, bias)
    ms = {name: plan.seconds(ceilings, dtype) * 1e3 for name, plan in by_impl.items()}
    return {
        "device": ceilings.name,
        "ms": ms,
        "flops": {name: plan.flops for name, plan in by_impl.items()},
        "bytes": {name: plan.bytes for name, plan in by_impl.items()},
        "kernels": {name: len(plan.kernels) for name, plan in by_impl.items()},
        "speedup_vs_peft": ms["peft"] / ms["lorafast"],
        "lorafast_vs_base": ms["lorafast"] / ms["base"],
        "peft_vs_base": ms["peft"] / ms["base"],
    }


def format_table(rows: List[Dict[str, object]]) -> str:
    """Markdown table of :func:`predict` results; each row also carries its configuration keys."""
    header = (
        "| device | shape | M,K,N | r | p | mode | base ms | lorafast ms | PEFT ms | lorafast/base "
        "| PEFT/base | speedup vs PEFT | MB lorafast | MB PEFT | kernels lf/PEFT |"
    )
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for row in rows:
        ms, nbytes, kernels = row["ms"], row["bytes"], row["kernels"]
        lines.append(
            f"| {row['device']} | {row['shape']} | {row['M']},{row['K']},{row['N']} | {row['r']} | {row['p']} "
            f"| {row['mode']} | {ms['base']:.3f} | {ms['lorafast']:.3f} | {ms['peft']:.3f} "
            f"| {row['lorafast_vs_base']:.3f} | {row['peft_vs_base']:.3f} | {row['speedup_vs_peft']:.2f} "
            f"| {nbytes['lorafast'] / 1e6:.1f} | {nbytes['peft'] / 1e6:.1f} "
            f"| {kernels['lorafast']}/{kernels['peft']} |"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m lorafast roofline`` (and ``benchmarks/roofline.py``)."""
    parser.add_argument("--device", choices=sorted(DEVICES), nargs="+", default=sorted(DEVICES))
    parser.add_argument("--dtype", choices=sorted(_DTYPE_BYTES), default="bfloat16")
    parser.add_argument("--shapes", nargs="+", default=["bert", "llama"], help="presets or M,K,N (as in bench)")
    parser.add_argument("--rank", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1])
    parser.add_argument("--no-launch", action="store_true", help="leave out the per-kernel launch cost")


def prediction_rows(args: argparse.Namespace) -> List[Dict[str, object]]:
    """:func:`predict` for every device, shape, rank, mode and dropout in ``args``."""
    rows = []
    for device in args.device:
        ceilings = DEVICES[device]
        if args.no_launch:
            ceilings = DeviceCeilings(ceilings.name, ceilings.matmul_flops, ceilings.bandwidth, 0.0, ceilings.source)
        for shape in parse_shapes(args.shapes):
            for r in args.rank:
                for mode in MODES:
                    # fwd is inference: dropout plays no part, one row per rank.
                    for p in args.dropout if mode == "fwd+bwd" else [0.0]:
                        pred = predict(shape.M, shape.K, shape.N, r, p, mode, args.dtype, ceilings)
                        pred.update(shape=shape.name, M=shape.M, K=shape.K, N=shape.N, r=r, p=p, mode=mode)
                        rows.append(pred)
    return rows


def run(args: argparse.Namespace) -> int:
    """Print the prediction table and the assumptions behind it."""
    print(format_table(prediction_rows(args)))
    launch_us = 0.0 if args.no_launch else H100.launch_s * 1e6
    print(
        f"\nPer-kernel launch cost {launch_us:.1f} µs (assumed, unmeasured). Ceilings: "
        + "; ".join(f"{d.name}: {d.source}" for d in DEVICES.values())
    )
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """``python -m lorafast.roofline [flags]``."""
    parser = argparse.ArgumentParser(description="Roofline predictions for LoRA linear layers (H100/H200).")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
