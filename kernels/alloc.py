"""Output allocation for the launchers, in one place so tests can poison it (NaN-fill) and catch
any element a kernel forgets to write."""

from typing import Optional, Sequence, Tuple

import torch

# Each view of zeros_views starts on a 64-byte boundary: the kernels' pointer arguments keep Triton's
# 16-byte divisibility specialisation (the configs the AOT gate compiled), whatever the sizes before it.
_ALIGN_BYTES = 64


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer; every element must be written by the kernel."""
    return torch.empty(shape, dtype=dtype, device=device)


def zeros_views(
    shapes: Sequence[Optional[Tuple[int, ...]]], dtype: torch.dtype, device: torch.device
) -> list:
    """Zero-filled contiguous tensors of ``shapes`` (None → None) carved from **one** ``torch.zeros``: one
    fill launch instead of one per accumulation target (the kernels add into them with atomics).

    The views share one storage, so none is freed before all are: meant for outputs that live about equally
    long (a layer's parameter gradients; :func:`lorafast.kernels.lora_bwd.lora_grads` adds dH where it is no
    larger than they are). Not for outputs of a ``torch.library`` op, which may not alias.
    One ``as_strided`` per view (a slice + view pair costs two dispatches).
    """
    key = (shapes if type(shapes) is tuple else tuple(shapes), dtype)
    plan = _LAYOUTS.get(key)
    if plan is None:
        plan = _layout(key[0], dtype)
        if len(_LAYOUTS) >= _LAYOUTS_MAX:  # M varies from call to call (packing): keep the memo bounded
            _LAYOUTS.clear()
        _LAYOUTS[key] = plan
    total, layout = plan
    flat = torch.zeros((total,), dtype=dtype, device=device)
    return [None if spec is None else flat.as_strided(*spec) for spec in layout]


# (shapes, dtype) -> (total elements, per shape (shape, strides, offset) or None): the layout arithmetic is
# Python work (about 2 µs for four shapes on the 2-core CPU), done once per shape set instead of per call.
_LAYOUTS: dict = {}
_LAYOUTS_MAX = 1024


def _layout(shapes: Tuple[Optional[Tuple[int, ...]], ...], dtype: torch.dtype) -> tuple:
    align = max(1, _ALIGN_BYTES // dtype.itemsize)
    layout, total = [], 0
    for shape in shapes:
        if shape is None:
            layout.append(None)
            continue
        strides, numel = [], 1
        for size in reversed(shape):
            strides.append(numel)
            numel *= size
        layout.append((shape, tuple(reversed(strides)), total))
        total += -(-numel // align) * align
    return total, tuple(layout)
