"""Worker side of tests/test_distributed.py: DDP and FSDP2 on a patched PEFT BERT, one process per rank.

Kept out of the test module so spawned ranks import only this (no pytest). Each rank trains on its slice
of one batch and saves the full-size gradients it ends up with; the test compares them with a
single-process run over the whole batch.
"""

from __future__ import annotations

import datetime
import os
import socket
from pathlib import Path
from typing import Dict

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from support.composability import bert_batch, count_fused_calls, patched_bert, trainable_grads

BATCH = 4  # split evenly over 2 ranks: the mean loss over the batch is the mean of the ranks' means


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_and_batch(backend: str, device: str):
    """The same patched model (p = 0, so no RNG difference between layouts) and batch in every process."""
    model = patched_bert(backend, lora_dropout=0.0).to(device).train()
    return model, bert_batch(batch=BATCH, device=device)


def single_process_grads(backend: str, device: str) -> Dict[str, torch.Tensor]:
    model, batch = model_and_batch(backend, device)
    model(**batch).loss.backward()
    return trainable_grads(model)


def _rank_slice(batch: Dict[str, torch.Tensor], rank: int, world: int) -> Dict[str, torch.Tensor]:
    per_rank = BATCH // world
    return {k: v[rank * per_rank:(rank + 1) * per_rank] for k, v in batch.items()}


def ddp_grads(backend: str, device: str, rank: int, world: int) -> Dict[str, torch.Tensor]:
    model, batch = model_and_batch(backend, device)
    ddp = DistributedDataParallel(model, device_ids=[rank] if device.startswith("cuda") else None)
    ddp(**_rank_slice(batch, rank, world)).loss.backward()
    return {name: grad.cpu() for name, grad in trainable_grads(model).items()}


def fsdp2_grads(backend: str, device: str, rank: int, world: int) -> Dict[str, torch.Tensor]:
    from torch.distributed.fsdp import fully_shard

    model, batch = model_and_batch(backend, device)
    for layer in model.base_model.model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    model(**_rank_slice(batch, rank, world)).loss.backward()
    # Sharded DTensor gradients, gathered to full size for the comparison.
    return {name: grad.full_tensor().cpu() for name, grad in trainable_grads(model).items()}


def worker(rank: int, world: int, port: int, pg_backend: str, backend: str, out_dir: str) -> None:
    """One rank: DDP, then FSDP2, on fresh models; saves {scenario: grads} and the fused-call counts."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # ranks share the machine's cores
    device = f"cuda:{rank}" if pg_backend == "nccl" else "cpu"
    if pg_backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(pg_backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        results = {}
        with count_fused_calls() as calls:
            results["ddp"] = ddp_grads(backend, device, rank, world)
            results["ddp_fused_calls"] = len(calls)
            results["fsdp2"] = fsdp2_grads(backend, device, rank, world)
            results["fsdp2_fused_calls"] = len(calls) - results["ddp_fused_calls"]
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
