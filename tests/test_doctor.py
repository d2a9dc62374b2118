"""``python -m lorafast doctor``: passes on this CPU (aten, plus fused and cublas in the interpreter, which it sets
up itself), writes the JSON report, and exits 1 when a strategy is broken (planted in a subprocess)."""

import json
import os
import subprocess
import sys
import textwrap

import torch

from lorafast import doctor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env_without_interpreter():
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def test_quick_doctor_passes_here_and_writes_the_report(tmp_path):
    out = tmp_path / "out.json"
    done = subprocess.run([sys.executable, "-m", "lorafast", "doctor", "--quick", "--json", str(out)], cwd=tmp_path,
                          env=_env_without_interpreter(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "re-executing with TRITON_INTERPRET=1" in done.stdout and "lorafast doctor: ok" in done.stdout
    report = json.loads(out.read_text())
    assert set(report) >= {"versions", "device", "compile", "checks", "timings", "strategy_cache", "ok"}
    assert report["ok"] is True
    assert report["versions"]["torch"] == torch.__version__ and report["versions"]["lorafast"]
    assert report["device"]["type"] == "cpu" and "skipped" in report["compile"]
    checks = report["checks"]
    assert all(set(c) >= {"strategy", "dtype", "dropout", "shape", "errors", "ok"} and c["ok"] for c in checks)
    seen = {(c["strategy"], c["dtype"], c["dropout"], c["call"]) for c in checks}
    assert seen == {(s, d, p, call) for s in ("aten", "fused", "cublas") for d in ("fp32", "bf16", "fp16")
                    for p in (0.0, 0.1) for call in (1, 2)}
    assert all(set(c["errors"]) == {"y", "dx", "da", "db", "dbias"} for c in checks)
    assert all(c["keep"] is not None for c in checks if c["dropout"] > 0)
    assert [t["shape"] for t in report["timings"]] == ["bert", "llama"]
    assert all(t["times_ms"]["aten"] > 0 and t["auto"].startswith("aten") for t in report["timings"])


def test_doctor_fails_on_a_planted_broken_strategy(tmp_path):
    out = tmp_path / "out.json"
    script = textwrap.dedent(f"""
        from lorafast import doctor, strategies

        impl = strategies.get("cublas")
        real = impl.backward

        def backward(*args):  # dA loses its first row, as a lost split partial would
            dx, da, db, dbias = real(*args)
            da = da.clone()
            da[0] = 0.0
            return dx, da, db, dbias

        impl.backward = backward
        raise SystemExit(doctor.main(["--quick", "--strategies", "cublas", "--json", {str(out)!r}]))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    assert "FAILED: 12 check(s)" in done.stdout
    report = json.loads(out.read_text())
    assert report["ok"] is False and {c["strategy"] for c in report["checks"]} == {"cublas"}
    for check in report["checks"]:
        assert not check["ok"] and check["errors"]["da"] > check["budgets"]["da"]
        assert all(check["errors"][k] <= check["budgets"][k] for k in ("y", "dx", "db", "dbias"))


def test_a_mask_that_keeps_everything_fails_the_keep_check():
    x = torch.randn(40, 50, dtype=torch.float64)
    outputs = {"y": x * 2}
    ok = doctor.check_calls(lambda: outputs, outputs, outputs, torch.float32, torch.rand(40, 50) >= 0.1, 0.1)
    assert all(r.ok for r in ok) and len(ok) == doctor.CALLS
    (bad,) = doctor.check_calls(lambda: outputs, outputs, outputs, torch.float32, torch.ones(40, 50, dtype=bool), 0.1,
                                calls=1)
    assert bad.keep == 1.0 and not bad.ok


def test_an_op_adds_its_cases_in_a_few_lines(monkeypatch, capsys):
    """How DoRA or MoE plug in: a family function returning Cases whose check calls check_calls."""
    def scale_cases(quick, device, only):
        x = torch.randn(7, 9)
        ref = {"y": x.double() * 3}
        step = lambda: {"y": x * 3 + (0.1 if "broken" in only else 0.0)}  # noqa: E731
        return [doctor.Case("scale", "aten", torch.float32, torch.float32, 0.0, "7x9",
                            lambda: doctor.check_calls(step, ref, {"y": x * 3}, torch.float32))]

    monkeypatch.setattr(doctor, "CASE_FAMILIES", {"scale": scale_cases})
    checks = doctor.run_checks(True, torch.device("cpu"))
    assert [(c["op"], c["call"], c["ok"]) for c in checks] == [("scale", 1, True), ("scale", 2, True)]
    assert not any(c["ok"] for c in doctor.run_checks(True, torch.device("cpu"), ("broken",)))
    assert "scale" in capsys.readouterr().out
