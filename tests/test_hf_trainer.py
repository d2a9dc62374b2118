"""HF Trainer with gradient checkpointing on a patched PEFT BERT: one epoch runs on the fused path and
trains exactly as the same run without checkpointing (LoRA dropout and model dropout on)."""

from __future__ import annotations

import copy
import math

import torch
from support.composability import (
    BERT_LORA_LAYERS,
    NUM_LABELS,
    VOCAB,
    assert_same_tensors,
    count_fused_calls,
    patched_bert,
    trainable_params,
)

EXAMPLES, BATCH = 16, 4
STEPS = EXAMPLES // BATCH


def tiny_dataset():
    gen = torch.Generator().manual_seed(0)
    return [
        {"input_ids": torch.randint(3, VOCAB, (6,), generator=gen), "labels": torch.tensor(i % NUM_LABELS)}
        for i in range(EXAMPLES)
    ]


def train_one_epoch(model, output_dir, gradient_checkpointing: bool):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=str(output_dir), use_cpu=True, num_train_epochs=1, per_device_train_batch_size=BATCH,
        learning_rate=5e-2, gradient_checkpointing=gradient_checkpointing, report_to="none",
        save_strategy="no", logging_steps=1, seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=tiny_dataset())
    with count_fused_calls() as calls:
        trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return losses, trainable_params(model), len(calls), trainer.state.epoch


def test_trainer_epoch_with_gradient_checkpointing(tmp_path):
    model = patched_bert("torch", lora_dropout=0.1, hidden_dropout=0.1)
    before = trainable_params(model)
    plain = copy.deepcopy(model)

    losses, params, fused_calls, epoch = train_one_epoch(model, tmp_path / "gc", gradient_checkpointing=True)
    assert epoch == 1 and len(losses) == STEPS and all(math.isfinite(loss) for loss in losses), losses
    encoder = model.base_model.model.bert.encoder
    assert all(layer.gradient_checkpointing for layer in encoder.layer), "Trainer did not enable checkpointing"
    # Per step: every LoRA layer in the forward, the 12 encoder ones again in the recompute.
    assert fused_calls == STEPS * (BERT_LORA_LAYERS + 12)
    for name, value in params.items():
        assert not torch.equal(value, before[name]), f"{name} did not train"

    losses_plain, params_plain, _, _ = train_one_epoch(plain, tmp_path / "plain", gradient_checkpointing=False)
    torch.testing.assert_close(losses, losses_plain, rtol=1e-5, atol=0)
    assert_same_tensors(params, params_plain, rtol=1e-5, what="checkpointed vs plain")
