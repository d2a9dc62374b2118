"""Public functional API: `lora_linear`, input validation and backend dispatch."""

from __future__ import annotations

import os
import warnings
from typing import Optional, Tuple, Union

import torch

from lorafast import ops, reference
from lorafast.validation import check_lora_linear_args

# The rank is padded to a power of two in registers by the kernels; above this the epilogue tiles
# would crowd out the GEMM's, so larger ranks run the torch backend (unmeasured bound, see KERNELS.md).
MAX_TRITON_RANK = 128
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_warned: set = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, x: torch.Tensor, lora_a: torch.Tensor) -> str:
    """Pick "triton" or "torch" for these inputs.

    "auto": triton on CUDA tensors (when triton imports), torch otherwise. "triton" on CPU needs
    TRITON_INTERPRET=1 set before triton is imported; otherwise a ValueError says so. Valid inputs
    the kernels do not cover (fp64, rank > MAX_TRITON_RANK) fall back to torch with a one-time warning.
    """
    if backend == "torch":
        return "torch"
    if backend == "auto" and (not x.is_cuda or not _triton_available()):
        return "torch"
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise ValueError(
            f"lora_linear: backend='triton' needs CUDA tensors, but x is on {x.device}; on CPU set "
            "TRITON_INTERPRET=1 before importing triton (interpreter, slow) or use backend='torch'/'auto'"
        )
    if not _triton_available():
        raise ValueError("lora_linear: backend='triton' requested but triton is not installed (pip install triton)")
    if x.dtype not in TRITON_DTYPES or lora_a.dtype not in TRITON_DTYPES:
        _warn_once("dtype", f"lorafast: {x.dtype}/{lora_a.dtype} is not supported by the Triton kernels; "
                            "using the torch backend")
        return "torch"
    if lora_a.shape[0] > MAX_TRITON_RANK:
        _warn_once("rank", f"lorafast: rank {lora_a.shape[0]} > {MAX_TRITON_RANK} runs on the torch backend")
        return "torch"
    return "triton"


def _scaling_tensor(scaling: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    # The kernels read s from memory, so a 0-dim tensor scaling (PEFT hotswap) needs no host sync and
    # changing its value does not recompile under torch.compile. fp64 inputs keep an fp64 scale.
    dtype = torch.promote_types(x.dtype, torch.float32)
    if isinstance(scaling, torch.Tensor):
        return scaling.detach().reshape(()).to(device=x.device, dtype=dtype)
    return torch.full((), float(scaling), dtype=dtype, device=x.device)


def _autocast_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """nn.Linear's rule under ``torch.autocast`` on x's device: x, weight and bias (except float64) are cast to
    the autocast dtype, so the output has that dtype. The adapters keep their dtype — the op casts them to
    x's dtype tile by tile, which is what PEFT's autocast lora_A/lora_B linears compute — so their
    gradients come back in their own dtype (fp32 for PEFT's upcast adapters)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(x), cast(weight), cast(bias)


def _dropout_seed(device: torch.device) -> torch.Tensor:
    # Drawn from the default generator of x's device, so torch.manual_seed makes a call reproducible.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Fused LoRA linear ``Y = X·Wᵀ + b + s·(drop(X)·Aᵀ)·Bᵀ``.

    Args:
        x: (..., K) fp16 / bf16 / fp32 (fp64 on the torch backend), any strides.
        weight: (N, K), x's dtype; frozen unless it requires grad (then dW = dYᵀ·X is computed by a
            plain matmul — a documented fallback, not fused).
        bias: (N,) or None; gets a gradient when it requires grad.
        lora_a: (r, K); lora_b: (N, r) — any float dtype; fp32 adapters with bf16/fp16 x are read as
            fp32 and cast per tile (no fp32 copy of x). Gradients come back in each one's dtype.
        scaling: python float or 0-dim float tensor s (no gradient flows to it).
        dropout_p: dropout on the LoRA input, applied only when ``training`` and p > 0; its Philox
            seed is drawn from the default generator of x's device.
        backend: "auto" (triton on CUDA, torch on CPU), "triton" (CPU only under TRITON_INTERPRET=1)
            or "torch".

    Under ``torch.autocast`` x, weight and bias are first cast to the autocast dtype as ``nn.Linear`` does
    (float64 excepted); the adapters keep their dtype.

    Returns:
        (..., N) tensor in x's dtype (the autocast dtype under autocast).
    """
    if isinstance(x, torch.Tensor):
        x, weight, bias = _autocast_inputs(x, weight, bias)
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p, backend)
    p = float(dropout_p) if training else 0.0
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:
        return reference.lora_linear(x, weight, bias, lora_a, lora_b, scaling)
    chosen = resolve_backend(backend, x, lora_a)
    seed = _dropout_seed(x.device) if p > 0.0 else torch.zeros((1,), dtype=torch.int64, device=x.device)
    args = (x2, weight, bias, lora_a, lora_b, _scaling_tensor(scaling, x), seed, p, chosen)
    if torch.compiler.is_compiling():
        y, _ = ops.lora_linear_fwd(*args)
    elif torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b)):
        y, _ = ops.LoraLinearFunction.apply(*args)
    else:  # inference: no graph to record, so skip autograd.Function's bookkeeping (~35 µs a call on CPU)
        y, _ = ops.forward_impl(*args)
    # Not y.reshape: like nn.Linear (matmul's _unsafe_view), the result is not a view, so in-place ops on it
    # keep FSDP2's pre-backward hook (fully_shard warns about view outputs). Safe: the op's y has no other user.
    return torch.ops.aten._unsafe_view(y, (*lead, weight.shape[0]))
