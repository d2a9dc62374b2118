"""The dropout keep-mask in torch ops: bit-identical to the Triton kernels' (kernels/dropout.py).

Every strategy on CUDA (fused, cublas and aten) draws this mask, so the strategy the dispatcher picks
never changes which inputs are dropped. On CPU the aten strategy uses a generator-based mask instead
(see :func:`lorafast.strategies.aten.cpu_keep_mask`): these ~13 int64 ops over M×K cost several times more
than a generator's draws on the 2-core CPU (2048×768: 8.2 ms, where ``uniform_`` alone took 3.4 ms, 1 thread).
No host sync: the seed stays a device tensor, so this is valid under CUDA graph capture.
"""

from __future__ import annotations

import torch

# mix32's odd multipliers (both < 2³¹, so the int64 products below never overflow) and the column salt;
# kernels/dropout.py imports them, so the kernels and these torch ops cannot drift apart.
MUL1, MUL2, SALT = 0x21F0AAAD, 0x735A2D97, 0x9E3779B9
_M32 = 0xFFFFFFFF


def mask_threshold(p: float) -> int:
    """The int32 threshold on ``u >> 1`` for drop probability ``p`` in [0, 1): keep iff (u >> 1) >= it."""
    return min(int(round(p * 2**31)), 2**31 - 1)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """kernels/dropout.py's mix32 in place on int64 values in [0, 2³²); products stay below 2⁶³."""
    x ^= x >> 16
    x *= MUL1
    x &= _M32
    x ^= x >> 15
    x *= MUL2
    x &= _M32
    x ^= x >> 15
    return x


def hash_keys(seed: torch.Tensor, M: int, K: int) -> tuple:
    """(row keys (M,), column keys (K,)) as int64 tensors on ``seed``'s device, as the kernels compute them."""
    s = seed.reshape(())
    k0 = s & _M32
    k1 = (s >> 32) & _M32
    rows = _mix32_(torch.arange(M, dtype=torch.int64, device=seed.device) ^ k0)
    cols = _mix32_(_mix32_(torch.arange(K, dtype=torch.int64, device=seed.device) ^ k1) ^ SALT)
    return rows, cols


def keep_mask(seed: torch.Tensor, M: int, K: int, p: float) -> torch.Tensor:
    """The (M, K) bool keep-mask of the Triton kernels for ``seed`` (int64, 1 element) and drop prob ``p``.

    drop(X) = X ⊙ keep / (1 − p). Pure function of (seed, m, k, p); M, K index the 2-D (M, K) view of x.
    """
    rows, cols = hash_keys(seed, M, K)
    u = _mix32_(rows[:, None] ^ cols[None, :])
    return (u >> 1) >= mask_threshold(p)
