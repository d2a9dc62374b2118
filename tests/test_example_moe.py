"""Smoke test of examples/finetune_moe.py: a few steps of both implementations, and the adapter round trip."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "finetune_moe.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("finetune_moe", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve string annotations through sys.modules
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_both_impls_train_alike(example, capsys):
    peft, fused = example.main(["--impl", "both", "--steps", "4", "--backend", "aten"])
    assert (peft.impl, fused.impl) == ("peft", "lorafast")
    assert fused.losses == pytest.approx(peft.losses, rel=1e-4)  # no dropout: the same numbers up to rounding
    assert "| lorafast |" in capsys.readouterr().out


def test_expert_dropout_and_vanilla_reload(example, tmp_path, capsys):
    (run,) = example.main(["--impl", "lorafast", "--steps", "6", "--expert-dropout", "0.1", "--save", str(tmp_path)])
    assert run.losses[-1] < run.losses[0]
    out = capsys.readouterr().out
    diff = float(out.split("max |Δlogits| = ")[1].split()[0])
    assert diff < 1e-5 and (tmp_path / "adapter_config.json").exists()
