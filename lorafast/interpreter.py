"""Make Triton's CPU interpreter (TRITON_INTERPRET=1) run lorafast's kernels as the GPU would.

Used where lorafast runs its Triton kernels on a CPU: the test suite (tests/conftest.py, through
tests/support/interpreter_shim.py) and ``python -m lorafast doctor`` without a GPU. It patches Triton's
interpreter (never the compiler) and only while the interpreter is active; importing this module imports triton,
so import it only after TRITON_INTERPRET is set.

The interpreter stores bf16 tensors as numpy uint16 bit patterns (triton 3.9, upstream issue #11584).
Two consequences matter for lorafast's kernels, and `install_bf16_dot_shim` fixes both:

* `tl.dot` on bf16 operands runs `np.matmul` on the raw uint16 bits — silently wrong by orders of
  magnitude. The shim widens bf16 operands to fp32 first; that is exact (a bf16 is the top 16 bits
  of an fp32), so the result is the fp32-accumulated product of the bf16 values, as on tensor cores.
* fp32 → bf16 casts (`x.to(tl.bfloat16)`, stores into bf16 pointers) truncate instead of rounding to
  nearest even, so every cast is biased toward zero by up to one bf16 ulp. The GPU rounds to nearest
  even (cvt.rn.bf16.f32), and so does the shim.

Other bf16 operations stay wrong in the interpreter and are not shimmed: arithmetic (+, -, *, /, and
with Python scalars), negation, comparisons and tl.maximum/minimum (uint16 ordering), and reductions
such as tl.sum. Kernels must cast bf16 tiles to fp32 after loading (lorafast's rule anyway). Loads,
stores, tl.where, tl.abs, bf16 → fp32/fp16 casts and fp32 atomic_add are correct.

Each fix is installed only when a tiny probe kernel shows the interpreter still needs it, so the
shim turns itself off once upstream Triton is fixed.

`install_scalar_index_shim` fixes one more interpreter bug, of triton 3.0-3.6 with NumPy >= 2.4 (fixed in
triton 3.7): a runtime scalar used as a loop bound (``range(tl.program_id(1) * BLOCK_K, K, ...)``) raises
``TypeError: only 0-dimensional arrays can be converted to Python scalars``, because the interpreter's
``tensor.__index__`` is ``int(self.handle.data)`` on a 1-element 1-D array, which NumPy 2.4 no longer converts
(NumPy 1.25-2.3 convert it with a DeprecationWarning: an error in tests that turn warnings into errors).
The reproducer without lorafast is tests/reproducers/interpreter_scalar_index.py.

`install_string_constexpr_shim` fixes the interpreter of triton 3.0-3.1: it recognises a ``tl.constexpr``
parameter only when the annotation object is ``tl.constexpr``, not the string ``"tl.constexpr"`` that
``from __future__ import annotations`` leaves (the compiler accepts both), so it turns constexpr arguments into
tensors and ``tl.arange(0, N)`` fails with "arange's arguments must be of type tl.constexpr". Triton 3.2 and
later run it. Reproducer: tests/reproducers/interpreter_string_constexpr.py.

`install_version_shims` installs both where their probes fail (conftest calls it before the bf16 shim).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from typing import Callable, Dict

import numpy as np
import triton
import triton.language as tl

_LOCK = threading.Lock()
_ORIGINALS: Dict[str, Callable] = {}
_MARKER = "_lorafast_bf16_shim_installed"
_INDEX_MARKER = "_lorafast_scalar_index_shim_installed"
_CONSTEXPR_MARKER = "_lorafast_string_constexpr_shim_installed"


def interpreter_active() -> bool:
    """True when Triton kernels run on the CPU interpreter (TRITON_INTERPRET set and not "0")."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def bf16_bits_to_fp32(bits: np.ndarray) -> np.ndarray:
    """Exact bf16 → fp32: the bf16 bit pattern (uint16) is the high half of the fp32 bit pattern."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def fp32_to_bf16_bits_rtne(values: np.ndarray) -> np.ndarray:
    """fp32 → bf16 bit patterns (uint16), rounding to nearest, ties to even; NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding_bias = ((bits >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    rounded = ((bits + rounding_bias) >> np.uint32(16)).astype(np.uint16)
    is_nan = np.isnan(values.astype(np.float32, copy=False))
    quiet_nan = ((bits >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)
    return np.where(is_nan, quiet_nan, rounded)


def _probe_dot_kernel(a_ptr, b_ptr, c_ptr, N: tl.constexpr):
    rows = tl.arange(0, N)
    offs = rows[:, None] * N + rows[None, :]
    tl.store(c_ptr + offs, tl.dot(tl.load(a_ptr + offs), tl.load(b_ptr + offs)))


def _probe_cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs).to(tl.bfloat16))


def _probe_scalar_index_kernel(out_ptr, n, BLOCK: tl.constexpr):
    total = 0
    for start in range(tl.program_id(0) * BLOCK, n, 2 * BLOCK):
        total += start
    tl.store(out_ptr + tl.program_id(0), total)


@functools.cache
def _jit(fn):
    # Decorated lazily: triton.jit picks interpreter or compiler when applied, not at module import.
    return triton.jit(fn)


def bf16_dot_is_correct() -> bool:
    """Run a 16×16 bf16 tl.dot on small integers (exact in bf16 and fp32) and check the result."""
    import torch

    n = 16
    idx = torch.arange(n)
    a = ((idx[:, None] + 2 * idx[None, :]) % 7 - 3).to(torch.bfloat16)
    b = ((3 * idx[:, None] - idx[None, :]) % 5 - 2).to(torch.bfloat16)
    c = torch.empty(n, n, dtype=torch.float32)
    _jit(_probe_dot_kernel)[(1,)](a, b, c, N=n)
    return torch.equal(c, a.float() @ b.float())


def bf16_cast_rounds_to_nearest_even() -> bool:
    """Cast fp32 values that need rounding (ties included) to bf16 and compare with torch's RTNE."""
    import torch

    one_ulp = 2.0**-7  # bf16 spacing in [1, 2)
    near_one = torch.tensor([0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 3.5, 0.3, 1.9, 7.3]) * one_ulp + 1.0
    x = torch.cat([near_one, -near_one, torch.tensor([3.0e38, -1.0e-39, float("inf"), 0.0])])
    x = torch.nn.functional.pad(x, (0, 32 - x.numel()), value=1.0)
    y = torch.empty(32, dtype=torch.bfloat16)
    _jit(_probe_cast_kernel)[(1,)](x, y, N=32)
    return torch.equal(y, x.to(torch.bfloat16))


def scalar_index_works() -> bool:
    """Run a kernel whose loop starts at a runtime scalar (the program id); False if the interpreter raises."""
    import torch

    out = torch.zeros(2, dtype=torch.int32)
    try:
        with warnings.catch_warnings():
            # NumPy 1.25-2.3 only warn (DeprecationWarning), which a test's warnings filter turns into an error.
            warnings.simplefilter("error", DeprecationWarning)
            _jit(_probe_scalar_index_kernel)[(2,)](out, 40, BLOCK=16)
    except Exception:  # the interpreter wraps the TypeError or warning in its own InterpreterError
        return False
    return out.tolist() == [0 + 32, 16]  # program 0 visits 0 and 32, program 1 visits 16


def _scalar_index(self) -> int:
    # What triton 3.7 does: a scalar is a 1-element array of any rank; squeeze it to 0-d for int().
    return int(self.handle.data.squeeze())


def install_scalar_index_shim() -> bool:
    """Make ``range()`` over runtime scalars work in the interpreter of triton 3.0-3.6 with NumPy >= 2.4.

    Wraps the interpreter's ``_patch_lang_tensor`` (which sets ``tensor.__index__`` on every kernel call) so that
    ``__index__`` squeezes the scalar first. Idempotent. Returns True when the fix is installed (now or earlier),
    False when the interpreter is not active or the probe kernel already works. Raises RuntimeError if the probe
    still fails after patching (the interpreter's internals changed).
    """
    if not interpreter_active():
        return False
    from triton.runtime import interpreter

    with _LOCK:
        if getattr(interpreter, _INDEX_MARKER, False):
            return True
        if scalar_index_works():
            return False
        original = interpreter._patch_lang_tensor

        def patch_lang_tensor(tensor, *scope):
            original(tensor, *scope)
            if scope:  # triton >= 3.6: a scope that restores the attribute after the call (in reverse order)
                scope[0].set_attr(tensor, "__index__", _scalar_index)
            else:  # triton <= 3.5 sets the attribute for good
                tensor.__index__ = _scalar_index

        interpreter._patch_lang_tensor = patch_lang_tensor
        if not scalar_index_works():
            interpreter._patch_lang_tensor = original
            raise RuntimeError(
                "lorafast.interpreter: range() over a runtime scalar still fails in the Triton "
                "interpreter after patching _patch_lang_tensor; its internals have changed"
            )
        setattr(interpreter, _INDEX_MARKER, True)
        return True


def _probe_arange_kernel(out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, offs)


def string_constexpr_works() -> bool:
    """Run a kernel whose ``N: tl.constexpr`` annotation is a string (this module postpones annotations)."""
    import torch

    out = torch.zeros(16, dtype=torch.int32)
    try:
        _jit(_probe_arange_kernel)[(1,)](out, N=16)
    except Exception:  # "arange's arguments must be of type tl.constexpr", wrapped in InterpreterError
        return False
    return out.tolist() == list(range(16))


def _is_constexpr_annotation(annotation) -> bool:
    # "tl.constexpr", "triton.language.constexpr", "constexpr": what the JIT's KernelParam.is_constexpr accepts.
    return isinstance(annotation, str) and annotation.strip().split(".")[-1] == "constexpr"


def install_string_constexpr_shim() -> bool:
    """Make the interpreter of triton 3.0-3.1 treat string ``tl.constexpr`` annotations as constexpr.

    Wraps ``GridExecutor.__init__`` to add the parameters whose annotation is such a string to its ``constexprs``.
    Idempotent; True when installed (now or earlier), False when not needed or the interpreter is off; raises
    RuntimeError when the probe still fails after patching.
    """
    if not interpreter_active():
        return False
    from triton.runtime import interpreter

    with _LOCK:
        executor = interpreter.GridExecutor
        if getattr(executor, _CONSTEXPR_MARKER, False):
            return True
        if string_constexpr_works():
            return False
        original = executor.__init__

        def init(self, fn, arg_names, *rest, **kwargs):
            original(self, fn, arg_names, *rest, **kwargs)
            annotations = getattr(fn, "__annotations__", {})
            self.constexprs = [name for name in arg_names
                               if name in self.constexprs or _is_constexpr_annotation(annotations.get(name))]

        executor.__init__ = init
        if not string_constexpr_works():
            executor.__init__ = original
            raise RuntimeError(
                "lorafast.interpreter: string tl.constexpr annotations still fail in the Triton "
                "interpreter after patching GridExecutor.__init__; its internals have changed"
            )
        setattr(executor, _CONSTEXPR_MARKER, True)
        return True


def install_version_shims() -> Dict[str, bool]:
    """Install the fixes for old interpreters (string constexpr annotations, scalar loop bounds) where needed.

    Returns which are installed. Call after TRITON_INTERPRET=1 is set and before `install_bf16_dot_shim`
    (whose probe kernels have string annotations).
    """
    return {"string_constexpr": install_string_constexpr_shim(), "scalar_index": install_scalar_index_shim()}


def _patch(builder_cls) -> None:
    from triton.runtime.interpreter import TensorHandle

    def widen(handle):
        if handle.dtype.scalar != tl.bfloat16:
            return handle
        return TensorHandle(bf16_bits_to_fp32(handle.data), tl.float32)

    original_dot = builder_cls.create_dot

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        return original_dot(self, widen(a), widen(b), d, input_precision, max_num_imprecise_acc)

    original_cast = builder_cls.cast_impl

    def cast_impl(self, src, dst_type):
        if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in (tl.float32, tl.float16):
            # fp16 → fp32 is exact, so fp16 → bf16 is rounded once, as on the GPU.
            bits = fp32_to_bf16_bits_rtne(src.data.astype(np.float32))
            return TensorHandle(bits, tl.bfloat16)
        return original_cast(self, src, dst_type)

    _ORIGINALS.update(create_dot=original_dot, cast_impl=original_cast)
    builder_cls.create_dot = create_dot
    builder_cls.cast_impl = cast_impl


def _restore(builder_cls) -> None:
    for name, fn in _ORIGINALS.items():
        setattr(builder_cls, name, fn)
    _ORIGINALS.clear()


def install_bf16_dot_shim() -> bool:
    """Fix bf16 `tl.dot` and fp32→bf16 rounding in Triton's CPU interpreter, where still needed.

    Call after TRITON_INTERPRET=1 is set (it imports triton). Idempotent. Returns True when the
    shim is installed (now or by an earlier call); False when the interpreter is not active or a
    probe kernel shows it already handles bf16 dots and casts correctly (fixed upstream).
    Raises RuntimeError if the interpreter is still wrong after patching (its internals changed).
    """
    if not interpreter_active():
        return False
    from triton.runtime.interpreter import InterpreterBuilder

    with _LOCK:
        if getattr(InterpreterBuilder, _MARKER, False):
            return True
        if bf16_dot_is_correct() and bf16_cast_rounds_to_nearest_even():
            return False
        _patch(InterpreterBuilder)
        if not (bf16_dot_is_correct() and bf16_cast_rounds_to_nearest_even()):
            _restore(InterpreterBuilder)
            raise RuntimeError(
                "lorafast.interpreter: the Triton interpreter still mishandles bf16 after "
                "patching InterpreterBuilder.create_dot/cast_impl; its internals have changed"
            )
        setattr(InterpreterBuilder, _MARKER, True)
        return True


def remove_bf16_dot_shim() -> bool:
    """Undo `install_bf16_dot_shim` (for tests that show the unpatched behaviour); True if it was on."""
    if not interpreter_active():
        return False
    from triton.runtime.interpreter import InterpreterBuilder

    with _LOCK:
        if not getattr(InterpreterBuilder, _MARKER, False):
            return False
        _restore(InterpreterBuilder)
        setattr(InterpreterBuilder, _MARKER, False)
        return True
