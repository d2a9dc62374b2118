"""The interchangeable implementations of the fused LoRA fwd+bwd, and the choice between them.

Every strategy module has the same two functions and one contract (saved for backward: x, H (M×r, fp32)
and the seed; the dropout mask regenerated, never stored; the same mask bits on CUDA):

    forward(x, weight, bias, lora_a, lora_b, scaling, seed, dropout_p) -> (y, h)
    backward(grad_y, x, weight, lora_a, lora_b, h, scaling, seed, dropout_p,
             need_dx, need_da, need_db_lora, need_dbias) -> (dx, da, db_lora, dbias)

- ``fused``: Triton GEMMs with the LoRA epilogues (lorafast.kernels).
- ``cublas``: cuBLAS base GEMMs + Triton LoRA side kernels.
- ``aten``: plain PyTorch ops (CPU default; GPU-safe fallback).

``backend="auto"`` runs ``aten`` on CPU and, on CUDA, the fastest candidate measured on the user's GPU
(:mod:`lorafast.dispatch`). ``"triton"`` and ``"torch"`` are kept as aliases of ``"fused"`` and ``"aten"``.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType
from typing import Callable, Optional, Tuple

import torch

STRATEGIES = ("fused", "cublas", "aten")
ALIASES = {"triton": "fused", "torch": "aten"}
BACKENDS = ("auto", *STRATEGIES, *ALIASES)
TRITON_STRATEGIES = ("fused", "cublas")
# The rank is padded to a power of two in registers by the kernels; above this the epilogue tiles would
# crowd out the GEMM's, so larger ranks run `aten` (unmeasured bound, see KERNELS.md).
MAX_TRITON_RANK = 128
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What `auto` runs when it must not time (torch.compile tracing, CUDA graph capture) and has no cached
# choice: cuBLAS's base GEMMs are never slower than ours by much, and its LoRA side work is small.
DEFAULT_CUDA = "cublas"
# Replaces backend="auto" everywhere (e.g. LORAFAST_STRATEGY=aten to rule our kernels out of a run).
ENV_STRATEGY = "LORAFAST_STRATEGY"

_modules: dict = {}
_warned: set = set()


def get(name: str) -> ModuleType:
    """The module of strategy ``name`` (a STRATEGIES entry or an alias)."""
    module = _modules.get(name)
    if module is None:
        canonical = ALIASES.get(name, name)
        if canonical not in STRATEGIES:
            raise ValueError(f"lorafast: unknown strategy {name!r}; expected one of {BACKENDS}")
        module = _modules[name] = importlib.import_module(f"lorafast.strategies.{canonical}")
    return module


def warn_once(key: str, message: str) -> None:
    """One warning per process and key (fallbacks are visible, but not on every call)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_fallback(x: torch.Tensor, lora_a: torch.Tensor) -> Optional[str]:
    """Why valid inputs cannot run a Triton strategy (they then run ``aten``), or None."""
    if x.dtype not in TRITON_DTYPES or lora_a.dtype not in TRITON_DTYPES:
        return f"{x.dtype}/{lora_a.dtype} is not supported by the Triton kernels"
    if lora_a.shape[0] > MAX_TRITON_RANK:
        return f"rank {lora_a.shape[0]} > {MAX_TRITON_RANK}"
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return "torch.use_deterministic_algorithms is on and the Triton kernels sum partial results with atomics"
    return None


def resolve(
    backend: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    dropout_p: float,
    needs: Tuple[bool, bool, bool, bool],
    make_run: Optional[Callable[[str], Callable[[], object]]] = None,
) -> str:
    """The strategy to run for these inputs: a STRATEGIES name.

    backend: "auto" or a strategy name/alias (validated by the caller). x: (M, K) 2-D.
    needs: (need_dx, need_da, need_db_lora, need_dbias) — part of the tuning key.
    make_run: for "auto" on CUDA, ``make_run(name)`` gives a closure running one step of strategy
    ``name`` on these inputs, for the dispatcher to time (None: no timing; cached choice or default).

    The environment variable LORAFAST_STRATEGY, when set, replaces "auto" (on CPU too).
    Explicit Triton strategies need CUDA tensors, or CPU under TRITON_INTERPRET=1 (set before triton is
    imported), else a ValueError. Valid inputs the kernels do not cover (fp64 or other dtypes, rank >
    MAX_TRITON_RANK, deterministic mode on CUDA) run ``aten`` with a one-time warning.
    """
    name = ALIASES.get(backend, backend)
    if name == "auto":
        override = os.environ.get(ENV_STRATEGY)
        if override:
            name = _override(override)
            backend = f"{override} (from {ENV_STRATEGY})"
    if name == "aten":
        return "aten"
    if name == "auto":
        if not x.is_cuda or not _triton_available():
            return "aten"
        if triton_fallback(x, lora_a) is not None:
            return "aten"
        return _auto(x, weight, lora_a, dropout_p, needs, make_run)
    if not x.is_cuda and not _interpreting():
        raise ValueError(
            f"lora_linear: backend={backend!r} needs CUDA tensors, but x is on {x.device}; on CPU set "
            "TRITON_INTERPRET=1 before importing triton (interpreter, slow) or use backend='aten'/'auto'"
        )
    if not _triton_available():
        raise ValueError(f"lora_linear: backend={backend!r} needs triton, which is not installed (pip install triton)")
    reason = triton_fallback(x, lora_a)
    if reason is not None:
        warn_once(reason.split(" ")[0], f"lorafast: {reason}; running the 'aten' strategy instead of {name!r}")
        return "aten"
    return name


def _override(value: str) -> str:
    """The strategy named by LORAFAST_STRATEGY (which replaces every "auto"), or a ValueError naming it."""
    name = ALIASES.get(value, value)
    if name not in STRATEGIES and name != "auto":
        raise ValueError(f"lorafast: {ENV_STRATEGY}={value!r} is not a strategy; expected one of {BACKENDS}")
    return name


def _auto(x, weight, lora_a, dropout_p, needs, make_run) -> str:
    from lorafast import dispatch

    # fp32's IEEE dots run on FMA units in our GEMMs: the fused path is a correctness path there.
    candidates = ("cublas", "aten") if x.dtype == torch.float32 else STRATEGIES
    return dispatch.select_call(x, weight, lora_a, dropout_p, needs, candidates, make_run, default=DEFAULT_CUDA)
