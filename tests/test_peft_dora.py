"""lorafast.patch on PEFT DoRA models (``use_dora=True``) and GPT-2 ``Conv1D`` (``fan_in_fan_out``) layers: the same
logits and gradients (magnitude included) as PEFT's own DoRA layers on tiny random BERT, Llama and GPT-2 models in
train mode, the fused op really running (calls counted), dropout with the op's mask replayed, save then load in
vanilla PEFT, merge_and_unload, torch.compile fullgraph, activation checkpointing, 4-bit DoRA, fallbacks."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from utils import assert_close, rel_err

import lorafast
import lorafast.peft.dora as peft_dora
from lorafast import functional, reference
from lorafast.dora import norm as dora_norm
from lorafast.strategies import aten

VOCAB = 61
RTOL = 1e-10  # float64 models: fused and PEFT agree to rounding
pytestmark = pytest.mark.usefixtures("fresh_fallback_log")


@pytest.fixture
def dora_calls(monkeypatch):
    """Counts the fused DoRA op's calls (a patched layer binds it when it plans, after this fixture)."""
    calls = []
    real = peft_dora.fused_dora_forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(peft_dora, "fused_dora_forward", counting)
    return calls


def _bert():
    return BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=48,
        max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3,
        initializer_range=0.2))


def _llama():
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, initializer_range=0.2))


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, initializer_range=0.2))


# arch -> (factory, target modules, task type, layers targeted)
ARCHS = {
    "bert": (_bert, ["query", "value", "dense"], "SEQ_CLS", 6),  # 3 dense + the pooler
    "llama": (_llama, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], "CAUSAL_LM", 5),
    "gpt2": (_gpt2, ["c_attn", "c_proj", "c_fc"], "CAUSAL_LM", 4),  # Conv1D layers (fan_in_fan_out); 2 c_proj
}


def randomize(model: nn.Module, seed: int) -> None:
    """Random A, B and a magnitude off PEFT's init (m = ‖W + s·B·A‖ there, so g = 1 and g − 1 would hide)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=gen, dtype=param.dtype))
            elif "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def build(arch="bert", dtype=torch.float64, use_dora=True, **lora_kwargs):
    factory, targets, task, _ = ARCHS[arch]
    torch.manual_seed(0)
    base = factory().to(dtype)
    options = {"r": 4, "lora_alpha": 8, "target_modules": targets, "task_type": task, "use_dora": use_dora,
               **lora_kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: fan_in_fan_out set to True for Conv1D
        model = get_peft_model(base, LoraConfig(**options))
    randomize(model, 1)
    return model


def patched(vanilla, backend="aten"):
    fused = copy.deepcopy(vanilla)
    assert lorafast.patch(fused, backend=backend) > 0
    return fused


def batch(seed=0, n=2, seq=6):
    return {"input_ids": torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))}


def forward_backward(model, inputs, seed=0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    logits = model(**inputs).logits
    proj = torch.randn(logits.shape, generator=torch.Generator().manual_seed(123), dtype=logits.dtype)
    (logits * proj).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(actual, expected, rtol=RTOL):
    (logits_a, grads_a), (logits_e, grads_e) = actual, expected
    assert rel_err(logits_a, logits_e) <= rtol, f"logits {rel_err(logits_a, logits_e):.2e}"
    assert grads_a.keys() == grads_e.keys()
    assert any("lora_magnitude_vector" in n for n in grads_e) or not any("magnitude" in n for n in grads_a)
    largest = max(g.norm().item() for g in grads_e.values())
    for name, grad in grads_e.items():
        err = (grads_a[name] - grad).norm().item() / max(grad.norm().item(), 1e-5 * largest)
        assert err <= rtol, f"grad {name}: {err:.2e}"


@pytest.mark.parametrize("arch", ARCHS)
def test_dora_matches_peft_in_train_mode(arch, dora_calls):
    vanilla = build(arch).train()
    fused = patched(vanilla).train()
    inputs = batch()
    expected = forward_backward(vanilla, inputs)
    assert not dora_calls
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback
        actual = forward_backward(fused, inputs)
    assert len(dora_calls) == ARCHS[arch][3]
    assert_same(actual, expected)
    assert any("lora_magnitude_vector" in n for n in actual[1])


@pytest.mark.parametrize("arch", ["gpt2"])
def test_conv1d_plain_lora_fused(arch, op_calls):
    """GPT-2's Conv1D (fan_in_fan_out) runs the plain fused op on W read transposed (a view)."""
    vanilla = build(arch, use_dora=False).train()
    fused = patched(vanilla)
    expected = forward_backward(vanilla, batch())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actual = forward_backward(fused, batch())
    assert len(op_calls) == ARCHS[arch][3]
    assert_same(actual, expected)


def test_conv1d_weight_is_read_not_copied():
    """The Conv1D layer's weight reaches the op as a transposed view of the parameter's own storage."""
    vanilla = build("gpt2", use_dora=True)
    fused = patched(vanilla)
    layer = fused.base_model.model.transformer.h[0].attn.c_attn
    seen = []
    real = lorafast.dora.functional.run

    def spy(x2, lead, weight, *rest):
        seen.append(weight)
        return real(x2, lead, weight, *rest)

    lorafast.dora.functional.run = spy
    try:
        layer(torch.randn(2, 3, 32, dtype=torch.float64))
    finally:
        lorafast.dora.functional.run = real
    param = layer.base_layer.weight
    assert seen and seen[0].data_ptr() == param.data_ptr() and seen[0].shape == param.shape[::-1]
    assert seen[0].stride() == (1, param.shape[1])


def test_eval_and_inference_match_peft(dora_calls):
    vanilla = build("llama", lora_dropout=0.3).eval()
    fused = patched(vanilla).eval()
    inputs = batch()
    with torch.no_grad():
        expected, actual = vanilla(**inputs).logits, fused(**inputs).logits
    assert dora_calls and rel_err(actual, expected) <= RTOL


def test_dropout_replayed_through_the_reference():
    """Train mode with p > 0: the patched layer's output and grads equal the float64 reference run with the mask the
    aten strategy drew (PEFT's own nn.Dropout draws a different one)."""
    p = 0.3
    vanilla = build("bert", lora_dropout=p)
    layer = patched(vanilla).base_model.model.bert.encoder.layer[0].attention.self.query.train()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    torch.manual_seed(11)
    y = layer(x)
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.manual_seed(11)
    mask = aten.dropout_keep_mask(functional._dropout_seed(x.device), 10, 32, p, torch.float64).bool()
    params = [t.detach().clone().requires_grad_() for t in (layer.lora_A["default"].weight,
                                                            layer.lora_B["default"].weight,
                                                            layer.lora_magnitude_vector["default"].weight)]
    x64 = x.detach().clone().requires_grad_()
    y_ref = reference.dora_linear(x64, layer.base_layer.weight, layer.base_layer.bias, *params,
                                  layer.scaling["default"], p, True, dropout_mask=mask.reshape(2, 5, 32))
    y_ref.backward(dy)
    assert rel_err(y, y_ref) < 1e-12 and rel_err(x.grad, x64.grad) < 1e-12
    for got, want in zip((layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad,
                          layer.lora_magnitude_vector["default"].weight.grad), params):
        assert rel_err(got, want.grad) < 1e-12


def test_fp32_adapters_on_bf16_base_within_tolerance(dora_calls):
    """PEFT's default autocast_adapter_dtype: fp32 A, B and magnitude on a bf16 model; the fused logits and grads
    are as close to float64 as PEFT's own."""
    vanilla64 = build("llama")
    vanilla = build("llama", dtype=torch.bfloat16)
    assert vanilla.base_model.model.model.layers[0].self_attn.q_proj.lora_magnitude_vector["default"].weight.dtype \
        == torch.float32
    fused = patched(vanilla)
    inputs = batch()
    ref = forward_backward(vanilla64, inputs)
    peft = forward_backward(vanilla, inputs)
    ours = forward_backward(fused, inputs)
    assert dora_calls
    assert_close(ours[0], ref[0], torch.bfloat16, peft[0], what="logits")
    for name, grad in ref[1].items():
        if "lora_" in name:
            assert_close(ours[1][name], grad, torch.bfloat16, peft[1][name], what=name)


def test_save_then_load_in_vanilla_peft(tmp_path):
    """A patched DoRA model trains, saves the same adapter file (keys, magnitude included) as PEFT, and vanilla PEFT
    loads it to the same logits."""
    vanilla = build("bert")
    fused = patched(vanilla).train()
    opt = torch.optim.SGD([p for p in fused.parameters() if p.requires_grad], lr=0.1)
    forward_backward(fused, batch())
    opt.step()
    fused.save_pretrained(tmp_path / "fused")
    vanilla.save_pretrained(tmp_path / "vanilla")
    saved = load_file(tmp_path / "fused" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "vanilla" / "adapter_model.safetensors").keys()
    assert any("lora_magnitude_vector" in k for k in saved)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(_bert().double(), tmp_path / "fused").eval()
    fused.eval()
    with torch.no_grad():
        assert rel_err(fused(**batch()).logits, loaded(**batch()).logits) <= RTOL


def test_merge_and_unload_and_unmerge():
    vanilla = build("gpt2")
    fused = patched(vanilla).eval()
    inputs = batch()
    with torch.no_grad():
        expected = fused(**inputs).logits
        fused.base_model.merge_adapter()  # merged: PEFT's forward (the base with W merged)
        assert rel_err(fused(**inputs).logits, expected) <= 1e-9
        fused.base_model.unmerge_adapter()
        assert rel_err(fused(**inputs).logits, expected) <= 1e-9
        merged = copy.deepcopy(fused).merge_and_unload()
        assert rel_err(merged(**inputs).logits, expected) <= 1e-9


def test_torch_compile_fullgraph_matches_eager():
    vanilla = build("bert", dtype=torch.float32)
    fused = patched(vanilla).train()
    eager = forward_backward(fused, batch())
    torch._dynamo.reset()
    compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
    actual = forward_backward(compiled, batch())
    torch._dynamo.reset()
    strip = {n.replace("_orig_mod.", ""): g for n, g in actual[1].items()}
    assert_same((actual[0], strip), eager, rtol=1e-5)


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_activation_checkpointing_matches(p):
    """Gradient checkpointing on the Llama: grads equal PEFT's at p = 0, and the recompute regenerates the same
    dropout mask at p > 0 (grads equal the non-checkpointed patched run)."""
    vanilla = build("llama", lora_dropout=p)
    fused = patched(vanilla).train()
    plain = forward_backward(fused, batch())
    fused.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    fused.base_model.model.enable_input_require_grads()
    checkpointed = forward_backward(fused, batch())
    assert_same(checkpointed, plain, rtol=1e-12)
    if p == 0.0:
        assert_same(checkpointed, forward_backward(vanilla.train(), batch()))


def test_disabled_merged_and_hooked_keep_peft(dora_calls):
    vanilla = build("bert")
    fused = patched(vanilla).train()
    inputs = batch()
    with fused.disable_adapter(), vanilla.disable_adapter(), torch.no_grad():
        assert rel_err(fused(**inputs).logits, vanilla(**inputs).logits) <= RTOL
    assert not dora_calls
    layer = fused.base_model.model.bert.encoder.layer[0].attention.self.query
    layer.lora_magnitude_vector["default"].register_forward_pre_hook(lambda *a: None)
    vanilla_layer = vanilla.base_model.model.bert.encoder.layer[0].attention.self.query
    vanilla_layer.lora_magnitude_vector["default"].register_forward_pre_hook(lambda *a: None)
    with pytest.warns(UserWarning, match="hooks"):
        actual = forward_backward(fused, inputs)
    assert_same(actual, forward_backward(vanilla, inputs))


def test_triton_strategy_through_the_patched_layer(dora_calls):
    """backend="fused" (Triton through the interpreter) on one small DoRA layer, fp32."""
    vanilla = build("bert", dtype=torch.float32)
    layer = patched(vanilla, backend="fused").base_model.model.bert.encoder.layer[0].attention.self.query.train()
    vlayer = vanilla.base_model.model.bert.encoder.layer[0].attention.self.query.train()
    x = torch.randn(2, 5, 32)
    y, y_ref = layer(x), vlayer(x)
    y.sum().backward()
    y_ref.sum().backward()
    assert dora_calls == ["fused"]
    assert rel_err(y, y_ref) < 1e-5
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        assert rel_err(getattr(layer, name)["default"].weight.grad, getattr(vlayer, name)["default"].weight.grad) \
            < 1e-4, name


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_conv1d_triton_strategy(use_dora, op_calls, dora_calls):
    """GPT-2's Conv1D c_attn (W read through .t()) on backend="fused" (Triton through the interpreter), fp32."""
    vanilla = build("gpt2", dtype=torch.float32, use_dora=use_dora)
    layer = patched(vanilla, backend="fused").base_model.model.transformer.h[0].attn.c_attn.train()
    vlayer = vanilla.base_model.model.transformer.h[0].attn.c_attn.train()
    x = torch.randn(2, 5, 32)
    y, y_ref = layer(x), vlayer(x)
    y.sum().backward()
    y_ref.sum().backward()
    assert (dora_calls if use_dora else op_calls) == ["fused"]
    assert rel_err(y, y_ref) < 1e-5
    for name in ("lora_A", "lora_B") + (("lora_magnitude_vector",) if use_dora else ()):
        assert rel_err(getattr(layer, name)["default"].weight.grad, getattr(vlayer, name)["default"].weight.grad) \
            < 1e-4, name


# ---- 4-bit DoRA --------------------------------------------------------------------------------------------

def test_4bit_dora_matches_peft():
    """bitsandbytes NF4 base + DoRA: the patched layer's y and grads (magnitude included) are as close to the float64
    DoRA of the dequantized weight as PEFT's own, and ‖W‖² is cached on the Params4bit."""
    bnb = pytest.importorskip("bitsandbytes")
    from lorafast.qlora import dequantize, read_quant_state

    torch.manual_seed(0)
    holder = nn.Module()
    holder.is_loaded_in_4bit = True
    linear = nn.Linear(64, 40)
    holder.proj = bnb.nn.Linear4bit(64, 40, compute_dtype=torch.float32, quant_type="nf4")
    holder.proj.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                           module=holder.proj)
    holder.proj.bias = nn.Parameter(linear.bias.data.clone())
    holder.proj.to("cpu")
    holder.forward = lambda x: holder.proj(x)
    vanilla = get_peft_model(holder, LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], use_dora=True))
    randomize(vanilla, 2)
    fused = patched(vanilla)
    layer, vlayer = fused.base_model.model.proj.train(), vanilla.base_model.model.proj.train()
    assert type(layer).__name__ == "FusedLoraLinear4bit"
    x = torch.randn(6, 64)
    dy = torch.randn(6, 40)
    outs = []
    for lay in (layer, vlayer):
        xx = x.clone().requires_grad_()
        with warnings.catch_warnings():
            warnings.simplefilter("error" if lay is layer else "ignore")
            y = lay(xx)
        y.backward(dy)
        outs.append((y, xx.grad, [lay.lora_A["default"].weight.grad, lay.lora_B["default"].weight.grad,
                                  lay.lora_magnitude_vector["default"].weight.grad]))
    weight = dequantize(read_quant_state(layer.base_layer), torch.float32, False).double()
    params = [t.detach().double().requires_grad_() for t in (layer.lora_A["default"].weight,
                                                             layer.lora_B["default"].weight,
                                                             layer.lora_magnitude_vector["default"].weight)]
    x64 = x.double().requires_grad_()
    y_ref = reference.dora_linear(x64, weight, layer.base_layer.bias.double(), *params, layer.scaling["default"])
    y_ref.backward(dy.double())
    (y, dx, grads), (y_peft, dx_peft, grads_peft) = outs
    assert_close(y, y_ref, torch.float32, y_peft, what="y")
    assert_close(dx, x64.grad, torch.float32, dx_peft, what="dx")
    for got, want, lowp, what in zip(grads, params, grads_peft, ("dA", "dB", "dm")):
        assert_close(got, want.grad, torch.float32, lowp, what=what)
    assert dora_norm.cached_row_sq_norms(weight.float(), layer.base_layer.weight) is not None
