"""torch.compile(fullgraph=True): the fused op is one opaque custom op in a single graph, training gives
eager's numbers (dropout included), and changing a 0-dim tensor scaling does not recompile.

"aot_eager" traces forward and backward through AOTAutograd (fake tensors, the op's register_fake and
register_autograd) without inductor's C++ codegen, which is too slow on 2 cores for a whole BERT; one test
runs the default inductor backend on the LoRALinear MLP. The triton backend runs under TRITON_INTERPRET=1
on CPU (set by conftest).
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import DEVICE
from support.composability import (
    BERT_LORA_LAYERS,
    REPEAT_RTOL,
    assert_same_tensors,
    bert_batch,
    fused_op_count,
    lora_mlp,
    patched_bert,
    trainable_grads,
    trainable_params,
)
from torch._dynamo.backends.registry import lookup_backend
from torch._dynamo.utils import counters

import lorafast
from lorafast.peft import FusedLoraLinear

BACKENDS = ["torch", "triton"]


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


class RecordingBackend:
    """A torch.compile backend that keeps each dynamo graph, then hands it to ``inner``."""

    def __init__(self, inner: str = "aot_eager"):
        self.inner = lookup_backend(inner)
        self.graphs: list = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return self.inner(gm, example_inputs)


def train_steps(model, batches, loss_fn, steps: int = 2, lr: float = 0.1):
    """``steps`` SGD steps with the same dropout seed per step; returns losses, last grads, final params."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses, grads = [], {}
    for step in range(steps):
        torch.manual_seed(100 + step)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, batches[step % len(batches)])
        loss.backward()
        grads = trainable_grads(model)
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses), grads, trainable_params(model)


def mlp_loss(model, x):
    return model(x).square().mean()


def assert_training_matches(compiled_run, eager_run, rtol):
    (loss_c, grads_c, params_c), (loss_e, grads_e, params_e) = compiled_run, eager_run
    assert torch.allclose(loss_c, loss_e, rtol=rtol, atol=0), f"losses {loss_c.tolist()} vs {loss_e.tolist()}"
    assert_same_tensors(grads_c, grads_e, rtol, "grad")
    assert_same_tensors(params_c, params_e, rtol, "param")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lora_mlp_fullgraph_trains_like_eager(backend):
    """Two LoRALinear layers with dropout p=0.1: one graph, both fused ops in it, eager's numbers."""
    eager = lora_mlp(backend).to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    recorder = RecordingBackend()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=recorder)
    batches = [torch.randn(3, 5, 24, device=DEVICE) for _ in range(2)]
    eager_run = train_steps(eager, batches, mlp_loss)
    compiled_run = train_steps(compiled, batches, mlp_loss)
    assert len(recorder.graphs) == 1, "recompiled between training steps"
    assert fused_op_count(recorder.graphs[0]) == 2
    assert not counters["graph_break"], dict(counters["graph_break"])
    # aot_eager runs the same kernels on the same inputs, and the dropout seed comes from the same RNG draw.
    assert_training_matches(compiled_run, eager_run, rtol=REPEAT_RTOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_peft_bert_fullgraph_trains_like_eager(backend):
    """Patched PEFT BERT (13 fused LoRA linears, lora_dropout 0.1): one graph, eager's losses and grads."""
    eager = patched_bert(backend).to(DEVICE)
    compiled_model = copy.deepcopy(eager)
    recorder = RecordingBackend()
    compiled = torch.compile(compiled_model, fullgraph=True, backend=recorder)
    batches = [bert_batch(seed, device=DEVICE) for seed in range(2)]

    def loss_fn(model, batch):
        return model(**batch).loss

    eager_run = train_steps(eager, batches, loss_fn, lr=1.0)
    compiled_run = train_steps(compiled, batches, loss_fn, lr=1.0)
    assert len(recorder.graphs) == 1, "recompiled between training steps"
    assert fused_op_count(recorder.graphs[0]) == BERT_LORA_LAYERS, "a patched layer fell back to PEFT under compile"
    assert_training_matches(compiled_run, eager_run, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tensor_scaling_change_does_not_recompile(backend):
    """The scaling is read by the op from a 0-dim tensor: new values (in place or a new tensor) reuse the graph."""
    inp = [torch.randn(9, 16), torch.randn(12, 16) / 4, torch.randn(12), torch.randn(4, 16) / 4,
           torch.randn(12, 4) / 2]
    inp = [t.to(DEVICE) for t in inp]

    def f(x, w, b, a, bb, s):
        return lorafast.lora_linear(x, w, b, a, bb, s, backend=backend)

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    scaling = torch.tensor(0.5, device=DEVICE)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (0.5, 2.0, -1.25):
            scaling.fill_(value)
            torch.testing.assert_close(compiled(*inp, scaling), f(*inp, scaling), rtol=1e-6, atol=1e-6)
        other = torch.tensor(3.0, device=DEVICE)
        torch.testing.assert_close(compiled(*inp, other), f(*inp, other), rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_float_scaling_change_recompiles():
    """Control for the test above: a python-float scaling is a compile-time constant, so the recompile
    detector does fire (which is why hotswap uses 0-dim tensors)."""
    layer = lorafast.LoRALinear(16, 12, r=4, backend="torch").to(DEVICE)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    x = torch.randn(5, 16, device=DEVICE)
    compiled(x)
    layer.scaling = 3.0
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(Exception, match="[Rr]ecompil"):
        compiled(x)


def test_peft_hotswap_scaling_does_not_recompile():
    """PEFT's compiled-hotswap path (scalings as 0-dim tensors, updated with fill_) on a patched model."""
    from peft.utils.hotswap import prepare_model_for_compiled_hotswap

    model = patched_bert("torch", lora_dropout=0.0).to(DEVICE).eval()
    prepare_model_for_compiled_hotswap(model)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    batch = {"input_ids": bert_batch(device=DEVICE)["input_ids"]}
    layers = [m for m in model.modules() if isinstance(m, FusedLoraLinear)]
    assert all(isinstance(m.scaling["default"], torch.Tensor) for m in layers)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for value in (2.0, 0.5):
            for layer in layers:
                layer.scaling["default"].fill_(value)
            with torch.no_grad():
                torch.testing.assert_close(compiled(**batch).logits, model(**batch).logits, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1


def test_lora_mlp_inductor_trains_like_eager():
    """The default inductor backend (C++ codegen on CPU): the fused op stays opaque around generated code.
    fallback_random makes inductor draw the dropout seed with eager's RNG."""
    eager = lora_mlp("torch").to(DEVICE)
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True)
    batches = [torch.randn(3, 5, 24, device=DEVICE) for _ in range(2)]
    eager_run = train_steps(eager, batches, mlp_loss)
    with torch._inductor.config.patch(fallback_random=True):
        compiled_run = train_steps(compiled, batches, mlp_loss)
    assert not counters["graph_break"], dict(counters["graph_break"])
    # Inductor fuses GELU and the loss into generated code: rounding-level differences only.
    assert_training_matches(compiled_run, eager_run, rtol=1e-5)


@pytest.mark.gpu
def test_peft_bert_inductor_on_cuda_trains_like_eager():
    """Inductor (its own Triton codegen around the opaque op) with the real kernels, patched PEFT BERT."""
    eager = patched_bert("triton").cuda()
    recorder = RecordingBackend("inductor")
    compiled = torch.compile(copy.deepcopy(eager), fullgraph=True, backend=recorder)
    batches = [bert_batch(seed, device="cuda") for seed in range(2)]

    def loss_fn(model, batch):
        return model(**batch).loss

    eager_run = train_steps(eager, batches, loss_fn, lr=1.0)
    with torch._inductor.config.patch(fallback_random=True):
        compiled_run = train_steps(compiled, batches, loss_fn, lr=1.0)
    assert len(recorder.graphs) == 1 and fused_op_count(recorder.graphs[0]) == BERT_LORA_LAYERS
    # Inductor's fused softmax/layernorm/GELU kernels round differently from eager's.
    assert_training_matches(compiled_run, eager_run, rtol=1e-4)
