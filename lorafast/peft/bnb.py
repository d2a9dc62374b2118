"""bitsandbytes' 4-bit LoRA layer (``peft.tuners.lora.bnb.Linear4bit``) on the fused QLoRA op
(:func:`lorafast.qlora.qlora_linear`), or, for a DoRA adapter, the op its registered LoRA-variant support gives
(:class:`lorafast.peft.core.VariantSupport`: :func:`lorafast.dora.quant.qdora_linear`).

:class:`FusedLoraLinear4bit` overrides only ``forward`` of PEFT's class. Numerics follow bitsandbytes'
``Linear4bit.forward``: x is cast to the layer's compute dtype (set from the first input as bitsandbytes does),
the bias too, and the result is cast back to x's dtype. The LoRA branch runs in the compute dtype, with fp32
adapters read as fp32 (PEFT runs it in the adapter dtype: the same within the compute dtype's tolerance).

Falls back to PEFT's forward (``super().forward``), quietly: inference (grad disabled: bitsandbytes' 4-bit
inference kernels win there), disabled/merged adapters, ``adapter_names``, no active adapter, empty or meta
inputs. With one warning per reason: LoRA variants other than DoRA (and DoRA among several active adapters),
hooks, extra forward arguments, ``torch.autocast``, several active adapters with dropout, mismatched
dtypes/devices, dropout p = 1, a base layer that is not exactly ``bnb.nn.Linear4bit``, and a quant state that is
missing or inconsistent.

Importing this module raises ImportError when bitsandbytes (or PEFT's bnb layers) is missing.
"""

from __future__ import annotations

from typing import Any, Callable, Tuple, Union

import bitsandbytes as bnb
import torch
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit

from lorafast.peft.core import (
    BACKEND_ATTR,
    Fallback,
    adapter_parts,
    call_fallback,
    fold_lora_bias,
    has_global_hooks,
    has_hooks,
    report_fallback,
)
from lorafast.qlora import COMPUTE_DTYPES, QLoraCall, Unsupported, qlora_linear, read_quant_state


class FusedLoraLinear4bit(PeftLinear4bit):
    """PEFT's bnb ``Linear4bit`` LoRA layer whose forward runs the fused QLoRA op when it can.

    Never constructed directly: ``lorafast.patch`` sets a PEFT layer's ``__class__`` to this. Shapes as PEFT:
    x (..., in_features) → (..., out_features) in x's dtype.
    """

    def _get_name(self) -> str:
        # repr / print(model) read exactly as PEFT's class.
        return "Linear4bit"

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not torch.is_grad_enabled():
            # Inference (no_grad / inference_mode): nothing to fuse in backward, and bitsandbytes' own 4-bit
            # inference kernels beat dequantizing all of W per call (bench --quant nf4, 2-core CPU, eval fwd:
            # the fused path took 3.9x PEFT's time at 256x768->768 and 6.5x at 64x2048->2048). Quietly PEFT's.
            return super().forward(x, *args, **kwargs)
        planned = self._fused_plan(x, args, kwargs)
        if isinstance(planned, Fallback):
            report_fallback(self, planned)
            return super().forward(x, *args, **kwargs)
        op, call = planned
        return op(call, getattr(self, BACKEND_ATTR, "auto"))

    def _fused_call(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Union[Fallback, QLoraCall]:
        """The fused op's arguments, equivalent to PEFT's forward on this input, or why there are none."""
        planned = self._fused_plan(x, args, kwargs)
        return planned if isinstance(planned, Fallback) else planned[1]

    def _fused_plan(self, x: torch.Tensor, args: tuple, kwargs: dict) -> Union[Fallback, Tuple[Callable, QLoraCall]]:
        """(the op, its arguments) for this input, or why there are none. The op is
        :func:`lorafast.qlora.qlora_linear`, or a LoRA variant's (DoRA: core.VariantSupport.quant_op)."""
        if self.disable_adapters:
            return Fallback("adapters disabled")
        if args or kwargs:
            extra = call_fallback(args, kwargs)
            if extra is not None:
                return extra
        if self.merged:
            return Fallback("adapters merged")
        parts = adapter_parts(self)
        if isinstance(parts, Fallback):
            return parts
        active, lora_a, lora_b, lora_biases, scalings, dropout_ps, variant = parts
        base = self._modules["base_layer"]
        if type(base) is not bnb.nn.Linear4bit:
            return Fallback("base layer is not exactly bnb.nn.Linear4bit", type(base).__name__)
        if has_global_hooks() or has_hooks(base):
            return Fallback("module hooks or a replaced forward")

        device_type = x.device.type
        if device_type == "meta":
            return Fallback("meta tensors")
        if x.numel() == 0:
            return Fallback("empty input")
        if not x.is_floating_point() or x.dtype not in COMPUTE_DTYPES:
            return Fallback("input is not fp16/bf16/fp32", f"{x.dtype}")
        if torch.is_autocast_enabled(device_type):
            return Fallback("torch.autocast on a 4-bit base layer")
        snap = read_quant_state(base)
        if isinstance(snap, Unsupported):
            return Fallback(*snap)
        if x.shape[-1] != snap.shape[1]:
            return Fallback("input features differ from the layer", f"{x.shape[-1]} vs {snap.shape[1]}")
        device = snap.packed.device
        if x.device != device or any(t.device != device for t in (*lora_a, *lora_b, *snap.tensors())):
            return Fallback("input, 4-bit weight and adapters not all on one device")
        if not base.compute_type_is_set:  # what bitsandbytes' forward does on its first call
            base.set_compute_type(x)
            base.compute_type_is_set = True
        compute_dtype = base.compute_dtype or x.dtype
        if compute_dtype not in COMPUTE_DTYPES:
            return Fallback("compute dtype is not fp16/bf16/fp32", str(compute_dtype))
        lora_dtype = lora_a[0].dtype
        if any(t.dtype != lora_dtype for t in (*lora_a, *lora_b)):
            return Fallback("adapters differ in dtype")
        if lora_dtype not in (compute_dtype, torch.float32):
            return Fallback("adapter dtype is neither the compute dtype nor float32", f"{lora_dtype}")
        bias = base.bias
        if bias is not None and bias.dtype != compute_dtype:
            # bitsandbytes' forward converts the stored bias to the compute dtype (in place, once): do the same
            # so the layer's state after a call is the one PEFT leaves.
            bias.data = bias.data.to(compute_dtype)
        bias = fold_lora_bias(bias, lora_biases, scalings, compute_dtype)
        if len(active) == 1:
            lora_a_cat, lora_b_cat, scaling = lora_a[0], lora_b[0], scalings[0]
        else:
            lora_a_cat = torch.cat(lora_a, dim=0)
            lora_b_cat = torch.cat([b * s for b, s in zip(lora_b, scalings)], dim=1)
            scaling = 1.0
        op = qlora_linear
        if variant is not None:  # the only active adapter is a LoRA variant's (core.adapter_parts)
            op = variant.quant_op(self, active[0])
            if isinstance(op, Fallback):
                return op
        return op, QLoraCall(x.to(compute_dtype), x.dtype, bias, lora_a_cat, lora_b_cat, scaling, dropout_ps[0], snap)


FUSED_CLASSES = {PeftLinear4bit: FusedLoraLinear4bit}
