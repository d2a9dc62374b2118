"""Public grouped (MoE experts) LoRA op: validation, strategy choice (timed on CUDA through
:func:`lorafast.dispatch.select`), the eager / compiled / inference paths."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from lorafast import dispatch
from lorafast.functional import _dropout_seed, scale_tensor
from lorafast.moe import ops, strategies
from lorafast.moe.groups import a_per_expert, out_features, weight_nk
from lorafast.strategies import ALIASES, BACKENDS, TRITON_STRATEGIES, warn_once
from lorafast.validation import FLOAT_DTYPES

# Timing runs use a fixed seed and a constant dY: they never draw from the default generator.
_TIMING_SEED = 0x5EED
# Per-expert ranks above this run `aten`: the MoE kernels' compile gate covers rank blocks 16–64 (at 128 the dH/dB
# pass and the in-place dX update spilled on every fp32 row and the AMD rows; expert LoRA ranks are rarely that high,
# as the adapters grow with E).
MAX_TRITON_RANK = 64


def _describe(name: str, t: torch.Tensor) -> str:
    return f"{name} (shape {tuple(t.shape)}, dtype {t.dtype}, device {t.device})"


def check_grouped_lora_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    offsets: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    dropout_p: float,
    backend: str,
    transposed: bool,
) -> None:
    """Raise TypeError / ValueError naming the offending argument, its shape, dtype and device. Offsets' values
    (non-decreasing, within [0, S]) are checked on CPU only: reading them from a GPU would sync."""
    named = {"x": x, "weight": weight, "lora_a": lora_a, "lora_b": lora_b}
    if bias is not None:
        named["bias"] = bias
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"grouped_lora_linear: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"grouped_lora_linear: {_describe(name, t)} has unsupported dtype; expected one of "
                            "float16, bfloat16, float32, float64")
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64) or offsets.dim() != 1:
        what = _describe("offsets", offsets) if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise TypeError(f"grouped_lora_linear: offsets must be a 1-D int32/int64 tensor (E,), got {what}")
    if weight.dtype != x.dtype:
        raise TypeError(f"grouped_lora_linear: {_describe('weight', weight)} must have x's dtype {x.dtype} (cast x "
                        "to the expert weight's dtype, as transformers' experts forward does)")
    for name, t, rank in (("x", x, 2), ("weight", weight, 3), ("lora_a", lora_a, 2), ("lora_b", lora_b, 2)):
        if t.dim() != rank:
            raise ValueError(f"grouped_lora_linear: {_describe(name, t)} must be {rank}-D")
    S, K = x.shape
    E = weight.shape[0]
    N = out_features(weight, transposed)
    layout = "(E, K, N)" if transposed else "(E, N, K)"
    if weight_nk(weight, transposed).shape[2] != K:
        raise ValueError(f"grouped_lora_linear: {_describe('weight', weight)} must be {layout} with K = x.shape[1] = "
                         f"{K} (transposed={transposed})")
    if offsets.shape[0] != E:
        raise ValueError(f"grouped_lora_linear: {_describe('offsets', offsets)} must have one entry per expert (E={E})")
    if lora_a.shape[1] != K or lora_a.shape[0] % E or lora_a.shape[0] == 0:
        raise ValueError(f"grouped_lora_linear: {_describe('lora_a', lora_a)} must be (E·r, K) with E = {E}, K = {K}, "
                         "r >= 1 (PEFT's ParamWrapper lora_A: Linear(K, r·E))")
    r = lora_a.shape[0] // E
    if tuple(lora_b.shape) != (N, r * E):
        raise ValueError(f"grouped_lora_linear: {_describe('lora_b', lora_b)} must be (N, r·E) = ({N}, {r * E}) "
                         "(PEFT's ParamWrapper lora_B: Linear(r·E, N))")
    if bias is not None and tuple(bias.shape) != (E, N):
        raise ValueError(f"grouped_lora_linear: {_describe('bias', bias)} must be (E, N) = ({E}, {N})")
    for name, t in (*named.items(), ("offsets", offsets)):
        if t.device != x.device:
            raise ValueError(f"grouped_lora_linear: {_describe(name, t)} is not on x's device {x.device}")
    if isinstance(scaling, torch.Tensor):
        if scaling.numel() != 1 or not scaling.is_floating_point():
            raise ValueError("grouped_lora_linear: scaling tensor must be a 0-dim (or 1-element) float tensor, got "
                             f"{_describe('scaling', scaling)}")
    elif not isinstance(scaling, (int, float)):
        raise TypeError(f"grouped_lora_linear: scaling must be a float or a 0-dim tensor, got {type(scaling).__name__}")
    if not 0.0 <= float(dropout_p) < 1.0:
        raise ValueError(f"grouped_lora_linear: dropout_p must be in [0, 1), got {dropout_p}")
    if backend not in BACKENDS:
        raise ValueError(f"grouped_lora_linear: backend must be one of {BACKENDS}, got {backend!r}")
    if offsets.device.type == "cpu" and E and not torch.compiler.is_compiling():
        bad_order = E > 1 and bool((offsets[1:] < offsets[:-1]).any())
        if bad_order or int(offsets[0]) < 0 or int(offsets[-1]) > S:
            raise ValueError(f"grouped_lora_linear: offsets must be non-decreasing cumulative row counts in [0, S={S}]"
                             f", got {offsets.tolist()[:8]}{'...' if E > 8 else ''}")


def grad_needs(x, weight, bias, lora_a, lora_b) -> Tuple[bool, bool, bool, bool]:
    """(need_dx, need_da, need_db_lora, need_dbias) when autograd records this call (else all False)."""
    if not torch.is_grad_enabled():
        return (False, False, False, False)
    return (x.requires_grad, lora_a.requires_grad, lora_b.requires_grad, bias is not None and bias.requires_grad)


def step_runner(x, weight, transposed, bias, offsets, lora_a, lora_b, scale, p, needs) -> dispatch.MakeRun:
    """``make_run`` for :func:`lorafast.dispatch.select`: one forward (+ the needed backward) of a strategy outside
    autograd, a fixed dropout seed and a constant dY; ``run()`` returns (y, dX, dA, dB, db), None where not
    computed, so the dispatcher can check each candidate against ``aten``'s outputs."""
    def make_run(name: str) -> dispatch.Runner:
        impl = strategies.get(name)
        seed = torch.full((1,), _TIMING_SEED, dtype=torch.int64, device=x.device) if p > 0.0 else None
        grad_y = []

        def run():
            with torch.no_grad():
                y, h = impl.forward(x, weight, transposed, bias, offsets, lora_a, lora_b, scale, seed, p)
                if not any(needs):
                    return dispatch.StepOutputs(y, None, None, None, None)
                if not grad_y:
                    grad_y.append(torch.full_like(y, 1e-2))
                grads = impl.backward(grad_y[0], x, weight, transposed, offsets, lora_a, lora_b, h, scale, seed, p,
                                      *needs)
                return dispatch.StepOutputs(y, *grads)

        return run

    return make_run


def choose_strategy(backend, x, weight, transposed, bias, offsets, lora_a, lora_b, scale, p) -> str:
    """The strategy for a call (see :func:`lorafast.dispatch.resolve`); "auto" on CUDA times the candidates once
    per key, whose ``op`` names the family and the expert count and layout (``moe64``, ``moe32t``). Ranks above
    MAX_TRITON_RANK run ``aten`` (one warning when a Triton strategy was asked for)."""
    E = weight.shape[0]
    w2, a2 = weight_nk(weight, transposed)[0], a_per_expert(lora_a, E)[0]  # (N, K), (r, K) views: the key's dims
    if a2.shape[0] > MAX_TRITON_RANK and ALIASES.get(backend, backend) != "aten":
        if ALIASES.get(backend, backend) in TRITON_STRATEGIES:
            warn_once("moe-rank", f"lorafast: grouped_lora_linear: rank {a2.shape[0]} > {MAX_TRITON_RANK} (the MoE "
                                  "kernels' limit); running the 'aten' strategy instead")
        return "aten"
    op = f"moe{E}{'t' if transposed else ''}"
    if backend != "auto" or not x.is_cuda:
        return dispatch.resolve(backend, x, w2, a2, p, (False,) * 4, op=op)
    needs = grad_needs(x, weight, bias, lora_a, lora_b)
    make_run = step_runner(x, weight, transposed, bias, offsets, lora_a, lora_b, scale, p, needs)
    return dispatch.resolve(backend, x, w2, a2, p, needs, make_run, op=op)


def run(x, weight, transposed, bias, offsets, lora_a, lora_b, scale, p, strategy) -> torch.Tensor:
    """The op on validated inputs (S > 0): a seed when p > 0, then the strategy (custom op under torch.compile,
    the autograd.Function when autograd records, the bare forward otherwise)."""
    seed = _dropout_seed(x.device) if p > 0.0 else None
    if torch.compiler.is_compiling():
        if not isinstance(scale, torch.Tensor):
            scale = scale_tensor(scale, x)
        y, _ = ops.grouped_lora_fwd(x, weight, bias, offsets, lora_a, lora_b, scale, seed, p, transposed, strategy)
        return y
    if torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, lora_a, lora_b)
    ):
        return ops.GroupedLoraFunction.apply(x, weight, bias, offsets, lora_a, lora_b, scale, seed, p, transposed,
                                             strategy)
    y, _ = strategies.get(strategy).forward(x, weight, transposed, bias, offsets, lora_a, lora_b, scale, seed, p)
    return y


def grouped_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    offsets: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    dropout_p: float = 0.0,
    training: bool = False,
    backend: str = "auto",
    *,
    transposed: bool = False,
) -> torch.Tensor:
    """Grouped LoRA over experts: for each expert e, ``Y_e = X_e·W_eᵀ + b_e + s·(drop(X_e)·A_eᵀ)·B_eᵀ``.

    Args:
        x: (S, K) fp16 / bf16 / fp32 (fp64 on ``aten``), token rows sorted by expert: expert e owns rows
            ``offsets[e-1]:offsets[e]`` (``offsets[-1]`` may be < S: the rows past it get zeros).
        weight: (E, N, K) in x's dtype — transformers' ``gate_up_proj`` (E, 2I, H) / ``down_proj`` (E, H, I) — or,
            with ``transposed=True``, (E, K, N) (gpt-oss's layout). Read in place, any strides. Frozen unless it
            requires grad (then dW comes from a plain grouped product: a documented fallback).
        bias: (E, N) or None (gpt-oss); gets a gradient when it requires grad.
        offsets: (E,) int32/int64 cumulative row counts (transformers' ``cumsum(histc(expert_ids))``).
        lora_a: (E·r, K), PEFT's ParamWrapper ``lora_A.weight`` (expert-major rows); lora_b: (N, r·E), its
            ``lora_B.weight`` (rank-major columns: B_e = ``lora_b[:, e::E]``). Any float dtype; the rank-r products
            run in x's dtype, as PEFT's ParamWrapper casts its factors to the parameter's dtype. Gradients come
            back in each one's dtype and layout.
        scaling: python float or 0-dim float tensor s.
        dropout_p: dropout on the LoRA input (PEFT rejects it on ParamWrapper; here the mask is regenerated in
            backward, never stored), applied only when ``training``; the seed comes from the default generator.
        backend: "auto" (CUDA: the fastest strategy measured on this GPU, cached; CPU: ``aten``), "fused",
            "cublas" (CPU only under TRITON_INTERPRET=1) or "aten"; LORAFAST_STRATEGY overrides "auto".
        transposed: the weight is (E, K, N).

    Runs in the weight's dtype with autocast off (transformers' grouped_mm path does the same).

    Returns:
        (S, N) tensor in x's dtype.
    """
    check_grouped_lora_args(x, weight, bias, offsets, lora_a, lora_b, scaling, dropout_p, backend, transposed)
    p = float(dropout_p) if training else 0.0
    if x.shape[0] == 0:
        from lorafast import reference

        return reference.grouped_lora_linear(x, weight, bias, offsets, lora_a, lora_b, scaling, transposed=transposed)
    scale = scale_tensor(scaling, x)
    strategy = choose_strategy(backend, x, weight, transposed, bias, offsets, lora_a, lora_b, scale, p)
    if strategy == "aten" and not isinstance(scaling, torch.Tensor) and not torch.compiler.is_compiling():
        scale = float(scaling)  # folded into the products' alpha
    args = (x, weight, transposed, bias, offsets, lora_a, lora_b, scale, p, strategy)
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return run(*args)
    return run(*args)
