"""The AOT compile gate (`python -m lorafast.aot`): compiles for sm_80/sm_90 on a CPU-only machine.

The compiler cannot run in this process (conftest sets TRITON_INTERPRET=1, which turns @triton.jit
into interpreter objects), so every compile runs in a subprocess. Its working directory is a temp
dir so the repo root (and its top-level `kernels/` folder) stays off sys.path.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorafast.aot import SMEM_LIMIT_BYTES, GateRow, config_label

TOY_ENTRIES = str(Path(__file__).parent / "support" / "aot_toy_kernels.py")


def _run_gate(tmp_path: Path, *args: str, interpreter_env: bool) -> tuple[subprocess.CompletedProcess, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpreter_env:
        env["TRITON_INTERPRET"] = "1"
    out = tmp_path / "gate.json"
    proc = subprocess.run(
        [sys.executable, "-m", "lorafast.aot", "--arch", "80", "--arch", "90", "--json", str(out), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200,
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    return proc, report


def test_gate_passes_clean_toy_kernels_and_flags_every_defect(tmp_path):
    # Run from an interpreter-mode environment on purpose: the CLI must re-run itself without it.
    proc, report = _run_gate(
        tmp_path, "--entries", f"{TOY_ENTRIES}:aot_entries_with_defects", interpreter_env=True
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 1, log
    rows = report["rows"]
    assert len(rows) == 2 * 7, log
    expected_problem = {
        "defect_spill": "spills",
        "defect_smem": "shared memory",
        "defect_no_tensor_cores": "no tensor-core",
        "defect_compile_error": "compile error",
    }
    for row in rows:
        where = f"{row['kernel']} {row['dtype']} sm_{row['arch']} {row['config']}: {row['problems']}"
        if row["kernel"] in expected_problem:
            assert any(expected_problem[row["kernel"]] in p for p in row["problems"]), where
            continue
        assert row["problems"] == [], where
        assert row["spill_bytes"] == 0 and 0 < row["regs"] <= 255, where
        assert 0 < row["smem_bytes"] <= SMEM_LIMIT_BYTES[row["arch"]], where
        if row["kernel"] == "toy_matmul":
            assert row["tc_instructions"] > 0 and row["ptx_mma"] > 0, where
            assert row["tc_op"] == ("HGMMA" if row["arch"] == 90 else "HMMA"), where
        else:
            assert row["tc_instructions"] == 0, where


def test_judge_thresholds_are_inclusive_limits():
    def judged(**kw) -> GateRow:
        base = dict(kernel="k", config="c", arch=90, dtype="bf16", uses_dot=True, regs=128, spill_bytes=0,
                    smem_bytes=SMEM_LIMIT_BYTES[90], tc_instructions=4, tc_op="HGMMA")
        row = GateRow(**{**base, **kw})
        row.judge()
        return row

    assert judged().problems == []
    assert "shared memory" in judged(smem_bytes=SMEM_LIMIT_BYTES[90] + 1).problems[0]
    assert "shared memory" in judged(arch=80).problems[0]  # 227 KiB fits sm_90, not sm_80
    assert "spills 4 B" in judged(spill_bytes=4).problems[0]
    assert "tensor-core" in judged(tc_instructions=0, tc_op="-").problems[0]
    assert judged(uses_dot=False, tc_instructions=0).problems == []
    assert judged(tc_op="HMMA").notes and not judged(tc_op="HMMA").problems


def test_config_label_names_blocks_warps_and_stages():
    import triton

    cfg = triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=4, num_stages=3)
    assert config_label(cfg) == "BLOCK_M=64,BLOCK_N=128,w4,s3"


@pytest.mark.skipif(
    importlib.util.find_spec("lorafast.kernels.registry") is None,
    reason="lorafast.kernels.registry (aot_entries) not written yet",
)
def test_registry_kernels_compile_for_sm80_and_sm90_without_spills(tmp_path):
    proc, report = _run_gate(tmp_path, interpreter_env=False)
    if proc.returncode != 0:
        tail = proc.stderr[-4000:]
        pytest.fail(f"AOT gate failed (exit {proc.returncode}):\n{proc.stdout}\n{tail}", pytrace=False)
    log = proc.stdout + proc.stderr
    assert report["passed"] and report["rows"], log
    assert {row["arch"] for row in report["rows"]} == {80, 90}, log
    print(proc.stdout)
