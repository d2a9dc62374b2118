"""Verification while tuning for the DoRA and MoE keys: their ``make_run`` steps return outputs (y, then each
gradient), so :func:`lorafast.dispatch.select` checks every candidate against ``aten`` exactly as for LoRA
(tests/test_verify.py). A candidate whose y is 1 % off, or one of whose gradients is, is excluded and recorded."""

import json
import warnings

import pytest
import torch

from lorafast import dispatch, strategies, verify
from lorafast.dora import functional as dora_functional
from lorafast.functional import scale_tensor
from lorafast.moe import functional as moe_functional

pytestmark = pytest.mark.skipif(not strategies.triton_available(), reason="needs triton (interpreter on CPU)")


class FakeTimer:
    def __init__(self, times):
        self.times, self.timed = times, []

    def __call__(self, name, run):
        self.timed.append(name)
        run()
        run()  # the second call's outputs are the ones judged
        return self.times[name]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(tmp_path))
    dispatch.clear()
    yield tmp_path
    dispatch.clear()
    dispatch.set_timer(None)


def _wrong(make_run, broken: str, index: int):
    """``make_run`` whose ``broken`` candidate returns output ``index`` scaled by 1.01 (1 % off)."""
    def wrapped(name):
        run = make_run(name)
        if name != broken:
            return run

        def bad():
            out = list(run())
            out[index] = out[index] * 1.01
            return tuple(out)
        return bad
    return wrapped


def _dora_problem(dtype):
    g = torch.Generator().manual_seed(3)
    M, K, N, r = 24, 40, 36, 4
    x = torch.randn(M, K, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(N, K, generator=g) / K**0.5).to(dtype)
    bias = torch.randn(N, generator=g).to(dtype)
    a = (torch.randn(r, K, generator=g) * 0.1).to(dtype).requires_grad_()
    b = (torch.randn(N, r, generator=g) * 0.1).to(dtype).requires_grad_()
    m = (torch.rand(N, generator=g) + 0.5).to(dtype).requires_grad_()
    scale = scale_tensor(2.0, x)
    needs = dora_functional.grad_needs(x, w, bias, a, b, m)
    key = dispatch.StrategyKey.for_call(x, w, a, 0.0, *needs[:4], op=dora_functional.dispatch_op(needs, w))
    return key, dora_functional.step_runner(x, w, bias, a, b, m, scale, 0.0, needs)


def _moe_problem(dtype):
    g = torch.Generator().manual_seed(5)
    E, S, K, N, r = 3, 20, 24, 16, 4
    x = torch.randn(S, K, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(E, N, K, generator=g) / K**0.5).to(dtype)
    offsets = torch.tensor([6, 13, 20], dtype=torch.int32)
    a = (torch.randn(E * r, K, generator=g) * 0.1).to(dtype).requires_grad_()
    b = (torch.randn(N, r * E, generator=g) * 0.1).to(dtype).requires_grad_()
    scale = scale_tensor(2.0, x)
    needs = moe_functional.grad_needs(x, w, None, a, b)
    key = dispatch.StrategyKey.for_call(x, w[0], a[:r], 0.0, *needs, op=f"moe{E}")
    return key, moe_functional.step_runner(x, w, False, None, offsets, a, b, scale, 0.0, needs)


@pytest.mark.parametrize("problem", [_dora_problem, _moe_problem], ids=["dora", "moe"])
@pytest.mark.parametrize("broken, index, what", [("fused", 0, "y"), ("cublas", 2, "da")])
def test_a_wrong_dora_or_moe_candidate_is_excluded_and_recorded(cache_dir, problem, broken, index, what):
    key, make_run = problem(torch.float16)
    correct = "cublas" if broken == "fused" else "fused"
    timer = FakeTimer({broken: 1.0, correct: 2.0, "aten": 3.0})
    dispatch.set_timer(timer)
    with pytest.warns(UserWarning, match=f"strategy '{broken}' gave wrong results"):
        name = dispatch.select(key, ("fused", "cublas", "aten"), _wrong(make_run, broken, index), "aten")
    assert name == correct, "the fastest correct candidate wins"
    assert timer.timed == ["aten", "fused", "cublas"]
    (path,) = cache_dir.glob("strategies-*.json")
    entry = json.loads(path.read_text())["rejected"][key.as_string()][broken]
    assert entry["output"] == what and entry["tolerance"] == pytest.approx(verify.tolerance(torch.float16))
    assert entry["error"] == pytest.approx(0.01, rel=0.05)


@pytest.mark.parametrize("problem", [_dora_problem, _moe_problem], ids=["dora", "moe"])
def test_correct_dora_and_moe_candidates_pass(cache_dir, problem):
    key, make_run = problem(torch.float16)
    dispatch.set_timer(FakeTimer({"fused": 1.0, "cublas": 2.0, "aten": 3.0}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select(key, ("fused", "cublas", "aten"), make_run, "aten") == "fused"
