"""Verification while tuning (lorafast.verify, lorafast.dispatch): the dispatcher, on a mocked CUDA device (``auto``
routed to the CUDA branch, a fake timer, the Triton strategies in the interpreter), excludes a candidate whose
outputs differ from aten's, warns once with the numbers, records it in the cache file and never times it again for
that key with these versions; correct candidates are unaffected. The QLoRA key: tests/test_qlora.py."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import DEVICE
from utils import make_inputs, plant_wrong_strategy

import lorafast
from lorafast import dispatch, strategies, verify
from lorafast.dropout import keep_mask
from lorafast.tolerances import REL_TOL

# ------------------------------------------------------------------------------------------- lorafast.verify

def test_tolerance_is_the_floor_plus_three_epsilons(monkeypatch):
    monkeypatch.setattr(verify, "_tf32_enabled", lambda: False)
    assert verify.tolerance(torch.float32) == pytest.approx(REL_TOL[torch.float32] + 3 * 2.0**-23)
    assert verify.tolerance(torch.bfloat16) == pytest.approx(REL_TOL[torch.bfloat16] + 3 * 2.0**-7)
    assert verify.tolerance(torch.float16) == pytest.approx(REL_TOL[torch.float16] + 3 * 2.0**-10)
    assert verify.tolerance(torch.float16) < 0.01 < verify.tolerance(torch.bfloat16), \
        "1% is caught in fp16 and fp32; in bf16 it is inside the dtype's own tolerance"
    monkeypatch.setattr(verify, "_tf32_enabled", lambda: True)
    assert verify.tolerance(torch.float32) == verify.tolerance(torch.float16), "TF32 has fp16's mantissa"


def test_relative_error_accumulates_in_fp32_and_handles_zeros_and_nans(monkeypatch):
    ref = torch.randn(300, 7).to(torch.bfloat16)
    assert verify.relative_error(ref, ref) == 0.0
    assert verify.relative_error(ref.float() * 1.01, ref) == pytest.approx(0.01, rel=1e-4)
    monkeypatch.setattr(verify, "_CHUNK", 64)  # several chunks give the same norm
    assert verify.relative_error(ref.float() * 1.01, ref) == pytest.approx(0.01, rel=1e-4)
    zeros = torch.zeros(5, 3)
    assert verify.relative_error(zeros, zeros) == 0.0
    assert verify.relative_error(zeros + 1e-9, zeros) == pytest.approx(1e-9 * 15**0.5), "absolute when ref = 0"
    bad = ref.float().clone()
    bad[3, 2] = float("nan")
    assert verify.relative_error(bad, ref) == float("inf")
    assert verify.relative_error(ref[:-1], ref) == float("inf")


def test_first_mismatch_names_the_output_and_skips_missing_pairs():
    y, da = torch.randn(4, 6), torch.randn(2, 5)
    ref = dispatch.StepOutputs(y, None, da, None, None)
    assert verify.first_mismatch(dispatch.StepOutputs(y.clone(), None, da.clone(), None, None), ref) is None
    miss = verify.first_mismatch(dispatch.StepOutputs(y, None, da * 2, None, None), ref)
    assert (miss.output, miss.error) == ("da", pytest.approx(1.0))
    assert verify.first_mismatch(dispatch.StepOutputs(y, None, None, None, None), ref).output == "da"
    assert verify.first_mismatch((y,), ref).output == "outputs"
    assert verify.output_names((y, da)) == ("y", "out1")


# ------------------------------------------------------------------- the dispatcher, on a mocked CUDA device

class FakeTimer:
    """A preset time per strategy; runs each step ``calls`` times (2: the second is the one verified)."""

    def __init__(self, times, calls=2):
        self.times, self.calls, self.timed = times, calls, []

    def __call__(self, name, run):
        self.timed.append(name)
        for _ in range(self.calls):
            run()
        return self.times[name]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(strategies.ENV_STRATEGY, raising=False)
    dispatch.clear()
    yield tmp_path
    dispatch.clear()
    dispatch.set_timer(None)


@pytest.fixture
def mocked_cuda(cache_dir, monkeypatch):
    """``backend="auto"`` takes the CUDA branch on these CPU tensors (the Triton strategies run in the
    interpreter): lorafast.lora_linear → choose_strategy → dispatch.resolve → _auto → select_call → select."""
    from lorafast import functional

    real_resolve = dispatch.resolve

    def resolve_as_on_cuda(backend, x, weight, lora_a, dropout_p, needs, make_run=None):
        if backend != "auto":
            return real_resolve(backend, x, weight, lora_a, dropout_p, needs, make_run)
        return dispatch._auto(x, weight, lora_a, dropout_p, needs, make_run)

    def choose_as_on_cuda(backend, x2, weight, bias, lora_a, lora_b, scale, p):
        needs = functional.grad_needs(x2, weight, bias, lora_a, lora_b)
        make_run = dispatch.step_runner(x2, weight, bias, lora_a, lora_b, scale, p, needs)
        return dispatch.resolve(backend, x2, weight, lora_a, p, needs, make_run)

    monkeypatch.setattr(dispatch, "resolve", resolve_as_on_cuda)
    monkeypatch.setattr(functional, "choose_strategy", choose_as_on_cuda)
    # On CUDA every strategy draws the kernels' hash mask; on CPU aten draws its own: make it draw the CUDA one.
    monkeypatch.setattr(strategies.get("aten"), "dropout_keep_mask",
                        lambda seed, M, K, p, dtype: keep_mask(seed, M, K, p).to(dtype))
    return cache_dir


def _file(cache_dir):
    (path,) = cache_dir.glob("strategies-*.json")
    return path, json.loads(path.read_text())


def _train_call(M=24, K=40, N=36, r=4, dtype=torch.float16, p=0.0):
    inp = make_inputs(M, K, N, r, dtype, device=DEVICE)
    y = lorafast.lora_linear(*inp.args(), dropout_p=p, training=p > 0, backend="auto")
    y.float().sum().backward()
    return y


@pytest.mark.parametrize("broken, what, correct", [("fused", "y", "cublas"), ("cublas", "da", "fused")])
def test_a_wrong_candidate_is_excluded_warned_once_recorded_and_not_timed_again(mocked_cuda, monkeypatch, broken,
                                                                              what, correct):
    plant_wrong_strategy(monkeypatch, broken, what)
    timer = FakeTimer({broken: 1.0, correct: 2.0, "aten": 3.0})
    dispatch.set_timer(timer)
    with pytest.warns(UserWarning, match=f"strategy '{broken}' gave wrong results") as record:
        _train_call()
        _train_call(M=300)  # another key (M bucket): excluded and recorded again, no second warning
    messages = [str(w.message) for w in record if "wrong results" in str(w.message)]
    assert len(messages) == 1 and f"{what} off by" in messages[0] and "tolerance" in messages[0]
    assert sorted(timer.timed) == sorted(["aten", broken, correct] * 2)
    assert set(dispatch.choices().values()) == {correct}, "the correct candidate is unaffected"

    path, data = _file(mocked_cuda)
    assert data["format"] == 2 and len(data["rejected"]) == 2
    for key_string, entry in data["rejected"].items():
        assert list(entry) == [broken] and data["choices"][key_string] == correct
        assert entry[broken]["output"] == what
        assert entry[broken]["error"] > entry[broken]["tolerance"] == pytest.approx(verify.tolerance(torch.float16))
        if what == "y":
            assert entry[broken]["error"] == pytest.approx(0.01, rel=0.05)

    # A new process: the choice is read back; with the choice gone (say, not among its candidates) it times again,
    # but never the rejected candidate.
    dispatch.clear()
    _train_call()
    assert len(timer.timed) == 6, "cached: nothing timed"
    key_string = next(iter(data["rejected"]))
    data["choices"].pop(key_string)
    path.write_text(json.dumps(data))
    dispatch.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a recorded rejection does not warn again
        _train_call()
    assert timer.timed[6:] == ["aten", correct]


def test_not_timed_again_in_a_real_new_process(cache_dir, monkeypatch):
    plant_wrong_strategy(monkeypatch, "fused", "y")
    dispatch.set_timer(FakeTimer({"fused": 1.0, "cublas": 2.0, "aten": 3.0}))
    key, make_run = _problem(torch.float32)
    with pytest.warns(UserWarning, match="'fused' gave wrong results"):
        assert dispatch.select(key, ("fused", "cublas", "aten"), make_run, default="cublas") == "cublas"
    path, data = _file(cache_dir)
    data["choices"] = {}
    path.write_text(json.dumps(data))
    script = textwrap.dedent(f"""
        from lorafast import dispatch
        from lorafast.dispatch import StepOutputs, StrategyKey
        import torch

        timed = []

        def timer(name, run):
            timed.append(name)
            run()
            return {{"fused": 1.0, "cublas": 2.0, "aten": 3.0}}[name]

        dispatch.set_timer(timer)
        key = StrategyKey(**{dict(vars(key))!r})
        y = torch.ones(3)
        print(dispatch.select(key, ("fused", "cublas", "aten"), lambda name: (lambda: StepOutputs(y, None, None,
              None, None)), default="aten"), timed)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "cublas ['aten', 'cublas']"


def _problem(dtype, M=24, K=40, N=36, r=4, p=0.0):
    inp = make_inputs(M, K, N, r, dtype, device=DEVICE)
    x2 = inp.x.detach().reshape(-1, K)
    needs = (True, True, True, True)
    key = dispatch.StrategyKey.for_call(x2, inp.weight, inp.lora_a, p, *needs)
    make_run = dispatch.step_runner(x2, inp.weight, inp.bias.detach(), inp.lora_a.detach(), inp.lora_b.detach(),
                                    torch.tensor(inp.scaling), p, needs)
    return key, make_run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_correct_candidates_pass_with_dropout_and_zero_init_adapters(mocked_cuda, dtype):
    """Every strategy agrees with aten (same mask, as on CUDA) in every dtype, with p = 0.1 and PEFT's lora_B = 0
    (the timing steps use their own random adapters, so the LoRA terms are checked all the same)."""
    inp = make_inputs(33, 40, 20, 3, dtype, device=DEVICE)
    inp.lora_b.data.zero_()
    dispatch.set_timer(FakeTimer({"fused": 1.0, "cublas": 2.0, "aten": 3.0}))
    x2, needs = inp.x.detach(), (True, True, True, True)
    make_run = dispatch.step_runner(x2, inp.weight, inp.bias.detach(), inp.lora_a.detach(), inp.lora_b.detach(),
                                    torch.tensor(inp.scaling), 0.1, needs)
    key = dispatch.StrategyKey.for_call(x2, inp.weight, inp.lora_a, 0.1, *needs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select(key, ("fused", "cublas", "aten"), make_run, default="aten") == "fused"
    assert dispatch.rejections() == {}
    outputs = make_run("aten")()
    assert all(t is not None and t.abs().sum() > 0 for t in outputs), "every output is checkable (nonzero)"
    assert not torch.equal(outputs.y.float(), (x2.float() @ inp.weight.float().t() + inp.bias.float()).to(dtype)), \
        "the LoRA term is part of y"


def test_the_verified_outputs_come_from_a_run_after_the_first_launch(cache_dir, monkeypatch):
    """The timer's second call is the one compared (the first launches through the autotuner, later ones through
    the cached compiled handles): wrong only on the first call passes, wrong from the second call on is caught."""
    key, make_run = _problem(torch.float32)
    calls = {"n": 0}

    def wrong_on(which):
        def make(name):
            run = make_run(name)
            if name != "fused":
                return run

            def counted():
                calls["n"] += 1
                out = run()
                return out._replace(y=out.y * 2) if calls["n"] in which else out

            return counted

        return make

    dispatch.set_timer(FakeTimer({"fused": 1.0, "cublas": 2.0, "aten": 3.0}, calls=3))
    assert dispatch.select(key, ("fused", "aten"), wrong_on({1}), default="aten") == "fused"
    dispatch.clear()
    dispatch.cache_path().unlink()
    calls["n"] = 0
    with pytest.warns(UserWarning, match="wrong results"):
        assert dispatch.select(key, ("fused", "aten"), wrong_on({2, 3}), default="aten") == "aten"


def test_candidates_without_aten_get_one_untimed_reference_step(cache_dir, monkeypatch):
    plant_wrong_strategy(monkeypatch, "fused", "y")
    timer = FakeTimer({"fused": 1.0, "cublas": 2.0})
    dispatch.set_timer(timer)
    key, make_run = _problem(torch.float32)
    with pytest.warns(UserWarning, match="'fused' gave wrong results"):
        assert dispatch.select(key, ("fused", "cublas"), make_run, default="aten") == "cublas"
    assert timer.timed == ["fused", "cublas"]


@pytest.mark.parametrize("legacy", ["every step", "the candidate's step"])
def test_steps_that_return_no_outputs_are_timed_unverified(cache_dir, legacy):
    dispatch.set_timer(FakeTimer({"fused": 1.0, "aten": 2.0}))
    key, make_run = _problem(torch.float32)

    def make(name):
        return make_run(name) if legacy != "every step" and name == "aten" else (lambda: None)

    with pytest.warns(UserWarning, match="timed unverified"):
        assert dispatch.select(key, ("fused", "aten"), make, default="aten") == "fused"


def test_a_format_1_file_and_a_qlora_choice_read_back(cache_dir):
    key, _ = _problem(torch.float32)
    other, _ = _problem(torch.float32, M=300)
    dispatch.cache_path().parent.mkdir(parents=True, exist_ok=True)
    dispatch.cache_path().write_text(json.dumps({"versions": "old", "choices": {key.as_string(): "cublas",
                                                                                other.as_string(): "gemm4bit"}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select(key, ("cublas", "aten"), None, default="aten") == "cublas"
        assert dispatch.select(other, ("gemm4bit", "aten"), None, default="aten") == "gemm4bit"
    assert dispatch.rejections() == {}
