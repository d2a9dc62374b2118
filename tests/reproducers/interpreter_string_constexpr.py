"""Reproducer: Triton's CPU interpreter (triton 3.0, 3.1) ignores a ``tl.constexpr`` annotation written as a string.

No lorafast code involved. Run it with the Triton to check::

    python tests/reproducers/interpreter_string_constexpr.py

``from __future__ import annotations`` (used by lorafast's kernel modules) turns every annotation into a string,
here ``"tl.constexpr"``. The compiler accepts that (``KernelParam.is_constexpr`` tests ``"constexpr" in
annotation``), but the interpreter's ``GridExecutor`` keeps only parameters whose annotation normalises to
exactly ``"constexpr"``, so the value becomes a tensor and ``tl.arange(0, N)`` raises ``ValueError: arange's
arguments must be of type tl.constexpr``. Triton 3.2 and later run it.

Exit status 1 and "BUG" when the interpreter fails, 0 and "OK" when the kernel runs.
"""

from __future__ import annotations  # what lorafast's kernel modules use: every annotation becomes a string

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def iota_kernel(out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, offs)


def main() -> int:
    out = torch.zeros(16, dtype=torch.int32)
    try:
        iota_kernel[(1,)](out, N=16)
    except Exception as exc:  # the interpreter wraps the error in its InterpreterError
        print(f"BUG (triton {triton.__version__}): {type(exc).__name__}: {exc}")
        return 1
    ok = out.tolist() == list(range(16))
    print(("OK" if ok else "BUG (wrong values)") + f" (triton {triton.__version__})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
