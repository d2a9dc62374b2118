"""The report: summary rows (medians and ratios), the markdown, the PNG plot and the JSON files."""

from __future__ import annotations

import datetime
import json
import math
import os
import re
import sys
from typing import Dict, List, Optional, Tuple

from lorafast.bench.checks import GRAD_NAMES
from lorafast.bench.host import host_markdown
from lorafast.bench.impls import IMPLEMENTATIONS
from lorafast.bench.moe import moe_markdown
from lorafast.bench.quant import quant_markdown
from lorafast.strategies import STRATEGIES


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
        auto = by_impl.get("lorafast", {}).get("strategy")
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
                "strategy": auto,
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


def strategies_timed(report: Dict[str, object]) -> List[str]:
    """The strategies (``fused``, ``cublas``, ``aten``) with rows in the report, in STRATEGIES order."""
    seen = {row["impl"] for row in report["results"]}
    return [name for name in STRATEGIES if name in seen]


def _header_lines(report: Dict[str, object]) -> List[str]:
    env = report["environment"]
    timer = sorted({r["timer"] for r in report["results"]})
    lines = [
        f"# lorafast bench — {env['device_name']}",
        "",
        f"{env['date']} · torch {env['torch']} · triton {env['triton']} · peft {env['peft']} · "
        f"dtype {env['dtype']} · adapters {env.get('adapter_dtype', env['dtype'])} "
        f"(precision {env.get('adapter_precision', '—')}) · "
        f"lorafast backend {env['backend']} → {env['backend_resolved']} · "
        f"timer {', '.join(timer) or '—'} · source {env.get('source_revision')}",
        "",
    ]
    if env["device"] == "cpu":
        lines += [
            f"CPU: {env['torch_threads']} torch threads; 1-min load average at start {env['load_average_1min']}.",
            "",
        ]
    if not report.get("complete", True):
        lines += ["**Partial report: the run was cut short; the rows below are those finished.**", ""]
    return lines


def _strategy_note(report: Dict[str, object], timed: List[str]) -> List[str]:
    if not report["results"]:
        return []
    lines = []
    if timed:
        lines.append(
            f"Strategies timed on their own: {', '.join(timed)} (`lora_linear(..., backend=name)`); "
            "`auto →` is the strategy `backend=\"auto\"` ran (on CUDA: the dispatcher's measured choice)."
        )
    missing = [name for name in STRATEGIES if name not in timed]
    if report["environment"]["device"] == "cpu" and missing:
        lines.append(
            f"Not timed: {', '.join(missing)} — Triton strategies need CUDA (on CPU they run only in Triton's "
            "interpreter, a correctness tool whose speed means nothing)."
        )
    return lines + [""] if lines else []


def _timing_table(report: Dict[str, object], rows: List[Dict[str, object]], timed: List[str]) -> List[str]:
    has_prediction = any(row["predicted_speedup_vs_peft"] is not None for row in rows)
    header = ["shape", "M,K,N", "r", "p", "mode", "lorafast", "PEFT", "reference", "base", *timed, "auto →",
              "speedup vs PEFT", "lorafast ×base", "PEFT ×base"]
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
            *(_fmt(ms.get(name), ".3f") for name in (*IMPLEMENTATIONS, *timed)),
            row.get("strategy") or "—",
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
    return [_table(header, body), ""]


def _correctness_table(report: Dict[str, object]) -> List[str]:
    lines = [
        "## Correctness and memory",
        "",
        "Relative error ‖out−ref‖/‖ref‖ vs float64 (dropout: each implementation's own mask, recovered and "
        "replayed). saved = unique storages saved for backward; extra = those that are not x nor a weight.",
        "",
    ]
    header = ["shape", "r", "p", "mode", "impl", "err y", "err dx", "err dA", "err dB", "ok", "saved MB",
              "extra MB", "peak MB"]
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
    return lines + [_table(header, body), ""]


def markdown_report(report: Dict[str, object]) -> str:
    """The markdown written to ``<stem>.md`` and printed on stdout: the timing table (when the sweep ran),
    correctness and memory, then the host-cost, QLoRA and MoE sections when the report has them."""
    lines = _header_lines(report)
    if report["results"]:
        timed = strategies_timed(report)
        lines += [
            "Medians in ms. speedup vs PEFT = t_PEFT / t_lorafast (> 1: lorafast faster); "
            "×base = t / t_base, the frozen linear alone (the floor, ≥ 1 expected). "
            "fwd = inference (no grad); fwd+bwd = training step with dropout p, grads of x, A, B.",
            "",
        ]
        lines += _strategy_note(report, timed)
        lines += _timing_table(report, summary_rows(report), timed)
        lines += _correctness_table(report)
    if report.get("host"):
        lines += [host_markdown(report["host"]), ""]
    if report.get("quant"):
        lines += [quant_markdown(report["quant"]), ""]
    if report.get("dora"):
        from lorafast.bench.dora import dora_markdown  # imports peft-dependent code only when there is a section

        lines += [dora_markdown(report["dora"]), ""]
    if report.get("moe"):
        lines += [moe_markdown(report["moe"]), ""]
    if report["failures"]:
        lines += ["## Correctness failures", ""] + [f"- {failure}" for failure in report["failures"]] + [""]
    return "\n".join(lines)


def plot_speedups(report: Dict[str, object], path: str) -> Optional[str]:
    """PNG bar chart of the measured speedup vs PEFT per configuration (lorafast and each strategy timed), with
    the ceiling t_PEFT / t_base (what a LoRA layer as cheap as the frozen linear would get). Returns the path,
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
    # One bar per series: lorafast (auto), each strategy timed on its own, then the ceiling.
    series = [("lorafast", "lorafast"), *((name, f"strategy {name}") for name in strategies_timed(report))]
    width = 0.8 / (len(series) + 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(rows) * (len(series) + 1)), 4.5))
    for j, (impl, label) in enumerate(series):
        values = [(row["ms"].get("peft") or 0.0) / row["ms"][impl] if row["ms"].get(impl) else 0.0 for row in rows]
        ax.bar([i - 0.4 + (j + 0.5) * width for i in positions], values, width=width, label=label)
    ax.bar(
        [i - 0.4 + (len(series) + 0.5) * width for i in positions],
        [row["peft_vs_base"] for row in rows],
        width=width,
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
    payload = finite_or_none(dict(report, summary=summary_rows(report)))
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, allow_nan=False)
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(markdown_report(report))
    draw = plot and bool(report["results"])
    paths["png"] = plot_speedups(report, os.path.join(out_dir, stem + ".png")) if draw else None
    return paths


def finite_or_none(value: object) -> object:
    """``value`` with every non-finite float replaced by None (strict JSON has no inf/NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


