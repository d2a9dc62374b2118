"""QLoRA: LoRA on a bitsandbytes 4-bit (NF4/FP4) base weight, fused.

    Y = x·dequant(W)ᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ

One ``torch.autograd.Function`` (:class:`QLoraFunction`) dequantizes the 4-bit weight to a transient N×K buffer
and hands it to a strategy of :mod:`lorafast.strategies` as ``weight`` (one place for the LoRA math). Backward
dequantizes W again for dX: the dequantized weight is never saved; saved for backward are x, H (M×r fp32), the
seed and the packed 4-bit storage with its quant-state tensors (already alive as the layer's parameter and
buffers; N·K/2 bytes, no N×K tensor). The PEFT layer that calls it is :mod:`lorafast.peft.bnb`.

Dequantization: on CPU ``bitsandbytes.functional.dequantize_4bit`` (bitsandbytes' reference); on CUDA, and
on CPU under the Triton interpreter for an explicit Triton strategy, :func:`lorafast.kernels.dequant.
dequantize_4bit`, bit-exact with it. On CUDA ``backend="auto"`` picks the LoRA strategy that follows the
dequant (``cublas``, ``fused``, ``aten``) with :mod:`lorafast.dispatch` under the key op "nf4"/"fp4".

The quant state is read on every call, never cached: bitsandbytes' CPU path repacks a 4-bit weight on its
first inference forward (``packing_format_for_cpu``; the absmax changes shape and dtype, to bf16). That
layout is dequantized too (with the bf16 absmax the repack stored), so training after a CPU evaluation
stays fused; seen with bitsandbytes 0.50.2: its own forward on that layout raised "a view of a leaf
Variable that requires grad is being used in an in-place operation" for an input requiring grad (a base
with bias). A quant state that is missing or inconsistent (unknown quant_type, wrong absmax length, shape
mismatch) is reported by :func:`read_quant_state` as :class:`Unsupported` — never a crash deep in a kernel.

Importing this module raises ImportError when bitsandbytes is missing.
"""

from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional, Tuple, Union

import bitsandbytes as bnb
import torch
from torch import nn

from lorafast import dispatch, functional, strategies
from lorafast.functional import _dropout_seed, scale_tensor

QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# What follows the dequant on CUDA when the dispatcher must not time (compile tracing, graph capture).
DEFAULT_CUDA = "cublas"
# Strategy (b): W dequantized inside the base GEMM's K loop (lorafast.kernels.dequant.gemm_4bit). It reads
# 0.5 B per weight element instead of writing and re-reading a 2 B copy, which pays where the GEMM is
# memory-bound: small M. Offered to the dispatcher up to this M (an unmeasured bound: no GPU has timed it).
GEMM_4BIT = "gemm4bit"
GEMM_4BIT_MAX_M = 512


class Unsupported(NamedTuple):
    """Why a 4-bit weight's storage cannot be read by :func:`read_quant_state`."""

    reason: str  # a fixed category
    detail: str = ""  # the specifics


class QuantSnapshot(NamedTuple):
    """A 4-bit weight's storage as read at call time (tensors are the layer's own, not copies)."""

    packed: torch.Tensor  # uint8 view of Params4bit data, ceil(N·K/2) bytes
    absmax: torch.Tensor  # (blocks,) fp32, or uint8 codes when nested
    code: torch.Tensor  # (16,) fp32, bitsandbytes' table
    nested_absmax: Optional[torch.Tensor]  # (ceil(blocks / nested_blocksize),) fp32, or None
    nested_code: Optional[torch.Tensor]  # (256,) fp32, or None
    offset: Optional[torch.Tensor]  # 0-dim/1-element fp32, or None
    blocksize: int
    nested_blocksize: int
    quant_type: str
    shape: Tuple[int, int]  # (N, K)
    dtype: torch.dtype  # the dtype bitsandbytes dequantizes to (the original weight's)
    cpu_packed: bool = False  # bitsandbytes' CPU inference layout (packing_format_for_cpu), see _cpu_packed_snapshot

    def tensors(self) -> Tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.packed, self.absmax, self.code, self.nested_absmax, self.nested_code,
                                 self.offset) if t is not None)

    def with_tensors(self, tensors: Tuple[torch.Tensor, ...]) -> QuantSnapshot:
        """The same snapshot with its tensors replaced (by saved-for-backward unpacks)."""
        it = iter(tensors)
        nested = self.nested_absmax is not None
        packed, absmax, code = next(it), next(it), next(it)
        nested_absmax, nested_code, offset = (next(it), next(it), next(it)) if nested else (None, None, None)
        return self._replace(packed=packed, absmax=absmax, code=code, nested_absmax=nested_absmax,
                             nested_code=nested_code, offset=offset)


def read_quant_state(base: nn.Module) -> Union[QuantSnapshot, Unsupported]:
    """The 4-bit storage of a ``bnb.nn.Linear4bit``, checked for consistency, or why it cannot be used."""
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        state = getattr(base, "quant_state", None)
    if not isinstance(weight, bnb.nn.Params4bit) or state is None:
        return Unsupported("4-bit weight without a quant state", type(weight).__name__)
    quant_type = getattr(state, "quant_type", None)
    if quant_type not in QUANT_TYPES:
        return Unsupported("unknown 4-bit quant_type", repr(quant_type))
    N, K = base.out_features, base.in_features
    if getattr(state, "packing_format_for_cpu", False):
        return _cpu_packed_snapshot(weight, state, quant_type, N, K)
    shape = tuple(int(s) for s in getattr(state, "shape", ()) or ())
    if shape != (N, K):
        return Unsupported("quant state shape differs from the layer", f"{shape} vs {(N, K)}")
    numel = N * K
    data = weight.data
    packed = data.reshape(-1) if data.dtype == torch.uint8 else data.reshape(-1).view(torch.uint8)
    if packed.numel() != (numel + 1) // 2 or not packed.is_contiguous():
        return Unsupported("4-bit storage size differs from the layer", f"{packed.numel()} bytes for {N}×{K}")
    blocksize = int(getattr(state, "blocksize", 0) or 0)
    absmax, code = getattr(state, "absmax", None), getattr(state, "code", None)
    if blocksize <= 0 or absmax is None or code is None or code.numel() != 16:
        return Unsupported("incomplete quant state (blocksize/absmax/code)")
    blocks = -(-numel // blocksize)
    if absmax.numel() != blocks:
        return Unsupported("wrong absmax length", f"{absmax.numel()} entries, expected {blocks}")
    nested_absmax = nested_code = offset = None
    nested_blocksize = 256
    if getattr(state, "nested", False):
        state2 = getattr(state, "state2", None)
        offset = getattr(state, "offset", None)
        if state2 is None or offset is None or state2.absmax is None or state2.code is None:
            return Unsupported("incomplete nested quant state (state2/offset)")
        nested_blocksize = int(state2.blocksize)
        if absmax.dtype != torch.uint8 or state2.code.numel() != 256 or \
                state2.absmax.numel() != -(-blocks // max(nested_blocksize, 1)):
            return Unsupported("wrong nested absmax length", f"{state2.absmax.numel()} entries")
        nested_absmax, nested_code = state2.absmax, state2.code
        offset = offset if isinstance(offset, torch.Tensor) else torch.tensor(float(offset), device=absmax.device)
    elif absmax.dtype != torch.float32:
        return Unsupported("absmax is not float32", str(absmax.dtype))
    if getattr(state, "dtype", None) not in COMPUTE_DTYPES:
        return Unsupported("quant state dtype is not fp16/bf16/fp32", str(getattr(state, "dtype", None)))
    return QuantSnapshot(packed, absmax, code, nested_absmax, nested_code, offset, blocksize, nested_blocksize,
                         quant_type, (N, K), state.dtype)


def _cpu_packed_snapshot(weight: nn.Parameter, state: Any, quant_type: str, N: int, K: int
                         ) -> Union[QuantSnapshot, Unsupported]:
    """The state bitsandbytes leaves after its CPU inference repack (``_convert_weight_packed_for_cpu``): data
    (N, K/2) uint8 in 32-row interleaved nibble order, absmax (K/blocksize, N) bf16, nesting undone."""
    data, absmax, code = weight.data, getattr(state, "absmax", None), getattr(state, "code", None)
    blocksize = int(getattr(state, "blocksize", 0) or 0)
    if (data.dtype != torch.uint8 or tuple(data.shape) != (N, K // 2) or N % 32 or K % 2 or blocksize <= 0
            or K % blocksize or absmax is None or tuple(absmax.shape) != (K // blocksize, N) or code is None
            or code.numel() != 16 or not data.is_contiguous()):
        return Unsupported("inconsistent bitsandbytes CPU-packed quant state (packing_format_for_cpu)",
                         f"data {tuple(data.shape)}, absmax {None if absmax is None else tuple(absmax.shape)}")
    return QuantSnapshot(data, absmax, code, None, None, None, blocksize, 256, quant_type, (N, K), torch.float32,
                         cpu_packed=True)


def _dequantize_cpu_packed(snap: QuantSnapshot, dtype: torch.dtype) -> torch.Tensor:
    """W from the CPU-packed layout: the inverse of bitsandbytes' repack (its own inverse mutates the state),
    then code · absmax in fp32 with the bf16 absmax the repack stored, rounded once to ``dtype``."""
    N, K = snap.shape
    nibbles = snap.packed.reshape(-1, 32)
    index = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1).reshape(N // 32, K // 2, 32, 2)
    index = index.transpose(1, 2).reshape(N, K).long()
    scales = snap.absmax.float().t().repeat_interleave(snap.blocksize, dim=1)
    return (snap.code.float()[index] * scales).to(dtype)


def dequantize(snap: QuantSnapshot, dtype: torch.dtype, use_triton: bool) -> torch.Tensor:
    """W (N, K) in ``dtype``, exactly as bitsandbytes' ``dequantize_4bit(...).to(dtype)``.

    use_triton: the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1) instead of bitsandbytes' op.
    Dequantizing straight to ``dtype`` rounds once, like dequantizing to fp32 and casting; from a 16-bit
    state dtype to another dtype bitsandbytes rounds twice, and so does this.
    """
    if snap.cpu_packed:
        return _dequantize_cpu_packed(snap, dtype)
    direct = snap.dtype == dtype or snap.dtype == torch.float32
    out_dtype = dtype if direct else snap.dtype
    if use_triton:
        from lorafast.kernels.dequant import code_table, dequantize_4bit

        weight = dequantize_4bit(snap.packed, snap.absmax, code_table(snap.quant_type, snap.code), snap.blocksize,
                                 snap.shape, out_dtype, snap.nested_absmax, snap.nested_code,
                                 snap.nested_blocksize, snap.offset)
    else:
        state2 = None
        if snap.nested_absmax is not None:
            state2 = bnb.functional.QuantState(absmax=snap.nested_absmax, code=snap.nested_code,
                                               blocksize=snap.nested_blocksize, dtype=torch.float32)
        state = bnb.functional.QuantState(absmax=snap.absmax, shape=torch.Size(snap.shape), code=snap.code,
                                          blocksize=snap.blocksize, quant_type=snap.quant_type, dtype=out_dtype,
                                          offset=snap.offset, state2=state2)
        weight = bnb.functional.dequantize_4bit(snap.packed, state)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _absmax_fp32(snap: QuantSnapshot) -> torch.Tensor:
    """The blockwise absmax as fp32, a nested one dequantized as bitsandbytes does (product, then offset)."""
    if snap.nested_absmax is None:
        return snap.absmax
    scales = snap.nested_absmax.repeat_interleave(snap.nested_blocksize)[: snap.absmax.numel()]
    return snap.nested_code[snap.absmax.long()] * scales + snap.offset.reshape(()).float()


def strategy_forward(name: str, x: torch.Tensor, snap: QuantSnapshot, bias: Optional[torch.Tensor],
                     lora_a: torch.Tensor, lora_b: torch.Tensor, scale: Union[float, torch.Tensor],
                     seed: Optional[torch.Tensor], p: float, use_triton: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """(y (M, N) in x's dtype, H (M, r) fp32) of QLoRA strategy ``name``: a lorafast strategy on the weight
    dequantized to a transient buffer, or GEMM_4BIT (W dequantized inside the base GEMM's K loop, the LoRA
    terms by the ``cublas`` strategy's Triton side kernels)."""
    if name == GEMM_4BIT and snap.cpu_packed:  # the in-loop kernel reads bitsandbytes' flat layout only
        name = "cublas"
    if name == GEMM_4BIT:
        from lorafast.kernels.dequant import code_table, gemm_4bit
        from lorafast.kernels.lora_fwd import lora_expand_add, lora_shrink

        h = lora_shrink(x, lora_a, seed, p)
        y = gemm_4bit(x, snap.packed, _absmax_fp32(snap), code_table(snap.quant_type, snap.code), snap.blocksize,
                      snap.shape[0], bias)
        lora_expand_add(y, h, lora_b, scale, h_factor=1.0 / (1.0 - p))
        return y, h
    weight = dequantize(snap, x.dtype, use_triton)
    return strategies.get(name).forward(x, weight, bias, lora_a, lora_b, scale, seed, p)


def strategy_backward(name: str, grad_y: torch.Tensor, x: torch.Tensor, snap: QuantSnapshot, lora_a: torch.Tensor,
                      lora_b: torch.Tensor, h: torch.Tensor, scale: Union[float, torch.Tensor],
                      seed: Optional[torch.Tensor], p: float, use_triton: bool,
                      needs: Tuple[bool, bool, bool, bool]) -> tuple:
    """(dX, dA, dB, db) of QLoRA strategy ``name`` (fp32 accumulators, None where not needed); W is
    dequantized again, only when dX is needed. GEMM_4BIT's backward is ``cublas``'s on the dequantized W."""
    weight = dequantize(snap, grad_y.dtype, use_triton) if needs[0] else x.new_empty((0, x.shape[1]))
    impl = strategies.get("cublas" if name == GEMM_4BIT else name)
    return impl.backward(grad_y, x, weight, lora_a, lora_b, h, scale, seed, p, *needs)


class QLoraFunction(torch.autograd.Function):
    """y = x·dequant(W)ᵀ + b + s/(1−p)·H·Bᵀ with the strategy's fused backward; W dequantized in both passes.

    forward(x (M, K) compute dtype, bias (N,) or None, lora_a (r, K), lora_b (N, r), scale (0-dim tensor, or
    a python float for ``aten`` as :func:`lorafast.functional.op_scale` gives it), seed,
    dropout_p, strategy name, use_triton_dequant, QuantSnapshot, *snapshot tensors) → y (M, N).
    The snapshot tensors are inputs so they are saved (and version-checked) like any saved tensor.
    """

    @staticmethod
    def forward(ctx, x, bias, lora_a, lora_b, scale, seed, dropout_p, strategy, use_triton, snap, *quant):
        # The dequantized weight is transient: freed on return, rebuilt in backward.
        y, h = strategy_forward(strategy, x, snap, bias, lora_a, lora_b, scale, seed, dropout_p, use_triton)
        ctx.float_scale = None if isinstance(scale, torch.Tensor) else scale
        ctx.save_for_backward(x, lora_a, lora_b, h, scale if ctx.float_scale is None else None, seed, *quant)
        ctx.snap, ctx.dropout_p, ctx.strategy, ctx.use_triton = snap, dropout_p, strategy, use_triton
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.set_materialize_grads(False)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, lora_a, lora_b, h, scale, seed, *quant = ctx.saved_tensors
        scale = scale if ctx.float_scale is None else ctx.float_scale
        n_inputs = 10 + len(quant)
        if grad_y is None:
            return (None,) * n_inputs
        need_dx, need_dbias, need_da, need_db_lora = ctx.needs_input_grad[:4]
        snap = ctx.snap.with_tensors(tuple(quant))
        dx, da, db_lora, dbias = strategy_backward(
            ctx.strategy, grad_y, x, snap, lora_a, lora_b, h, scale, seed, ctx.dropout_p, ctx.use_triton,
            (need_dx, need_da, need_db_lora, need_dbias),
        )
        return (
            dx if need_dx else None,
            dbias.to(ctx.bias_dtype) if need_dbias else None,
            da.to(lora_a.dtype) if need_da else None,
            db_lora.to(lora_b.dtype) if need_db_lora else None,
            *(None,) * (n_inputs - 4),
        )


class QLoraCall(NamedTuple):
    """The arguments of one fused QLoRA call (checked by the caller, e.g. :mod:`lorafast.peft.bnb`)."""

    x: torch.Tensor  # (..., K) in the compute dtype
    out_dtype: torch.dtype
    bias: Optional[torch.Tensor]
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: Union[float, torch.Tensor]
    dropout_p: float
    snap: QuantSnapshot


def _grad_needs(call: QLoraCall) -> Tuple[bool, bool, bool, bool]:
    if not torch.is_grad_enabled():
        return (False, False, False, False)
    bias = call.bias
    return (call.x.requires_grad, call.lora_a.requires_grad, call.lora_b.requires_grad,
            bias is not None and bias.requires_grad)


def choose(backend: str, call: QLoraCall, x2: torch.Tensor, scale: torch.Tensor,
           needs: Tuple[bool, bool, bool, bool]) -> Tuple[str, bool]:
    """(QLoRA strategy, whether the Triton dequant kernel runs).

    CPU: "auto"/"aten" → bitsandbytes' dequant + ``aten``; an explicit Triton strategy (or GEMM_4BIT) runs
    under the interpreter with the Triton dequant (tests). CUDA: the Triton dequant (when Triton is installed)
    and, for "auto", the fastest by :func:`lorafast.dispatch.select` (key op = quant_type) of dequant +
    cublas/fused/aten and, for 16-bit x with M ≤ GEMM_4BIT_MAX_M, GEMM_4BIT.
    """
    snap = call.snap
    weight_like = torch.empty((snap.shape[0], 0), device="meta")  # only its N is read by resolve/dispatch
    have_triton = strategies.triton_available()
    if backend == GEMM_4BIT:  # explicit (tests; set as the layer's backend attribute)
        dispatch.resolve("cublas", x2, weight_like, call.lora_a, call.dropout_p, needs)  # device/triton checks
        return GEMM_4BIT, True
    overridden = backend == "auto" and os.environ.get(strategies.ENV_STRATEGY)
    if backend == "auto" and not overridden and x2.is_cuda and have_triton and \
            strategies.triton_fallback(x2, call.lora_a) is None:
        return dispatch_strategy(x2, call, scale, needs), True
    # resolve applies LORAFAST_STRATEGY (which replaces "auto") and the device/dtype checks.
    name = dispatch.resolve(backend, x2, weight_like, call.lora_a, call.dropout_p, needs)
    use_triton = have_triton and (x2.is_cuda or name in strategies.TRITON_STRATEGIES)
    return name, use_triton


def candidates_for(x2: torch.Tensor, snap: QuantSnapshot) -> Tuple[str, ...]:
    """What the CUDA dispatcher times for this call: dequant + each lorafast strategy (no ``fused`` for fp32,
    whose IEEE dots run on FMA units), and GEMM_4BIT for 16-bit x at M ≤ GEMM_4BIT_MAX_M when its in-loop
    rounding equals the dequant path's (state dtype = x's dtype or fp32)."""
    candidates = ("cublas", "aten") if x2.dtype == torch.float32 else strategies.STRATEGIES
    if x2.dtype != torch.float32 and x2.shape[0] <= GEMM_4BIT_MAX_M and snap.dtype in (x2.dtype, torch.float32):
        candidates = (*candidates, GEMM_4BIT)
    return candidates


def dispatch_strategy(x2: torch.Tensor, call: QLoraCall, scale: torch.Tensor,
                      needs: Tuple[bool, bool, bool, bool]) -> str:
    """The QLoRA strategy :func:`lorafast.dispatch.select` picks (timed once per key, cached) under the key op
    "nf4"/"fp4"; DEFAULT_CUDA when it must not time (compile tracing, graph capture)."""
    weight_like = torch.empty((call.snap.shape[0], 0), device="meta")  # only N is read
    key = dispatch.StrategyKey.for_call(x2, weight_like, call.lora_a, call.dropout_p, *needs, op=call.snap.quant_type)
    return dispatch.select(key, candidates_for(x2, call.snap), _timing_run(x2, call, scale, needs),
                           default=DEFAULT_CUDA)


def _timing_run(x2: torch.Tensor, call: QLoraCall, scale: torch.Tensor,
                needs: Tuple[bool, bool, bool, bool]) -> Callable[[str], Callable[[], dispatch.StepOutputs]]:
    """``make_run`` for the dispatcher: one training step's work of a candidate — dequant, forward, and (when
    gradients are needed) dequant again and backward — outside autograd, on the call's x and 4-bit weight with the
    dispatcher's timing adapters, seed and dY (:func:`lorafast.dispatch.timing_adapters`; the default generator
    is not touched). Each run returns :class:`lorafast.dispatch.StepOutputs` (y, dX, dA, dB, db), which the
    dispatcher compares with the ``aten`` candidate's."""
    shared: dict = {}

    def inputs():
        if not shared:
            shared["adapters"] = dispatch.timing_adapters(call.lora_a, call.lora_b)
            shared["seed"] = dispatch.timing_seed(x2.device, call.dropout_p)
        return shared["adapters"], shared["seed"]

    def make_run(name: str) -> Callable[[], dispatch.StepOutputs]:
        p = call.dropout_p

        def run() -> dispatch.StepOutputs:
            (lora_a, lora_b), seed = inputs()
            with torch.no_grad():
                y, h = strategy_forward(name, x2, call.snap, call.bias, lora_a, lora_b, scale, seed, p, True)
                if not any(needs):
                    return dispatch.StepOutputs(y, None, None, None, None)
                if "dy" not in shared:
                    shared["dy"] = dispatch.timing_grad(y)
                grads = strategy_backward(name, shared["dy"], x2, call.snap, lora_a, lora_b, h, scale, seed, p,
                                          True, needs)
                return dispatch.StepOutputs(y, *grads)

        return run

    return make_run


def qlora_linear(call: QLoraCall, backend: str = "auto") -> torch.Tensor:
    """Run the fused QLoRA op on checked arguments (see :meth:`lorafast.peft.bnb.FusedLoraLinear4bit._fused_call`).

    Returns (*x.shape[:-1], N) in ``call.out_dtype``.
    """
    x = call.x
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    scale = scale_tensor(call.scaling, x2)
    needs = _grad_needs(call)
    strategy, use_triton = choose(backend, call, x2, scale, needs)
    op_scale = getattr(functional, "op_scale", None)  # the scale form the plain path hands this strategy
    scale = op_scale(call.scaling, scale, strategy) if op_scale is not None else scale
    p = call.dropout_p
    seed = _dropout_seed(x2.device) if p > 0.0 else None
    snap = call.snap
    args = (x2, call.bias, call.lora_a, call.lora_b, scale, seed, p, strategy, use_triton, snap, *snap.tensors())
    if any(needs):
        y = QLoraFunction.apply(*args)
    else:  # inference: no graph to record
        y, _ = strategy_forward(strategy, x2, snap, call.bias, call.lora_a, call.lora_b, scale, seed, p, use_triton)
    y = y.reshape(*lead, snap.shape[0])
    return y if y.dtype == call.out_dtype else y.to(call.out_dtype)


__all__ = ["QLoraCall", "QLoraFunction", "QuantSnapshot", "Unsupported", "dequantize", "qlora_linear",
           "read_quant_state"]
