"""Output allocation for the launchers, in one place so tests can poison it (NaN-fill) and catch
any element a kernel forgets to write."""

import torch


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised output buffer; every element must be written by the kernel."""
    return torch.empty(shape, dtype=dtype, device=device)
