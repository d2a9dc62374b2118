"""The bench CLI end to end on a tiny CPU shape, its correctness machinery, and the roofline model.

No timing assertions: only that the report is complete, finite and self-consistent.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lorafast import bench, roofline
from lorafast.__main__ import main

TINY = bench.Shape("tiny", 64, 96, 80)


def _strict_json(path):
    def reject(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    with open(path, encoding="utf-8") as f:
        return json.load(f, parse_constant=reject)


def test_cli_quick_cpu_writes_complete_report(tmp_path, capsys):
    argv = ["bench", "--quick", "--device", "cpu", "--shapes", "64,96,80", "--rank", "4", "--dropout", "0", "0.1",
            "--cpu-budget", "0.05", "--out", str(tmp_path), "--name", "tiny", "--no-progress"]
    assert main(argv) == 0
    report = _strict_json(tmp_path / "tiny.json")
    assert report["environment"]["device"] == "cpu"
    assert report["environment"]["backend_resolved"] == "aten"
    assert report["failures"] == []
    results = report["results"]
    # fwd (eval) once, fwd+bwd for each p; four implementations each.
    groups = {(r["mode"], r["dropout"]) for r in results}
    assert groups == {("fwd", None), ("fwd+bwd", 0.0), ("fwd+bwd", 0.1)}
    for group in groups:
        impls = {r["impl"] for r in results if (r["mode"], r["dropout"]) == group}
        assert impls == set(bench.IMPLEMENTATIONS)
    for r in results:
        assert r["median_ms"] > 0 and math.isfinite(r["median_ms"]) and r["reps"] >= 3
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["correct"] is True
        expected = {"y"} if r["mode"] == "fwd" else ({"y", "dx"} if r["impl"] == "base" else {"y", "dx", "da", "db"})
        assert expected <= set(r["errors"])
        assert all(math.isfinite(v) and v < 1e-4 for k, v in r["errors"].items() if k != "keep")
        if r["mode"] == "fwd+bwd":
            assert r["saved_bytes"] >= r["saved_extra_bytes"] >= 0
    for row in report["summary"]:
        for key in ("speedup_vs_peft", "lorafast_vs_base", "peft_vs_base"):
            assert row[key] > 0 and math.isfinite(row[key])
    markdown = (tmp_path / "tiny.md").read_text(encoding="utf-8")
    for word in ("lorafast", "PEFT", "reference", "base", "speedup vs PEFT"):
        assert word in markdown
    assert (tmp_path / "tiny.png").stat().st_size > 0
    assert "speedup vs PEFT" in capsys.readouterr().out


def test_parse_shapes_presets_and_explicit():
    shapes = bench.parse_shapes(["bert,llama", "64x96x80", "1,2,3"])
    assert [s.name for s in shapes[:4]] == ["bert-attn", "bert-ffn-up", "llama8b-attn", "llama8b-mlp-up"]
    assert (shapes[4].M, shapes[4].K, shapes[4].N) == (64, 96, 80)
    assert (shapes[5].M, shapes[5].K, shapes[5].N) == (1, 2, 3)
    with pytest.raises(ValueError, match="unknown shape 'gpt'"):
        bench.parse_shapes(["gpt"])


@pytest.mark.parametrize("name", ["reference", "peft"])
def test_recovered_dropout_mask_is_the_one_drawn(name):
    inputs = bench.make_inputs(TINY, 4, torch.float32, torch.device("cpu"))
    mask = bench.recover_dropout_mask(name, inputs, 0.5, "auto", seed=3)
    # Both draw F.dropout's mask from the global generator, first thing after the seed.
    torch.manual_seed(3)
    drawn = F.dropout(torch.ones(TINY.M, TINY.K), p=0.5) != 0
    assert torch.equal(mask, drawn)


def test_check_flags_a_wrong_mask_and_a_wrong_layer():
    inputs = bench.make_inputs(TINY, 4, torch.float32, torch.device("cpu"))
    errors = bench.check_implementation("lorafast", inputs, 0.3, "fwd+bwd")
    assert bench.passes(errors, None, torch.float32)
    assert 0.5 < errors["keep"] < 0.9
    # The reference replayed with a different mask than the one drawn must fail the check.
    wrong = bench.float64_reference(inputs, 0.3, True, torch.rand(TINY.M, TINY.K) >= 0.3, base_only=False)
    assert bench.relative_error(wrong[1], bench.float64_reference(inputs, 0.3, True, None, False)[1]) > 1e-3
    # An implementation that forgets the LoRA branch fails.
    base_as_lora = {"y": bench.relative_error(F.linear(inputs.x, inputs.weight, inputs.bias),
                                              bench.float64_reference(inputs, 0.0, False, None, False)[0])}
    assert not bench.passes(base_as_lora, None, torch.float32)
    assert not bench.passes({"y": float("nan")}, None, torch.float32)


def test_saved_bytes_fused_keeps_nothing_of_size_mk():
    inputs = bench.make_inputs(TINY, 4, torch.float32, torch.device("cpu"))
    impls = bench.build_implementations(inputs, 0.1)
    mk_bytes = TINY.M * TINY.K * 4
    _, fused_extra = bench.saved_bytes(impls["lorafast"], inputs)
    _, peft_extra = bench.saved_bytes(impls["peft"], inputs)
    _, base_extra = bench.saved_bytes(impls["base"], inputs)
    # H (M×r fp32) and scalars only — and at least H, so the hooks do see what lorafast saves.
    assert TINY.M * 4 * 4 <= fused_extra < mk_bytes / 4
    assert peft_extra >= mk_bytes  # PEFT keeps the dropped-out copy of x (and its mask)
    assert base_extra == 0


@pytest.mark.parametrize("shape", bench.SHAPE_PRESETS["bert"] + bench.SHAPE_PRESETS["llama"], ids=lambda s: s.name)
@pytest.mark.parametrize("mode", roofline.MODES)
@pytest.mark.parametrize("p", [0.0, 0.1])
def test_roofline_orders_the_implementations(shape, mode, p):
    for r in (8, 16, 64):
        plans = roofline.plans(shape.M, shape.K, shape.N, r, p, mode, "bfloat16")
        fused, peft, base = plans["lorafast"], plans["peft"], plans["base"]
        assert base.bytes < fused.bytes < peft.bytes
        assert base.flops < fused.flops <= peft.flops * 1.001
        assert len(base.kernels) < len(fused.kernels) < len(peft.kernels)
        for ceilings in roofline.DEVICES.values():
            pred = roofline.predict(shape.M, shape.K, shape.N, r, p, mode, "bfloat16", ceilings)
            assert pred["ms"]["base"] <= pred["ms"]["lorafast"] < pred["ms"]["peft"]
            assert pred["speedup_vs_peft"] > 1.0 and pred["lorafast_vs_base"] >= 1.0


def test_roofline_numbers_by_hand():
    # Llama attention projection, r=16, training with p=0.1, bf16: the base GEMM pair is
    # 2·2·8192·4096·4096 FLOPs; PEFT's dropout alone moves 2·M·K bf16 + an M·K bool mask.
    M, K, N, r = 8192, 4096, 4096, 16
    plans = roofline.plans(M, K, N, r, 0.1, "fwd+bwd", "bfloat16")
    assert plans["base"].flops == 4 * M * N * K
    dropout = [k for k in plans["peft"].kernels if k.name.startswith("dropout:")]
    assert dropout[0].bytes == 2 * 2 * M * K + M * K
    h100 = roofline.H100
    gemm_s = 2 * M * N * K / h100.matmul_flops["bfloat16"]
    assert plans["base"].seconds(h100, "bfloat16", with_launch=False) == pytest.approx(2 * gemm_s)
    assert roofline.ceilings_for_device_name("NVIDIA H100 80GB HBM3") is roofline.H100
    assert roofline.ceilings_for_device_name("NVIDIA A100-SXM4-40GB") is None
    with pytest.raises(ValueError, match="mode"):
        roofline.plans(M, K, N, r, 0.1, "bwd", "bfloat16")


def test_check_replays_the_triton_backends_own_mask():
    # Interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1), real kernels on a GPU: the
    # Philox mask differs from the torch backend's, and the probe must recover it all the same.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = bench.make_inputs(TINY, 4, torch.float32, device)
    errors = bench.check_implementation("lorafast", inputs, 0.3, "fwd+bwd", backend="triton")
    assert bench.passes(errors, None, torch.float32), errors
    assert 0.5 < errors["keep"] < 0.9


def test_an_implementation_that_raises_is_reported_and_the_others_still_run(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed to compile")

    monkeypatch.setattr(bench.lorafast, "lora_linear", broken)
    config = bench.BenchConfig(
        shapes=[TINY], ranks=[4], dropouts=[0.1], dtype=torch.float32, device=torch.device("cpu"),
        quick=True, progress=False, cpu_budget_s=0.01,
    )  # fmt: skip
    seen = []
    report = bench.run_benchmark(config, on_group_done=lambda partial: seen.append(len(partial["results"])))
    assert report["complete"] and seen == [3, 6]
    assert {r["impl"] for r in report["results"]} == {"peft", "reference", "base"}
    assert len(report["failures"]) == 2
    assert all("lorafast" in f and "RuntimeError: kernel failed to compile" in f for f in report["failures"])
    assert "Correctness failures" in bench.markdown_report(report)


def test_gpu_report_shows_roofline_predictions(tmp_path):
    # The GPU-only parts of the report (predictions, peak memory), fed by a synthetic result set.
    shape = bench.SHAPE_PRESETS["llama"][0]
    pred = bench.predicted_ms("NVIDIA H100 80GB HBM3", torch.bfloat16, shape, 16, 0.1, "fwd+bwd")
    assert set(pred) == set(bench.IMPLEMENTATIONS) and pred["base"] < pred["lorafast"] < pred["peft"]
    assert bench.predicted_ms(None, torch.bfloat16, shape, 16, 0.1, "fwd+bwd") == {}
    measured = {"lorafast": 0.8, "peft": 1.3, "reference": 1.3, "base": 0.7}
    results = [
        dict(shape=shape.name, M=shape.M, K=shape.K, N=shape.N, rank=16, dropout=0.1, mode="fwd+bwd", impl=name,
             median_ms=ms, p20_ms=ms, p80_ms=ms, reps=-1, timer="do_bench", errors={"y": 1e-3}, correct=True,
             saved_bytes=10**6, saved_extra_bytes=10**5, peak_bytes=10**8, predicted_ms=pred[name])
        for name, ms in measured.items()
    ]  # fmt: skip
    env = {
        "device": "cuda", "device_name": "NVIDIA H100 80GB HBM3", "torch": "t", "triton": "t", "peft": "p",
        "date": "2026-11-23T14:00:00+00:00", "dtype": "bfloat16", "backend": "auto", "backend_resolved": "triton",
    }  # fmt: skip
    report = {"environment": env, "results": results, "failures": [], "complete": True}
    (row,) = bench.summary_rows(report)
    assert row["speedup_vs_peft"] == pytest.approx(1.3 / 0.8)
    assert row["predicted_speedup_vs_peft"] == pytest.approx(pred["peft"] / pred["lorafast"])
    markdown = bench.markdown_report(report)
    assert "pred. speedup" in markdown and "100.00" in markdown  # peak MB column
    paths = bench.write_report(report, str(tmp_path))
    assert paths["json"].endswith("nvidia-h100-80gb-hbm3-2026-11-23-1400.json")
    assert _strict_json(paths["json"])["summary"][0]["predicted_lorafast_vs_base"] > 1.0


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--shapes", "gpt"], "unknown shape 'gpt'"),
        (["--dtype", "int8"], "--dtype"),
        (["--dropout", "1.0"], "--dropout"),
        (["--rank", "0"], "--rank"),
    ],
)
def test_cli_bad_flags_give_one_clear_error(flags, message, capsys):
    assert main(["bench", "--device", "cpu", *flags]) == 2
    err = capsys.readouterr().err
    assert "lorafast bench: error:" in err and message in err
