"""lorafast.patch on PEFT's ParamWrapper (LoraConfig(target_parameters=...)) over transformers' MoE experts: tiny
random-init Qwen3-MoE, Mixtral, OLMoE, DeepSeek-V3 and gpt-oss (transposed, interleaved, biased experts). Patched
equals vanilla PEFT on logits and every gradient; no tensor the size of an expert weight is made in fwd+bwd;
adapter files load in vanilla PEFT; merge_and_unload; training; torch.compile; activation checkpointing; expert
dropout (lorafast's extension); fallbacks."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch._dynamo.backends.registry import lookup_backend
from torch.utils._python_dispatch import TorchDispatchMode
from utils import rel_err

import lorafast
import lorafast.peft.experts as lfexperts
from lorafast.peft import FusedParamWrapper

BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
SMALL = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, max_position_embeddings=64)


def build(family: str, implementation: str = "grouped_mm"):
    """A tiny random-init causal LM of ``family`` (no download), fp32, eval mode."""
    import transformers as tf

    if family == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**SMALL, intermediate_size=48, moe_intermediate_size=16, num_experts=8,
                                num_experts_per_tok=2)
        cls = tf.Qwen3MoeForCausalLM
    elif family == "mixtral":
        cfg, cls = tf.MixtralConfig(**SMALL, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2), \
            tf.MixtralForCausalLM
    elif family == "olmoe":
        cfg, cls = tf.OlmoeConfig(**SMALL, intermediate_size=16, num_experts=4, num_experts_per_tok=2), \
            tf.OlmoeForCausalLM
    elif family == "deepseek_v3":
        kw = {k: v for k, v in SMALL.items() if k != "head_dim"}
        cfg = tf.DeepseekV3Config(**{**kw, "num_key_value_heads": 2}, intermediate_size=48, moe_intermediate_size=16,
                                  n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
                                  first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16, qk_rope_head_dim=8,
                                  qk_nope_head_dim=8, v_head_dim=8, n_shared_experts=1)
        cls = tf.DeepseekV3ForCausalLM
    elif family == "gpt_oss":
        cfg = tf.GptOssConfig(**SMALL, intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
                              layer_types=["full_attention"] * SMALL["num_hidden_layers"])
        cls = tf.GptOssForCausalLM
    else:
        raise ValueError(family)
    cfg._experts_implementation = implementation
    torch.manual_seed(0)
    model = cls(cfg).float().eval()
    if family == "gpt_oss":  # its init leaves the expert biases at zero: make them matter
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_proj_bias"):
                    p.normal_(0, 0.1)
    return model


def randomize_lora(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def peft_pair(family="qwen3_moe", targets=BOTH, implementation="grouped_mm", r=4):
    vanilla = get_peft_model(build(family, implementation),
                             LoraConfig(r=r, lora_alpha=2 * r, target_modules=[], target_parameters=targets))
    randomize_lora(vanilla)
    patched = copy.deepcopy(vanilla)
    layers = 2 if family != "deepseek_v3" else 1  # DeepSeek-V3's first layer is dense
    assert lorafast.patch(patched, backend="aten") == layers * len(targets)
    return vanilla, patched


def batch(seed=0, tokens=9):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL["vocab_size"], (2, tokens), generator=gen)


def step(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_step(vanilla, patched, ids=None, rtol=1e-5):
    ids = batch() if ids is None else ids
    logits_v, grads_v = step(vanilla, ids)
    logits_p, grads_p = step(patched, ids)
    assert rel_err(logits_p, logits_v) <= rtol, rel_err(logits_p, logits_v)
    assert grads_p.keys() == grads_v.keys() and grads_v
    for name in grads_v:
        assert rel_err(grads_p[name], grads_v[name]) <= rtol, (name, rel_err(grads_p[name], grads_v[name]))


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    real = lfexperts.experts_forward

    def counting(*args, **kwargs):
        calls.append(sorted(args[4]))
        return real(*args, **kwargs)

    monkeypatch.setattr(lfexperts, "experts_forward", counting)
    return calls


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "olmoe", "deepseek_v3", "gpt_oss"])
def test_patched_equals_peft(family, fused_calls):
    vanilla, patched = peft_pair(family)
    assert_same_step(vanilla, patched)
    assert fused_calls and all(c == ["down_proj", "gate_up_proj"] for c in fused_calls)


@pytest.mark.parametrize("targets", [["mlp.experts.gate_up_proj"], ["mlp.experts.down_proj"]], ids=["gate_up", "down"])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_one_projection_targeted(family, targets, fused_calls):
    vanilla, patched = peft_pair(family, targets)
    assert_same_step(vanilla, patched)
    assert fused_calls and all(c == [targets[0].split(".")[-1]] for c in fused_calls)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm"])
def test_other_experts_implementations(implementation):
    """PEFT on the eager loop / batched_mm: the same products, other summation orders."""
    vanilla, patched = peft_pair(implementation=implementation)
    assert_same_step(vanilla, patched)


def test_several_adapters_active_and_switching(fused_calls):
    vanilla, patched = peft_pair()
    for model in (vanilla, patched):
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=[], target_parameters=BOTH))
    lorafast.patch(patched, backend="aten")
    randomize_lora(vanilla, seed=5)
    randomize_lora(patched, seed=5)
    for model in (vanilla, patched):
        model.base_model.set_adapter(["default", "second"])
    assert_same_step(vanilla, patched)
    for model in (vanilla, patched):
        model.set_adapter("second")
    assert_same_step(vanilla, patched)
    assert fused_calls


class _LargestAllocation(TorchDispatchMode):
    """The most elements of any tensor an op creates (outputs that alias an input, i.e. views, excluded)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.numel())
        return out


THREE = ["qwen3_moe", "mixtral", "gpt_oss"]


@pytest.mark.parametrize("family", THREE)
def test_no_expert_sized_tensor_in_fwd_bwd(family):
    """PEFT builds W + s·ΔW for all experts (and its gradient); the patched layers never make a tensor as large
    as the smallest expert weight. The experts here are the largest weights, and tokens few, so any E×N×K tensor
    shows."""
    vanilla, patched = peft_pair(family)
    smallest = min(p.numel() for n, p in patched.named_parameters() if n.endswith(("gate_up_proj", "down_proj")))
    ids = batch(tokens=5)
    sizes = {}
    for name, model in (("vanilla", vanilla), ("patched", patched)):
        mode = _LargestAllocation()
        with mode:
            model(input_ids=ids, labels=ids).loss.backward()
        sizes[name] = mode.largest
    assert sizes["vanilla"] >= smallest  # the check can fail
    assert sizes["patched"] < smallest, (sizes, smallest)


@pytest.mark.parametrize("family", THREE)
def test_save_then_load_in_vanilla_peft(family, tmp_path):
    _, patched = peft_pair(family)
    lorafast.set_expert_dropout(patched, 0.1)
    patched.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0 and sorted(config["target_parameters"]) == sorted(BOTH)
    loaded = PeftModel.from_pretrained(build(family), tmp_path)
    assert not any(isinstance(m, FusedParamWrapper) for m in loaded.modules())
    ids = batch()
    patched.eval()
    with torch.no_grad():
        assert rel_err(loaded(input_ids=ids).logits, patched(input_ids=ids).logits) < 1e-6
    assert patched.state_dict().keys() == loaded.state_dict().keys()


@pytest.mark.parametrize("family", THREE)
def test_merge_and_unload_and_repr(family):
    vanilla, patched = peft_pair(family)
    assert repr(patched) == repr(vanilla)
    ids = batch()
    with torch.no_grad():
        before = patched(input_ids=ids).logits
        patched.merge_adapter()
        assert rel_err(patched(input_ids=ids).logits, before) < 1e-5  # merged: PEFT's forward on merged weights
        patched.unmerge_adapter()
        assert rel_err(patched(input_ids=ids).logits, before) < 1e-5
        merged = patched.merge_and_unload()
        assert not any(isinstance(m, FusedParamWrapper) for m in merged.modules())
        assert rel_err(merged(input_ids=ids).logits, before) < 1e-5


def test_disabled_adapters_and_hooks_fall_back(fused_calls, fresh_fallback_log):
    vanilla, patched = peft_pair()
    ids = batch()
    with torch.no_grad(), patched.disable_adapter():
        base = patched(input_ids=ids).logits
    assert not fused_calls
    experts = patched.base_model.model.model.layers[0].mlp.experts.get_base_layer()
    handle = experts.register_forward_hook(lambda m, i, o: None)
    with pytest.warns(UserWarning, match="module hooks"):
        assert_same_step(vanilla, patched)
    handle.remove()
    fused_calls.clear()
    assert_same_step(vanilla, patched)
    assert len(fused_calls) == 2
    with torch.no_grad(), vanilla.disable_adapter():
        assert rel_err(vanilla(input_ids=ids).logits, base) < 1e-6


def test_unpatch_restores_peft():
    vanilla, patched = peft_pair()
    assert lorafast.unpatch(patched) == 4
    assert not any(isinstance(m, FusedParamWrapper) for m in patched.modules())
    assert_same_step(vanilla, patched)


@pytest.mark.parametrize("family", THREE)
def test_training_lowers_the_loss(family):
    _, patched = peft_pair(family)
    patched.train()
    lorafast.set_expert_dropout(patched, 0.05)
    opt = torch.optim.SGD([p for p in patched.parameters() if p.requires_grad], lr=2.0, momentum=0.9)
    ids = batch(tokens=12)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = patched(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.15, losses  # only the experts' LoRA trains: a slow but steady descent


def test_expert_dropout_is_lorafast_only_and_replayable():
    """set_expert_dropout: training calls drop (different from eval), the same seed gives the same step, eval
    and vanilla PEFT agree; p is a layer attribute, not config."""
    vanilla, patched = peft_pair()
    assert lorafast.set_expert_dropout(patched, 0.3) == 4
    ids = batch()
    patched.train()
    torch.manual_seed(3)
    logits_a, grads_a = step(patched, ids)
    torch.manual_seed(3)
    logits_b, grads_b = step(patched, ids)
    assert torch.equal(logits_a, logits_b) and all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    patched.eval()
    logits_eval, _ = step(patched, ids)
    assert rel_err(logits_a, logits_eval) > 1e-3
    assert_same_step(vanilla, patched)
    with pytest.raises(ValueError, match="p must be"):
        lorafast.set_expert_dropout(patched, 1.0)


@pytest.mark.parametrize("family", THREE)
def test_activation_checkpointing_replays_dropout(family):
    _, patched = peft_pair(family)
    lorafast.set_expert_dropout(patched, 0.2)
    patched.train()
    ids = batch()
    torch.manual_seed(4)
    logits_ref, grads_ref = step(patched, ids)
    patched.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    patched.base_model.model.config.use_cache = False
    torch.manual_seed(4)
    logits_ckpt, grads_ckpt = step(patched, ids)
    assert rel_err(logits_ckpt, logits_ref) < 1e-6
    for name in grads_ref:
        assert rel_err(grads_ckpt[name], grads_ref[name]) < 1e-6, name


@pytest.mark.parametrize("family", THREE)
def test_torch_compile_fullgraph_matches_eager(family):
    torch._dynamo.reset()
    vanilla, patched = peft_pair(family)
    block = patched.base_model.model.model.layers[0].mlp
    graphs = []

    def recording(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    compiled = torch.compile(block, backend=recording, fullgraph=True)
    x = torch.randn(1, 7, SMALL["hidden_size"], requires_grad=True)
    g = torch.randn(1, 7, SMALL["hidden_size"])
    results = []
    for fn in (block, compiled):
        patched.zero_grad(set_to_none=True)
        x.grad = None
        out = fn(x)
        (out[0] if isinstance(out, tuple) else out).backward(g)  # gpt-oss's block also returns router scores
        results.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters() if p.grad is not None])
    assert len(results[0]) == 5
    for eager, comp in zip(*results):
        assert rel_err(comp, eager) < 1e-6
    ops = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert len(graphs) == 1 and ops.count("lorafast.grouped_lora_fwd.default") == 2, ops
    torch._dynamo.reset()


def test_bf16_model_within_peft_error_of_float64():
    """bf16 experts: PEFT rounds W + s·ΔW to bf16, lorafast adds the bf16 LoRA product to the bf16 base product —
    different roundings of the same math. Against the float64 model, the patched logits and LoRA gradients are as
    close as PEFT's own (within 2× + the bf16 floor)."""
    from utils import assert_close

    vanilla, patched = peft_pair()
    ref = copy.deepcopy(vanilla).double()
    for module in ref.modules():
        if hasattr(module, "gate_up_proj") and hasattr(module, "config"):
            module.config._experts_implementation = "eager"  # CPU grouped_mm has no float64 kernel
    vanilla, patched = vanilla.to(torch.bfloat16), patched.to(torch.bfloat16)
    ids = batch()
    results = [step(model, ids) for model in (ref, vanilla, patched)]
    (logits64, grads64), (logits_v, grads_v), (logits_p, grads_p) = results
    assert_close(logits_p, logits64, torch.bfloat16, logits_v, what="logits")
    for name, g64 in grads64.items():
        if "lora_" in name:
            assert_close(grads_p[name], g64, torch.bfloat16, grads_v[name], what=name)


class _Holder(torch.nn.Module):
    """An experts module alone, called with a fixed routing (for layouts no tiny full model here exercises)."""

    def __init__(self, experts, top_k=2, tokens=11, seed=0):
        super().__init__()
        self.experts = experts
        gen = torch.Generator().manual_seed(seed)
        scores = torch.rand(tokens, experts.num_experts, generator=gen)
        weights, self.index = scores.topk(top_k, dim=-1)
        self.weights = weights / weights.sum(-1, keepdim=True)

    def forward(self, x):
        return self.experts(x, self.index, self.weights)


@pytest.mark.parametrize("kind", ["nemotron_h (no gate: up_proj)", "muse_spark (post-expert norm)"])
def test_ungated_and_post_norm_experts(kind):
    import transformers as tf

    torch.manual_seed(0)
    if kind.startswith("nemotron"):
        from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHExperts

        cfg = tf.NemotronHConfig(hidden_size=24, moe_intermediate_size=16, n_routed_experts=4, mlp_hidden_act="relu2")
        experts, targets = NemotronHExperts(cfg), ["experts.up_proj", "experts.down_proj"]
    else:
        from transformers.models.muse_spark.modeling_muse_spark import MuseSparkExperts

        cfg = tf.MuseSparkTextConfig(hidden_size=24, num_attention_heads=2, num_key_value_heads=1, head_dim=12,
                                     moe_hidden_size=24, moe_intermediate_size=16, num_local_experts=4)
        experts, targets = MuseSparkExperts(cfg), ["experts.gate_up_proj", "experts.down_proj"]
    cfg._experts_implementation = "grouped_mm"
    with torch.no_grad():
        for p in experts.parameters():
            p.normal_(0, 0.2)
    vanilla = get_peft_model(_Holder(experts), LoraConfig(r=3, lora_alpha=6, target_modules=[],
                                                          target_parameters=targets))
    randomize_lora(vanilla)
    patched = copy.deepcopy(vanilla)
    assert lorafast.patch(patched, backend="aten") == 2
    x = torch.randn(11, 24)
    g = torch.randn(11, 24)
    outs = []
    for model in (vanilla, patched):
        xx = x.clone().requires_grad_()
        model(xx).backward(g)
        outs.append([xx.grad] + [p.grad for n, p in model.named_parameters() if "lora_" in n])
    for got, want in zip(outs[1], outs[0]):
        assert rel_err(got, want) < 1e-5
