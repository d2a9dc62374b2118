"""LoRALinear: PEFT-style init, from_linear sharing, merge/unmerge, trainable set, training step."""

import math

import pytest
import torch
from conftest import DEVICE
from torch import nn
from utils import assert_close

import lorafast
from lorafast import reference


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_from_linear_equals_linear_at_init(backend):
    linear = nn.Linear(40, 24).to(DEVICE)
    layer = lorafast.LoRALinear.from_linear(linear, r=4, lora_alpha=8, backend=backend)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert torch.all(layer.lora_B == 0)
    x = torch.randn(3, 7, 40, device=DEVICE)
    assert_close(layer(x), linear(x.double().float()).detach(), torch.float32, what="init output")


def test_init_and_trainable_parameters():
    layer = lorafast.LoRALinear(32, 16, r=4, lora_alpha=8)
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A", "lora_B"}
    assert layer.lora_A.shape == (4, 32) and layer.lora_B.shape == (16, 4)
    assert torch.all(layer.lora_B == 0) and layer.lora_A.abs().max() <= 1 / math.sqrt(32) + 1e-6
    assert layer.scaling == 2.0
    assert lorafast.LoRALinear(32, 16, r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    layer.bias.requires_grad_(True)
    x = torch.randn(5, 32)
    layer(x).sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is not None and layer.lora_A.grad is not None


def test_matches_reference_with_random_adapters():
    layer = lorafast.LoRALinear(32, 16, r=4, lora_alpha=8, backend="torch")
    nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 9, 32)
    ref = reference.lora_linear(x.double(), layer.weight.double(), layer.bias.double(), layer.lora_A.double(),
                                layer.lora_B.double(), layer.scaling)
    assert_close(layer(x), ref, torch.float32, what="module forward")


def test_merge_unmerge_round_trip():
    layer = lorafast.LoRALinear(32, 16, r=4, lora_alpha=8)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 32)
    before = layer(x).detach()
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    assert_close(layer(x), before.double(), torch.float32, what="merged")
    layer.merge()  # idempotent
    layer.unmerge()
    assert not layer.merged
    assert torch.allclose(layer.weight, w0, atol=1e-6)
    assert_close(layer(x), before.double(), torch.float32, what="unmerged")


def test_dropout_only_in_training():
    layer = lorafast.LoRALinear(32, 16, r=4, lora_dropout=0.5, backend="torch")
    nn.init.normal_(layer.lora_B)
    x = torch.randn(6, 32)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    torch.manual_seed(0)
    a = layer(x)
    torch.manual_seed(1)
    assert not torch.equal(a, layer(x))


def test_training_reduces_loss():
    torch.manual_seed(0)
    layer = lorafast.LoRALinear(16, 8, r=4, lora_alpha=8)
    target = torch.randn(64, 8)
    x = torch.randn(64, 16)
    opt = torch.optim.Adam([layer.lora_A, layer.lora_B], lr=0.05)
    losses = []
    for _ in range(30):
        loss = nn.functional.mse_loss(layer(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


def test_bad_constructor_args():
    with pytest.raises(ValueError, match="r must be"):
        lorafast.LoRALinear(4, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout"):
        lorafast.LoRALinear(4, 4, lora_dropout=1.0)
