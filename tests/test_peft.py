"""lorafast.patch on PEFT models: same numbers, same parameters, same files as vanilla PEFT.

Every comparison runs a vanilla PEFT model and a deep copy of it patched by lorafast on the same
inputs. LoRA B is randomised (PEFT initialises it to zero, which would hide a wrong LoRA branch).
Models are tiny random transformers configs (no hub); model dropout is 0 so train mode is exact.
"""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.layer import LoraLayer
from safetensors.torch import load_file
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)
from utils import assert_close as assert_close_to_fp64
from utils import describe_mismatch

import lorafast
from lorafast.peft import FusedLoraLinear

VOCAB = 61
# Logic checks run in float64, where fused and PEFT agree to rounding whatever the conditioning; fp32
# runs (Trainer, save/load, triton) use transformers' default init scale, which is well conditioned.
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
# Gradients that are mathematically zero (attention key bias: softmax is shift-invariant) hold only
# rounding noise, so each gradient is measured against at least this fraction of the largest one.
GRAD_FLOOR = {torch.float64: 1e-5, torch.float32: 1e-3}
STRONG_INIT = 0.2  # makes every gradient O(1e-2..1) relative to the largest (default 0.02: down to 1e-4)


def _bert(init_range):
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, num_labels=3, initializer_range=init_range)
    return BertForSequenceClassification(cfg)


def _distilbert(init_range):
    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=48,
                           max_position_embeddings=32, dropout=0.0, attention_dropout=0.0,
                           seq_classif_dropout=0.0, num_labels=3, initializer_range=init_range)
    return DistilBertForSequenceClassification(cfg)


def _roberta(init_range):
    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=40, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, num_labels=3, pad_token_id=1,
                        initializer_range=init_range)
    return RobertaForSequenceClassification(cfg)


def _llama(init_range):
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
                      initializer_range=init_range)
    return LlamaForCausalLM(cfg)


# arch -> (factory, LoRA target modules, task type)
ARCHS = {
    "bert": (_bert, ["query", "value"], "SEQ_CLS"),
    "distilbert": (_distilbert, ["q_lin", "v_lin", "out_lin"], "SEQ_CLS"),
    "roberta": (_roberta, ["query", "value", "dense"], "SEQ_CLS"),
    "llama": (_llama, ["q_proj", "v_proj", "o_proj", "gate_proj", "down_proj"], "CAUSAL_LM"),
}


def base_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float64, init_range: float = STRONG_INIT):
    torch.manual_seed(seed)
    return ARCHS[arch][0](init_range).to(dtype)


def randomize_lora(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)


def build(
    arch: str = "bert",
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    init_range: float = STRONG_INIT,
    **lora_kwargs,
) -> PeftModel:
    """Tiny PEFT model with randomised LoRA A, B (and lora_B bias)."""
    _, targets, task = ARCHS[arch]
    options = {"r": 8, "lora_alpha": 16, "target_modules": targets, "task_type": task, **lora_kwargs}
    model = get_peft_model(base_model(arch, seed, dtype, init_range), LoraConfig(**options))
    randomize_lora(model, seed + 1)
    return model


def inputs(seed: int = 0, batch: int = 2, seq: int = 7) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(3, VOCAB, (batch, seq), generator=gen)}


def forward_backward(model: nn.Module, batch: dict, **kwargs) -> tuple[torch.Tensor, dict]:
    """Logits and the gradient of a random projection of them for every parameter that gets one."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # same dropout masks wherever PEFT's own nn.Dropout runs
    logits = model(**batch, **kwargs).logits
    proj = torch.randn(logits.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    (logits.double() * proj).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def rel_err(actual: torch.Tensor, expected: torch.Tensor, floor: float = 1e-30) -> float:
    """‖actual − expected‖ / max(‖expected‖, floor)."""
    diff = (actual.double() - expected.double()).norm()
    return (diff / expected.double().norm().clamp_min(floor)).item()


def assert_close(
    actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 0.0, floor: float = 1e-30
) -> None:
    """Same shape and dtype, relative error ≤ rtol (default: RTOL of the dtype)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} vs {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} vs {expected.dtype}"
    rtol = rtol or RTOL[expected.dtype]
    err = rel_err(actual, expected, floor)
    assert err <= rtol, f"{what}: rel err {err:.3e} > {rtol:.1e}\n{describe_mismatch(actual, expected)}"


def assert_same_results(fused: tuple, vanilla: tuple) -> None:
    """Logits and every gradient agree within the dtype's tolerance; LoRA gradients are non-trivial."""
    (logits_f, grads_f), (logits_v, grads_v) = fused, vanilla
    assert_close(logits_f, logits_v, "logits")
    assert grads_f.keys() == grads_v.keys()
    largest = max(g.double().norm().item() for g in grads_v.values())
    for name in grads_v:
        if "lora_" in name and logits_v.dtype == torch.float64:
            assert grads_v[name].norm() > 1e-4 * largest, f"{name}: ~zero gradient, vacuous comparison"
        assert_close(grads_f[name], grads_v[name], f"grad {name}", floor=GRAD_FLOOR[logits_v.dtype] * largest)


def lora_linear_count(model: nn.Module) -> int:
    return sum(isinstance(m, PeftLoraLinear) for m in model.modules())


pytestmark = pytest.mark.usefixtures("fresh_fallback_log")


def patched_copy(vanilla: nn.Module, backend: str = "torch") -> nn.Module:
    fused = copy.deepcopy(vanilla)
    assert lorafast.patch(fused, backend=backend) == lora_linear_count(vanilla) > 0
    return fused


OPTIONS = {
    "default": {},
    # r=4: alpha/√r = 8 (alpha/r would be 4). Values exact in fp32, because lorafast.lora_linear holds
    # the scale as an fp32 scalar (a 1e-8 relative error on fp64 inputs otherwise).
    "rslora": {"use_rslora": True, "r": 4},
    "bias_all": {"bias": "all"},
    "bias_lora_only": {"bias": "lora_only"},
    "lora_bias": {"lora_bias": True},
}


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("arch", ARCHS)
def test_fused_matches_peft(arch, option, op_calls):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT: lora_bias on a bias-less layer cannot be merged
        vanilla = build(arch, **OPTIONS[option])
    fused = patched_copy(vanilla)
    batch = inputs()
    expected = forward_backward(vanilla, batch)
    assert not op_calls
    actual = forward_backward(fused, batch)
    assert len(op_calls) == lora_linear_count(fused)
    assert_same_results(actual, expected)


@pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
    reason="backend='triton' on CPU needs TRITON_INTERPRET=1 set before triton is imported",
)
@pytest.mark.parametrize("option", ["default", "lora_bias"])
def test_fused_matches_peft_triton(option, op_calls):
    vanilla = build("distilbert", dtype=torch.float32, init_range=0.02, **OPTIONS[option])
    fused = patched_copy(vanilla, backend="triton")
    batch = inputs(batch=1, seq=5)
    expected = forward_backward(vanilla, batch)
    actual = forward_backward(fused, batch)
    assert op_calls == ["triton"] * lora_linear_count(fused)
    assert_same_results(actual, expected)


def test_scaling_tensor_hotswap(op_calls):
    vanilla = build("bert")
    for layer in (m for m in vanilla.modules() if isinstance(m, LoraLayer)):
        layer.scaling["default"] = torch.tensor(1.75, dtype=torch.float64)
    fused = patched_copy(vanilla)
    batch = inputs()
    assert_same_results(forward_backward(fused, batch), forward_backward(vanilla, batch))
    # Hotswap changes the tensor in place: the fused layers must read the new value.
    for model in (vanilla, fused):
        for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):
            layer.scaling["default"].fill_(-0.375)
    assert_same_results(forward_backward(fused, batch), forward_backward(vanilla, batch))
    assert op_calls


def test_several_active_adapters_one_call_per_layer(op_calls):
    # No task_type: a classifier in modules_to_save cannot have two active adapters.
    vanilla = build("bert", lora_bias=True, task_type=None)
    # Second adapter on a subset of the layers, with other rank/scale options.
    second = LoraConfig(r=4, lora_alpha=3, use_rslora=True, target_modules=["value"])
    vanilla.add_adapter("second", second)
    randomize_lora(vanilla, 7)
    vanilla.base_model.set_adapter(["default", "second"])
    fused = patched_copy(vanilla)
    batch = inputs()
    expected = forward_backward(vanilla, batch)
    actual = forward_backward(fused, batch)
    assert len(op_calls) == lora_linear_count(fused)
    assert any("second" in name for name in expected[1])
    assert_same_results(actual, expected)


def _fp64_reference(vanilla: nn.Module, batch: dict) -> tuple:
    return forward_backward(copy.deepcopy(vanilla).double(), batch)


def assert_low_precision_close(fused: tuple, vanilla: tuple, reference: tuple, dtype: torch.dtype) -> None:
    """The team's rule (tests/utils.py): fused error vs fp64 ≤ 2 × PEFT's error + REL_TOL[dtype]."""
    for what, actual, expected, ref in [("logits", fused[0], vanilla[0], reference[0])] + [
        (f"grad {n}", fused[1][n], vanilla[1][n], reference[1][n]) for n in reference[1]
    ]:
        assert actual.dtype == expected.dtype, what
        assert_close_to_fp64(actual, ref, dtype, lowp=expected, what=what)


def test_fp32_adapters_on_bf16_base(op_calls):
    vanilla = build("bert", dtype=torch.bfloat16, lora_bias=True)
    lora_dtypes = {p.dtype for n, p in vanilla.named_parameters() if "lora_" in n}
    assert lora_dtypes == {torch.float32}  # PEFT's autocast_adapter_dtype upcast
    fused = patched_copy(vanilla)
    batch = inputs()
    expected = forward_backward(vanilla, batch)
    actual = forward_backward(fused, batch)
    assert len(op_calls) == lora_linear_count(fused)
    assert_low_precision_close(actual, expected, _fp64_reference(vanilla, batch), torch.bfloat16)


def test_autocast_bf16(op_calls):
    vanilla = build("bert", dtype=torch.float32)
    fused = patched_copy(vanilla)
    batch = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = forward_backward(vanilla, batch)
        actual = forward_backward(fused, batch)
    assert len(op_calls) == lora_linear_count(fused)
    assert actual[0].dtype == expected[0].dtype == torch.bfloat16
    assert_low_precision_close(actual, expected, _fp64_reference(vanilla, batch), torch.bfloat16)


def test_dropout_inactive_in_eval_matches_peft(op_calls):
    vanilla = build("bert", lora_dropout=0.3).eval()
    fused = patched_copy(vanilla)
    batch = inputs()
    assert_same_results(forward_backward(fused, batch), forward_backward(vanilla, batch))
    assert op_calls


def test_dropout_train_mode_is_seeded_and_active(op_calls):
    fused = patched_copy(build("bert", lora_dropout=0.3))
    batch = inputs()
    outputs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        outputs.append(fused(**batch).logits)
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.allclose(outputs[0], outputs[2])
    fused.eval()
    assert not torch.allclose(outputs[0], fused(**batch).logits)
    assert op_calls


def test_dropout_statistics_follow_the_module_p(op_calls):
    """Mean and spread of the LoRA delta over dropout draws match PEFT's nn.Dropout (same p)."""
    torch.manual_seed(0)
    vanilla = get_peft_model(nn.Sequential(nn.Linear(24, 16)), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.4,
                                                                          target_modules=["0"]))
    randomize_lora(vanilla, 3)
    fused = patched_copy(vanilla)
    x = torch.randn(8, 24)
    with torch.no_grad():
        base = vanilla.base_model.model[0].base_layer(x)
        expected_mean = vanilla.eval()(x) - base
        vanilla.train()

        def deltas(model):
            return torch.stack([model(x) - base for _ in range(400)])

        fused_deltas, peft_deltas = deltas(fused), deltas(vanilla)
    assert len(op_calls) == 400
    assert rel_err(fused_deltas.mean(0), expected_mean) < 0.1
    spread_ratio = (fused_deltas.std(0).norm() / peft_deltas.std(0).norm()).item()
    assert 0.85 < spread_ratio < 1.15, spread_ratio


def test_trainer_step_matches_peft(tmp_path):
    from transformers import Trainer, TrainingArguments

    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(3, VOCAB, (6,), generator=gen), "labels": torch.tensor(i % 3)}
        for i in range(8)
    ]

    def train(model, name):
        args = TrainingArguments(
            output_dir=str(tmp_path / name), use_cpu=True, per_device_train_batch_size=4, max_steps=2,
            learning_rate=5e-2, report_to="none", save_strategy="no", logging_steps=1, seed=0,
            disable_tqdm=True,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
        weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return losses, weights

    vanilla = build("bert", dtype=torch.float32, init_range=0.02)
    fused = patched_copy(vanilla)
    before = {n: p.detach().clone() for n, p in vanilla.named_parameters() if p.requires_grad}
    losses_v, weights_v = train(vanilla, "vanilla")
    losses_f, weights_f = train(fused, "fused")
    assert len(losses_v) == 2
    assert losses_f == pytest.approx(losses_v, rel=RTOL[torch.float32])
    assert weights_f.keys() == weights_v.keys()
    for name, weight in weights_v.items():
        assert not torch.equal(weight, before[name]), f"{name} did not train"
        assert_close(weights_f[name], weight, name)


def test_state_dict_parameters_and_modules_unchanged():
    vanilla = build("bert", lora_bias=True)
    fused = patched_copy(vanilla)
    assert list(fused.state_dict()) == list(vanilla.state_dict())
    assert [n for n, _ in fused.named_parameters()] == [n for n, _ in vanilla.named_parameters()]
    assert [n for n, _ in fused.named_buffers()] == [n for n, _ in vanilla.named_buffers()]
    assert [n for n, _ in fused.named_modules()] == [n for n, _ in vanilla.named_modules()]
    for (name, p_f), p_v in zip(fused.named_parameters(), vanilla.parameters()):
        assert p_f.requires_grad == p_v.requires_grad, name


# PEFT 0.21.2 mistakes the 1-D lora_B.bias for an ungathered ZeRO-3 shard when saving (vanilla too).
@pytest.mark.filterwarnings("ignore:.*LoRA tensor\\(s\\) have invalid shape")
def test_saved_adapter_identical_and_loadable_both_ways(tmp_path):
    vanilla = build("bert", dtype=torch.float32, lora_bias=True)
    fused = patched_copy(vanilla)
    fused.save_pretrained(tmp_path / "fused")
    vanilla.save_pretrained(tmp_path / "vanilla")
    files = sorted(p.name for p in (tmp_path / "vanilla").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "fused").iterdir())
    config = {d: json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fused", "vanilla")}
    # PEFT keeps target_modules as a set and writes it in set-iteration order, which varies with
    # PYTHONHASHSEED between copies of the same config (vanilla PEFT too): compare it as a set.
    targets = {d: set(config[d].pop("target_modules")) for d in config}
    assert targets["fused"] == targets["vanilla"]
    assert config["fused"] == config["vanilla"]
    tensors = {d: load_file(tmp_path / d / "adapter_model.safetensors") for d in ("fused", "vanilla")}
    assert list(tensors["fused"]) == list(tensors["vanilla"])
    for key, tensor in tensors["vanilla"].items():
        assert torch.equal(tensors["fused"][key], tensor), key

    batch = inputs()
    fused.eval()
    vanilla.eval()
    # patched save -> vanilla PEFT load
    loaded_vanilla = PeftModel.from_pretrained(base_model("bert", dtype=torch.float32), tmp_path / "fused")
    loaded_vanilla.eval()
    assert not any(isinstance(m, FusedLoraLinear) for m in loaded_vanilla.modules())
    assert_close(loaded_vanilla(**batch).logits, fused(**batch).logits, "logits")
    # vanilla save -> load, then patch
    loaded_fused = PeftModel.from_pretrained(base_model("bert", dtype=torch.float32), tmp_path / "vanilla")
    loaded_fused.eval()
    assert lorafast.patch(loaded_fused) == lora_linear_count(vanilla)
    assert_close(loaded_fused(**batch).logits, vanilla(**batch).logits, "logits")


def test_merge_and_unload_gives_plain_linear():
    fused = patched_copy(build("bert", lora_bias=True)).eval()
    batch = inputs()
    expected = fused(**batch).logits
    merged = fused.merge_and_unload()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    for layer in merged.bert.encoder.layer:
        assert type(layer.attention.self.query) is nn.Linear
        assert type(layer.attention.self.value) is nn.Linear
    assert_close(merged(**batch).logits, expected, "merged logits")


def _dora_among_two_adapters():
    # DoRA runs fused for one active adapter (tests/test_peft_dora.py); PEFT applies several in turn.
    model = build("bert", use_dora=True, task_type=None)
    model.add_adapter("second", LoraConfig(r=4, target_modules=["query", "value"]))
    randomize_lora(model, 5)
    model.base_model.set_adapter(["default", "second"])
    return model, {}


def _merged():
    model = build("bert")
    model.merge_adapter()
    return model, {}


def _mixed_batch():
    model = build("bert").eval()
    return model, {"adapter_names": ["default", "__base__"]}


def _two_adapters_with_dropout():
    model = build("bert", lora_dropout=0.2, task_type=None)
    model.add_adapter("second", LoraConfig(r=4, lora_dropout=0.1, target_modules=["query", "value"]))
    randomize_lora(model, 5)
    model.base_model.set_adapter(["default", "second"])
    return model, {}


# case -> (builder, warns: a one-time fallback warning is expected)
FALLBACKS = {
    "dora_among_two_adapters": (_dora_among_two_adapters, True),
    "merged": (_merged, False),
    "mixed_batch": (_mixed_batch, False),
    "two_adapters_with_dropout": (_two_adapters_with_dropout, True),
}


@pytest.mark.parametrize("case", FALLBACKS)
def test_fallbacks_give_peft_numbers(case, op_calls):
    builder, warns = FALLBACKS[case]
    vanilla, kwargs = builder()
    fused = patched_copy(vanilla)
    batch = inputs()
    expected = forward_backward(vanilla, batch, **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        actual = forward_backward(fused, batch, **kwargs)
    assert not op_calls
    ours = [w for w in caught if "lorafast" in str(w.message)]
    assert len(ours) == (1 if warns else 0), [str(w.message) for w in ours]
    assert_same_results(actual, expected)


def test_disabled_adapters_give_base_model(op_calls):
    vanilla = build("bert")
    fused = patched_copy(vanilla)
    batch = inputs()
    with vanilla.disable_adapter():
        expected = vanilla(**batch).logits
    with fused.disable_adapter():
        actual = fused(**batch).logits
    assert not op_calls
    assert torch.equal(actual, expected)
    assert not torch.allclose(actual, fused(**batch).logits)  # adapters matter when enabled


def test_hooked_layer_falls_back_alone(op_calls):
    vanilla = build("bert")
    fused = patched_copy(vanilla)
    seen = []
    for model in (vanilla, fused):
        model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.register_forward_hook(
            lambda mod, args, out: seen.append(out.shape)
        )
    batch = inputs()
    expected = forward_backward(vanilla, batch)
    with pytest.warns(UserWarning, match="hooks"):
        actual = forward_backward(fused, batch)
    assert len(seen) == 2
    assert len(op_calls) == lora_linear_count(fused) - 1
    assert_same_results(actual, expected)


def test_patch_is_idempotent_and_unpatch_restores():
    vanilla = build("bert")
    n = lora_linear_count(vanilla)
    fused = copy.deepcopy(vanilla)
    assert lorafast.patch(fused, backend="torch") == n
    assert lorafast.patch(fused, backend="torch") == 0
    layers = [m for m in fused.modules() if isinstance(m, LoraLayer)]
    assert all(type(m) is FusedLoraLinear for m in layers) and len(layers) == n
    assert lorafast.unpatch(fused) == n
    assert all(type(m) is PeftLoraLinear for m in layers)
    assert not any("_lorafast" in key for m in layers for key in vars(m))
    assert lorafast.unpatch(fused) == 0
    batch = inputs()
    assert torch.equal(fused(**batch).logits, vanilla(**batch).logits)


def test_patch_again_after_add_adapter_on_new_layers(op_calls):
    vanilla = build("bert", task_type=None)
    vanilla.add_adapter("other", LoraConfig(r=2, target_modules=["key", "query"]))
    randomize_lora(vanilla, 4)
    # Patch first, add the adapter afterwards: "query" layers are already fused, "key" ones are new.
    fused = build("bert", task_type=None)
    assert lorafast.patch(fused) == lora_linear_count(fused)
    fused.add_adapter("other", LoraConfig(r=2, target_modules=["key", "query"]))
    fused.load_state_dict(vanilla.state_dict())
    n_key = len(fused.base_model.model.bert.encoder.layer)
    assert lorafast.patch(fused, backend="torch") == n_key  # only the new "key" layers
    for model in (vanilla, fused):
        model.base_model.set_adapter(["default", "other"])
    batch = inputs()
    assert_same_results(forward_backward(fused, batch), forward_backward(vanilla, batch))
    assert len(op_calls) == lora_linear_count(fused)


class _CustomLinear(nn.Linear):
    """Stands in for quantized nn.Linear subclasses, which must stay on PEFT's dispatchers."""


def test_register_builds_fused_layers_and_loads(tmp_path, op_calls):
    vanilla = build("bert")
    torch.manual_seed(0)
    config = lorafast.peft.register(LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                               task_type="SEQ_CLS"), backend="torch")
    fused = get_peft_model(base_model("bert"), config)
    randomize_lora(fused, 1)
    layers = [m for m in fused.modules() if isinstance(m, LoraLayer)]
    assert layers and all(type(m) is FusedLoraLinear for m in layers)
    assert list(fused.state_dict()) == list(vanilla.state_dict())
    batch = inputs()
    assert_same_results(forward_backward(fused, batch), forward_backward(vanilla, batch))
    assert len(op_calls) == len(layers)

    vanilla.save_pretrained(tmp_path)
    config = lorafast.peft.register(LoraConfig.from_pretrained(tmp_path))
    loaded = PeftModel.from_pretrained(base_model("bert"), tmp_path, config=config)
    assert all(type(m) is FusedLoraLinear for m in loaded.modules() if isinstance(m, LoraLayer))
    assert_close(loaded.eval()(**batch).logits, vanilla.eval()(**batch).logits, "logits")

    custom = nn.Sequential(_CustomLinear(8, 8), nn.Linear(8, 8))
    custom = get_peft_model(custom, lorafast.peft.register(LoraConfig(r=2, target_modules=["0", "1"])))
    assert type(custom.base_model.model[0]) is PeftLoraLinear
    assert type(custom.base_model.model[1]) is FusedLoraLinear


def test_bad_backend_is_rejected():
    with pytest.raises(ValueError, match="backend"):
        lorafast.patch(build("bert"), backend="cuda")


def test_torch_compile_fullgraph(op_calls):
    """No graph break in the fused forward: dynamo traces the checks and the custom op."""
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(24, 16), nn.ReLU(), nn.Linear(16, 8))
    vanilla = get_peft_model(mlp, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"], lora_bias=True))
    randomize_lora(vanilla, 2)
    fused = patched_copy(vanilla)
    compiled = torch.compile(fused, fullgraph=True, backend="aot_eager")
    x = torch.randn(5, 24)
    expected = forward_backward_plain(vanilla, x)
    actual = forward_backward_plain(compiled, x)
    assert op_calls  # traced through lorafast.peft's forward
    assert_close(actual[0], expected[0], "output")
    assert actual[1].keys() == expected[1].keys()
    for name, grad in expected[1].items():
        assert_close(actual[1][name], grad, f"grad {name}")


def forward_backward_plain(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.square().sum().backward()
    # torch.compile's wrapper prefixes parameter names with "_orig_mod."
    named = model.named_parameters()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in named if p.grad is not None}
    return out.detach(), grads
