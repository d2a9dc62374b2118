"""``python -m lorafast bench --moe``: the report has every implementation at each shape, lorafast's outputs match
float64, and no step of lorafast makes a tensor as large as PEFT's W + s·ΔW (timings are not asserted)."""

from __future__ import annotations

import json

from lorafast.__main__ import main


def test_cli_moe_writes_report(tmp_path, capsys):
    assert main(["bench", "--device", "cpu", "--moe", "4,32,16,2,8", "--quick", "--cpu-budget", "0.01",
                 "--out", str(tmp_path), "--name", "moe"]) == 0
    report = json.loads((tmp_path / "moe.json").read_text())
    rows = {r["impl"]: r for r in report["moe"]["rows"]}
    assert set(rows) == {"frozen", "peft grouped_mm", "peft eager", "lorafast aten"}
    assert rows["lorafast aten"]["max_rel_err"] < 1e-5 and rows["peft grouped_mm"]["max_rel_err"] < 1e-5
    # PEFT's largest tensor is W + s·ΔW for all experts (E·2I·H fp32); lorafast's stays below one expert stack.
    expert_stack = 4 * 32 * 32 * 4
    assert rows["peft grouped_mm"]["largest_new_tensor_bytes"] >= expert_stack
    assert rows["lorafast aten"]["largest_new_tensor_bytes"] < expert_stack
    assert report["moe"]["notes"] == []
    assert "| E=4 H=32 I=16 top-2 T=8 | lorafast aten |" in (tmp_path / "moe.md").read_text()
    assert "MoE experts" in capsys.readouterr().out


def test_cli_moe_bad_shape_is_one_clear_error(capsys):
    assert main(["bench", "--device", "cpu", "--moe", "4,32,16"]) == 2
    assert "--moe: expected E,H,I,K,T" in capsys.readouterr().err
