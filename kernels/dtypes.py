"""Dtype policy shared by the launchers: the base dots' input precision, and the adapter precision.

Adapter precision (issue 9, "Fidelity"). PEFT keeps LoRA adapters in fp32 on a bf16/fp16 base
(``autocast_adapter_dtype``) and runs ``lora_B(lora_A(dropout(x.float()))) * s`` as fp32 matmuls. With
fp32 adapters and 16-bit x, the kernels' rank-r dots (shrink H = drop(X)·Aᵀ, the expand (s·H)·Bᵀ,
dH = dY·B, dB = dYᵀ·H, dX's (dH·A) epilogue, dA = dHᵀ·drop(X)) run in one of two precisions:

- ``"fp32"``: PEFT's precision. fp32 operands (the x/dY tile widened in registers, never an fp32 copy of
  X in memory; H, dH and the adapters are fp32 already) with the input precision PEFT's fp32 matmul has
  on that GPU: IEEE, or TF32 when ``torch.backends.cuda.matmul.allow_tf32`` is on (:func:`dot_precision`).
- ``"compute"``: adapter tiles, H and dH cast to x's dtype; 16-bit tensor-core dots.

Measured distance from PEFT's own computation (interpreter, tests/test_fidelity.py, 67×70→45, r=8): H, dA
and dB at 1.6–2.6e-3 relative with bf16 x in "compute" (fp16: 2.1–3.3e-4), 1.1–2.7e-7 in "fp32"; y and dX
differ from PEFT by their own final rounding either way (bf16: y 2.2e-3 "fp32" vs 3.1e-3 "compute").

Only the rank-r dots change: the base GEMMs (X·Wᵀ, dY·W) stay 16-bit dots on tensor cores, and every
accumulator is fp32 in both. Other adapter dtypes (bf16/fp16 adapters, fp32 x) are unaffected.

Switch: :func:`set_adapter_precision` or the environment variable ``LORAFAST_ADAPTER_PRECISION``
(read once, on the first launch; the call wins over the variable). Default: ``"compute"``.

Why the default is ``"compute"`` (a static estimate; no GPU has run either variant). The extra work is
in the rank-r dots only: 2·M·K·r FLOPs each (2·M·N·r for the expand, dH and dB), six per fwd+bwd, against
two base GEMMs of 2·M·K·N. With torch's default (``allow_tf32`` off) PEFT's precision means IEEE fp32
dots, which run on FMA units, not tensor cores. H100 SXM peak rates: bf16 ~990 TFLOP/s dense, TF32 ~495,
fp32 FMA ~67 (15× below bf16); 3.35 TB/s.

- Epilogue dots (expand, dX) run after the GEMM's K loop, not overlapped: their cost relative to that
  GEMM is (r/K)·(990/67) for IEEE — Llama 8192×4096→4096, r=16: 5.8% per GEMM; BERT 2048×768→768: 31% —
  and (r/K)·2 for TF32: 0.8% and 4.2%.
- Skinny passes (shrink, dH/dB, dA) are memory-bound in bf16 (they stream X or dY once: 67 MB, 20 µs at
  Llama); their IEEE dots need 16 µs (shrink, dA) and 32 µs (dH + dB) of FMA time at peak, so dH/dB turns
  compute-bound (+12 µs) and the others are hidden only if the FMA loop overlaps the loads perfectly.
- Llama fwd+bwd at peak: base GEMMs 0.56 ms + skinny passes 0.06 ms ≈ 0.62 ms; IEEE adds ≈ 32 µs
  (epilogues) + ≥ 12 µs (dH/dB) ≈ 7% (more at the FMA efficiency Triton reaches); TF32 adds ≈ 2 µs (< 1%).
- BERT fwd+bwd: ~8–10 µs of kernels at peak; IEEE adds ≈ 4.5 µs of FMA work (up to ~50%), TF32 ≈ 0.3 µs
  (~3%); the layer is launch-bound there, so wall time moves less.

Compile gate, sm_90, bf16 x, rank block 16, triton 3.9 (``python -m lorafast.aot --arch 90 --entries
benchmarks/fidelity_aot.py:entries``): the IEEE variant has no tensor-core instruction left in the rank-r
dots (skinny and in-place epilogue kernels: 0 HGMMA/HMMA), the fused GEMM's SASS doubles (expand at
128×128×64: 1,109 → 2,214 instructions, 124 → 198 registers; dX at 128×128×64 reaches 255 registers and
spills 16 B) and the in-place expand triples (547 → 1,638); on the bf16 skinny tables the dH/dB pass
spilled, so IEEE skinny passes take the fp32 tables (:func:`skinny_fp32_tiles`). The TF32 variant keeps
HGMMA/HMMA (twice the count: k = 8 per instruction instead of 16) at about the same instruction count and
registers as "compute" (expand 1,139; no new spills).

IEEE "fp32" costs more than a few percent at both reference shapes, so it is opt-in; with TF32 on it is
cheap (≈ 1–3%), and users who enable TF32 can take PEFT's precision almost for free. Measure on a GPU
before changing the default.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

ADAPTER_PRECISIONS = ("fp32", "compute")
ENV_VAR = "LORAFAST_ADAPTER_PRECISION"
DEFAULT_ADAPTER_PRECISION = "compute"
HALF_DTYPES = (torch.float16, torch.bfloat16)

# None until the first launch reads the environment; a module global so a launch pays one lookup,
# not an os.environ read.
_adapter_precision: Optional[str] = None


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for operands of ``dtype``.

    fp32 operands follow PyTorch's own matmul setting, so the fused layer matches nn.Linear:
    IEEE fp32 unless the user enabled TF32 (``torch.backends.cuda.matmul.allow_tf32``). For 16-bit
    operands Triton ignores the value (tensor-core/MFMA dots either way; the compile gate checks), but AMD
    backends validate it: triton 3.0-3.2 accept only "ieee" there, later ones add "tf32" on CDNA3 (gfx94x) only,
    so "tf32" failed to compile every 16-bit kernel on gfx942 with triton 3.0. 16-bit operands take "ieee".
    """
    if dtype == torch.float32 and _allow_tf32():
        return "tf32"
    return "ieee"


# What `torch.backends.cuda.matmul.allow_tf32` returns, without its module-level __getattr__ (0.09 vs 0.7 µs
# a read on the 2-core CPU; fp32 launches read it once each). The public property where torch lacks it.
_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None) or (lambda: torch.backends.cuda.matmul.allow_tf32)


def _checked(precision: object, source: str) -> str:
    if precision not in ADAPTER_PRECISIONS:
        raise ValueError(f"lorafast: {source} must be one of {ADAPTER_PRECISIONS}, got {precision!r}")
    return precision


def set_adapter_precision(precision: str) -> None:
    """Choose the rank-r dots' precision for fp32 adapters on fp16/bf16 x: ``"fp32"`` (PEFT's) or
    ``"compute"`` (x's dtype, tensor cores). Applies to launches from now on; process-wide."""
    global _adapter_precision
    _adapter_precision = _checked(precision, "set_adapter_precision(precision)")


def adapter_precision() -> str:
    """The current adapter precision: set by :func:`set_adapter_precision`, else ``$LORAFAST_ADAPTER_PRECISION``
    (read on the first call), else ``DEFAULT_ADAPTER_PRECISION``. A bad variable raises ValueError here."""
    global _adapter_precision
    if _adapter_precision is None:
        value = os.environ.get(ENV_VAR, "").strip().lower() or DEFAULT_ADAPTER_PRECISION
        _adapter_precision = _checked(value, f"${ENV_VAR}")
    return _adapter_precision


def lora_dot(x_dtype: torch.dtype, adapter_dtype: torch.dtype) -> Tuple[bool, str]:
    """The ``(LORA_FP32, LORA_PRECISION)`` constexprs of a kernel's rank-r dots.

    x_dtype: the activation (or dY) tile's dtype; adapter_dtype: the dtype of the adapter the dot
    involves. LORA_FP32 is True when the dot runs on fp32 operands although x is 16-bit (fp32 adapters,
    precision "fp32"); LORA_PRECISION is then PyTorch's fp32 matmul precision (:func:`dot_precision`).
    When LORA_FP32 is False the kernels use their DOT_PRECISION and LORA_PRECISION is unused.
    """
    if adapter_dtype == torch.float32 and x_dtype in HALF_DTYPES and adapter_precision() == "fp32":
        return True, dot_precision(torch.float32)
    return False, "ieee"


def skinny_fp32_tiles(x_dtype: torch.dtype, lora_fp32: bool, lora_precision: str) -> bool:
    """Whether a skinny pass (shrink, dH/dB, dA: the rank-r dot is the whole kernel) takes the fp32 config
    table: fp32 x, or a widened IEEE rank-r dot, which runs on FMA units like fp32 x does. The bf16 tables
    spilled there (compile gate, sm_90, rank block 16: the dH/dB pass at 64×128×64 used 255 registers and
    spilled 48 B); a TF32 dot keeps tensor cores and the bf16 tables (no spills)."""
    return x_dtype == torch.float32 or (lora_fp32 and lora_precision == "ieee")

