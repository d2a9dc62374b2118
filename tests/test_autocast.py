"""torch.autocast: lorafast.lora_linear follows nn.Linear + PEFT's dtype rules.

Under autocast nn.Linear casts x, weight and bias to the autocast dtype (float64 excepted) and PEFT's
lora_A / lora_B linears run under the same autocast, so the LoRA branch is computed in that dtype from fp32
adapters. The fused op must return the autocast dtype, be as close to a float64 reference as that PEFT math
is (flash-attention's 2× rule, tests/utils.py), and give each parameter its gradient in its own dtype —
also when backward() is called inside the autocast region.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICE
from support.composability import bert_batch, lora_mlp, patched_bert
from utils import assert_close

import lorafast

BACKENDS = ["torch", "triton"]
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]


def peft_math(x, weight, bias, lora_a, lora_b, scaling):
    """What nn.Linear + PEFT's lora.Linear compute (no dropout): three F.linear calls, each autocast."""
    return F.linear(x, weight, bias) + F.linear(F.linear(x.to(lora_a.dtype), lora_a), lora_b) * scaling


def leaves(M=37, K=48, N=40, r=8, device=DEVICE):
    """fp32 x, frozen weight, trainable bias, fp32 adapters — a PEFT layer under mixed precision."""
    x = torch.randn(M, K, device=device).requires_grad_()
    weight = torch.randn(N, K, device=device) / K**0.5
    bias = (torch.randn(N, device=device) * 0.1).requires_grad_()
    lora_a = (torch.randn(r, K, device=device) / K**0.5).requires_grad_()
    lora_b = (torch.randn(N, r, device=device) / r**0.5).requires_grad_()
    return [x, weight, bias, lora_a, lora_b]


def run(fn, tensors, grad_out, autocast_dtype=None, device_type=DEVICE):
    """Output and the gradients of x, bias, lora_a, lora_b; backward runs inside the autocast region."""
    tensors = [t.detach().clone().requires_grad_(t.requires_grad) for t in tensors]
    enabled = autocast_dtype is not None
    with torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16, enabled=enabled):
        out = fn(*tensors, 0.75)
        out.backward(grad_out.to(out.dtype))
    x, _, bias, lora_a, lora_b = tensors
    return out, [x.grad, bias.grad, lora_a.grad, lora_b.grad]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_lora_linear_under_autocast_matches_peft_rules(backend, dtype):
    tensors = leaves()
    grad_out = torch.randn(37, 40, device=DEVICE)

    def fused(*args):
        return lorafast.lora_linear(*args, backend=backend)

    out, grads = run(fused, tensors, grad_out, dtype)
    peft_out, peft_grads = run(peft_math, tensors, grad_out, dtype)
    ref_out, ref_grads = run(peft_math, [t.double() for t in tensors], grad_out.double())

    assert out.dtype == peft_out.dtype == dtype
    assert_close(out, ref_out, dtype, lowp=peft_out, what=f"{backend} y")
    for name, got, peft, ref, leaf in zip(["dx", "dbias", "dA", "dB"], grads, peft_grads, ref_grads,
                                          [tensors[0], *tensors[2:]]):
        assert got.dtype == peft.dtype == leaf.dtype == torch.float32, f"{name}: {got.dtype}"
        assert_close(got, ref, dtype, lowp=peft, what=f"{backend} {name}")


def test_low_precision_base_with_fp32_input_under_autocast():
    """A bf16 base weight with fp32 activations is an error without autocast (as for nn.Linear) and works
    under autocast, where both are cast to the autocast dtype."""
    x, weight, bias, lora_a, lora_b = leaves()
    weight = weight.bfloat16()
    with pytest.raises(TypeError, match="weight"):
        lorafast.lora_linear(x, weight, bias, lora_a, lora_b, 0.75)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = lorafast.lora_linear(x, weight, bias, lora_a, lora_b, 0.75)
        peft_out = peft_math(x, weight, bias, lora_a, lora_b, 0.75)
    ref = peft_math(*[t.detach().double() for t in (x, weight, bias, lora_a, lora_b)], 0.75)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref, torch.bfloat16, lowp=peft_out, what="y")


def test_float64_is_not_autocast():
    """Autocast leaves float64 alone (nn.Linear too): the result is the exact float64 one."""
    tensors = [t.double() for t in leaves()]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = lorafast.lora_linear(*tensors, 0.75, backend="torch")
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, lorafast.lora_linear(*tensors, 0.75, backend="torch"), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_linear_module_under_autocast(backend):
    """LoRALinear (fp32 parameters) under fp16 autocast: fp16 output near PEFT's, fp32 gradients."""
    layer = lorafast.LoRALinear(48, 40, r=8, lora_alpha=6, backend=backend).to(DEVICE)
    torch.nn.init.normal_(layer.lora_B, std=0.3)
    x = torch.randn(2, 9, 48, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        out = layer(x)
        peft_out = peft_math(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling)
    out.float().square().sum().backward()
    ref = peft_math(*[t.detach().double() for t in (x, layer.weight, layer.bias, layer.lora_A, layer.lora_B)],
                    layer.scaling)
    assert out.dtype == torch.float16
    assert_close(out, ref, torch.float16, lowp=peft_out, what="y")
    assert layer.lora_A.grad.dtype == layer.lora_B.grad.dtype == torch.float32
    assert layer.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_under_autocast_matches_eager(backend):
    """torch.compile(fullgraph) of a LoRALinear MLP called under fp16 autocast: same dtype and numbers."""
    torch._dynamo.reset()  # fresh caches: earlier tests compiled the same forward code
    model = lora_mlp(backend, dropout=0.0).to(DEVICE)
    compiled = torch.compile(copy.deepcopy(model), fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 5, 24, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        eager_out, compiled_out = model(x), compiled(x)
    assert eager_out.dtype == compiled_out.dtype == torch.float16
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-3, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=str)
def test_patched_peft_bert_under_cuda_autocast_matches_peft(dtype):
    """The real kernels on CUDA inside a patched PEFT BERT under autocast, against vanilla PEFT."""
    vanilla = patched_bert(lora_dropout=0.0, patch=False).cuda()
    fused = copy.deepcopy(vanilla)
    lorafast.patch(fused, backend="triton")
    reference = copy.deepcopy(vanilla).double()
    batch = bert_batch(device="cuda")
    results = []
    for model in (fused, vanilla, reference):
        with torch.autocast("cuda", dtype=dtype, enabled=model is not reference):
            out = model(**batch)
            out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((out.logits, grads))
    (logits_f, grads_f), (logits_v, grads_v), (logits_r, grads_r) = results
    assert logits_f.dtype == logits_v.dtype
    assert_close(logits_f, logits_r, dtype, lowp=logits_v, what="logits")
    for name, ref in grads_r.items():
        assert grads_f[name].dtype == grads_v[name].dtype == torch.float32
        assert_close(grads_f[name], ref, dtype, lowp=grads_v[name], what=name)
