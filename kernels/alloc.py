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
    flat = torch.zeros((total,), dtype=dtype, device=device)
    return [None if spec is None else flat.as_strided(*spec) for spec in layout]
