"""Activation checkpointing with LoRA dropout p > 0: the recompute must use the forward's dropout mask.

The fused op draws its dropout seed from torch's RNG at call time; torch.utils.checkpoint restores the RNG
state before recomputing (preserve_rng_state, its default), so the recompute draws the same seed and the op
regenerates the same mask from it. Gradients must then equal the non-checkpointed run's. A control test
turns RNG preservation off and shows the comparison does detect a different mask.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE
from support.composability import (
    REPEAT_RTOL,
    assert_same_tensors,
    bert_batch,
    count_fused_calls,
    lora_mlp,
    patched_bert,
    rel_err,
    trainable_grads,
)
from torch.utils.checkpoint import checkpoint

BACKENDS = ["torch", "triton"]
P = 0.25


def mlp_grads(model, x, **checkpoint_kwargs):
    """Gradients of a loss over the MLP, checkpointed as one segment when kwargs are given."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    y = checkpoint(model, x, **checkpoint_kwargs) if checkpoint_kwargs else model(x)
    y.square().mean().backward()
    # torch.compile prefixes names with _orig_mod and a wrapper adds its own: compare by the MLP's names.
    grads = {name.split("inner.")[-1]: grad for name, grad in trainable_grads(model).items()}
    return {**grads, "x": x.grad}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointed_lora_mlp_grads_equal_plain(backend, use_reentrant):
    model = lora_mlp(backend, dropout=P).to(DEVICE)
    x = torch.randn(3, 5, 24, device=DEVICE)
    plain = mlp_grads(model, x)
    checkpointed = mlp_grads(model, x, use_reentrant=use_reentrant)
    # Same kernels, inputs and seed: bitwise on CPU (REPEAT_RTOL); a different mask moves the LoRA
    # gradients by O(1e-1) (see the control below).
    assert_same_tensors(checkpointed, plain, rtol=REPEAT_RTOL, what=f"{backend} checkpointed")


def test_control_without_rng_preservation_grads_differ():
    """Recompute with a fresh RNG draw (preserve_rng_state=False) gives a different mask, which the
    comparison above would catch: the LoRA gradients move by far more than its tolerance."""
    model = lora_mlp("torch", dropout=P).to(DEVICE)
    x = torch.randn(3, 5, 24, device=DEVICE)
    plain = mlp_grads(model, x)
    fresh = mlp_grads(model, x, use_reentrant=False, preserve_rng_state=False)
    assert rel_err(fresh["0.lora_A"], plain["0.lora_A"]) > 1e-2


def bert_grads(model, batch):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    model(**batch).loss.backward()
    return trainable_grads(model)


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_hf_gradient_checkpointing_patched_peft_bert(use_reentrant):
    """transformers' gradient_checkpointing_enable on a patched PEFT BERT (lora_dropout 0.1 and model
    dropout 0.1): every layer stays fused and the gradients equal the non-checkpointed model's."""
    plain = patched_bert("torch", lora_dropout=0.1, hidden_dropout=0.1).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    # Reentrant checkpointing only backpropagates into segments whose inputs require grad, and PEFT freezes
    # the embeddings: the usual PEFT step (transformers 5 does it inside gradient_checkpointing_enable too).
    checkpointed.enable_input_require_grads()
    assert all(layer.gradient_checkpointing for layer in checkpointed.base_model.model.bert.encoder.layer)
    batch = bert_batch()
    with count_fused_calls() as calls:
        expected = bert_grads(plain, batch)
        calls_plain = len(calls)
        got = bert_grads(checkpointed, batch)
    assert calls_plain == 13
    # 13 in the forward + the 12 encoder layers' recompute (the pooler is not checkpointed).
    assert len(calls) - calls_plain == 13 + 12
    assert_same_tensors(got, expected, rtol=REPEAT_RTOL, what="HF checkpointed")


class CheckpointedMLP(torch.nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return checkpoint(self.inner, x, use_reentrant=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_checkpoint_keeps_the_mask(backend):
    """torch.compile(fullgraph) over a non-reentrant checkpoint: AOTAutograd's partitioner decides what to
    recompute; the dropout seed is a graph value, so the recompute (if any) must use the forward's mask."""
    torch._dynamo.reset()  # fresh caches: earlier tests compiled the same forward code
    model = lora_mlp(backend, dropout=P).to(DEVICE)
    x = torch.randn(3, 5, 24, device=DEVICE)
    plain = mlp_grads(model, x)
    compiled = torch.compile(CheckpointedMLP(copy.deepcopy(model)), fullgraph=True, backend="aot_eager")
    got = mlp_grads(compiled, x)
    assert_same_tensors(got, plain, rtol=REPEAT_RTOL, what=f"{backend} compiled + checkpoint")
