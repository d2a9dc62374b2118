"""Bad inputs raise one clear error naming the argument; valid-but-unsupported cases fall back."""

import os

import pytest
import torch

import lorafast


def good(**over):
    args = dict(x=torch.randn(5, 8), weight=torch.randn(6, 8), bias=torch.randn(6), lora_a=torch.randn(2, 8),
                lora_b=torch.randn(6, 2), scaling=0.5)
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over, exc, pattern",
    [
        ({"weight": torch.randn(6, 9)}, ValueError, r"weight \(shape \(6, 9\).*K = x.shape\[-1\] = 8"),
        ({"lora_a": torch.randn(2, 7)}, ValueError, r"lora_a \(shape \(2, 7\)"),
        ({"lora_b": torch.randn(6, 3)}, ValueError, r"lora_b \(shape \(6, 3\).*\(6, 2\)"),
        ({"lora_b": torch.randn(5, 2)}, ValueError, r"lora_b"),
        ({"bias": torch.randn(7)}, ValueError, r"bias \(shape \(7,\)"),
        ({"x": torch.tensor(1.0)}, ValueError, r"x .* at least 1 dimension"),
        ({"x": torch.ones(5, 8, dtype=torch.int32)}, TypeError, r"x .*int32.*unsupported dtype"),
        ({"lora_a": torch.ones(2, 8, dtype=torch.int64)}, TypeError, r"lora_a .*unsupported dtype"),
        ({"weight": torch.randn(6, 8, dtype=torch.float16)}, TypeError, r"weight .*x's dtype"),
        ({"weight": torch.randn(6, 8, 1)}, ValueError, r"weight .*2-D"),
        ({"lora_a": torch.randn(0, 8), "lora_b": torch.randn(6, 0)}, ValueError, r"r = 0"),
        ({"scaling": torch.ones(2)}, ValueError, r"scaling tensor"),
        ({"scaling": "2"}, TypeError, r"scaling must be"),
        ({"weight": torch.randn(6, 8, device="meta")}, ValueError, r"weight .*not on x's device"),
        ({"x": [1.0]}, TypeError, r"x must be a torch.Tensor"),
    ],
)
def test_bad_inputs(over, exc, pattern):
    with pytest.raises(exc, match=pattern):
        lorafast.lora_linear(**good(**over))


def test_bad_dropout_and_backend():
    with pytest.raises(ValueError, match="dropout_p"):
        lorafast.lora_linear(**good(), dropout_p=1.0, training=True)
    with pytest.raises(ValueError, match="backend must be one of"):
        lorafast.lora_linear(**good(), backend="cuda")


def test_triton_on_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        lorafast.lora_linear(**good(), backend="triton")


def test_auto_is_aten_on_cpu():
    from lorafast import dispatch

    x = torch.randn(2, 2)
    assert dispatch.resolve("auto", x, x, x, 0.0, (True,) * 4) == "aten"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="triton backend needs CUDA or the interpreter")
def test_fp64_on_triton_falls_back_with_warning():
    from lorafast import strategies

    strategies._warned.clear()
    args = good(**{k: v.double() for k, v in good().items() if isinstance(v, torch.Tensor)})
    if torch.cuda.is_available():
        args = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    with pytest.warns(UserWarning, match="running the 'aten' strategy"):
        y = lorafast.lora_linear(**args, backend="triton")
    assert y.dtype == torch.float64


class _CudaLike:
    """What triton_fallback reads of a tensor, on a (mocked) CUDA device."""

    def __init__(self, dtype=torch.bfloat16, rows=8):
        self.dtype, self.is_cuda, self.shape = dtype, True, (rows, 64)


def test_triton_older_than_the_verified_floor_runs_aten_on_cuda(monkeypatch):
    from lorafast import strategies

    monkeypatch.setattr(strategies, "triton_version", lambda: (3, 0))
    reason = strategies.triton_fallback(_CudaLike(), _CudaLike())
    assert reason is not None and reason.startswith("triton 3.0 is older than 3.6"), reason
    cpu = torch.randn(8, 64, dtype=torch.bfloat16)  # the interpreter on CPU keeps running the kernels
    assert strategies.triton_fallback(cpu, cpu) is None
    monkeypatch.setattr(strategies, "triton_version", lambda: strategies.MIN_TRITON)
    assert strategies.triton_fallback(_CudaLike(), _CudaLike()) is None
