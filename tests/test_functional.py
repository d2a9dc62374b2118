"""lorafast.lora_linear vs the float64 reference, for every strategy: `fused` and `cublas` (their Triton parts
through the interpreter on CPU, cuBLAS parts as torch matmuls) and `aten`: forward and every gradient, odd
shapes, all dtypes, mixed adapter dtypes, strided inputs. Dropout is covered in test_dropout.py."""

import pytest
import torch
from conftest import DEVICE
from utils import assert_close, make_inputs, rel_err

import lorafast
from lorafast import reference
from lorafast.kernels import alloc


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    """Every kernel output starts as NaN, so an element a kernel fails to write fails the test."""
    real_empty = alloc.empty

    def nan_empty(shape, dtype, device):
        return real_empty(shape, dtype, device).fill_(float("nan"))

    monkeypatch.setattr(alloc, "empty", nan_empty)


def run(inp, backend, grad_out=None, **kw):
    """Forward + backward; returns (y, [grads of inp.leaves()])."""
    for t in inp.leaves():
        t.grad = None
    y = lorafast.lora_linear(*inp.args(), backend=backend, **kw)
    g = torch.randn_like(y) if grad_out is None else grad_out
    y.backward(g)
    return y, [t.grad for t in inp.leaves()], g


def check_against_reference(inp, backend="fused", what=""):
    dtype = inp.x.dtype
    y, grads, g = run(inp, backend)
    ref = inp.to64()
    y_ref = reference.lora_linear(*ref.args())
    y_ref.backward(g.double())
    low = LowPrecision(inp, g)
    assert_close(y, y_ref, dtype, low.y, what=f"{what} y")
    names = ["x", "bias", "lora_a", "lora_b"] if inp.bias is not None else ["x", "lora_a", "lora_b"]
    for name, got, leaf64, lowp in zip(names, grads, ref.leaves(), low.grads):
        assert got is not None and got.dtype == {"x": inp.x, "bias": inp.bias, "lora_a": inp.lora_a,
                                                 "lora_b": inp.lora_b}[name].dtype, f"{what} d{name} dtype"
        assert_close(got, leaf64.grad, dtype, lowp, what=f"{what} d{name}")


class LowPrecision:
    """The reference math run by PyTorch in the inputs' own dtypes: the error budget's yardstick."""

    def __init__(self, inp, g):
        leaves = [t.detach().clone().requires_grad_() for t in inp.leaves()]
        it = iter(leaves)
        x = next(it)
        bias = next(it) if inp.bias is not None else None
        a, b = next(it), next(it)
        self.y = reference.lora_linear(x, inp.weight, bias, a, b, inp.scaling)
        self.y.backward(g)
        self.grads = [t.grad for t in leaves]


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STRATEGIES = ["fused", "cublas", "aten"]
TRITON_STRATEGIES = ["fused", "cublas"]


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dtypes_and_bias(strategy, dtype, bias):
    inp = make_inputs(130, 70, 45, 8, dtype, bias=bias, device=DEVICE)
    check_against_reference(inp, strategy, what=f"{strategy} {dtype}")


@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
@pytest.mark.parametrize("M", [1, 7, 64, 130])
def test_rows(strategy, M):
    check_against_reference(make_inputs(M, 37, 53, 8, torch.float32, device=DEVICE), strategy, what=f"M={M}")


@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
@pytest.mark.parametrize("r", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ranks(strategy, r, dtype):
    check_against_reference(make_inputs(33, 70, 45, r, dtype, device=DEVICE), strategy, what=f"r={r}")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_on_half_activations(strategy, dtype):
    inp = make_inputs(65, 70, 45, 8, dtype, adapter_dtype=torch.float32, device=DEVICE)
    check_against_reference(inp, strategy, what=f"{strategy} {dtype}+fp32 adapters")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_3d_input(strategy):
    inp = make_inputs(9, 40, 33, 4, torch.float32, device=DEVICE, lead=(3,))
    check_against_reference(inp, strategy, what=f"{strategy} 3-D")


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted3d"])
def test_strided_inputs(strategy, layout):
    inp = make_inputs(50, 40, 33, 4, torch.float32, device=DEVICE)
    if layout == "transposed":
        x = torch.randn(40, 50, device=DEVICE).t()
    elif layout == "sliced":
        x = torch.randn(50, 90, device=DEVICE)[:, 7:47]
    else:
        x = torch.randn(5, 40, 10, device=DEVICE).permute(0, 2, 1)
    assert not x.is_contiguous()
    inp.x = x.detach().requires_grad_()
    assert not inp.x.is_contiguous()
    check_against_reference(inp, strategy, what=f"{strategy} {layout}")


@pytest.mark.parametrize("strategy", TRITON_STRATEGIES)
def test_transposed_weight_and_adapters(strategy):
    inp = make_inputs(30, 40, 33, 4, torch.float32, device=DEVICE)
    inp.weight = torch.randn(40, 33, device=DEVICE).t() / 7
    inp.lora_a = (torch.randn(40, 4, device=DEVICE) / 7).t().requires_grad_()
    inp.lora_b = (torch.randn(4, 33, device=DEVICE) / 2).t().requires_grad_()
    check_against_reference(inp, strategy, what=f"{strategy} strided weight/A/B")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_stride0_grad_from_sum(strategy):
    inp = make_inputs(20, 24, 18, 4, torch.float32, device=DEVICE)
    lorafast.lora_linear(*inp.args(), backend=strategy).sum().backward()
    ref = inp.to64()
    reference.lora_linear(*ref.args()).sum().backward()
    for got, leaf in zip(inp.leaves(), ref.leaves()):
        assert_close(got.grad, leaf.grad, torch.float32, what="sum().backward()")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_scaling_as_tensor_matches_float(strategy):
    inp = make_inputs(17, 24, 18, 4, torch.float32, device=DEVICE)
    y_float = lorafast.lora_linear(*inp.args(), backend=strategy)
    args = list(inp.args())
    args[-1] = torch.tensor(inp.scaling)
    y_tensor = lorafast.lora_linear(*args, backend=strategy)
    if strategy == "aten":  # a float scale is folded into the GEMM's alpha there: rounding may differ
        assert rel_err(y_float, y_tensor) <= 1e-6
    else:
        assert torch.equal(y_float, y_tensor)


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("M", [5, 67])  # both sides of the aten strategy's plain/transposed product switch
def test_scaling_as_tensor_matches_float_gradients(M, dropout_p):
    """Every gradient of the aten strategy with a tensor scale equals the float-scale call's (the float is
    folded into the GEMMs' alpha, the tensor multiplied in: two code paths), with dropout on too."""
    inp = make_inputs(M, 24, 18, 4, torch.float32, device=DEVICE, scaling=1.7)
    results = []
    for scaling in (inp.scaling, torch.tensor(inp.scaling)):
        for t in inp.leaves():
            t.grad = None
        args = list(inp.args())
        args[-1] = scaling
        torch.manual_seed(5)
        y = lorafast.lora_linear(*args, dropout_p=dropout_p, training=True, backend="aten")
        y.backward(torch.ones_like(y) + torch.arange(y.numel(), dtype=y.dtype).reshape(y.shape) / y.numel())
        results.append([y, *[t.grad for t in inp.leaves()]])
    for got, expected in zip(*results):
        assert expected.abs().sum() > 0 and rel_err(got, expected) <= 1e-6


def test_float_scale_tensor_is_cached_per_value():
    """One 0-dim device tensor per (value, dtype, device), reused: no new tensor per call."""
    from lorafast.functional import scale_tensor

    x = torch.randn(2, 3, device=DEVICE)
    a, b = scale_tensor(0.5, x), scale_tensor(0.5, x)
    assert a is b and a.item() == 0.5 and a.dtype == torch.float32
    assert scale_tensor(0.25, x).item() == 0.25
    assert scale_tensor(0.5, x.double()).dtype == torch.float64


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_trainable_weight_gets_gradient(strategy):
    inp = make_inputs(20, 24, 18, 4, torch.float32, device=DEVICE)
    inp.weight.requires_grad_()
    y = lorafast.lora_linear(*inp.args(), backend=strategy)
    g = torch.randn_like(y)
    y.backward(g)
    ref = inp.to64()
    reference.lora_linear(*ref.args()).backward(g.double())
    assert_close(inp.weight.grad, ref.weight.grad, torch.float32, what="dW fallback")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_only_requested_grads(strategy):
    """x without grad: only adapter grads computed (no dX GEMM) and they stay correct."""
    inp = make_inputs(20, 24, 18, 4, torch.float32, device=DEVICE)
    inp.x.requires_grad_(False)
    y = lorafast.lora_linear(*inp.args(), backend=strategy)
    g = torch.randn_like(y)
    y.backward(g)
    ref = inp.to64()
    reference.lora_linear(*ref.args()).backward(g.double())
    assert inp.x.grad is None
    assert_close(inp.lora_a.grad, ref.lora_a.grad, torch.float32, what="dA")
    assert_close(inp.lora_b.grad, ref.lora_b.grad, torch.float32, what="dB")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_empty_rows(strategy):
    inp = make_inputs(0, 24, 18, 4, torch.float32, device=DEVICE, lead=(2,))
    y = lorafast.lora_linear(*inp.args(), backend=strategy)
    assert y.shape == (2, 0, 18)
    y.sum().backward()
    assert inp.lora_a.grad is not None and torch.all(inp.lora_a.grad == 0)


@pytest.mark.parametrize("alias, strategy", [("triton", "fused"), ("torch", "aten")])
def test_backend_aliases(alias, strategy):
    """"triton" and "torch" stay accepted and run exactly the strategy they name."""
    inp = make_inputs(21, 24, 18, 4, torch.float32, device=DEVICE)
    assert torch.equal(lorafast.lora_linear(*inp.args(), backend=alias), lorafast.lora_linear(*inp.args(),
                                                                                            backend=strategy))


def test_backward_allocates_no_zero_grad_for_h():
    """materialize_grads is off: autograd does not build a zero (M, r) gradient for the non-differentiable
    H output on every backward (it did: one zeros_like + fill per call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    inp = make_inputs(21, 24, 18, 4, torch.float32, device=DEVICE)
    y = lorafast.lora_linear(*inp.args(), backend="aten")
    g = torch.randn_like(y)
    with Ops() as mode:
        y.backward(g)
    zero_fills = [n for n in mode.names if "zero" in n or "fill" in n]
    assert zero_fills == [], mode.names
