"""Philox dropout mask shared by every kernel that touches drop(X).

keep[m, k] = uniform(seed, m·K + k) >= p — a pure function of (seed, m, k), so the forward shrink,
the dX epilogue and the dA pass regenerate the same tile independently and the mask is never stored.
"""

import triton
import triton.language as tl


@triton.jit
def dropout_keep(seed, offs_m, offs_k, K, p):
    """Boolean keep-mask tile (len(offs_m) × len(offs_k)) for logical row length K."""
    offsets = offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    return tl.rand(seed, offsets) >= p


@triton.jit
def dropout_keep_mask_kernel(seed_ptr, out_ptr, M, K, p, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    keep = dropout_keep(tl.load(seed_ptr), offs_m, offs_k, K, p)
    in_bounds = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=in_bounds)


def dropout_keep_mask(seed: "torch.Tensor", M: int, K: int, p: float) -> "torch.Tensor":  # noqa: F821
    """The (M, K) bool keep-mask the kernels use for ``seed`` (int64 tensor, shape (1,)) and ``p``.

    Not on any hot path: tests and the reference comparison replay the kernels' mask with it.
    """
    import torch

    out = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        dropout_keep_mask_kernel[grid](seed, out, M, K, p, BLOCK_M=32, BLOCK_K=32)
    return out.bool()
