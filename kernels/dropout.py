"""Dropout mask shared by every kernel that touches drop(X): a counter-based integer hash.

keep[m, k] = (u[m, k] >> 1) >= round(p·2³¹), with
    u[m, k] = mix32(row_key[m] ^ col_key[k]),  row_key[m] = mix32(m ^ k0),
    col_key[k] = mix32(mix32(k ^ k1) ^ 0x9E3779B9),  (k0, k1) = low / high 32 bits of the seed,
a pure function of (seed, m, k, p): the forward shrink, the dX pass and the dA pass regenerate the
same tile independently and the mask is never stored. `lorafast.dropout.keep_mask` computes the same
bits with torch ops (tests check they are equal), so every strategy draws the identical mask.

Why not `tl.rand` (Philox-4x32-10): it costs ~73 SASS instructions per element and keeps one of four
outputs. Here the row and column keys are per tile edge (BLOCK_M + BLOCK_K hashes per tile) and each
element costs one xor, one mix32 (3 shift-xor + 2 multiply) and a compare — about 11 integer
instructions, all 32-bit. Both multipliers are odd and below 2³¹, so the torch version's int64
products never overflow (no reliance on wrap-around). The 31-bit threshold gives p a resolution of
2⁻³¹ and keeps the threshold an int32 kernel argument.
"""

import triton
import triton.language as tl

# The hash's constants and the threshold rule live in the triton-free torch implementation
# (lorafast/dropout.py), so `import lorafast` works without triton; tl.constexpr copies for the kernels
# (Triton only reads module globals that are constexpr).
from lorafast.dropout import MUL1, MUL2, SALT, mask_threshold  # noqa: E402

MIX_MUL1 = tl.constexpr(MUL1)
MIX_MUL2 = tl.constexpr(MUL2)
COL_SALT = tl.constexpr(SALT)
__all__ = ["mask_threshold"]


@triton.jit
def mix32(x):
    """A bijective 32-bit finaliser (two multiply rounds, xorshift between); x is uint32."""
    x ^= x >> 16
    x *= MIX_MUL1
    x ^= x >> 15
    x *= MIX_MUL2
    x ^= x >> 15
    return x


@triton.jit
def dropout_row_keys(seed, offs_m):
    """Per-row keys (uint32, len(offs_m)) for an int64 ``seed``; compute once per row block."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    return mix32(offs_m.to(tl.uint32) ^ k0)


@triton.jit
def dropout_col_keys(seed, offs_k):
    """Per-column keys (uint32, len(offs_k)) for an int64 ``seed``; compute once per column block."""
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return mix32(mix32(offs_k.to(tl.uint32) ^ k1) ^ COL_SALT)


@triton.jit
def dropout_keep(row_keys, col_keys, threshold):
    """Boolean keep tile (len(row_keys) × len(col_keys)) from the per-edge keys."""
    u = mix32(row_keys[:, None] ^ col_keys[None, :])
    return (u >> 1).to(tl.int32) >= threshold


@triton.jit(do_not_specialize=["threshold"])
def dropout_keep_mask_kernel(seed_ptr, out_ptr, M, K, threshold, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    seed = tl.load(seed_ptr)
    keep = dropout_keep(dropout_row_keys(seed, offs_m), dropout_col_keys(seed, offs_k), threshold)
    in_bounds = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    tl.store(out_ptr + offs_m[:, None] * K + offs_k[None, :], keep.to(tl.int8), mask=in_bounds)


def dropout_keep_mask(seed: "torch.Tensor", M: int, K: int, p: float) -> "torch.Tensor":  # noqa: F821
    """The (M, K) bool keep-mask the kernels use for ``seed`` (int64 tensor, shape (1,)) and ``p``.

    Not on any hot path: tests check it equals `lorafast.dropout.keep_mask` bit for bit.
    """
    import torch

    from lorafast.kernels.configs import device_guard

    out = torch.empty((M, K), dtype=torch.int8, device=seed.device)
    if M and K:
        grid = (triton.cdiv(M, 32), triton.cdiv(K, 32))
        with device_guard(seed.device):
            dropout_keep_mask_kernel[grid](seed, out, M, K, mask_threshold(p), BLOCK_M=32, BLOCK_K=32)
    return out.bool()
