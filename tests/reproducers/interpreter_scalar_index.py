"""Reproducer: Triton's CPU interpreter (triton <= 3.6) cannot use a runtime scalar as a loop bound with NumPy >= 2.4.

No lorafast code involved. Run it with the Triton to check::

    python tests/reproducers/interpreter_scalar_index.py

The interpreter holds every scalar (a program id, an int argument) as a 1-element, 1-D NumPy array and
converts one to a Python int for ``range(...)`` with ``int(self.handle.data)``. NumPy 2.4 made ``int()`` of an
array with ndim > 0 an error (a DeprecationWarning since NumPy 1.25), so any ``for k in range(pid * B, K, B)``
raises ``TypeError: only 0-dimensional arrays can be converted to Python scalars`` in triton 3.0-3.6. Triton 3.7
changed the lambda to ``int(self.handle.data.squeeze())``. Compiled kernels on a GPU are unaffected.

Exit status 1 and "BUG" when the interpreter fails, 0 and "OK" when it sums correctly.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def strided_sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    # Each program sums every program-count-th block starting at its own id: the loop start is a runtime scalar.
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(tl.program_id(0) * BLOCK, n, BLOCK * tl.num_programs(0)):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0)
    tl.atomic_add(out_ptr, tl.sum(acc, axis=0))


def main() -> int:
    x = torch.arange(100, dtype=torch.float32)
    out = torch.zeros(1)
    versions = f"triton {triton.__version__}, numpy {np.__version__}"
    try:
        strided_sum_kernel[(2,)](x, out, x.numel(), BLOCK=16)
    except Exception as exc:  # the interpreter wraps the TypeError in its InterpreterError
        print(f"BUG ({versions}): {type(exc).__name__}: {exc}")
        return 1
    ok = out.item() == x.sum().item()
    print(("OK" if ok else "BUG (wrong sum)") + f" ({versions}): {out.item()} vs {x.sum().item()}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
