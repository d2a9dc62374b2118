"""``python -m lorafast bench --dora``: a tiny run has every row, errors vs float64 at the dtype's floor (the lorafast
rows' dropout masks replayed), no N×K allocation for lorafast's DoRA and some for PEFT's, and the report section."""

import pytest
import torch

pytest.importorskip("peft")

from lorafast.bench import dora  # noqa: E402
from lorafast.bench.cli import add_arguments, config_from_args  # noqa: E402
from lorafast.shapes import Shape  # noqa: E402


def test_tiny_run_rows_errors_and_targets():
    config = dora.DoraConfig(cases=[(Shape("tiny", 16, 24, 20), 2)], dropouts=[0.0, 0.25], dtype=torch.float32,
                             device=torch.device("cpu"), quick=True, cpu_budget_s=0.05)
    result = dora.run_dora(config)
    rows = {(r["dropout"], r["impl"]): r for r in result["rows"]}
    impls = {"peft-dora", "lorafast-dora", "dora-aten", "peft-lora", "lorafast-lora", "base"}
    assert {impl for _, impl in rows} == impls
    for p in (0.0, 0.25):
        for impl in ("lorafast-dora", "dora-aten", "lorafast-lora"):
            errors = rows[(p, impl)]["errors"]
            assert errors and max(errors.values()) < 1e-5, (p, impl, errors)
        assert set(rows[(p, "lorafast-dora")]["errors"]) == {"y", "dx", "da", "db", "dm"}
        assert rows[(p, "lorafast-dora")]["nk_allocs"] == 0 and rows[(p, "peft-dora")]["nk_allocs"] >= 1
    assert rows[(0.0, "peft-dora")]["errors"] and not rows[(0.25, "peft-dora")]["errors"]
    assert len(result["targets"]) == 2 and all(t["saved met"] for t in result["targets"])
    text = dora.dora_markdown(result)
    assert "## DoRA" in text and "lorafast-dora" in text and "Targets" in text


def test_cli_dora_defaults():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--dora", "--device", "cpu"])
    assert args.dora and config_from_args(args).dtype == torch.float32
    with pytest.raises(ValueError, match="choose one"):
        config_from_args(parser.parse_args(["--dora", "--host", "--device", "cpu"]))
    assert [(s.M, s.K, s.N, r) for s, r in dora.DORA_CASES["cpu"]] == [(2048, 768, 768, 8), (512, 2048, 5632, 16)]
