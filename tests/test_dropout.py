"""Dropout: the kernels' Philox mask replayed through the reference (fwd + every grad), keep rate and
1/(1−p) scaling, seeding, and gradcheck of the seeded forward on the torch backend."""

import pytest
import torch
from conftest import DEVICE
from utils import assert_close, make_inputs

import lorafast
from lorafast import functional, reference, torch_backend
from lorafast.kernels.dropout import dropout_keep_mask

P = 0.25


def replay_mask(backend, seed, M, K, p):
    if backend == "triton":
        return dropout_keep_mask(seed, M, K, p)
    return torch_backend.dropout_keep_mask(seed, M, K, p, seed.device).bool()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mask_replay_matches_reference(backend, dtype):
    """Forward and all grads equal the reference run with the very mask the backend drew."""
    inp = make_inputs(67, 45, 37, 5, dtype, device=DEVICE)
    torch.manual_seed(1234)
    y = lorafast.lora_linear(*inp.args(), dropout_p=P, training=True, backend=backend)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(1234)
    seed = functional._dropout_seed(inp.x.device)
    mask = replay_mask(backend, seed, 67, 45, P)
    ref = inp.to64()
    y_ref = reference.lora_linear(*ref.args(), dropout_p=P, training=True, dropout_mask=mask)
    y_ref.backward(g.double())
    names = ["y", "dx", "dbias", "dA", "dB"]
    outs = [y] + [t.grad for t in inp.leaves()]
    wants = [y_ref] + [r.grad for r in ref.leaves()]
    for name, got, want in zip(names, outs, wants):
        # The per-dtype floor alone (no low-precision yardstick): bf16's floor covers these sizes.
        assert_close(got, want, dtype, what=f"{backend} {name}")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_keep_rate_and_scaling(backend):
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
    M, K, p = 257, 255, 0.1
    keep = replay_mask(backend, seed, M, K, p)
    assert keep.shape == (M, K) and keep.dtype == torch.bool
    rate = keep.float().mean().item()
    # 65k Bernoulli draws: std ≈ 0.0012, so 0.006 is a 5-sigma band.
    assert abs(rate - (1 - p)) < 0.006, rate
    # Scaling: with W = 0, b = 0 and A = I-like, E[y] over the mask equals the no-dropout output.
    x = torch.ones(M, K, device=DEVICE)
    a = torch.ones(1, K, device=DEVICE) / K
    b = torch.ones(1, 1, device=DEVICE)
    w = torch.zeros(1, K, device=DEVICE)
    torch.manual_seed(5)
    y = lorafast.lora_linear(x, w, None, a, b, 1.0, dropout_p=p, training=True, backend=backend)
    assert abs(y.mean().item() - 1.0) < 0.01, y.mean().item()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_seeding(backend):
    inp = make_inputs(31, 40, 20, 4, torch.float32, device=DEVICE)

    def draw(s):
        torch.manual_seed(s)
        return lorafast.lora_linear(*inp.args(), dropout_p=0.5, training=True, backend=backend).detach()

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    eval_y = lorafast.lora_linear(*inp.args(), dropout_p=0.5, training=False, backend=backend)
    assert_close(eval_y, reference.lora_linear(*inp.to64().args()), torch.float32, what="eval ignores dropout")


def test_masks_differ_across_seeds_triton():
    a = dropout_keep_mask(torch.tensor([1], device=DEVICE), 64, 64, 0.5)
    b = dropout_keep_mask(torch.tensor([2], device=DEVICE), 64, 64, 0.5)
    assert (a != b).float().mean() > 0.3


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_backend_gradcheck(p):
    """float64 gradcheck of the seeded forward: every input including bias, with and without dropout."""
    inp = make_inputs(6, 5, 4, 3, torch.float64, device="cpu")
    inp.weight.requires_grad_()

    def f(x, w, b, a, bb):
        torch.manual_seed(7)
        return lorafast.lora_linear(x, w, b, a, bb, 0.7, dropout_p=p, training=True, backend="torch")

    assert torch.autograd.gradcheck(f, (inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b))
