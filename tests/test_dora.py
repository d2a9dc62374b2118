"""lorafast.dora_linear vs the float64 DoRA reference for every strategy (`fused` and `cublas` through Triton's
interpreter on CPU): y and the gradients of x, bias, A, B and the magnitude, fp32/fp16/bf16, p = 0 and p > 0
with the strategy's own mask replayed, odd shapes, 3-D and strided x, fp32 adapters on a 16-bit base; the weight
norm without an N×K tensor (against the dense float64 norm, cancellation included) and its ‖W‖² cache; no N×K
tensor allocated per call; validation; the trainable-weight fallback; autocast; gradcheck."""

import warnings

import pytest
import torch
from conftest import DEVICE
from torch.utils._python_dispatch import TorchDispatchMode
from utils import assert_close, rel_err

import lorafast
from lorafast import functional, reference
from lorafast.dora import norm as dora_norm
from lorafast.dora import strategies as dora_strategies
from lorafast.dropout import keep_mask
from lorafast.kernels import alloc
from lorafast.strategies import aten

STRATEGIES = ["fused", "cublas", "aten"]
TRITON = ["fused", "cublas"]
P = 0.25


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel fails to write fails the test."""
    real_empty = alloc.empty
    monkeypatch.setattr(alloc, "empty",
                        lambda shape, dtype, device: real_empty(shape, dtype, device).fill_(float("nan")))


@pytest.fixture(autouse=True)
def fresh_norm_cache():
    dora_norm.clear_cache()
    yield
    dora_norm.clear_cache()


class DoraInputs:
    """Random DoRA inputs with O(1) outputs; g = m/‖W + s·B·A‖ spread around 1 (±20%), so g − 1 matters."""

    def __init__(self, M, K, N, r, dtype=torch.float32, adapter_dtype=None, bias=True, lead=(), scaling=0.75,
                 magnitude_dtype=None):
        adapter_dtype = adapter_dtype or dtype
        self.x = torch.randn(*lead, M, K, device=DEVICE).to(dtype).requires_grad_()
        self.weight = (torch.randn(N, K, device=DEVICE) * K**-0.5).to(dtype)
        self.bias = (torch.randn(N, device=DEVICE) * 0.1).to(dtype).requires_grad_() if bias else None
        self.lora_a = (torch.randn(r, K, device=DEVICE) * K**-0.5).to(adapter_dtype).requires_grad_()
        self.lora_b = (torch.randn(N, r, device=DEVICE) * r**-0.5).to(adapter_dtype).requires_grad_()
        self.scaling = scaling
        dense = reference.dora_weight_norm(self.weight.double(), self.lora_a.double(), self.lora_b.double(), scaling)
        spread = 1.0 + 0.2 * (2 * torch.rand(N, device=DEVICE, dtype=torch.float64) - 1)
        mdt = magnitude_dtype or (torch.float32 if adapter_dtype == torch.float32 else adapter_dtype)
        self.magnitude = (dense * spread).to(mdt).requires_grad_()

    def leaves(self):
        return [t for t in (self.x, self.bias, self.lora_a, self.lora_b, self.magnitude) if t is not None]

    def args(self):
        return (self.x, self.weight, self.bias, self.lora_a, self.lora_b, self.magnitude, self.scaling)

    def to64(self):
        twin = object.__new__(DoraInputs)
        for name in ("x", "weight", "bias", "lora_a", "lora_b", "magnitude"):
            t = getattr(self, name)
            setattr(twin, name, None if t is None else t.detach().double().requires_grad_(t.requires_grad))
        twin.scaling = self.scaling
        return twin

    def low_precision(self, dy, **kw):
        """The reference math in the inputs' own dtypes: (y, grads) — the error budget's yardstick."""
        leaves = [t.detach().clone().requires_grad_() for t in self.leaves()]
        it = iter(leaves)
        x = next(it)
        bias = next(it) if self.bias is not None else None
        a, b, m = next(it), next(it), next(it)
        y = reference.dora_linear(x, self.weight, bias, a, b, m, self.scaling, **kw)
        y.backward(dy)
        return y, [t.grad for t in leaves]


def replay_mask(strategy, seed, M, K, p):
    """The mask ``strategy`` drew for ``seed`` (the plain op's masks: DoRA draws the same)."""
    if strategy == "aten" and seed.device.type == "cpu":
        return aten.dropout_keep_mask(seed, M, K, p, torch.float32).bool()
    return keep_mask(seed, M, K, p)


def check(inp, strategy, p=0.0, what="", lowp_yardstick=True):
    """One fwd+bwd of ``strategy`` against the float64 reference (the strategy's mask replayed when p > 0)."""
    dtype = inp.x.dtype
    for t in inp.leaves():
        t.grad = None
    torch.manual_seed(1234)
    y = lorafast.dora_linear(*inp.args(), dropout_p=p, training=True, backend=strategy)
    dy = torch.randn_like(y)
    y.backward(dy)
    mask = None
    if p > 0.0:
        torch.manual_seed(1234)
        seed = functional._dropout_seed(inp.x.device)
        M, K = inp.x.reshape(-1, inp.x.shape[-1]).shape
        mask = replay_mask(strategy, seed, M, K, p).reshape(inp.x.shape)
    ref = inp.to64()
    y_ref = reference.dora_linear(*ref.args(), dropout_p=p, training=True, dropout_mask=mask)
    y_ref.backward(dy.double())
    low_y, low_grads = (None, [None] * 5)
    if lowp_yardstick and p == 0.0:
        low_y, low_grads = inp.low_precision(dy)
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype, low_y, what=f"{what} y")
    names = ["x", "bias", "lora_a", "lora_b", "magnitude"] if inp.bias is not None else \
        ["x", "lora_a", "lora_b", "magnitude"]
    for name, got, want, lowp in zip(names, [t.grad for t in inp.leaves()], [t.grad for t in ref.leaves()],
                                     low_grads):
        assert got is not None and got.dtype == getattr(inp, name).dtype, f"{what} d{name} dtype"
        assert_close(got, want, dtype, lowp, what=f"{what} d{name}")


# ---- the weight norm -------------------------------------------------------------------------------------

def norm_of(strategy):
    return dora_strategies.get(strategy).norm


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["random", "large_lora", "cancel"])
def test_norm_matches_dense_float64(strategy, dtype, case):
    """g and 1/‖W + s·B·A‖ from ‖W‖² + 2s·B·(W·Aᵀ) + s²·B·(A·Aᵀ)·Bᵀ (no N×K tensor) equal the dense float64
    norm; 'large_lora': ‖s·B·A‖ ≈ 30·‖W‖; 'cancel': W ≈ −0.9·s·B·A, so the norm is ~10× below ‖W‖ and the
    three terms cancel to one digit."""
    N, K, r, s = 45, 70, 5, 0.75
    a = torch.randn(r, K, device=DEVICE, dtype=torch.float64) * K**-0.5
    b = torch.randn(N, r, device=DEVICE, dtype=torch.float64)
    w = torch.randn(N, K, device=DEVICE, dtype=torch.float64) * K**-0.5
    if case == "large_lora":
        b = b * 30
    elif case == "cancel":
        w = -0.9 * s * (b @ a) + 0.01 * w
    w, a, b = w.to(dtype), a.float(), b.float()
    m = torch.rand(N, device=DEVICE) + 0.5
    dense = reference.dora_weight_norm(w.double(), a.double(), b.double(), s)
    scale = s if strategy == "aten" else torch.tensor(s, device=DEVICE)  # the Triton kernels read s from memory
    g, inv_norm, row_sq = norm_of(strategy)(w, a, b, m, scale, None)
    assert g.dtype == inv_norm.dtype == torch.float32
    # The factored form (aten) sums terms up to ‖W‖²/‖·‖² ≈ 100× the result ('cancel'): allow that factor over
    # fp32's floor; the Triton kernel sums (W + s·B·A)² itself and keeps fp32's floor there too.
    budget = 2e-3 if case == "cancel" and strategy == "aten" else 2e-5
    assert rel_err(inv_norm, 1.0 / dense) <= budget, case
    assert rel_err(g, m.double() / dense) <= budget, case
    if strategy == "aten":  # its ‖W‖² for the cache, and a cached one gives the same result
        assert row_sq.dtype == torch.float32
        assert_close(row_sq, (w.double() ** 2).sum(1), torch.float32, what="‖W‖²")
        g2, inv2, same = norm_of(strategy)(w, a, b, m, scale, row_sq)
        assert same is row_sq and torch.equal(g, g2) and torch.equal(inv_norm, inv2)
    else:
        assert row_sq is None


@pytest.mark.parametrize("r", [5, 8, 16, 32])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["rows", "conv1d_t"])
@pytest.mark.parametrize("chunk", [None, 150], ids=["one_chunk", "chunked"])
def test_weight_times_adapter_and_row_sq(monkeypatch, r, dtype, layout, chunk):
    """W·Aᵀ (N, r) and ‖W‖² against float64, through both forms of the rank-r product (r = 16, 32: MKL's plain
    product; 5, 8: the transposed one), for a row-major W and a Conv1D weight's ``.t()`` view, with 16-bit W
    widened in one piece or in several row chunks (``chunk`` elements each)."""
    if chunk is not None:
        monkeypatch.setattr(dora_norm, "CHUNK_ELEMENTS", chunk)
    N, K = 37, 70
    w64 = torch.randn(N, K, device=DEVICE, dtype=torch.float64)
    a = torch.randn(r, K, device=DEVICE)
    w = w64.to(dtype) if layout == "rows" else w64.t().contiguous().to(dtype).t()
    assert w.is_contiguous() == (layout == "rows")
    got = dora_norm.weight_times_adapter(w, a)
    assert got.shape == (N, r) and got.dtype == torch.float32
    want = w.double() @ a.double().t()
    assert rel_err(got, want) <= 1e-6
    row_sq = dora_norm.row_sq_norms_uncached(w)
    assert row_sq.shape == (N,) and rel_err(row_sq, (w.double() ** 2).sum(1)) <= 1e-6


def test_norm_tensor_scaling_and_float64():
    N, K, r = 9, 33, 3
    w, a, b = (torch.randn(N, K, dtype=torch.float64), torch.randn(r, K, dtype=torch.float64),
               torch.randn(N, r, dtype=torch.float64))
    m = torch.rand(N, dtype=torch.float64) + 0.5
    s = torch.tensor(0.3, dtype=torch.float64)
    g, inv_norm, _ = dora_strategies.get("aten").norm(w, a, b, m, s, None)
    dense = reference.dora_weight_norm(w, a, b, s)
    assert g.dtype == torch.float64 and rel_err(inv_norm, 1 / dense) < 1e-13


def test_row_sq_cache_invalidation(monkeypatch):
    """‖W‖² is computed once per frozen weight and again after an in-place write, a .data swap or a dtype change;
    a transposed view (Conv1D) is keyed on its parameter."""
    calls = []
    real = dora_norm.row_sq_norms_uncached

    def counting(weight):
        calls.append(tuple(weight.shape))
        return real(weight)

    monkeypatch.setattr(dora_norm, "row_sq_norms_uncached", counting)
    monkeypatch.setattr(dora_strategies.get("aten"), "row_sq_norms_uncached", counting)
    inp = DoraInputs(6, 20, 12, 3)
    layer_weight = torch.nn.Parameter(inp.weight.clone(), requires_grad=False)

    def call(weight):
        lorafast.dora_linear(inp.x, weight, inp.bias, inp.lora_a, inp.lora_b, inp.magnitude, 0.5).sum().backward()

    call(layer_weight)
    call(layer_weight)
    assert len(calls) == 1
    with torch.no_grad():
        layer_weight.mul_(2.0)  # in place: version bump
    call(layer_weight)
    assert len(calls) == 2
    layer_weight.data = layer_weight.data.clone()  # new storage
    call(layer_weight)
    assert len(calls) == 3
    y64 = lorafast.dora_linear(inp.x.double(), layer_weight.double(), None, inp.lora_a, inp.lora_b, inp.magnitude,
                               0.5)
    assert len(calls) == 4 and y64.dtype == torch.float64
    conv1d = torch.nn.Parameter(inp.weight.t().contiguous(), requires_grad=False)  # (K, N) storage
    call(conv1d.t())
    call(conv1d.t())
    assert len(calls) == 5


def test_row_sq_cache_result_after_update():
    """A stale ‖W‖² would change y: after an in-place write the op still matches the reference."""
    inp = DoraInputs(5, 20, 12, 3)
    weight = inp.weight.clone()
    lorafast.dora_linear(inp.x, weight, inp.bias, inp.lora_a, inp.lora_b, inp.magnitude, 0.5)
    weight.mul_(1.5)
    y = lorafast.dora_linear(inp.x, weight, inp.bias, inp.lora_a, inp.lora_b, inp.magnitude, 0.5)
    y_ref = reference.dora_linear(inp.x.double(), weight.double(), inp.bias.double(), inp.lora_a.double(),
                                  inp.lora_b.double(), inp.magnitude.double(), 0.5)
    assert_close(y, y_ref, torch.float32)


# ---- the op against float64 --------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, P], ids=["p0", "dropout"])
def test_dtypes_and_dropout(strategy, dtype, p):
    check(DoraInputs(37, 45, 29, 5, dtype), strategy, p, what=f"{strategy} {dtype} p={p}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("shape", [(1, 33, 17, 1), (7, 70, 45, 3), (40, 16, 50, 8)], ids=str)
def test_odd_shapes_no_bias(strategy, shape):
    check(DoraInputs(*shape, bias=False), strategy, what=f"{strategy} {shape}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("p", [0.0, P], ids=["p0", "dropout"])
def test_fp32_adapters_on_half_base(strategy, dtype, p):
    check(DoraInputs(33, 40, 24, 4, dtype, adapter_dtype=torch.float32), strategy, p, what=f"{strategy} {dtype}+fp32")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["3d", "transposed", "permuted3d"])
def test_3d_and_strided_x(strategy, layout):
    inp = DoraInputs(9, 40, 33, 4, lead=(3,) if layout == "3d" else ())
    if layout == "transposed":
        inp.x = torch.randn(40, 9, device=DEVICE).t().requires_grad_()
    elif layout == "permuted3d":
        inp.x = torch.randn(3, 40, 9, device=DEVICE).permute(0, 2, 1).requires_grad_()
    check(inp, strategy, P, what=f"{strategy} {layout}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_transposed_weight_tensor_scale_frozen_parts(strategy):
    """A Conv1D weight's transposed view (read as is), a 0-dim tensor scaling, a frozen magnitude and bias."""
    inp = DoraInputs(21, 40, 33, 4)
    inp.weight = inp.weight.t().contiguous().t()
    inp.scaling = torch.tensor(0.6, device=DEVICE)
    check(inp, strategy, P, what=f"{strategy} W.t() tensor s")
    inp.magnitude.requires_grad_(False)
    inp.bias.requires_grad_(False)
    for t in inp.leaves():
        t.grad = None
    y = lorafast.dora_linear(*inp.args(), backend=strategy)
    y.sum().backward()  # stride-0 dY
    assert inp.magnitude.grad is None and inp.bias.grad is None and inp.lora_a.grad is not None
    ref = inp.to64()
    reference.dora_linear(*ref.args()).sum().backward()
    assert_close(inp.x.grad, ref.x.grad, torch.float32, what="dx with stride-0 dY")


def test_aten_gradcheck():
    """float64 gradcheck of the seeded aten op in x, bias and m (A and B also move the detached norm, so their
    numerical gradient is not the op's by design: they are checked against the reference above)."""
    M, K, N, r = 5, 6, 4, 2
    gen = torch.Generator().manual_seed(0)
    w, a, b = (torch.randn(*s, dtype=torch.float64, generator=gen) for s in ((N, K), (r, K), (N, r)))
    x, bias = (torch.randn(*s, dtype=torch.float64, generator=gen).requires_grad_() for s in ((M, K), (N,)))
    m = (torch.rand(N, dtype=torch.float64, generator=gen) + 1).requires_grad_()
    for p in (0.0, 0.3):
        def f(x, bias, m, _p=p):
            torch.manual_seed(7)
            return lorafast.dora_linear(x, w, bias, a, b, m, 0.7, _p, True, backend="aten")

        assert torch.autograd.gradcheck(f, (x, bias, m))


# ---- memory: nothing N×K per call ------------------------------------------------------------------------

class LargestAllocation(TorchDispatchMode):
    """Records the largest tensor any op allocates: an output whose storage is not one of its inputs' (views and
    in-place/out= results share an input's storage; below autograd, ``_base`` does not mark views)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shape = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat_in = torch.utils._pytree.tree_leaves((args, kwargs))
        inputs = {t.untyped_storage().data_ptr() for t in flat_in if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs and \
                    t.numel() > self.largest:
                self.largest, self.shape = t.numel(), tuple(t.shape)
        return out


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("p", [0.0, P], ids=["p0", "dropout"])
def test_no_nxk_tensor_per_call(strategy, p):
    """fwd+bwd allocate nothing of N×K (no dense B·A, W + s·B·A or dW): at M = 8, K = 64, N = 48, r = 4 every
    legitimate tensor (M×K, M×N, the parameter gradients' one fill) is under N·K/2; ‖W‖² is cached by a first
    call."""
    M, K, N = 8, 64, 48
    inp = DoraInputs(M, K, N, 4)
    lorafast.dora_linear(*inp.args(), dropout_p=p, training=True, backend=strategy).sum().backward()
    mode = LargestAllocation()
    with mode:
        y = lorafast.dora_linear(*inp.args(), dropout_p=p, training=True, backend=strategy)
        y.backward(torch.ones_like(y))
    assert mode.largest < N * K // 2, f"{strategy}: a {mode.shape} tensor was allocated"
    # The check can fail: PEFT's own DoRA math (the reference) builds N×K tensors.
    mode = LargestAllocation()
    with mode:
        reference.dora_linear(*inp.args(), dropout_p=p, training=True).sum().backward()
    assert mode.largest >= N * K


def test_saved_for_backward_is_x_h_zb_and_vectors():
    """Saved beyond x and the parameters: H (M×r fp32), Zb (M×N), g and 1/‖·‖ (N) and the seed — no mask, no M×K."""
    M, K, N, r = 16, 24, 20, 4
    inp = DoraInputs(M, K, N, r)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lorafast.dora_linear(*inp.args(), dropout_p=P, training=True, backend="aten")
    alive = {t.untyped_storage().data_ptr() for t in (inp.x, inp.weight, inp.lora_a, inp.lora_b)}
    extra = sorted(tuple(t.shape) for t in saved if t.untyped_storage().data_ptr() not in alive)
    assert extra == sorted([(M, r), (M, N), (N,), (N,), (1,)]), extra


# ---- API ---------------------------------------------------------------------------------------------------

def test_validation_names_the_magnitude():
    inp = DoraInputs(4, 8, 6, 2)
    with pytest.raises(ValueError, match=r"magnitude \(shape \(5,\)"):
        lorafast.dora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b, inp.magnitude[:5], 1.0)
    with pytest.raises(TypeError, match="magnitude must be a torch.Tensor"):
        lorafast.dora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b, [1.0] * 6, 1.0)
    with pytest.raises(ValueError, match="lora_b"):
        lorafast.dora_linear(inp.x, inp.weight, None, inp.lora_a, inp.lora_b[:, :1], inp.magnitude, 1.0)


def test_trainable_weight_runs_the_reference_visibly():
    inp = DoraInputs(4, 8, 6, 2)
    weight = inp.weight.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = lorafast.dora_linear(inp.x, weight, inp.bias, inp.lora_a, inp.lora_b, inp.magnitude, 0.5)
    y.sum().backward()
    assert weight.grad is not None
    assert any("requires grad" in str(w.message) for w in caught) or "dora-trainable-weight" in \
        lorafast.strategies._warned


def test_empty_and_inference():
    inp = DoraInputs(4, 8, 6, 2)
    empty = lorafast.dora_linear(inp.x[:0], inp.weight, inp.bias, inp.lora_a, inp.lora_b, inp.magnitude, 0.5)
    assert empty.shape == (0, 6)
    with torch.no_grad():
        y = lorafast.dora_linear(*inp.args(), dropout_p=0.5, training=False)
    y_ref = reference.dora_linear(*inp.to64().args())
    assert_close(y, y_ref, torch.float32)


def test_autocast_bf16():
    """Under CPU autocast x, W and b run in bf16 like nn.Linear; the fp32 adapters and magnitude keep theirs."""
    inp = DoraInputs(12, 32, 16, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lorafast.dora_linear(*inp.args())
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert inp.magnitude.grad.dtype == torch.float32 and inp.lora_a.grad.dtype == torch.float32
    y_ref = reference.dora_linear(*inp.to64().args())
    assert_close(y, y_ref, torch.bfloat16)


@pytest.mark.parametrize("p", [0.0, P], ids=["p0", "dropout"])
def test_timing_runs_return_outputs_that_agree(p):
    """The dispatcher's timing closures (COMMON contract): each run() returns (y, dx, dA, dB, db, dm) — None for a
    gradient not needed — and every strategy's outputs agree with aten's on the same inputs and seed (the
    dispatcher's cross-check; on CPU the mask differs between aten and the kernels, so p > 0 compares shapes)."""
    from lorafast.dora import functional as dora_functional

    inp = DoraInputs(24, 40, 33, 4)
    x2 = inp.x.detach()
    scale = torch.tensor(inp.scaling)
    needs = (True, True, True, False, True)
    make_run = dora_functional.step_runner(x2, inp.weight, inp.bias, inp.lora_a, inp.lora_b, inp.magnitude, scale,
                                           p, needs)
    outs = {name: make_run(name)() for name in STRATEGIES}
    for name, out in outs.items():
        assert len(out) == 6 and out[4] is None and all(t is not None for i, t in enumerate(out) if i != 4), name
        for got, want in zip(out, outs["aten"]):
            if got is None:
                continue
            assert got.shape == want.shape
            if p == 0.0:
                assert rel_err(got, want) < 1e-4, name
    assert dora_functional.dispatch_op(needs, inp.weight) == "dora"
    assert dora_functional.dispatch_op((True,) * 4 + (False,), inp.weight.t().contiguous().t()) == "dora-mfrozen-wT"
