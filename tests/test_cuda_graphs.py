"""CUDA graphs over a patched PEFT BERT (GPU only): after a warm-up, fwd+bwd has no host sync, and
`torch.cuda.make_graphed_callables` / `torch.compile(mode="reduce-overhead")` replays equal eager.

LoRA dropout and hidden dropout are 0, so eager and replayed runs compute the same numbers (the CUDA
kernels reduce dA, dB and db with fp32 atomics, whose order varies: relative tolerance, not bitwise).
The CPU side of the same guarantee (no syncing op on the planned path) is tests/test_hot_path.py.
"""

import copy

import pytest
import torch
from support.composability import bert_batch, patched_bert, rel_err, trainable_grads

pytestmark = pytest.mark.gpu

BACKENDS = ["auto", "fused", "cublas", "aten"]
RTOL = 1e-4


class _Logits(torch.nn.Module):
    """BERT as a tensors-in, tensor-out callable (what the graph APIs capture)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits


def _bert(backend, device="cuda"):
    model = patched_bert(backend, lora_dropout=0.0).to(device).train()
    return _Logits(model), (bert_batch(0, device=device)["input_ids"],)


def _fwd_bwd(module, args):
    for p in module.parameters():
        p.grad = None
    logits = module(*args)
    logits.float().square().sum().backward()
    return logits.detach().clone(), {k: v.clone() for k, v in trainable_grads(module).items()}


def _assert_same(got, expected, what):
    (logits, grads), (logits_ref, grads_ref) = got, expected
    assert rel_err(logits, logits_ref) <= RTOL, f"{what}: logits"
    assert grads.keys() == grads_ref.keys() and grads_ref, what
    for name in grads_ref:
        assert rel_err(grads[name], grads_ref[name]) <= RTOL, f"{what}: grad {name}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_warm_step_has_no_host_sync(backend):
    module, args = _bert(backend)
    _fwd_bwd(module, args)  # warm-up: plans, strategy choice (auto-tuning may sync), compiled kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logits = module(*args)
        logits.float().square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("backend", BACKENDS)
def test_make_graphed_callables_matches_eager(backend):
    module, args = _bert(backend)
    graphed_module = copy.deepcopy(module)
    for _ in range(2):  # warm-up on the default stream (make_graphed_callables warms up on a side stream too)
        _fwd_bwd(module, args)
        _fwd_bwd(graphed_module, args)
    expected = _fwd_bwd(module, args)
    graphed = torch.cuda.make_graphed_callables(graphed_module, args)
    for step in range(3):  # replays read the current parameter values: each replay equals eager
        _assert_same(_fwd_bwd(graphed, args), expected, f"{backend} replay {step}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_reduce_overhead_matches_eager(backend):
    module, args = _bert(backend)
    compiled = torch.compile(copy.deepcopy(module), mode="reduce-overhead")
    _fwd_bwd(module, args)
    expected = _fwd_bwd(module, args)
    for step in range(3):  # the first calls record, later ones replay the CUDA graph
        _assert_same(_fwd_bwd(compiled, args), expected, f"{backend} step {step}")
    module.eval()
    compiled.eval()
    with torch.no_grad():
        ref = module(*args)
        for step in range(3):
            assert rel_err(compiled(*args), ref) <= RTOL, f"{backend} inference step {step}"
