"""Timers: on CUDA ``triton.testing.do_bench`` (median and 20/80% quantiles, L2 flushed between runs),
optionally CUDA graphs for small shapes; on CPU the calls run round-robin (start rotated each round)
and each one's median of ``time.perf_counter`` is taken."""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch


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




def load_average() -> Optional[float]:
    """The 1-minute load average (None where the OS has none): other processes disturb CPU timings."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def time_calls(
    calls: Dict[str, Callable[[], object]],
    device: torch.device,
    quick: bool,
    cpu_budget_s: Optional[float] = None,
    cuda_graph: bool = False,
) -> Dict[str, Timing]:
    """Each call's timing: ``do_bench`` per call on CUDA; round-robin medians on CPU (``cpu_budget_s``
    seconds, default 4, quick 0.5)."""
    if device.type == "cuda":
        return {n: time_gpu(call, quick, cuda_graph) for n, call in calls.items()}
    min_reps, max_reps = (3, 20) if quick else (11, 200)
    budget = cpu_budget_s if cpu_budget_s is not None else (0.5 if quick else 4.0)
    return time_cpu_round_robin(calls, min_reps, max_reps, budget, warmup=1 if quick else 2)
