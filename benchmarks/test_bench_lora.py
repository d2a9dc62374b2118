"""lorafast (and each strategy that runs on this device) vs PEFT vs the plain-PyTorch reference vs the frozen
linear, under pytest-benchmark.

Same implementations and setup as ``python -m lorafast bench`` (lorafast.bench); this suite adds
pytest-benchmark's statistics, comparisons between saved runs (``--benchmark-autosave`` /
``--benchmark-compare``) and histograms. No correctness checks here: the bench CLI and tests/ do those.
"""

import pytest
import torch

from lorafast import bench

# fwd is inference (dropout plays no part): one p. fwd+bwd: with and without dropout.
CASES = [("fwd", 0.0), ("fwd+bwd", 0.0), ("fwd+bwd", 0.1)]


def _synchronized(call, device):
    # pytest-benchmark reads a host clock: wait for the GPU's queue to drain inside the timed call.
    if device.type != "cuda":
        return call

    def run():
        out = call()
        torch.cuda.synchronize()
        return out

    return run


_DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
IMPLS = (*bench.IMPLEMENTATIONS, *bench.default_strategies(_DEVICE))  # strategies timed on their own too


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode,p", CASES, ids=[f"{m}-p{p:g}" for m, p in CASES])
def test_lora_linear(benchmark, lora_inputs, bench_device, shape, mode, p, impl):
    device, _, rank = bench_device
    if impl == "peft" and not bench.peft_available():
        pytest.skip("peft is not installed")
    inputs = lora_inputs(shape)
    layer = bench.build_implementations(inputs, p, names=[impl])[impl]
    if mode == "fwd":
        call = bench.inference_call(layer, inputs.x)
    else:
        call = bench.training_call(layer, inputs.x, inputs.dy)
    benchmark.group = f"{shape.name} ({shape.M},{shape.K},{shape.N}) r={rank} {mode} p={p:g}"
    benchmark.extra_info.update(
        impl=impl, M=shape.M, K=shape.K, N=shape.N, rank=rank, dropout=p, mode=mode,
        device=str(device), dtype=bench.dtype_name(inputs.x.dtype),
    )
    benchmark(_synchronized(call, device))
