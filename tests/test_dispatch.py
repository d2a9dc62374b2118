"""lorafast.dispatch (backend="auto" on CUDA) with an injected timer: picks the fastest, times once per key,
persists to disk (read by a new process), survives corrupt/unwritable cache files, never times under
torch.compile tracing or CUDA graph capture, and LORAFAST_STRATEGY wins over "auto"."""

import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from conftest import DEVICE
from utils import make_inputs

import lorafast
from lorafast import dispatch, strategies

CANDIDATES = ("fused", "cublas", "aten")


class FakeTimer:
    """Reports a fixed time per strategy and records which ones were timed (and runs each step once)."""

    def __init__(self, times):
        self.times = times
        self.calls = []

    def __call__(self, name, run):
        self.calls.append(name)
        run()
        if isinstance(self.times[name], Exception):
            raise self.times[name]
        return self.times[name]


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(tmp_path))
    monkeypatch.delenv(strategies.ENV_STRATEGY, raising=False)
    dispatch.clear()
    yield tmp_path
    dispatch.clear()
    dispatch.set_timer(None)


def _problem(M=24, K=40, N=36, r=4, p=0.0):
    inp = make_inputs(M, K, N, r, torch.float32, device=DEVICE)
    x2 = inp.x.detach().reshape(-1, K)
    scale = torch.tensor(inp.scaling)
    needs = (True, True, True, True)
    key = dispatch.StrategyKey.for_call(x2, inp.weight, inp.lora_a, p, *needs)
    make_run = dispatch.step_runner(x2, inp.weight, inp.bias.detach(), inp.lora_a.detach(), inp.lora_b.detach(),
                                    scale, p, needs)
    return key, make_run


def test_picks_the_fastest_and_times_each_key_once(cache_dir):
    timer = FakeTimer({"fused": 3.0, "cublas": 1.0, "aten": 2.0})
    dispatch.set_timer(timer)
    key, make_run = _problem()
    assert dispatch.select(key, CANDIDATES, make_run, default="aten") == "cublas"
    assert timer.calls == ["aten", "fused", "cublas"], "aten first: its outputs are the reference"
    assert dispatch.select(key, CANDIDATES, make_run, default="aten") == "cublas"
    assert len(timer.calls) == 3, "the second call must not time"
    other, _ = _problem(M=300)  # another M bucket is another key
    assert other != key
    timer.times["aten"] = 0.5
    assert dispatch.select(other, CANDIDATES, make_run, default="cublas") == "aten"


def test_key_buckets_m_and_rank_and_separates_what_changes_the_work():
    x = torch.randn(100, 16)
    w, a = torch.randn(8, 16), torch.randn(5, 16)
    key = dispatch.StrategyKey.for_call(x, w, a, 0.0, True, True, True, False)
    assert (key.m_bucket, key.r_bucket, key.n, key.k, key.needs) == (128, 8, 8, 16, "xab")
    assert key == dispatch.StrategyKey.for_call(torch.randn(120, 16), w, torch.randn(7, 16), 0.0, True, True, True,
                                                False)
    assert key != dispatch.StrategyKey.for_call(x, w, a, 0.1, True, True, True, False)
    assert key != dispatch.StrategyKey.for_call(x, w, a, 0.0, False, True, True, False)
    assert key != dispatch.StrategyKey.for_call(x.half(), w, a, 0.0, True, True, True, False)
    assert key != dispatch.StrategyKey.for_call(x, w, a, 0.0, True, True, True, False, op="nf4")


def test_key_separates_the_adapter_precision_of_fp32_adapters_on_bf16(monkeypatch):
    from lorafast.kernels import dtypes

    x, w, a = torch.randn(64, 16, dtype=torch.bfloat16), torch.randn(8, 16), torch.randn(4, 16)
    monkeypatch.setattr(dtypes, "_adapter_precision", "compute")
    compute = dispatch.StrategyKey.for_call(x, w, a, 0.0, True, True, True, False)
    monkeypatch.setattr(dtypes, "_adapter_precision", "fp32")
    fp32 = dispatch.StrategyKey.for_call(x, w, a, 0.0, True, True, True, False)
    assert compute.adapter_dtype == "float32@compute" and fp32.adapter_dtype.startswith("float32@fp32-")
    assert dispatch.StrategyKey.for_call(x, w, a.bfloat16(), 0.0, True, True, True, False).adapter_dtype == "bfloat16"


def test_timing_steps_run_every_strategy_without_touching_the_default_rng(cache_dir):
    """The timing closures really run (fwd + bwd, dropout on) and draw nothing from torch's generator, so a
    first (timed) call and a later (cached) call see the same dropout seeds — checkpointing relies on it."""
    _, make_run = _problem(p=0.3)
    state = torch.random.get_rng_state()
    for name in CANDIDATES:
        make_run(name)()
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_new_process_reads_the_disk_cache(cache_dir):
    dispatch.set_timer(FakeTimer({"fused": 3.0, "cublas": 2.0, "aten": 1.0}))
    key, make_run = _problem()
    assert dispatch.select(key, CANDIDATES, make_run, default="cublas") == "aten"
    files = list(cache_dir.glob("strategies-*.json"))
    data = json.loads(files[0].read_text())
    assert len(files) == 1 and data["choices"] == {key.as_string(): "aten"} and data["rejected"] == {}
    script = textwrap.dedent(f"""
        import torch
        from lorafast import dispatch
        from lorafast.dispatch import StrategyKey

        def no_timing(name, run):
            raise AssertionError("timed although the disk cache has the key")

        dispatch.set_timer(no_timing)
        key = StrategyKey(**{dict(vars(key))!r})
        print(dispatch.select(key, ("fused", "cublas", "aten"), lambda name: (lambda: None), default="cublas"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().splitlines()[-1] == "aten"


def test_versions_are_part_of_the_file_name(cache_dir, monkeypatch):
    first = dispatch.cache_path()
    monkeypatch.setattr(lorafast.version, "__version__", "9.9.9")
    assert dispatch.cache_path() != first and "9.9.9" in dispatch.cache_path().name


def test_corrupt_cache_is_ignored_with_one_warning_and_rewritten(cache_dir):
    path = dispatch.cache_path()
    path.write_text("{not json")
    dispatch.set_timer(FakeTimer({"fused": 1.0, "cublas": 2.0, "aten": 3.0}))
    key, make_run = _problem()
    with pytest.warns(UserWarning, match="corrupt strategy cache"):
        assert dispatch.select(key, CANDIDATES, make_run, default="cublas") == "fused"
    assert json.loads(path.read_text())["choices"] == {key.as_string(): "fused"}


def test_cache_with_an_unknown_strategy_name_counts_as_corrupt(cache_dir):
    key, make_run = _problem()
    dispatch.cache_path().write_text(json.dumps({"choices": {key.as_string(): "rm -rf"}}))
    dispatch.set_timer(FakeTimer({"fused": 2.0, "cublas": 1.0, "aten": 3.0}))
    with pytest.warns(UserWarning, match="corrupt"):
        assert dispatch.select(key, CANDIDATES, make_run, default="aten") == "cublas"


def test_unwritable_cache_keeps_the_choice_in_memory(tmp_path, monkeypatch, cache_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(blocker / "sub"))  # mkdir under a regular file fails
    timer = FakeTimer({"fused": 2.0, "cublas": 1.0, "aten": 3.0})
    dispatch.set_timer(timer)
    key, make_run = _problem()
    with pytest.warns(UserWarning, match="cannot write the strategy cache") as record:
        assert dispatch.select(key, CANDIDATES, make_run, default="aten") == "cublas"
    assert len([w for w in record if "lorafast" in str(w.message)]) == 1, "one warning, not one per problem"
    other, _ = _problem(M=300)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.select(other, CANDIDATES, make_run, default="aten") == "cublas"
    assert dispatch.select(key, CANDIDATES, make_run, default="aten") == "cublas"
    assert len(timer.calls) == 6


def test_a_failing_candidate_is_skipped_with_a_warning(cache_dir):
    dispatch.set_timer(FakeTimer({"fused": RuntimeError("no kernel image"), "cublas": 2.0, "aten": 3.0}))
    key, make_run = _problem()
    with pytest.warns(UserWarning, match="'fused' failed while timing"):
        assert dispatch.select(key, CANDIDATES, make_run, default="aten") == "cublas"


@pytest.mark.parametrize("state", ["compiling", "capturing", "no make_run"])
def test_no_timing_while_tracing_or_capturing(cache_dir, monkeypatch, state):
    timer = FakeTimer({"fused": 1.0, "cublas": 2.0, "aten": 3.0})
    dispatch.set_timer(timer)
    key, make_run = _problem()
    if state == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    elif state == "capturing":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    else:
        make_run = None
    assert dispatch.select(key, CANDIDATES, make_run, default="cublas") == "cublas"
    assert timer.calls == [] and dispatch.choices() == {}, "the default is not cached: eager use times later"
    monkeypatch.undo()
    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(cache_dir))
    _, make_run = _problem()
    assert dispatch.select(key, CANDIDATES, make_run, default="cublas") == "fused"


def test_cached_choice_is_used_while_tracing(cache_dir, monkeypatch):
    dispatch.set_timer(FakeTimer({"fused": 1.0, "cublas": 2.0, "aten": 3.0}))
    key, make_run = _problem()
    dispatch.select(key, CANDIDATES, make_run, default="cublas")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.select(key, CANDIDATES, make_run, default="cublas") == "fused"


def test_select_call_memoises_real_choices_only(cache_dir, monkeypatch):
    timer = FakeTimer({"fused": 2.0, "cublas": 1.0, "aten": 3.0})
    dispatch.set_timer(timer)
    key, make_run = _problem()
    x, w, a = torch.randn(24, 40), torch.randn(36, 40), torch.randn(4, 40)
    needs = (True,) * 4
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert dispatch.select_call(x, w, a, 0.0, needs, CANDIDATES, make_run, "aten") == "aten"
    monkeypatch.undo()
    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(cache_dir))
    assert dispatch.select_call(x, w, a, 0.0, needs, CANDIDATES, make_run, "aten") == "cublas"
    calls = len(timer.calls)
    assert dispatch.select_call(x, w, a, 0.0, needs, CANDIDATES, make_run, "aten") == "cublas"
    assert len(timer.calls) == calls == 3
    assert dispatch.select_call(torch.randn(20, 40), w, a, 0.0, needs, CANDIDATES, make_run, "aten") == "cublas", \
        "same bucket, other exact M: the key's choice, no timing"
    assert len(timer.calls) == 3


def test_auto_candidates_exclude_fused_for_fp32(cache_dir):
    timer = FakeTimer({"fused": 0.1, "cublas": 2.0, "aten": 1.0})
    dispatch.set_timer(timer)
    key, make_run = _problem()
    x = torch.randn(8, 40)
    w, a = torch.randn(36, 40), torch.randn(4, 40)
    assert dispatch._auto(x, w, a, 0.0, (True,) * 4, make_run) == "aten"
    assert "fused" not in timer.calls


@pytest.mark.parametrize("value, expected", [("fused", "fused"), ("cublas", "cublas"), ("torch", "aten"),
                                             ("aten", "aten")])
def test_env_override_wins_over_auto(cache_dir, monkeypatch, value, expected):
    monkeypatch.setenv(strategies.ENV_STRATEGY, value)
    dispatch.set_timer(FakeTimer({}))  # any timing would KeyError
    x, w, a = torch.randn(8, 40, device=DEVICE), torch.randn(36, 40, device=DEVICE), torch.randn(4, 40, device=DEVICE)
    assert dispatch.resolve("auto", x, w, a, 0.0, (True,) * 4) == expected
    assert dispatch.resolve("aten", x, w, a, 0.0, (True,) * 4) == "aten", "explicit backends are not overridden"


def test_env_override_with_a_bad_name_is_one_clear_error(cache_dir, monkeypatch):
    monkeypatch.setenv(strategies.ENV_STRATEGY, "fastest")
    x = torch.randn(8, 40)
    with pytest.raises(ValueError, match="LORAFAST_STRATEGY='fastest' is not a strategy"):
        lorafast.lora_linear(x, torch.randn(36, 40), None, torch.randn(4, 40), torch.randn(36, 4), 1.0)


def test_env_override_runs_end_to_end(cache_dir, monkeypatch):
    """LORAFAST_STRATEGY=cublas makes an "auto" call run the cublas strategy (here: its Triton parts in the
    interpreter) with the same result as asking for it."""
    inp = make_inputs(9, 24, 18, 4, torch.float32, device=DEVICE)
    want = lorafast.lora_linear(*inp.args(), backend="cublas")
    monkeypatch.setenv(strategies.ENV_STRATEGY, "cublas")
    calls = []
    monkeypatch.setattr(strategies.get("cublas"), "forward", _recording(strategies.get("cublas").forward, calls))
    got = lorafast.lora_linear(*inp.args(), backend="auto")
    assert calls and torch.equal(got, want)


def _recording(fn, calls):
    def wrapper(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)

    return wrapper


def test_tune_times_each_call_of_a_model_and_restores_grads(cache_dir, monkeypatch):
    """tune() runs forward + backward once so every key is chosen up front. On CPU "auto" never times, so route
    "auto" through the dispatcher here (as it is on CUDA) with a fake timer."""
    real_resolve = dispatch.resolve

    def resolve_as_on_cuda(backend, x, weight, lora_a, dropout_p, needs, make_run=None):
        if backend != "auto":
            return real_resolve(backend, x, weight, lora_a, dropout_p, needs, make_run)
        key = dispatch.StrategyKey.for_call(x, weight, lora_a, dropout_p, *needs)
        return dispatch.select(key, ("cublas", "aten"), make_run, default="cublas")

    monkeypatch.setattr(dispatch, "resolve", resolve_as_on_cuda)
    monkeypatch.setattr(lorafast.functional, "choose_strategy", _choose_always_timing)
    timer = FakeTimer({"cublas": 2.0, "aten": 1.0})
    dispatch.set_timer(timer)
    model = torch.nn.Sequential(lorafast.LoRALinear(16, 12, r=4), torch.nn.ReLU(), lorafast.LoRALinear(12, 8, r=2))
    model.train()
    chosen = dispatch.tune(model, torch.randn(5, 16))
    assert len(chosen) == 2 and set(chosen.values()) == {"aten"}
    assert all(p.grad is None for p in model.parameters()), "tune must leave .grad as it found it"
    assert len(timer.calls) == 4
    model(torch.randn(5, 16)).sum().backward()
    assert len(timer.calls) == 4, "training after tune does not time again"


def _choose_always_timing(backend, x2, weight, bias, lora_a, lora_b, scale, p):
    from lorafast.functional import grad_needs

    needs = grad_needs(x2, weight, bias, lora_a, lora_b)
    make_run = dispatch.step_runner(x2, weight, bias, lora_a, lora_b, scale, p, needs)
    return dispatch.resolve(backend, x2, weight, lora_a, p, needs, make_run)


@pytest.mark.gpu
def test_auto_on_cuda_times_once_and_caches(cache_dir):
    inp = make_inputs(256, 128, 96, 8, torch.bfloat16, device="cuda")
    y = lorafast.lora_linear(*inp.args(), dropout_p=0.1, training=True)
    y.sum().backward()
    chosen = dispatch.choices()
    assert len(chosen) == 1 and next(iter(chosen.values())) in CANDIDATES
    assert dispatch.cache_path().exists()


@pytest.mark.parametrize("family", ["lorafast.strategies", "lorafast.dora.strategies", "lorafast.moe.strategies"])
def test_each_op_family_loads_its_own_strategy_modules(family):
    """One loader serves the plain op, DoRA and MoE: each family's get() imports its own package's module (aliases
    included, cached) and names the strategies on an unknown name."""
    import importlib

    get = importlib.import_module(family).get
    package = family.removesuffix(".strategies") if family == "lorafast.dora.strategies" else family
    for name in strategies.STRATEGIES:
        assert get(name).__name__ == f"{package}.{name}" and get(name) is get(name)
    for alias, canonical in strategies.ALIASES.items():
        assert get(alias) is get(canonical)
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        get("nope")
