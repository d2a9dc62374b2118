"""DDP and FSDP2 (fully_shard) on a patched PEFT BERT: 2 CPU processes over gloo (localhost, free port).

Each rank runs half of a batch; the gradients every rank ends up with (DDP's all-reduced ones, FSDP2's
reduce-scattered shards gathered to full size) must equal a single-process run over the whole batch,
with every LoRA layer on the fused path. The ranks are spawned once per module (imports dominate).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from support.composability import BERT_LORA_LAYERS, assert_same_tensors
from support.distributed import free_port, single_process_grads, worker

import lorafast

WORLD = 2
# Same math, different summation order (per-rank partial sums, then the collective's reduction).
RTOL = 1e-5


def run_ranks(tmp_dir, world: int, pg_backend: str, backend: str) -> list:
    mp.spawn(worker, args=(world, free_port(), pg_backend, backend, str(tmp_dir)), nprocs=world, join=True)
    return [torch.load(tmp_dir / f"rank{rank}.pt") for rank in range(world)]


@pytest.fixture(scope="module")
def gloo_results(tmp_path_factory):
    return run_ranks(tmp_path_factory.mktemp("gloo"), WORLD, "gloo", "torch")


@pytest.fixture(scope="module")
def single_process():
    return single_process_grads("torch", "cpu")


@pytest.mark.parametrize("scenario", ["ddp", "fsdp2"])
def test_two_ranks_match_single_process_over_the_whole_batch(gloo_results, single_process, scenario):
    for rank, results in enumerate(gloo_results):
        # Forward only runs the LoRA layers once per rank; none may have fallen back to PEFT.
        assert results[f"{scenario}_fused_calls"] == BERT_LORA_LAYERS, f"rank {rank}"
        assert_same_tensors(results[scenario], single_process, RTOL, f"{scenario} rank {rank}")
    assert any("lora_A" in name for name in single_process)


def test_output_is_not_a_view_like_nn_linear():
    """FSDP2 registers its pre-backward hook on a fully_shard'ed module's output; an in-place op on a view
    output would drop it (fully_shard warns). nn.Linear returns no view for (..., K) inputs; neither may we."""
    layer = lorafast.LoRALinear(16, 12, r=4, backend="torch")
    for shape in [(5, 16), (2, 3, 16), (16,)]:
        x = torch.randn(shape)
        assert not layer(x)._is_view() and not torch.nn.functional.linear(x, layer.weight)._is_view(), shape


@pytest.mark.gpu
def test_fsdp2_and_ddp_on_cuda_triton():
    """The Triton kernels under DDP and FSDP2 over NCCL: two GPUs when present, else a 1-rank group
    (which still runs FSDP2's all-gather/reduce-scatter path, but cannot show cross-rank reduction)."""
    world = min(2, torch.cuda.device_count())
    with tempfile.TemporaryDirectory() as tmp:
        results = run_ranks(Path(tmp), world, "nccl", "triton")
    expected = {k: v.cpu() for k, v in single_process_grads("triton", "cuda:0").items()}
    for rank, result in enumerate(results):
        for scenario in ("ddp", "fsdp2"):
            assert result[f"{scenario}_fused_calls"] == BERT_LORA_LAYERS, f"{scenario} rank {rank}"
            assert_same_tensors(result[scenario], expected, 1e-4, f"{scenario} rank {rank}")
