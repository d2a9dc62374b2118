"""Shared pieces for the composability tests (compile, autocast, checkpointing, distributed, Trainer).

Tiny random models only (no hub): a two-layer LoRALinear MLP and a 2-layer BERT with PEFT LoRA on every
attention and MLP linear, patched by lorafast. LoRA B is randomised (PEFT's zeros would hide the branch).
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch
from torch import nn

import lorafast

VOCAB = 61
NUM_LABELS = 3
BERT_TARGETS = ["query", "key", "value", "dense"]
# Tolerance for "the same computation run twice" (eager vs aot_eager, checkpoint recompute): bitwise on CPU;
# on CUDA the kernels reduce dA, dB and db with fp32 atomics, whose order varies from run to run.
REPEAT_RTOL = 1e-5 if torch.cuda.is_available() else 1e-6
BERT_LORA_LAYERS = 13  # 2 layers × (query, key, value, 3 dense) + the pooler dense


def lora_mlp(backend: str, dropout: float = 0.1, seed: int = 0, dim: int = 24, hidden: int = 40) -> nn.Module:
    """LoRALinear(dim→hidden) → GELU → LoRALinear(hidden→dim//2), random A and B, fp32."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        lorafast.LoRALinear(dim, hidden, r=4, lora_alpha=8, lora_dropout=dropout, backend=backend),
        nn.GELU(),
        lorafast.LoRALinear(hidden, dim // 2, r=4, lora_alpha=8, lora_dropout=dropout, backend=backend),
    )
    randomize_lora(model, seed + 1)
    return model


def randomize_lora(model: nn.Module, seed: int, std: float = 0.3) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * std / param.shape[-1] ** 0.5)


def tiny_bert(seed: int = 0, hidden_dropout: float = 0.0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=48, max_position_embeddings=32, hidden_dropout_prob=hidden_dropout,
                     attention_probs_dropout_prob=0.0, num_labels=NUM_LABELS,
                     # Set up front: BERT would set it on the first call, which recompiles a compiled model.
                     problem_type="single_label_classification")
    return BertForSequenceClassification(cfg)


def patched_bert(backend: str = "torch", lora_dropout: float = 0.1, seed: int = 0, hidden_dropout: float = 0.0,
                 patch: bool = True):
    """PEFT LoRA (r=4) on every BERT linear but the classifier, random B; patched by lorafast (all 13)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=lora_dropout, target_modules=BERT_TARGETS,
                        task_type="SEQ_CLS")
    model = get_peft_model(tiny_bert(seed, hidden_dropout), config)
    randomize_lora(model, seed + 1)
    if patch:
        patched = lorafast.patch(model, backend=backend)
        assert patched == BERT_LORA_LAYERS, f"expected {BERT_LORA_LAYERS} patched LoRA linears, got {patched}"
    return model


def bert_batch(seed: int = 0, batch: int = 4, seq: int = 7, device: str = "cpu") -> Dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(3, VOCAB, (batch, seq), generator=gen).to(device),
        "labels": torch.randint(0, NUM_LABELS, (batch,), generator=gen).to(device),
    }


def _plain_name(name: str) -> str:
    # torch.compile wraps the model as `_orig_mod`; compiled and eager runs compare by the eager names.
    return name.replace("_orig_mod.", "")


def trainable_grads(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {_plain_name(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def trainable_params(model: nn.Module) -> Dict[str, torch.Tensor]:
    return {_plain_name(n): p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    diff = (actual.detach().double() - expected.detach().double()).norm()
    return (diff / expected.detach().double().norm().clamp_min(1e-30)).item()


def assert_same_tensors(actual: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], rtol: float,
                        what: str = "") -> None:
    """Same keys; each tensor within ``rtol`` relative norm error; the expected ones are not all zero."""
    assert actual.keys() == expected.keys(), f"{what}: {sorted(actual)} vs {sorted(expected)}"
    assert expected, f"{what}: nothing to compare"
    assert any(t.abs().sum() > 0 for t in expected.values()), f"{what}: all-zero tensors, vacuous comparison"
    for name in expected:
        dtypes = f"{actual[name].dtype} vs {expected[name].dtype}"
        assert actual[name].dtype == expected[name].dtype, f"{what} {name}: {dtypes}"
        err = rel_err(actual[name], expected[name])
        assert err <= rtol, f"{what} {name}: rel err {err:.3e} > {rtol:.1e}"


@contextlib.contextmanager
def count_fused_calls() -> Iterator[List[Optional[str]]]:
    """Records the backend of every fused op call lorafast.peft makes (eager only: dynamo would trace the
    wrapper); an empty list afterwards means every patched layer fell back to PEFT."""
    import lorafast.peft.linear as lfpeft

    calls: List[Optional[str]] = []
    real = lfpeft.fused_forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    lfpeft.fused_forward = counting
    try:
        yield calls
    finally:
        lfpeft.fused_forward = real


def fused_op_count(graph_module: torch.fx.GraphModule) -> int:
    """Calls of lorafast::lora_linear_fwd in a dynamo graph."""
    return sum(
        node.op == "call_function" and "lorafast.lora_linear_fwd" in str(node.target)
        for node in graph_module.graph.nodes
    )
