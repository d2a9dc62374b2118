"""Public functional API: `lora_linear` (validation, autocast, strategy choice) and `run`, the unchecked hot
path for callers that validated once (the PEFT plan)."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from lorafast import dispatch, ops, reference, strategies
from lorafast.strategies.aten import accum_dtype
from lorafast.validation import check_lora_linear_args

# The 0-dim scale tensors of float scalings, per (value, dtype, device): the kernels read s from memory,
# and making a new device tensor per call costs an op (and, under CUDA graph capture, an allocation).
_SCALE_CACHE: dict = {}
_SCALE_CACHE_MAX = 256


def scale_tensor(scaling: Union[float, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """s as a 0-dim tensor on x's device in x's accumulation dtype (fp32, or fp64 for fp64 inputs).

    A 0-dim tensor scaling (PEFT hotswap) is used as is (a view, no copy when already there), so changing
    its value needs no sync and no recompile under torch.compile. Float scalings come from a cache.
    """
    dtype = accum_dtype(x.dtype)  # a dict lookup: torch.promote_types is a dispatched op (~1 µs)
    if isinstance(scaling, torch.Tensor):
        return scaling.detach().reshape(()).to(device=x.device, dtype=dtype)
    if torch.compiler.is_compiling():  # a traced constant; never hand dynamo a cached real tensor
        return torch.full((), float(scaling), dtype=dtype, device=x.device)
    key = (float(scaling), dtype, x.device)
    cached = _SCALE_CACHE.get(key)
    if cached is None:
        if len(_SCALE_CACHE) >= _SCALE_CACHE_MAX:
            _SCALE_CACHE.clear()
        cached = _SCALE_CACHE[key] = torch.full((), key[0], dtype=dtype, device=x.device)
    return cached


def autocast_inputs(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """nn.Linear's rule under ``torch.autocast`` on x's device: x, weight and bias (except float64) are cast to
    the autocast dtype, so the output has that dtype. The adapters keep their dtype — the op casts them to
    x's dtype tile by tile, which is what PEFT's autocast lora_A/lora_B linears compute — so their
    gradients come back in their own dtype (fp32 for PEFT's upcast adapters). The one autocast rule of the
    package (the PEFT glue calls it too)."""
    device_type = x.device.type
    if not torch.is_autocast_enabled(device_type):
        return x, weight, bias
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return cast(x), cast(weight), cast(bias)


def _dropout_seed(device: torch.device) -> torch.Tensor:
    # Drawn from the default generator of x's device, so torch.manual_seed makes a call reproducible, and
    # checkpointing's RNG restore replays it. A device tensor: no host sync, capturable in a CUDA graph.
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def grad_needs(x, weight, bias, lora_a, lora_b) -> Tuple[bool, bool, bool, bool]:
    """(need_dx, need_da, need_db_lora, need_dbias) when autograd records this call (else all False)."""
    if not torch.is_grad_enabled():
        return (False, False, False, False)
    return (x.requires_grad, lora_a.requires_grad, lora_b.requires_grad, bias is not None and bias.requires_grad)


def op_scale(scaling: Union[float, torch.Tensor], scale: torch.Tensor, strategy: str) -> Union[float, torch.Tensor]:
    """What :func:`run` takes as the scale: the python float itself for the ``aten`` strategy (folded into
    its GEMMs' alpha: one mul launch fewer per use, and nothing to read from memory), else ``scale``, the
    0-dim tensor the Triton kernels read."""
    if strategy == "aten" and not isinstance(scaling, torch.Tensor) and not torch.compiler.is_compiling():
        return float(scaling)
    return scale


def choose_strategy(backend: str, x2, weight, bias, lora_a, lora_b, scale, p) -> str:
    """The strategy for a call on the 2-D ``x2``: see :func:`lorafast.dispatch.resolve`. The tuning
    inputs (grad needs, the timing closure) are only built for "auto" on CUDA."""
    if backend != "auto" or not x2.is_cuda:
        return dispatch.resolve(backend, x2, weight, lora_a, p, (False,) * 4)
    needs = grad_needs(x2, weight, bias, lora_a, lora_b)
    make_run = dispatch.step_runner(x2, weight, bias, lora_a, lora_b, scale, p, needs)
    return dispatch.resolve(backend, x2, weight, lora_a, p, needs, make_run)


def run(
    x2: torch.Tensor,
    lead: Sequence[int],
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: Union[float, torch.Tensor],
    p: float,
    strategy: str,
) -> torch.Tensor:
    """The op on validated inputs: x2 (M, K) with M > 0, ``scale`` from :func:`scale_tensor` (or, for the
    ``aten`` strategy outside torch.compile, the python float itself: see :func:`op_scale`), ``p`` the
    dropout probability in effect (0 outside training), ``strategy`` a STRATEGIES name. Returns
    (*lead, N). Per call: a seed tensor when p > 0, then the strategy's launches; nothing else."""
    seed = _dropout_seed(x2.device) if p > 0.0 else None
    if torch.compiler.is_compiling():
        if not isinstance(scale, torch.Tensor):  # the custom op's schema takes a tensor
            scale = scale_tensor(scale, x2)
        y, _ = ops.lora_linear_fwd(x2, weight, bias, lora_a, lora_b, scale, seed, p, strategy)
    elif torch.is_grad_enabled() and (
        x2.requires_grad or lora_a.requires_grad or lora_b.requires_grad or weight.requires_grad
        or (bias is not None and bias.requires_grad)
    ):
        y = ops.apply_function(x2, weight, bias, lora_a, lora_b, scale, seed, p, strategy)
    else:  # inference: no graph to record, so skip autograd.Function's bookkeeping (~35 µs a call on CPU)
        y, _ = strategies.get(strategy).forward(x2, weight, bias, lora_a, lora_b, scale, seed, p)
    if len(lead) == 1:  # x was 2-D: y already has its shape
        return y
    # Not y.reshape: like nn.Linear (matmul's _unsafe_view), the result is not a view, so in-place ops on it
    # keep FSDP2's pre-backward hook (fully_shard warns about view outputs). Safe: the op's y has no other user.
    return _unsafe_view(y, (*lead, weight.shape[0]))


_unsafe_view = torch.ops.aten._unsafe_view.default  # the overload itself: skips the packet's overload lookup


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
        x: (..., K) fp16 / bf16 / fp32 (fp64 on the aten strategy), any strides.
        weight: (N, K), x's dtype; frozen unless it requires grad (then dW = dYᵀ·X is computed by a
            plain matmul — a documented fallback, not fused).
        bias: (N,) or None; gets a gradient when it requires grad.
        lora_a: (r, K); lora_b: (N, r) — any float dtype; fp32 adapters with bf16/fp16 x are read as
            fp32 and cast per tile (no fp32 copy of x). Gradients come back in each one's dtype.
        scaling: python float or 0-dim float tensor s (no gradient flows to it).
        dropout_p: dropout on the LoRA input, applied only when ``training`` and p > 0; its seed is drawn
            from the default generator of x's device.
        backend: "auto" (on CUDA the fastest strategy measured on this GPU, cached; ``aten`` on CPU),
            "fused", "cublas" (CPU only under TRITON_INTERPRET=1) or "aten"; "triton"/"torch" are
            aliases of "fused"/"aten". The env var LORAFAST_STRATEGY overrides "auto".

    Under ``torch.autocast`` x, weight and bias are first cast to the autocast dtype as ``nn.Linear`` does
    (float64 excepted); the adapters keep their dtype.

    Returns:
        (..., N) tensor in x's dtype (the autocast dtype under autocast).
    """
    if isinstance(x, torch.Tensor):
        x, weight, bias = autocast_inputs(x, weight, bias)
    check_lora_linear_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p, backend)
    p = float(dropout_p) if training else 0.0
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x2.shape[0] == 0:
        return reference.lora_linear(x, weight, bias, lora_a, lora_b, scaling)
    scale = scale_tensor(scaling, x)
    strategy = choose_strategy(backend, x2, weight, bias, lora_a, lora_b, scale, p)
    args = (x2, lead, weight, bias, lora_a, lora_b, op_scale(scaling, scale, strategy), p, strategy)
    if torch.is_autocast_enabled(x.device.type):
        # The casts are done (autocast_inputs); inside, the strategy picks each product's dtype itself (e.g. fp32
        # rank-r products for PEFT's adapter precision), which autocast would otherwise recast to 16 bits.
        with torch.autocast(x.device.type, enabled=False):
            return run(*args)
    return run(*args)
