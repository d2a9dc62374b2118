"""The patched PEFT layer's per-call path: its plan is rebuilt on every state change PEFT allows (each test
checks the output, and the gradients, equal PEFT's after the change), and a planned call is sync-free
(no `.item()`-like op, no tensor made per call that could be cached), so CUDA graphs can capture it."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from utils import rel_err

import lorafast
import lorafast.peft.linear as lfpeft
from lorafast.dropout import keep_mask
from lorafast.strategies import aten

IN, OUT, R = 12, 10, 4


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(IN, OUT)

    def forward(self, x):
        return self.lin(x)


def _randomize_lora(model, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)


def _pair(dropout=0.0, **config):
    """(PEFT model, the same model patched by lorafast), LoRA B random so the branch is not zero."""
    torch.manual_seed(0)
    vanilla = get_peft_model(_Tiny(), LoraConfig(r=R, lora_alpha=8, lora_dropout=dropout, target_modules=["lin"],
                                                 **config))
    _randomize_lora(vanilla, 1)
    patched = copy.deepcopy(vanilla)
    assert lorafast.patch(patched, backend="aten") == 1
    return vanilla, patched


def _layer(model):
    return model.base_model.model.lin


pytestmark = pytest.mark.usefixtures("fresh_fallback_log")


def _step(model, x, grad):
    for p in model.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_()
    y = model(x)
    y.backward(grad)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _assert_matches(vanilla, patched, x=None, rtol=1e-6, what=""):
    """One fwd+bwd of each on the same fresh input: output, dX and every parameter gradient agree."""
    x = torch.randn(3, 5, IN, dtype=_layer(vanilla).base_layer.weight.dtype) if x is None else x
    grad = torch.randn(*x.shape[:-1], OUT, dtype=x.dtype)
    y_v, dx_v, grads_v = _step(vanilla, x, grad)
    y_p, dx_p, grads_p = _step(patched, x, grad)
    assert y_p.dtype == y_v.dtype and y_v.abs().sum() > 0, what
    assert rel_err(y_p, y_v) <= rtol, f"{what}: y rel err {rel_err(y_p, y_v):.2e}"
    assert rel_err(dx_p, dx_v) <= rtol, f"{what}: dx"
    assert grads_p.keys() == grads_v.keys(), f"{what}: {sorted(grads_p)} vs {sorted(grads_v)}"
    for name in grads_v:
        assert grads_p[name].dtype == grads_v[name].dtype, f"{what}: {name} dtype"
        assert rel_err(grads_p[name], grads_v[name]) <= rtol, f"{what}: grad {name}"


def _both(vanilla, patched, change):
    change(vanilla)
    change(patched)


def _add_second_adapter(model):
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=5, lora_dropout=0.0, target_modules=["lin"]))
    layer = _layer(model)
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for module in (layer.lora_A["other"], layer.lora_B["other"]):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen))


def test_planned_once_then_reused(monkeypatch, op_calls):
    """A state change rebuilds the plan; steady calls neither re-plan nor re-validate the op's arguments."""
    _, patched = _pair()
    x = torch.randn(4, IN)
    patched(x)
    plans, checks = [], []
    real_plan, real_check = lfpeft.FusedLoraLinear._make_plan, lfpeft.check_lora_linear_args
    monkeypatch.setattr(lfpeft.FusedLoraLinear, "_make_plan", lambda *a: plans.append(1) or real_plan(*a))
    monkeypatch.setattr(lfpeft, "check_lora_linear_args", lambda *a: checks.append(1) or real_check(*a))
    for _ in range(3):
        patched(x).sum().backward()
    assert plans == [] and checks == [] and len(op_calls) == 4
    _layer(patched).lora_dropout["default"].p = 0.0  # a state change, even one with no effect here
    patched(x)
    assert len(plans) == 1


def test_set_adapter(op_calls):
    vanilla, patched = _pair()
    _both(vanilla, patched, _add_second_adapter)
    _assert_matches(vanilla, patched, what="after add_adapter (inactive)")
    _both(vanilla, patched, lambda m: m.set_adapter("other"))
    _assert_matches(vanilla, patched, what="set_adapter('other')")
    _both(vanilla, patched, lambda m: m.base_model.set_adapter(["default", "other"]))
    _assert_matches(vanilla, patched, what="two active adapters")
    assert len(op_calls) == 3


def test_delete_adapter(op_calls):
    vanilla, patched = _pair()
    _both(vanilla, patched, _add_second_adapter)
    _both(vanilla, patched, lambda m: m.set_adapter("other"))
    _assert_matches(vanilla, patched, what="other active")
    _both(vanilla, patched, lambda m: m.delete_adapter("other"))
    _both(vanilla, patched, lambda m: m.set_adapter("default"))
    _assert_matches(vanilla, patched, what="after delete_adapter")
    assert len(op_calls) == 2


def test_merge_unmerge(op_calls):
    vanilla, patched = _pair()
    _assert_matches(vanilla, patched, what="before merge")
    _both(vanilla, patched, lambda m: m.merge_adapter())
    x = torch.randn(2, IN)
    with torch.no_grad():
        assert rel_err(patched(x), vanilla(x)) <= 1e-6, "merged"
    assert len(op_calls) == 1, "a merged layer runs PEFT's forward"
    _both(vanilla, patched, lambda m: m.unmerge_adapter())
    _assert_matches(vanilla, patched, rtol=1e-5, what="after unmerge")  # merge rounding in the base weight
    assert len(op_calls) == 2


def test_disable_enable_adapters(op_calls):
    vanilla, patched = _pair()
    _assert_matches(vanilla, patched, what="enabled")
    x = torch.randn(2, IN)
    with torch.no_grad():
        enabled = vanilla(x)
        with vanilla.disable_adapter(), patched.disable_adapter():
            disabled = patched(x)
            assert torch.equal(disabled, vanilla(x)) and rel_err(disabled, enabled) > 1e-3
    assert len(op_calls) == 1
    _assert_matches(vanilla, patched, what="enabled again")
    assert len(op_calls) == 2


def test_dropout_p_and_train_eval(op_calls):
    """p and train/eval change what the op computes: eval equals PEFT, training with p > 0 drops, p → 0 in
    training equals PEFT again."""
    vanilla, patched = _pair(dropout=0.4)
    vanilla.eval(), patched.eval()
    _assert_matches(vanilla, patched, what="eval")
    x = torch.randn(6, IN)
    patched.train()
    with torch.no_grad():
        assert rel_err(patched(x), vanilla(x)) > 1e-3, "training with p = 0.4 must drop something"
    _both(vanilla, patched, lambda m: m.train())
    _both(vanilla, patched, lambda m: setattr(_layer(m).lora_dropout["default"], "p", 0.0))
    _assert_matches(vanilla, patched, what="train, p = 0")
    _both(vanilla, patched, lambda m: m.eval())
    _both(vanilla, patched, lambda m: setattr(_layer(m).lora_dropout["default"], "p", 0.4))
    _assert_matches(vanilla, patched, what="eval, p = 0.4")
    assert len(op_calls) == 4


def test_dtype_change_with_to(op_calls):
    vanilla, patched = _pair()
    _assert_matches(vanilla, patched, what="fp32")
    _both(vanilla, patched, lambda m: m.to(torch.float64))
    _assert_matches(vanilla, patched, rtol=1e-12, what="fp64 after .to")
    assert len(op_calls) == 2


def test_requires_grad_flip(op_calls):
    vanilla, patched = _pair()
    _both(vanilla, patched, lambda m: _layer(m).lora_A["default"].weight.requires_grad_(False))
    _assert_matches(vanilla, patched, what="lora_A frozen")
    _both(vanilla, patched, lambda m: _layer(m).base_layer.bias.requires_grad_(True))
    _assert_matches(vanilla, patched, what="base bias trainable")
    assert len(op_calls) == 2


def test_parameter_replacement_and_inplace_hotswap(op_calls):
    vanilla, patched = _pair()
    _assert_matches(vanilla, patched, what="before")
    new_a = torch.randn(R, IN)
    _both(vanilla, patched, lambda m: setattr(_layer(m).lora_A["default"], "weight", nn.Parameter(new_a.clone())))
    _assert_matches(vanilla, patched, what="lora_A replaced")
    new_b = torch.randn(OUT, R)
    _both(vanilla, patched, lambda m: _layer(m).lora_B["default"].weight.data.copy_(new_b))
    _assert_matches(vanilla, patched, what="lora_B updated in place")
    new_w = torch.randn(OUT, IN)
    _both(vanilla, patched, lambda m: setattr(_layer(m).base_layer, "weight", nn.Parameter(new_w, False)))
    _assert_matches(vanilla, patched, what="base weight replaced")
    assert len(op_calls) == 4


def test_scale_changes(op_calls):
    vanilla, patched = _pair()
    _both(vanilla, patched, lambda m: _layer(m).set_scale("default", 3.0))
    _assert_matches(vanilla, patched, what="set_scale")
    _both(vanilla, patched, lambda m: _layer(m).scale_layer(0.5))
    _assert_matches(vanilla, patched, what="scale_layer")
    # PEFT's hotswap keeps a 0-dim tensor scale and changes its value in place.
    _both(vanilla, patched, lambda m: _layer(m).scaling.__setitem__("default", torch.tensor(1.25)))
    _assert_matches(vanilla, patched, what="tensor scale")
    _both(vanilla, patched, lambda m: _layer(m).scaling["default"].fill_(-0.75))
    _assert_matches(vanilla, patched, what="tensor scale changed in place")
    assert len(op_calls) == 4


def test_hook_added_later(op_calls):
    vanilla, patched = _pair()
    _assert_matches(vanilla, patched, what="no hooks")

    def double(module, args, output):
        return output * 2

    handles = [_layer(m).lora_A["default"].register_forward_hook(double) for m in (vanilla, patched)]
    with pytest.warns(UserWarning, match="module hooks"):
        _assert_matches(vanilla, patched, what="hook on lora_A")
    assert len(op_calls) == 1, "a hooked module runs PEFT's forward, hooks included"
    for handle in handles:
        handle.remove()
    _assert_matches(vanilla, patched, what="hook removed")
    assert len(op_calls) == 2


@pytest.mark.parametrize("where", ["base_layer", "lora_B", "lora_dropout", "pre_hook", "forward", "global"])
def test_other_hooks_added_later(where, op_calls, fresh_fallback_log):
    """Every kind of hook the fused call would bypass, added after the layer planned, sends it to PEFT's
    forward (hook included); removing it brings the fused call back."""
    vanilla, patched = _pair(dropout=0.0)
    _assert_matches(vanilla, patched, what="no hooks")

    def double(module, args, output):
        return output * 2

    def add(model):
        layer = _layer(model)
        if where == "global":
            return torch.nn.modules.module.register_module_forward_hook(double)
        if where == "pre_hook":
            return layer.base_layer.register_forward_pre_hook(lambda module, args: (args[0] * 2,))
        if where == "forward":
            module, original = layer.lora_B["default"], type(layer.lora_B["default"]).forward
            module.forward = lambda t: original(module, t) * 2

            class Remove:
                def remove(self):
                    del module.forward

            return Remove()
        module = layer.base_layer if where == "base_layer" else getattr(layer, where)["default"]
        return module.register_forward_hook(double)

    if where == "global":  # one hook for both models
        handles = [add(patched)]
    else:
        handles = [add(m) for m in (vanilla, patched)]
    with pytest.warns(UserWarning, match="module hooks"):
        _assert_matches(vanilla, patched, what=f"hook on {where}")
    assert len(op_calls) == 1
    for handle in handles:
        handle.remove()
    _assert_matches(vanilla, patched, what="hook removed")
    assert len(op_calls) == 2


def test_autocast_on_off(op_calls):
    vanilla, patched = _pair()
    _assert_matches(vanilla, patched, what="autocast off")
    x = torch.randn(3, 5, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_v, y_p = vanilla(x), patched(x)
    assert y_p.dtype == y_v.dtype == torch.bfloat16
    assert rel_err(y_p, y_v) <= 2e-2
    _assert_matches(vanilla, patched, what="autocast off again")
    assert len(op_calls) == 3


def test_wrong_input_width_is_one_clear_error():
    _, patched = _pair()
    patched(torch.randn(2, IN))
    with pytest.raises(ValueError, match="x.shape\\[-1\\]"):
        patched(torch.randn(2, IN + 1))


def test_repr_reads_as_peft():
    vanilla, patched = _pair()
    assert repr(patched) == repr(vanilla)
    assert repr(_layer(patched)).startswith("lora.Linear(")


# Ops that read a device value on the host (a sync on CUDA) or make a host tensor.
_SYNCING = {"_local_scalar_dense", "item", "is_nonzero", "equal", "allclose"}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in ("_to_copy", "copy_") and kwargs and "device" in kwargs:
            self.ops.append(f"to device {kwargs['device']}")
        return out


@pytest.fixture
def cuda_mask_on_cpu(monkeypatch):
    """The aten strategy's CPU mask (a generator seeded by `.item()`) is the one CPU-only branch: run the
    hash mask it uses on CUDA instead, so the recorded path is the CUDA one."""
    monkeypatch.setattr(aten, "dropout_keep_mask", lambda seed, M, K, p, dtype: keep_mask(seed, M, K, p).to(dtype))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_planned_call_has_no_host_sync(dropout, cuda_mask_on_cpu):
    """After a warm-up, fwd+bwd of a patched layer runs no host-syncing op; at p = 0 it makes no seed and no
    scale tensor (nothing allocated per call beyond the op's own outputs)."""
    _, patched = _pair(dropout=dropout)
    x = torch.randn(3, 5, IN, requires_grad=True)
    patched(x).sum().backward()
    with _Recorder() as rec:
        y = patched(x)
        y.backward(torch.ones_like(y))
    assert rec.ops, "nothing recorded"
    assert not _SYNCING.intersection(rec.ops), rec.ops
    assert not any(op.startswith("to device") for op in rec.ops), rec.ops
    if dropout == 0.0:
        assert not {"randint", "full", "scalar_tensor", "zeros", "lift_fresh"}.intersection(rec.ops), rec.ops


def test_fused_path_with_launches_stubbed_has_no_host_sync(monkeypatch):
    """The Triton strategy's ATen side (allocations, seed) is sync-free too (launches stubbed: numbers are
    garbage here, only the op stream is checked)."""
    pytest.importorskip("triton")
    from lorafast.kernels import configs, lora_bwd, lora_fwd

    launches = []
    for module in (configs, lora_fwd, lora_bwd):
        monkeypatch.setattr(module, "launch", lambda *a, **k: launches.append(1))
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoraConfig(r=R, lora_alpha=8, lora_dropout=0.1, target_modules=["lin"]))
    lorafast.patch(model, backend="fused")
    x = torch.randn(7, IN, requires_grad=True)
    model(x).sum().backward()
    with _Recorder() as rec:
        y = model(x)
        y.backward(torch.ones_like(y))
    assert launches and not _SYNCING.intersection(rec.ops), rec.ops


@pytest.mark.parametrize("M, fills", [(7, 2), (40, 3)])
def test_fused_fwd_bwd_zero_fills(monkeypatch, M, fills):
    """Per fwd+bwd the Triton strategy zero-fills the buffers its atomics sum into: H in the forward, and in the
    backward one storage shared by dA/dB/db and dH — while dH (M×r) is no larger than those gradients (M = 7 here:
    two fills in all); at larger M dH gets a fill of its own (three). Five kernel launches; the parameter
    gradients it returns share the one storage."""
    pytest.importorskip("triton")
    from lorafast.kernels import configs, lora_bwd, lora_fwd

    launches = []
    for module in (configs, lora_fwd, lora_bwd):
        monkeypatch.setattr(module, "launch", lambda *a, **k: launches.append(1))
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoraConfig(r=R, lora_alpha=8, target_modules=["lin"], lora_bias=True))
    lorafast.patch(model, backend="fused")
    layer = _layer(model)
    x = torch.randn(M, IN, requires_grad=True)
    model(x).sum().backward()
    launches.clear()
    params = [layer.lora_A["default"].weight, layer.lora_B["default"].weight]
    with _Recorder() as rec:
        y = model(x)
        grads = torch.autograd.grad(y, [x, *params], torch.ones_like(y))
    assert len(launches) == 5
    assert rec.ops.count("zeros") == fills, rec.ops
    assert grads[1].untyped_storage().data_ptr() == grads[2].untyped_storage().data_ptr()
