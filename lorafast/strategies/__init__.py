"""The interchangeable implementations of the fused LoRA fwd+bwd, and the choice between them.

Every strategy module has the same two functions and one contract (saved for backward: x, H (M×r, fp32)
and the seed; the dropout mask regenerated, never stored; the same mask bits on CUDA):

    forward(x, weight, bias, lora_a, lora_b, scaling, seed, dropout_p) -> (y, h)
    backward(grad_y, x, weight, lora_a, lora_b, h, scaling, seed, dropout_p,
             need_dx, need_da, need_db_lora, need_dbias) -> (dx, da, db_lora, dbias)

- ``fused``: Triton GEMMs with the LoRA epilogues (lorafast.kernels).
- ``cublas``: cuBLAS base GEMMs + Triton LoRA side kernels.
- ``aten``: plain PyTorch ops (CPU default; GPU-safe fallback).

``backend="auto"`` runs ``aten`` on CPU and, on CUDA, the fastest candidate measured on the user's GPU; the
choice between strategies (:func:`lorafast.dispatch.resolve`) lives in :mod:`lorafast.dispatch`, which imports
this registry (never the other way round). ``"triton"`` and ``"torch"`` are kept as aliases of ``"fused"``
and ``"aten"``.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import warnings
from types import ModuleType
from typing import Callable, Optional

import torch

STRATEGIES = ("fused", "cublas", "aten")
ALIASES = {"triton": "fused", "torch": "aten"}
BACKENDS = ("auto", *STRATEGIES, *ALIASES)
TRITON_STRATEGIES = ("fused", "cublas")
# The rank is padded to a power of two in registers by the kernels; above this the epilogue tiles would
# crowd out the GEMM's, so larger ranks run `aten` (unmeasured bound, see KERNELS.md).
MAX_TRITON_RANK = 128
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Replaces backend="auto" everywhere (e.g. LORAFAST_STRATEGY=aten to rule our kernels out of a run).
ENV_STRATEGY = "LORAFAST_STRATEGY"

_warned: set = set()


def module_getter(package: str) -> Callable[[str], ModuleType]:
    """``get(name)`` for one op family: the module ``{package}.{strategy}`` of strategy ``name`` (a STRATEGIES
    entry or an alias), imported on first use and cached (the plain op's, DoRA's and MoE's strategy modules)."""
    modules: dict = {}

    def get(name: str) -> ModuleType:
        """The module of strategy ``name`` (a STRATEGIES entry or an alias)."""
        module = modules.get(name)
        if module is None:
            canonical = ALIASES.get(name, name)
            if canonical not in STRATEGIES:
                raise ValueError(f"lorafast: unknown strategy {name!r}; expected one of {BACKENDS}")
            module = modules[name] = importlib.import_module(f"{package}.{canonical}")
        return module

    return get


get = module_getter("lorafast.strategies")


def warn_once(key: str, message: str) -> None:
    """One warning per process and key (fallbacks are visible, but not on every call)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def triton_available() -> bool:
    """Whether triton can be imported."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# The oldest Triton whose compile of every shipped kernel config is proven by the compile gate, with the test suite
# (docs/triton-versions.md). Triton 3.0 and 3.1 crash compiling lora_grad_h (32×128×128, sm_90: a segfault would
# end the user's process while autotuning) and spill in 13 configs; 3.2 hits pipeliner assertions; 3.3-3.5 are not
# checked yet. Older Triton on CUDA runs ``aten``, with one warning; the interpreter (CPU tests) is not affected.
MIN_TRITON = (3, 6)


@functools.cache
def triton_version() -> tuple:
    """(major, minor) of the installed triton; (0, 0) when unreadable."""
    import triton

    found = re.match(r"(\d+)\.(\d+)", getattr(triton, "__version__", ""))
    return (int(found[1]), int(found[2])) if found else (0, 0)


def triton_fallback(x: torch.Tensor, lora_a: torch.Tensor) -> Optional[str]:
    """Why valid inputs cannot run a Triton strategy (they then run ``aten``), or None."""
    if x.is_cuda and triton_version() < MIN_TRITON:
        have = ".".join(map(str, triton_version()))
        want = ".".join(map(str, MIN_TRITON))
        return (f"triton {have} is older than {want}, the oldest whose kernel compiles are verified "
                "(docs/triton-versions.md)")
    if x.dtype not in TRITON_DTYPES or lora_a.dtype not in TRITON_DTYPES:
        return f"{x.dtype}/{lora_a.dtype} is not supported by the Triton kernels"
    if lora_a.shape[0] > MAX_TRITON_RANK:
        return f"rank {lora_a.shape[0]} > {MAX_TRITON_RANK}"
    if x.is_cuda and torch.are_deterministic_algorithms_enabled():
        return "torch.use_deterministic_algorithms is on and the Triton kernels sum partial results with atomics"
    return None
