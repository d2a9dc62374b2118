"""lorafast.grouped_lora_linear (MoE experts) vs the float64 per-expert reference, every strategy (the Triton ones
through the interpreter on CPU): y, dX, dA, dB, db; fp32/fp16/bf16; zero-token and uneven experts, rows past the
last offset; both weight layouts; strided adapters; dropout replay; validation."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICE
from utils import assert_close, rel_err

import lorafast
from lorafast import reference
from lorafast.dropout import keep_mask
from lorafast.kernels import alloc
from lorafast.moe.strategies import aten

STRATEGIES = ["fused", "cublas", "aten"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Kernel outputs start as NaN: an element a kernel forgets to write fails the test."""
    real_empty = alloc.empty

    def nan_empty(shape, dtype, device):
        return real_empty(shape, dtype, device).fill_(float("nan"))

    monkeypatch.setattr(alloc, "empty", nan_empty)


class MoeInputs:
    """Random inputs of the grouped op: x (S, K) sorted by expert with ``counts`` rows each (plus ``tail`` rows
    past the last offset), weight (E, N, K) or transposed (E, K, N), bias (E, N), PEFT-layout adapters."""

    def __init__(self, K, N, counts, r, dtype=torch.float32, bias=False, transposed=False, tail=0,
                 adapter_dtype=None, scaling=0.75, device=DEVICE):
        E = len(counts)
        S = sum(counts) + tail
        adapter_dtype = adapter_dtype or dtype
        self.x = torch.randn(S, K, device=device).to(dtype).requires_grad_()
        w = torch.randn(E, N, K, device=device) / K**0.5
        self.weight = (w.transpose(1, 2).contiguous() if transposed else w).to(dtype)
        self.bias = (torch.randn(E, N, device=device) * 0.5).to(dtype).requires_grad_() if bias else None
        self.offsets = torch.tensor(counts, device=device).cumsum(0).to(torch.int32)
        self.lora_a = (torch.randn(E * r, K, device=device) / K**0.5).to(adapter_dtype).requires_grad_()
        self.lora_b = (torch.randn(N, r * E, device=device) / r**0.5).to(adapter_dtype).requires_grad_()
        self.scaling, self.transposed, self.tail = scaling, transposed, tail

    def leaves(self):
        return [t for t in (self.x, self.bias, self.lora_a, self.lora_b) if t is not None]

    def call(self, fn, tensors=None, **kw):
        x, bias, a, b = tensors or (self.x, self.bias, self.lora_a, self.lora_b)
        return fn(x, self.weight if x.dtype == self.weight.dtype else self.weight.to(x.dtype), bias, self.offsets, a, b,
                  self.scaling, transposed=self.transposed, **kw)

    def detached(self, dtype=None):
        def copy(t):
            if t is None:
                return None
            return (t.detach().to(dtype) if dtype else t.detach().clone()).requires_grad_()

        return [copy(t) for t in (self.x, self.bias, self.lora_a, self.lora_b)]


def fwd_bwd(inp, fn, tensors=None, grad=None, **kw):
    tensors = tensors or inp.detached()
    y = inp.call(fn, tensors, **kw)
    grad = torch.randn_like(y) if grad is None else grad.to(y.dtype)
    y.backward(grad)
    return y, [t.grad if t is not None else None for t in tensors], grad


def check(inp, strategy, what="", **kw):
    dtype = inp.x.dtype
    y, grads, g = fwd_bwd(inp, lorafast.grouped_lora_linear, backend=strategy, **kw)
    y64, grads64, _ = fwd_bwd(inp, reference.grouped_lora_linear, inp.detached(torch.float64), g.double(), **kw)
    ylow, gradslow, _ = fwd_bwd(inp, reference.grouped_lora_linear, grad=g, **kw)
    assert y.dtype == dtype
    assert_close(y, y64, dtype, ylow, what=f"{what} y")
    for name, got, ref, low, leaf in zip(("x", "bias", "lora_a", "lora_b"), grads, grads64, gradslow,
                                         (inp.x, inp.bias, inp.lora_a, inp.lora_b)):
        if leaf is None:
            continue
        assert got is not None and got.dtype == leaf.dtype and got.shape == leaf.shape, f"{what} d{name}"
        assert_close(got, ref, dtype, low, what=f"{what} d{name}")
    return y, grads


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_uneven_and_zero_token_experts(strategy, dtype):
    inp = MoeInputs(40, 24, [9, 0, 23, 1, 0, 14], r=4, dtype=dtype)
    check(inp, strategy, f"{strategy} {dtype}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("transposed", [False, True], ids=["E-N-K", "E-K-N"])
def test_layouts_with_bias(strategy, transposed):
    """transformers' (E, N, K) and gpt-oss's transposed (E, K, N) with a per-expert bias, read in place."""
    inp = MoeInputs(36, 20, [7, 12, 0, 5], r=3, bias=True, transposed=transposed)
    check(inp, strategy, f"{strategy} transposed={transposed}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rows_past_last_offset_are_zero(strategy):
    """Expert-parallel sentinel rows (past offsets[-1]) get y = 0 and dX = 0, and feed no adapter gradient."""
    inp = MoeInputs(32, 16, [5, 3, 0], r=2, tail=6)
    y, grads = check(inp, strategy, strategy)
    assert y[-6:].abs().max() == 0 and grads[0][-6:].abs().max() == 0


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp32_adapters_on_bf16(strategy):
    """PEFT keeps fp32 adapters on a bf16 base; the rank-r products run in bf16 (as ParamWrapper casts its
    factors to the parameter dtype), gradients come back fp32."""
    inp = MoeInputs(40, 24, [11, 0, 21], r=4, dtype=torch.bfloat16, adapter_dtype=torch.float32)
    check(inp, strategy, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rank_one_and_single_expert(strategy):
    check(MoeInputs(24, 20, [13], r=1), strategy, f"{strategy} E=1 r=1")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strided_inputs_read_in_place(strategy):
    """Column-sliced x and adapters, and a weight that is a strided view: no layout is assumed."""
    inp = MoeInputs(30, 18, [6, 0, 9], r=2)
    wide = torch.randn(inp.x.shape[0], 50)
    x = wide[:, 5:35]
    x.copy_(inp.x.detach())
    wide_a = torch.randn(inp.lora_a.shape[0], 40)
    wide_a[:, 3:33].copy_(inp.lora_a.detach())
    a = wide_a[:, 3:33].requires_grad_()
    inp.weight = torch.randn(3, 30, 18).transpose(1, 2)  # (E, N, K) view of a (E, K, N) tensor
    tensors = [x.requires_grad_(), None, a, inp.lora_b.detach().clone().requires_grad_()]
    g = torch.randn(x.shape[0], 18)
    y, grads, _ = fwd_bwd(inp, lorafast.grouped_lora_linear, tensors, g, backend=strategy)
    y64, grads64, _ = fwd_bwd(inp, reference.grouped_lora_linear, [t.detach().double().requires_grad_() if t is not None
                                                                    else None for t in tensors], g.double())
    assert rel_err(y, y64) < 1e-5
    for got, ref in zip(grads, grads64):
        if ref is not None:
            assert rel_err(got, ref) < 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stride0_grad_from_sum(strategy):
    inp = MoeInputs(24, 16, [4, 7], r=2)
    y = lorafast.grouped_lora_linear(inp.x, inp.weight, None, inp.offsets, inp.lora_a, inp.lora_b, 0.5,
                                     backend=strategy)
    y.sum().backward()
    x64 = inp.x.detach().double().requires_grad_()
    reference.grouped_lora_linear(x64, inp.weight.double(), None, inp.offsets, inp.lora_a.detach().double(),
                                  inp.lora_b.detach().double(), 0.5).sum().backward()
    assert rel_err(inp.x.grad, x64.grad) < 1e-5


def _replayed_mask(strategy, seed_value, S, K, p):
    """The keep-mask the op drew after torch.manual_seed(seed_value): same draw as lorafast's seed, then the
    strategy's mask function (the kernels' hash on CUDA and in Triton; a generator on the CPU aten path)."""
    torch.manual_seed(seed_value)
    seed = torch.randint(0, 2**62, (1,), dtype=torch.int64, device=DEVICE)
    if strategy == "aten":
        return aten.dropout_keep_mask(seed, S, K, p, torch.float32).bool()
    return keep_mask(seed, S, K, p)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dropout_replay(strategy):
    """The mask a training call draws, replayed in the reference: y and every gradient match, and backward
    regenerated the same mask (dX, dA would differ otherwise)."""
    p = 0.3
    inp = MoeInputs(40, 24, [10, 0, 17, 6], r=4)
    S, K = inp.x.shape
    mask = _replayed_mask(strategy, 11, S, K, p)
    assert 0.55 < mask.float().mean() < 0.85
    torch.manual_seed(11)
    y, grads, g = fwd_bwd(inp, lorafast.grouped_lora_linear, backend=strategy, dropout_p=p, training=True)
    y64, grads64, _ = fwd_bwd(inp, reference.grouped_lora_linear, inp.detached(torch.float64), g.double(),
                              dropout_p=p, training=True, dropout_mask=mask)
    assert rel_err(y, y64) < 1e-5
    for got, ref in zip(grads, grads64):
        if ref is not None:
            assert rel_err(got, ref) < 1e-5
    # eval: no dropout
    y_eval = inp.call(lorafast.grouped_lora_linear, backend=strategy, dropout_p=p, training=False)
    y_ref = inp.call(reference.grouped_lora_linear)
    assert rel_err(y_eval, y_ref) < 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_requested_grads_and_trainable_weight(strategy):
    inp = MoeInputs(24, 16, [5, 0, 8], r=2)
    inp.weight.requires_grad_()
    x = inp.x.detach().requires_grad_(False)
    y = lorafast.grouped_lora_linear(x, inp.weight, None, inp.offsets, inp.lora_a, inp.lora_b, 0.5, backend=strategy)
    g = torch.randn_like(y)
    y.backward(g)
    w64 = inp.weight.detach().double().requires_grad_()
    reference.grouped_lora_linear(x.double(), w64, None, inp.offsets, inp.lora_a.detach().double(),
                                  inp.lora_b.detach().double(), 0.5).backward(g.double())
    assert x.grad is None and rel_err(inp.weight.grad, w64.grad) < 1e-5


def test_float64_on_aten_and_gradcheck():
    inp = MoeInputs(6, 5, [2, 0, 3], r=2, dtype=torch.float64, bias=True, tail=1)

    def fn(x, bias, a, b):
        return lorafast.grouped_lora_linear(x, inp.weight, bias, inp.offsets, a, b, 0.7, backend="aten")

    assert torch.autograd.gradcheck(fn, (inp.x, inp.bias, inp.lora_a, inp.lora_b))


def test_grouped_mm_and_loop_paths_agree(monkeypatch):
    """The aten strategy's grouped_mm path and its per-expert loop (float64, odd strides, or no grouped_mm)."""
    inp = MoeInputs(32, 16, [6, 0, 10, 3], r=4, bias=True)
    y1, g1, g = fwd_bwd(inp, lorafast.grouped_lora_linear, backend="aten")
    monkeypatch.setattr(aten, "_GROUPED_MM", None)
    y2, g2, _ = fwd_bwd(inp, lorafast.grouped_lora_linear, grad=g, backend="aten")
    assert rel_err(y1, y2) < 1e-6
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-6


def test_empty_input():
    inp = MoeInputs(8, 6, [0, 0], r=2)
    y = lorafast.grouped_lora_linear(inp.x, inp.weight, None, inp.offsets, inp.lora_a, inp.lora_b, 1.0)
    assert y.shape == (0, 6)


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(weight=d["weight"][0]), "weight"),
    (lambda d: d.update(offsets=d["offsets"].float()), "offsets"),
    (lambda d: d.update(offsets=d["offsets"][:-1]), "one entry per expert"),
    (lambda d: d.update(offsets=d["offsets"].flip(0)), "non-decreasing"),
    (lambda d: d.update(lora_a=d["lora_a"][:-1]), "lora_a"),
    (lambda d: d.update(lora_b=d["lora_b"][:, :-1]), "lora_b"),
    (lambda d: d.update(bias=torch.zeros(5)), "bias"),
    (lambda d: d.update(x=d["x"].double()), "dtype"),
    (lambda d: d.update(dropout_p=1.0), "dropout_p"),
    (lambda d: d.update(backend="nope"), "backend"),
])
def test_bad_arguments_raise_one_clear_error(change, message):
    inp = MoeInputs(8, 6, [2, 3], r=2)
    args = dict(x=inp.x, weight=inp.weight, bias=None, offsets=inp.offsets, lora_a=inp.lora_a, lora_b=inp.lora_b,
                scaling=1.0)
    change(args)
    with pytest.raises((TypeError, ValueError), match=message):
        lorafast.grouped_lora_linear(**args)


def test_auto_timing_runs_return_every_output_and_agree(monkeypatch, tmp_path):
    """The dispatcher's contract: each candidate's run() returns (y, dX, dA, dB, db) on the same inputs (a fixed
    seed, a constant dY), so the candidates can be checked against aten's; the key names the MoE family."""
    from lorafast import dispatch
    from lorafast.moe.functional import choose_strategy, step_runner

    inp = MoeInputs(32, 16, [5, 0, 9, 2], r=2, bias=True)
    x, bias, a, b = (t.detach() for t in (inp.x, inp.bias, inp.lora_a, inp.lora_b))
    scale = torch.tensor(0.75)
    # p = 0: on CPU the aten strategy draws its mask from a generator, the kernels from their hash (on CUDA every
    # strategy uses the hash, so the dispatcher compares them with dropout on too).
    make_run = step_runner(x, inp.weight, False, bias, inp.offsets, a, b, scale, 0.0, (True, True, True, True))
    outs = {name: make_run(name)() for name in STRATEGIES}
    assert all(len(o) == 5 and all(t is not None for t in o) for o in outs.values())
    for name in ("fused", "cublas"):
        for got, ref in zip(outs[name], outs["aten"]):
            assert rel_err(got, ref) < 1e-5, name
    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(tmp_path))
    dispatch.clear()
    try:
        timed = []
        times = {"fused": 2.0, "aten": 3.0, "cublas": 1.0}
        monkeypatch.setattr(dispatch, "_timer", lambda name, run: timed.append(run()) or times[name])
        monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))  # take the CUDA "auto" path
        with torch.no_grad():
            chosen = choose_strategy("auto", x, inp.weight, False, bias, inp.offsets, a, b, scale, 0.0)
        monkeypatch.undo()
        keys = list(dispatch.choices())
        # fp32: the dispatcher times cublas and aten (our fp32 GEMMs are a correctness path); cublas timed faster.
        assert chosen == "cublas" and len(timed) == 2 and keys[0].op == "moe4" and keys[0].n == 16
    finally:
        dispatch.clear()


def test_rank_above_the_kernels_limit_runs_aten_visibly():
    from lorafast.moe.functional import MAX_TRITON_RANK
    from lorafast.strategies import _warned

    _warned.discard("moe-rank")
    inp = MoeInputs(16, 8, [3, 4], r=MAX_TRITON_RANK + 1)
    with pytest.warns(UserWarning, match="running the 'aten' strategy"):
        y = inp.call(lorafast.grouped_lora_linear, backend="fused")
    assert rel_err(y, inp.call(reference.grouped_lora_linear)) < 1e-5
