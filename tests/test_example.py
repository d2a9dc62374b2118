"""Smoke test of examples/finetune_classifier.py: a tiny offline run of both implementations."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_classifier.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("finetune_classifier", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_lexicon_split_is_fixed_and_disjoint(example):
    first, second = example.lexicon_split("sentiment", seed=0), example.lexicon_split("sentiment", seed=0)
    assert first.train_texts == second.train_texts and first.test_texts == second.test_texts
    assert not set(first.train_texts) & set(first.test_texts)
    assert set(first.train_labels) == {0, 1} and len(first.test_texts) > 1000
    emotion = example.lexicon_split("emotion", seed=0)
    assert len(emotion.label_names) == 8 and set(emotion.train_labels) == set(range(8))


def test_main_runs_both_impls_offline(example, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # Without dropout the two implementations compute the same numbers (up to rounding).
    results = example.main(["--impl", "both", "--epochs", "1", "--max-train", "64", "--max-test", "64",
                            "--dropout", "0", "--backend", "torch", "--no-progress"])
    peft, fused = results
    assert (peft.impl, fused.impl) == ("peft", "lorafast")
    assert peft.trainable_params == fused.trainable_params > 0
    assert fused.final_loss == pytest.approx(peft.final_loss, rel=1e-4)
    assert abs(fused.accuracy - peft.accuracy) <= 1 / 64
    table = capsys.readouterr().out
    assert "| lorafast | 8 | 16 |" in table and "| peft | 8 | 16 |" in table


def test_main_quant_nf4_runs_both_impls(example, monkeypatch, capsys):
    """--quant nf4: MiniLM loaded in 4-bit through BitsAndBytesConfig on CPU; PEFT's QLoRA layers patched."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    results = example.main(["--impl", "both", "--quant", "nf4", "--epochs", "1", "--max-train", "16",
                            "--max-test", "16", "--batch-size", "8", "--dropout", "0", "--backend", "torch",
                            "--no-progress"])
    peft, fused = results
    assert peft.trainable_params == fused.trainable_params > 0
    # Same 4-bit weights, no dropout: the two agree to rounding (the LoRA branch runs in the compute dtype).
    assert fused.final_loss == pytest.approx(peft.final_loss, rel=1e-3)
    out = capsys.readouterr().out
    assert "base in 4-bit nf4" in out and "| lorafast | 8 | 16 |" in out


def test_build_model_patches_qlora_layers(example):
    pytest.importorskip("bitsandbytes")
    from lorafast.peft.bnb import FusedLoraLinear4bit

    args = example.parse_args(["--quant", "nf4", "--device", "cpu"])
    model = example.build_model(example.bundled_model_dir(), 2, 4, 8, args, "lorafast")
    patched = [m for m in model.modules() if type(m) is FusedLoraLinear4bit]
    assert len(patched) == 12  # query and value in each of the 6 layers (PEFT's default BERT targets)


def test_main_dora_runs_both_impls_fused(example, monkeypatch, capsys):
    """--dora: PEFT DoRA adapters; the patched run takes the fused DoRA path (no fallback) and, without dropout,
    the same loss as PEFT to rounding."""
    import lorafast.peft.dora as peft_dora

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    calls = []
    real = peft_dora.fused_dora_forward
    monkeypatch.setattr(peft_dora, "fused_dora_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = example.main(["--impl", "both", "--dora", "--epochs", "1", "--max-train", "16", "--max-test", "16",
                            "--batch-size", "16", "--dropout", "0", "--backend", "torch", "--no-progress"])
    peft, fused = results
    assert calls and peft.trainable_params == fused.trainable_params > 0
    assert fused.final_loss == pytest.approx(peft.final_loss, rel=1e-4)
    assert ", DoRA" in capsys.readouterr().out

