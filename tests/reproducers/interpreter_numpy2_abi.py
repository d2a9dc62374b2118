"""Reproducer: the CPU interpreter of triton 3.0 (built against NumPy 1.x) loads garbage and drops stores with NumPy 2.

No lorafast code involved. Run it with the Triton and NumPy to check::

    python tests/reproducers/interpreter_numpy2_abi.py

The interpreter's loads and stores go through a C++ helper in libtriton (``triton._C.libtriton.interpreter``) that
reads NumPy arrays through the NumPy C API of the NumPy it was built with. Triton 3.0's wheels were built against
NumPy 1.x: with NumPy 2 a masked load returns garbage (denormal-looking numbers) and a store writes nothing, with no
error. With NumPy 1.26 it works. Compiled kernels on a GPU are unaffected. Tests on triton 3.0 therefore run with
``numpy<2`` (.ci/triton-version installs it).

Exit status 1 and "BUG" when the doubled values are wrong, 0 and "OK" when they are right.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def double_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2)


def main() -> int:
    x = torch.arange(16, dtype=torch.float32)
    y = torch.full((16,), -1.0)
    double_kernel[(1,)](x, y, BLOCK=16)
    ok = torch.equal(y, 2 * x)
    print(("OK" if ok else "BUG") + f" (triton {triton.__version__}, numpy {np.__version__}): y[:4] = {y[:4].tolist()}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
