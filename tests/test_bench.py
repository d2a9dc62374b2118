"""The bench CLI end to end on a tiny CPU shape, its correctness machinery, and the roofline model.

No timing assertions: only that the report is complete, finite and self-consistent.
"""

import json
import math
import os

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
            "--cpu-budget", "0.05", "--out", str(tmp_path), "--name", "tiny", "--no-progress", "--no-host"]
    assert main(argv) == 0
    report = _strict_json(tmp_path / "tiny.json")
    assert report["environment"]["device"] == "cpu"
    assert report["environment"]["backend_resolved"] == "aten"
    assert report["environment"]["strategies"] == ["aten"]  # the only one that runs on a CPU
    assert "host" not in report
    assert report["failures"] == []
    results = report["results"]
    # fwd (eval) once, fwd+bwd for each p; four implementations each.
    groups = {(r["mode"], r["dropout"]) for r in results}
    assert groups == {("fwd", None), ("fwd+bwd", 0.0), ("fwd+bwd", 0.1)}
    for group in groups:
        impls = {r["impl"] for r in results if (r["mode"], r["dropout"]) == group}
        assert impls == {*bench.IMPLEMENTATIONS, "aten"}
    for r in results:
        assert r["strategy"] == ("aten" if r["impl"] in ("lorafast", "aten") else None)
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
    for word in ("lorafast", "PEFT", "reference", "base", "speedup vs PEFT", "aten", "auto →", "need CUDA"):
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
    assert len(report["failures"]) == 4  # lorafast and the aten strategy row, fwd and fwd+bwd
    assert {f.split()[0] for f in report["failures"]} == {"lorafast", "aten"}
    assert all("RuntimeError: kernel failed to compile" in f for f in report["failures"])
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


# ---- strategies (issue 9), adapter dtype, host cost (issue 10), QLoRA (issue 11) ----------------------------


def test_strategies_flag_times_the_fused_strategy_in_the_interpreter(tmp_path):
    # conftest sets TRITON_INTERPRET=1 on CPU, so `fused` runs (in the interpreter) and is checked like the rest.
    argv = ["bench", "--quick", "--device", "cpu", "--shapes", "16,24,20", "--rank", "2", "--dropout", "0.2",
            "--strategies", "fused", "aten", "--cpu-budget", "0.01", "--out", str(tmp_path), "--name", "s",
            "--no-progress", "--no-host"]  # fmt: skip
    assert main(argv) == 0
    report = _strict_json(tmp_path / "s.json")
    assert report["environment"]["strategies"] == ["fused", "aten"]
    rows = {(r["impl"], r["mode"]): r for r in report["results"]}
    for mode in ("fwd", "fwd+bwd"):
        assert rows[("fused", mode)]["strategy"] == "fused" and rows[("fused", mode)]["correct"]
        assert rows[("aten", mode)]["strategy"] == "aten"
        assert rows[("lorafast", mode)]["strategy"] == "aten"  # what auto runs on a CPU
    assert 0.5 < rows[("fused", "fwd+bwd")]["errors"]["keep"] < 1.0  # its own mask was recovered and replayed
    summary = report["summary"]
    assert all({"fused", "aten"} <= set(row["ms"]) and row["strategy"] == "aten" for row in summary)
    markdown = (tmp_path / "s.md").read_text(encoding="utf-8")
    assert "| fused | aten | auto → |" in markdown and "Not timed: cublas" in markdown


def test_triton_strategies_on_cpu_without_the_interpreter_are_a_clear_error(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert main(["bench", "--device", "cpu", "--strategies", "cublas"]) == 2
    err = capsys.readouterr().err
    assert "lorafast bench: error: --strategies: cublas need CUDA" in err


def test_adapter_dtype_fp32_on_bf16_is_checked_against_float64(tmp_path):
    from lorafast.kernels import dtypes

    argv = ["bench", "--quick", "--device", "cpu", "--dtype", "bf16", "--adapter-dtype", "fp32", "--shapes",
            "32,48,40", "--rank", "4", "--dropout", "0", "--cpu-budget", "0.01", "--out", str(tmp_path), "--name",
            "a", "--no-progress", "--no-host", "--adapter-precision", "fp32"]  # fmt: skip
    before = dtypes.adapter_precision()
    try:
        assert main(argv) == 0
    finally:
        dtypes.set_adapter_precision(before)
    report = _strict_json(tmp_path / "a.json")
    assert report["environment"]["dtype"] == "bfloat16" and report["environment"]["adapter_dtype"] == "float32"
    assert report["environment"]["adapter_precision"] == "fp32"
    assert report["failures"] == [] and all(r["correct"] for r in report["results"])
    lora_rows = [r for r in report["results"] if r["impl"] != "base"]
    assert all(0 < r["errors"]["y"] < 1e-2 for r in lora_rows)  # bf16 rounding, measured, not zero
    inputs = bench.make_inputs(TINY, 4, torch.bfloat16, "cpu", adapter_dtype=torch.float32)
    layer = bench.peft_layer(inputs, 0.0)
    assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's upcast kept in the PEFT row
    assert layer.base_layer.weight.dtype == torch.bfloat16


def test_make_inputs_is_the_one_builder_and_tests_utils_delegates():
    import utils

    a = bench.make_inputs(TINY, 3, torch.float32, "cpu", seed=5)
    b = bench.make_inputs(TINY, 3, torch.float32, "cpu", seed=5)
    assert torch.equal(a.x, b.x) and torch.equal(a.dy, b.dy)  # private generator: reproducible
    assert a.x.abs().min() > 0 and a.lora_b.abs().sum() > 0 and not a.x.requires_grad
    assert utils.LoraInputs is bench.LoRAInputs
    t = utils.make_inputs(5, 7, 6, 2, lead=(3,))
    assert t.x.shape == (3, 5, 7) and t.x.requires_grad and t.bias.requires_grad and t.dy is None
    assert len(t.leaves()) == 4 and t.to64().x.dtype == torch.float64


def test_launch_counter_counts_kernels_not_views():
    from lorafast.bench.host import LaunchCounter

    x = torch.randn(4, 6)
    with LaunchCounter() as ops:
        y = (x.t() @ x).view(-1) + 1.0
    assert y.numel() == 36
    assert ops.kernels == 2  # mm and add; the transpose and the view launch nothing
    assert sum(ops.ops.values()) >= 4


def test_host_section_counts_stubbed_triton_launches_and_restores_them():
    from lorafast.bench import host
    from lorafast.kernels import configs, lora_fwd

    original = configs.launch
    config = host.HostConfig(M=4, K=16, N=8, rank=2, dropouts=(0.0, 0.1), strategies=("aten", "fused"),
                             quick=True, budget_s=0.01)  # fmt: skip
    result = host.measure_host(config)
    assert configs.launch is original and lora_fwd.launch is original
    rows = {(r["variant"], r["p"], r["mode"]): r for r in result["rows"]}
    variants = {"peft", "patch:aten", "patch:fused", "op:aten", "op:fused"}
    assert {k[0] for k in rows} == variants
    for p in (0.0, 0.1):
        for mode in ("fwd", "fwd+bwd"):
            assert rows[("peft", p, mode)]["triton_launches"] == 0 and rows[("peft", p, mode)]["launches"] > 0
            assert rows[("op:aten", p, mode)]["triton_launches"] == 0
            # fused: shrink + GEMM forward, plus dH/dB, dX and dA backward, all through the stub
            fused = rows[("op:fused", p, mode)]
            assert fused["triton_launches"] >= (2 if mode == "fwd" else 5)
            assert rows[("patch:fused", p, mode)]["triton_launches"] == fused["triton_launches"]
            for name in variants - {"peft"}:
                row = rows[(name, p, mode)]
                assert row["host_us"] > 0 and row["host_vs_peft"] > 0 and row["launches_vs_peft"] > 0
    assert not any("NOT patched" in r["description"] for r in result["rows"])
    assert result["torch_threads"] == 1 and torch.get_num_threads() >= 1
    markdown = host.host_markdown(result)
    assert "Host cost" in markdown and "host ≤ 0.8×" in markdown and "launches ≤ 0.7×" in markdown


def test_stubbed_launches_are_restored_when_the_body_raises(monkeypatch):
    from lorafast.bench import host
    from lorafast.kernels import configs, lora_bwd

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    original, counter = configs.launch, [0]
    with pytest.raises(RuntimeError, match="boom"):
        with host.stubbed_triton_launches(counter):
            assert lora_bwd.launch is not original and configs.launch is not original  # where launchers look
            lora_bwd.launch(None, "gemm", None, None, ())
            raise RuntimeError("boom")
    assert counter == [1] and lora_bwd.launch is original and configs.launch is original
    assert os.environ["TRITON_INTERPRET"] == "0"


def test_runs_fused_tells_peft_forward_from_the_fused_path():
    pytest.importorskip("bitsandbytes")
    from lorafast.bench import quant

    inputs = bench.make_inputs(bench.Shape("q", 4, 64, 32), 2, torch.float32, "cpu")
    peft = quant.qlora_layer(inputs, 0.0)
    assert not quant.runs_fused(quant._implementation("peft", peft), inputs, "fwd+bwd")  # PEFT calls Linear4bit


def test_cli_host_only_writes_the_host_report(tmp_path):
    argv = ["bench", "--host", "--quick", "--cpu-budget", "0.01", "--out", str(tmp_path), "--name", "h",
            "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    report = _strict_json(tmp_path / "h.json")
    assert report["results"] == [] and report["complete"]
    assert {r["variant"] for r in report["host"]["rows"]} >= {"peft", "patch:aten", "op:aten", "op:fused"}
    assert report["host"]["load_average_before"] is not None
    assert "Host cost" in (tmp_path / "h.md").read_text(encoding="utf-8")
    assert not (tmp_path / "h.png").exists()


def test_quant_nf4_errors_are_against_the_dequantized_weight():
    pytest.importorskip("bitsandbytes")
    from lorafast.bench import quant

    config = quant.QuantConfig(shapes=[bench.Shape("q", 8, 64, 32)], rank=4, dropouts=[0.0, 0.1],
                               dtype=torch.float32, device=torch.device("cpu"), quick=True, cpu_budget_s=0.01)
    result = quant.run_quant(config)
    rows = {(r["impl"], r["dropout"], r["mode"]): r for r in result["rows"]}
    assert {k[0] for k in rows} == {"lorafast", "peft", "base"}
    assert ("lorafast", None, "fwd") in rows and ("peft", None, "fwd") in rows
    for impl in ("lorafast", "peft"):
        for key in ("y", "dx", "da", "db"):
            assert rows[(impl, 0.0, "fwd+bwd")]["errors"][key] < 1e-4, (impl, key)
        # eval on a CPU where bitsandbytes repacks the weight runs its bf16 gemv: a larger, still small error
        assert rows[(impl, None, "fwd")]["errors"]["y"] < 1e-2
        assert rows[(impl, 0.1, "fwd+bwd")]["errors"] == {}  # masks differ: time and memory only
        assert rows[(impl, 0.1, "fwd+bwd")]["saved_bytes"] > 0
    # The quantization error is far above that: the reference must be on the dequantized weight.
    inputs = bench.make_inputs(config.shapes[0], 4, torch.float32, "cpu")
    layer = quant.qlora_layer(inputs, 0.0)
    assert bench.relative_error(quant.dequantized_weight(layer), inputs.weight) > 1e-2
    fused = rows[("lorafast", 0.0, "fwd+bwd")]
    try:
        from lorafast.peft.bnb import FUSED_CLASSES
    except ImportError:
        FUSED_CLASSES = {}
    fused_names = {f"{c.__module__}.{c.__qualname__}" for c in FUSED_CLASSES.values()}
    if fused["layer_class"] not in fused_names:
        assert fused["fused"] is False
    assert all(r["fused"] is None for r in result["rows"] if r["impl"] != "lorafast")
    assert rows[("peft", 0.0, "fwd+bwd")]["layer_class"] == "peft.tuners.lora.bnb.Linear4bit"
    markdown = quant.quant_markdown(result)
    assert "QLoRA (nf4" in markdown
    any_unfused = any(r["fused"] is False for r in result["rows"])
    assert ("lorafast (not fused)" in markdown) == any_unfused == any("NOT fused" in n for n in result["notes"])
