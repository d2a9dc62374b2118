"""PEFT's LoRA ``Linear`` (``peft.tuners.lora.layer.Linear``) over ``nn.Linear`` or GPT-2's ``Conv1D`` on the fused op.

:class:`FusedLoraLinear` is a subclass that overrides only ``forward`` (and the name it prints as);
:func:`lorafast.peft.patch` sets a layer's ``__class__`` to it. Parameters, buffers, submodules, state_dict
keys, saved adapter files and merge/unload behaviour are PEFT's own. Whatever the fused op does not cover
falls back to PEFT's ``forward`` (``super().forward``), so results always match PEFT.

Each layer plans once per module state (which path, dropout p, autocast casts, validated arguments) and
re-plans when a fingerprint of that state changes (set_adapter, add/delete, merge, enable/disable,
dropout p, train/eval, ``.to()``, parameter replacement, hooks, autocast, scales); tensors are read from
the modules on every call, so in-place updates are always seen.

Fused (one ``lora_linear`` call): one or several active vanilla-LoRA adapters (several are concatenated
along r with each adapter's scale folded into its B slice), rsLoRA, scaling as float or 0-dim tensor
(hotswap), ``lora_dropout`` (p read from the adapter's ``nn.Dropout``), bias "none"/"all"/"lora_only"
(the base bias gets its gradient from the op), ``lora_bias`` (``s·b_B`` folded into the op's bias
vector, N-sized, no extra M×N pass), fp32 adapters on a bf16/fp16 base, ``torch.autocast``; a ``Conv1D`` base
(``fan_in_fan_out``: W read through ``weight.t()``, a strided view, never copied). A LoRA variant's adapter (DoRA)
runs the op its registered :class:`lorafast.peft.core.VariantSupport` gives, on the same plan (this module imports
no sibling: :mod:`lorafast.peft.patching` registers the variants in the core).

Falls back to PEFT, quietly (PEFT's forward is already just the base layer, or is per-sample):
adapters disabled, adapters merged, ``adapter_names`` mixed batches, no active adapter on the layer,
meta-device inputs.

Falls back to PEFT with a one-time warning per reason (and one INFO log line per layer and reason):
LoRA variants without a registered support (aLoRA, Arrow, VeLoRA, ...) and a variant adapter among several active
ones, base layer not exactly ``nn.Linear`` or ``Conv1D`` (quantized, nested tuners) or a ``fan_in_fan_out`` flag
that does not match it, hooks on the base/LoRA/dropout (or the variant's) modules or global module hooks
(DeepSpeed ZeRO-3, accelerate offload, activation capture), extra forward arguments, float64 under
autocast, mismatched dtypes/devices, a non-``nn.Dropout`` dropout module, dropout p = 1, several
active adapters with dropout active (PEFT draws an independent mask per adapter) or with different
adapter dtypes, adapters narrower than the input outside autocast (e.g. bf16 adapters on fp32).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Union

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorafast import functional
from lorafast.functional import autocast_inputs, lora_linear, op_scale, scale_tensor
from lorafast.peft.core import (
    BACKEND_ATTR,
    PLAN_ATTR,
    Fallback,
    adapter_names,
    adapter_parts,
    call_fallback,
    fold_lora_bias,
    has_global_hooks,
    has_hooks,
    hook_dicts,
    hooked,
    report_fallback,
    tensor_meta,
    tensor_meta_c,
    variant_support,
)
from lorafast.validation import check_lora_linear_args

# Autocast casts these (not float64) to its dtype for linear layers.
_AUTOCAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class _Plan(NamedTuple):
    """What a layer's forward does for one module state (see ``FusedLoraLinear._plan_key``): fall back,
    or run the op on tensors read from the held modules per call (never a cached derived tensor)."""

    key: tuple  # the state it was made for
    fallback: Optional[Fallback]
    names: tuple = ()  # active adapters present on this layer
    dropout_p: float = 0.0
    autocast_device: Optional[str] = None  # device type whose autocast the op runs under (then turned off)
    adapter_dtype: Optional[torch.dtype] = None  # cast the adapters to this first (PEFT's autocast rule)
    lora_bias: bool = False  # some lora_B has a bias: fold s·b_B into the op's bias vector
    in_features: int = 0
    # One adapter: (base weight, base bias, lora_A weight, lora_B weight, scaling) — the Parameter objects
    # (and the float or 0-dim scale) the key's ids name, so reading them here is reading the modules: the key
    # changed if any was replaced, and the plan's reference keeps a freed id from being reused meanwhile.
    # Parameters, not derived tensors: in-place updates and `.data` swaps are seen.
    tensors: tuple = ()
    # Set by FusedLoraLinear._with_hook_state: the hook dicts and __dict__s of the modules the fused call
    # bypasses, and whether any hook (or a global one) was present when planned.
    hook_dicts: tuple = ()
    module_dicts: tuple = ()
    hooked: bool = False
    # A LoRA variant's op (core.VariantSupport.linear_op, e.g. DoRA's with its magnitude bound), called as
    # ``op(x, weight, bias, lora_a, lora_b, scaling, dropout_p, *, backend)``; None: fused_forward.
    op: Optional[Callable] = None
    # GPT-2's Conv1D stores W as (K, N): the op reads ``weight.t()``, a strided view made per call (never a copy).
    fan_in_fan_out: bool = False


class FusedLoraLinear(PeftLoraLinear):
    """PEFT ``lora.Linear`` whose forward runs the fused op when it can.

    Never constructed directly: :func:`patch` (or the :func:`register` dispatcher) sets a PEFT layer's
    ``__class__`` to this. Shapes as PEFT: x (..., in_features) → (..., out_features), output in the
    base layer's result dtype (x's dtype, or the autocast dtype under ``torch.autocast``).

    The checks PEFT's state needs (adapters, variants, hooks, dtypes, devices, dropout, autocast) run once
    per state, not per call: the layer keeps a plan keyed by a cheap fingerprint of everything they read
    (module and parameter identities, dtypes, devices, shapes, dropout p and mode, scales, hook presence,
    autocast state, x's dtype and device), rebuilt whenever the fingerprint changes. Tensors are read from
    the modules on every call, so in-place weight updates and hotswaps are always seen.
    """

    def _get_name(self) -> str:
        # print(model) and PEFT's get_layer_status read the class name: keep PEFT's "lora.Linear(...)".
        return PeftLoraLinear.__name__

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            fallback = call_fallback(args, kwargs)
            if fallback is not None:
                report_fallback(self, fallback)
                return super().forward(x, *args, **kwargs)
        key = self._plan_key(x)
        plan = self.__dict__.get(PLAN_ATTR)
        # Equal keys mean the same module objects, so the plan's held hook dicts are theirs: a hook added or
        # removed since planning changes what this reads (one C-level any() over them, not attribute walks).
        if plan is None or plan.key != key or hooked(plan.hook_dicts, plan.module_dicts) is not plan.hooked:
            plan = self._with_hook_state(self._make_plan(x, key))
            self.__dict__[PLAN_ATTR] = plan
        if plan.fallback is not None:
            report_fallback(self, plan.fallback)
            return super().forward(x, *args, **kwargs)
        return self._run_plan(plan, x)

    def _with_hook_state(self, plan: _Plan) -> _Plan:
        """``plan`` with the hook dicts and ``__dict__``s of the modules a fused call bypasses (base layer and
        each active adapter's lora_A, lora_B, dropout), and whether any hook was present when planned."""
        modules = self._modules
        held = [modules["base_layer"]]
        lora_A, lora_B, dropouts = (modules[n]._modules for n in ("lora_A", "lora_B", "lora_dropout"))
        variants = self.lora_variant
        for name in adapter_names(self._active_adapter):
            if name in lora_A:
                held += (lora_A[name], lora_B[name], dropouts[name])
                support = variant_support(variants.get(name))
                if support is not None:
                    held += support.held_modules(self, name)
        plan = plan._replace(
            hook_dicts=tuple(d for m in held for d in hook_dicts(m)), module_dicts=tuple(m.__dict__ for m in held)
        )
        return plan._replace(hooked=hooked(plan.hook_dicts, plan.module_dicts))

    def _plan_key(self, x: torch.Tensor) -> tuple:
        """Everything :meth:`_make_plan` reads, cheaply (µs): the plan is valid while this stays equal.

        A replaced module or parameter gives a new ``id`` (and should a new object reuse a freed one's
        address, the plan's decision still holds: types, dtypes, devices and shapes are in the key too, and
        tensors are read per call). requires_grad is not part of it (the op reads it per call).
        Written for the interpreter: every item costs bytecode on every call (measured in a fwd+bwd loop,
        cold caches, the key was ~14 µs of a 115 µs step), so attribute tuples come from one C-level
        ``attrgetter`` (eager), and hooks are not in it: ``forward`` checks the plan's held hook dicts.
        """
        d = self.__dict__
        meta = tensor_meta if torch.compiler.is_compiling() else tensor_meta_c
        modules = d["_modules"]
        base = modules["base_layer"]
        names = adapter_names(d["_active_adapter"])
        device = x.device
        autocast = device.type != "meta" and torch.is_autocast_enabled(device.type)
        params = base._parameters
        w = params.get("weight")
        lora_A, lora_B = modules["lora_A"]._modules, modules["lora_B"]._modules
        dropouts, variants, scaling = modules["lora_dropout"]._modules, d["lora_variant"], d["scaling"]
        key = [
            d["_disable_adapters"], bool(d["merged_adapters"]), names, d["fan_in_fan_out"],
            d["cast_input_dtype_enabled"], x.dtype, device, autocast,
            torch.get_autocast_dtype(device.type) if autocast else None,
            type(base), id(base), id(w), id(params.get("bias")), None if w is None else meta(w),
        ]
        for name in names:
            a_module = lora_A.get(name)
            if a_module is None:
                key += (name, None)
                continue
            b_module, dropout = lora_B[name], dropouts[name]
            s = scaling[name]
            a_params, b_params = a_module._parameters, b_module._parameters
            a_w, b_w = a_params.get("weight"), b_params.get("weight")
            key += (
                name, id(variants.get(name)), type(a_module), type(b_module), type(dropout),
                id(a_module), id(b_module), id(dropout),
                # __dict__, not getattr: nn.Identity has no p, and a failed module getattr costs µs.
                dropout.training, dropout.__dict__.get("p"), s if type(s) is float else id(s),
                id(a_w), id(b_w), id(a_params.get("bias")), id(b_params.get("bias")),
                None if a_w is None else meta(a_w), None if b_w is None else meta(b_w),
            )
            variant = variants.get(name)
            if variant is not None:  # a LoRA variant (DoRA): what its op reads, e.g. the magnitude parameter
                support = variant_support(variant)
                if support is not None:
                    key += support.plan_key(self, name)
        return tuple(key)

    def _make_plan(self, x: torch.Tensor, key: tuple) -> _Plan:
        """The plan for this state: PEFT's forward (and why) or the fused op's recipe; validates once what
        stays fixed while ``key`` does (PEFT's own checks, dtypes, devices, the op's shape rules)."""

        def fallback(reason: str, detail: str = "") -> _Plan:
            return _Plan(key, Fallback(reason, detail))

        if self.disable_adapters:
            return fallback("adapters disabled")
        if self.merged:
            return fallback("adapters merged")
        modules = self._modules
        parts = adapter_parts(self)
        if isinstance(parts, Fallback):
            return _Plan(key, parts)
        active, lora_a, lora_b, lora_biases, scalings, dropout_ps, variant = parts
        base = modules["base_layer"]
        # PEFT forces fan_in_fan_out on for a Conv1D base (W stored (K, N), y = addmm(b, x, W)) and off for
        # nn.Linear; either pairing is F.linear(x, W_nk, b) with W_nk the (N, K) weight or a transposed view.
        fan_in_fan_out = bool(self.fan_in_fan_out)
        if (type(base), fan_in_fan_out) not in ((nn.Linear, False), (Conv1D, True)):
            if type(base) not in (nn.Linear, Conv1D):
                return fallback("base layer is not a plain nn.Linear or transformers Conv1D", type(base).__name__)
            return fallback("fan_in_fan_out does not match the base layer", f"{type(base).__name__}, "
                            f"fan_in_fan_out={fan_in_fan_out}")
        if has_global_hooks() or has_hooks(base):
            return fallback("module hooks or a replaced forward")

        device_type = x.device.type
        if device_type == "meta":  # shape-only runs; torch has no autocast state for meta
            return fallback("meta tensors")
        autocast = torch.is_autocast_enabled(device_type)
        weight, bias = base.weight, base.bias
        weight_nk = weight.t() if fan_in_fan_out else weight
        if not x.is_floating_point():
            return fallback("input is not floating point", f"{x.dtype}")
        if autocast and (x.dtype not in _AUTOCAST_DTYPES or weight.dtype not in _AUTOCAST_DTYPES):
            return fallback("float64 under autocast", f"x {x.dtype}, weight {weight.dtype}")
        compute_dtype = torch.get_autocast_dtype(device_type) if autocast else x.dtype
        if not autocast and weight.dtype != x.dtype:
            return fallback("input dtype differs from the base weight dtype", f"{x.dtype} vs {weight.dtype}")
        device = weight.device
        if x.device != device or any(t.device != device for t in (*lora_a, *lora_b)):
            return fallback("input, base weight and adapters not all on one device")
        lora_dtype = lora_a[0].dtype
        if any(t.dtype != lora_dtype for t in (*lora_a, *lora_b)):
            return fallback("adapters differ in dtype")
        adapter_dtype = None
        if lora_dtype != compute_dtype and lora_dtype != torch.float32:
            if not autocast:
                # PEFT would run the LoRA branch in a narrower dtype than the input; the op only widens.
                return fallback("adapter dtype is neither the input dtype nor float32", f"{lora_dtype}")
            adapter_dtype = compute_dtype
        if not autocast and lora_dtype != x.dtype and not self.cast_input_dtype_enabled:
            return fallback("input dtype casting disabled and adapter dtype differs")
        # The op's own argument rules, once per state (per call only x's last dim can still change).
        check_lora_linear_args(
            x.to(compute_dtype) if autocast else x,
            weight_nk.to(compute_dtype) if autocast else weight_nk,
            None if bias is None else (bias.to(compute_dtype) if autocast else bias),
            torch.cat(lora_a, dim=0), torch.cat(lora_b, dim=1), 1.0, dropout_ps[0],
            getattr(self, BACKEND_ATTR, "auto"),
        )
        op = None  # fused_forward (looked up per call)
        if variant is not None:  # the only active adapter is a LoRA variant's (core.adapter_parts)
            op = variant.linear_op(self, active[0], weight_nk)
            if isinstance(op, Fallback):
                return _Plan(key, op)
        tensors = (weight, bias, lora_a[0], lora_b[0], scalings[0]) if len(active) == 1 else ()
        return _Plan(
            key, None, tuple(active), dropout_ps[0], device_type if autocast else None, adapter_dtype,
            any(b is not None for b in lora_biases), weight_nk.shape[1], tensors, op=op,
            fan_in_fan_out=fan_in_fan_out,
        )

    def _run_plan(self, plan: _Plan, x: torch.Tensor) -> torch.Tensor:
        """The fused call on this input: the held modules' current tensors, as PEFT's forward reads them."""
        backend = self.__dict__.get(BACKEND_ATTR, "auto")
        if plan.tensors and plan.autocast_device is None and not plan.lora_bias:  # the common case
            weight, bias, lora_a, lora_b, scaling = plan.tensors
            if plan.fan_in_fan_out:
                weight = weight.t()
            op = plan.op or fused_forward
            return op(x, weight, bias, lora_a, lora_b, scaling, plan.dropout_p, backend=backend)
        modules = self._modules
        lora_A, lora_B = modules["lora_A"]._modules, modules["lora_B"]._modules
        names = plan.names
        if plan.tensors:
            weight, bias, lora_a, lora_b, scaling = plan.tensors
            if plan.adapter_dtype is not None:
                lora_a, lora_b = lora_a.to(plan.adapter_dtype), lora_b.to(plan.adapter_dtype)
        else:
            base_params = modules["base_layer"]._parameters
            weight, bias = base_params["weight"], base_params["bias"]
            lora_as = [lora_A[n]._parameters["weight"] for n in names]
            lora_bs = [lora_B[n]._parameters["weight"] for n in names]
            if plan.adapter_dtype is not None:
                lora_as = [t.to(plan.adapter_dtype) for t in lora_as]
                lora_bs = [t.to(plan.adapter_dtype) for t in lora_bs]
            # Sum over adapters of s_i·B_i·A_i = [s_1·B_1 | s_2·B_2 | ...]·[A_1; A_2; ...]: one rank-Σr call.
            lora_a = torch.cat(lora_as, dim=0)
            lora_b = torch.cat([b * self.scaling[n] for b, n in zip(lora_bs, names)], dim=1)
            scaling = 1.0
        if plan.fan_in_fan_out:
            weight = weight.t()
        if plan.autocast_device is not None:
            x, weight, bias = autocast_inputs(x, weight, bias)
        if plan.lora_bias:
            bias = fold_lora_bias(
                bias, [lora_B[n]._parameters["bias"] for n in names], [self.scaling[n] for n in names], x.dtype
            )
        op = plan.op or fused_forward
        if plan.autocast_device is None:
            return op(x, weight, bias, lora_a, lora_b, scaling, plan.dropout_p, backend=backend)
        with torch.autocast(plan.autocast_device, enabled=False):
            return op(x, weight, bias, lora_a, lora_b, scaling, plan.dropout_p, backend=backend)


def fused_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scaling: Union[float, torch.Tensor],
    dropout_p: float,
    *,
    backend: str,
) -> torch.Tensor:
    """The op for a planned call: what :func:`lorafast.lora_linear` does, less the checks the plan made once.

    x (..., K) in weight's dtype on its device (validated by the plan; only K is checked here); the other
    tensors as :func:`lorafast.lora_linear`; ``dropout_p`` the probability in effect (0 in eval). Returns
    (..., N) in x's dtype. One module-level name, so tests can count the fused calls.
    """
    K = weight.shape[1]
    if x.shape[-1] != K or x.dim() == 0:
        check_lora_linear_args(x, weight, bias, lora_a, lora_b, scaling, dropout_p, backend)  # raises
    x2 = x if x.dim() == 2 else x.reshape(-1, K)
    if x2.shape[0] == 0:
        return lora_linear(x, weight, bias, lora_a, lora_b, scaling, dropout_p, dropout_p > 0.0, backend)
    # The 0-dim scale tensor is for the Triton kernels (and the CUDA auto-tuner's timing runs); a float
    # scale on the CPU aten strategy needs none.
    float_on_cpu = type(scaling) is float and not x2.is_cuda
    scale = None if float_on_cpu else scale_tensor(scaling, x2)
    strategy = functional.choose_strategy(backend, x2, weight, bias, lora_a, lora_b, scale, dropout_p)
    if scale is None:
        scale = scaling if strategy == "aten" else scale_tensor(scaling, x2)
    else:
        scale = op_scale(scaling, scale, strategy)
    return functional.run(x2, x.shape[:-1], weight, bias, lora_a, lora_b, scale, dropout_p, strategy)
