"""lorafast.lora_linear (triton backend through the interpreter on CPU) vs the float64 reference:
forward and every gradient, odd shapes, all dtypes, mixed adapter dtypes, strided inputs."""

import pytest
import torch
from conftest import DEVICE
from utils import assert_close, make_inputs

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


def check_against_reference(inp, backend="triton", what=""):
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_dtypes_and_bias(dtype, bias):
    check_against_reference(make_inputs(130, 70, 45, 8, dtype, bias=bias, device=DEVICE), what=f"{dtype}")


@pytest.mark.parametrize("M", [1, 7, 64, 130])
def test_rows(M):
    check_against_reference(make_inputs(M, 37, 53, 8, torch.float32, device=DEVICE), what=f"M={M}")


@pytest.mark.parametrize("r", [1, 3, 8, 16, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ranks(r, dtype):
    check_against_reference(make_inputs(33, 70, 45, r, dtype, device=DEVICE), what=f"r={r}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_fp32_adapters_on_half_activations(dtype):
    inp = make_inputs(65, 70, 45, 8, dtype, adapter_dtype=torch.float32, device=DEVICE)
    check_against_reference(inp, what=f"{dtype}+fp32 adapters")


def test_3d_input():
    check_against_reference(make_inputs(9, 40, 33, 4, torch.float32, device=DEVICE, lead=(3,)), what="3-D")


@pytest.mark.parametrize("layout", ["transposed", "sliced", "permuted3d"])
def test_strided_inputs(layout):
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
    check_against_reference(inp, what=layout)


def test_transposed_weight_and_adapters():
    inp = make_inputs(30, 40, 33, 4, torch.float32, device=DEVICE)
    inp.weight = torch.randn(40, 33, device=DEVICE).t() / 7
    inp.lora_a = (torch.randn(40, 4, device=DEVICE) / 7).t().requires_grad_()
    check_against_reference(inp, what="strided weight/A")


def test_stride0_grad_from_sum():
    inp = make_inputs(20, 24, 18, 4, torch.float32, device=DEVICE)
    lorafast.lora_linear(*inp.args(), backend="triton").sum().backward()
    ref = inp.to64()
    reference.lora_linear(*ref.args()).sum().backward()
    for got, leaf in zip(inp.leaves(), ref.leaves()):
        assert_close(got.grad, leaf.grad, torch.float32, what="sum().backward()")


def test_scaling_as_tensor_matches_float():
    inp = make_inputs(17, 24, 18, 4, torch.float32, device=DEVICE)
    y_float = lorafast.lora_linear(*inp.args(), backend="triton")
    args = list(inp.args())
    args[-1] = torch.tensor(inp.scaling)
    y_tensor = lorafast.lora_linear(*args, backend="triton")
    assert torch.equal(y_float, y_tensor)


def test_trainable_weight_gets_gradient():
    inp = make_inputs(20, 24, 18, 4, torch.float32, device=DEVICE)
    inp.weight.requires_grad_()
    y = lorafast.lora_linear(*inp.args(), backend="triton")
    g = torch.randn_like(y)
    y.backward(g)
    ref = inp.to64()
    reference.lora_linear(*ref.args()).backward(g.double())
    assert_close(inp.weight.grad, ref.weight.grad, torch.float32, what="dW fallback")


def test_only_requested_grads():
    """x without grad: only adapter grads computed (no dX GEMM) and they stay correct."""
    inp = make_inputs(20, 24, 18, 4, torch.float32, device=DEVICE)
    inp.x.requires_grad_(False)
    y = lorafast.lora_linear(*inp.args(), backend="triton")
    g = torch.randn_like(y)
    y.backward(g)
    ref = inp.to64()
    reference.lora_linear(*ref.args()).backward(g.double())
    assert inp.x.grad is None
    assert_close(inp.lora_a.grad, ref.lora_a.grad, torch.float32, what="dA")
    assert_close(inp.lora_b.grad, ref.lora_b.grad, torch.float32, what="dB")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_empty_rows(backend):
    inp = make_inputs(0, 24, 18, 4, torch.float32, device=DEVICE, lead=(2,))
    y = lorafast.lora_linear(*inp.args(), backend=backend)
    assert y.shape == (2, 0, 18)
    y.sum().backward()
    assert inp.lora_a.grad is not None and torch.all(inp.lora_a.grad == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_torch_backend_matches_reference(dtype):
    check_against_reference(make_inputs(70, 45, 37, 3, dtype, device=DEVICE), backend="torch", what="torch")


def test_torch_backend_fp32_adapters_on_bf16():
    inp = make_inputs(33, 45, 37, 3, torch.bfloat16, adapter_dtype=torch.float32, device=DEVICE)
    check_against_reference(inp, backend="torch", what="torch mixed")
