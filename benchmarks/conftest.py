"""pytest-benchmark suite setup: which device, shapes and ranks ``benchmarks/`` times.

Not collected by the default ``pytest`` run (pyproject's testpaths is ``tests``). Run it as::

    pytest benchmarks --benchmark-only                    # CPU: BERT shapes; CUDA: BERT + Llama-8B
    LORAFAST_BENCH_QUICK=1 pytest benchmarks --benchmark-only \\
        --benchmark-min-rounds=1 --benchmark-max-time=0.05 --benchmark-warmup=off   # CI smoke run

Each group (``benchmark.group``) holds one shape/mode/dropout, so its lorafast, PEFT, reference and
base (and per-strategy) rows print together. The inputs come from :func:`lorafast.bench.make_inputs`, the same setup as
``python -m lorafast bench``.
"""

import os

import pytest
import torch

from lorafast import bench

QUICK = os.environ.get("LORAFAST_BENCH_QUICK", "0") == "1"
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32

if QUICK:
    SHAPES = [bench.Shape("tiny", 64, 96, 80)]
    RANK = 4
elif DEVICE.type == "cuda":
    SHAPES = bench.SHAPE_PRESETS["bert"] + bench.SHAPE_PRESETS["llama"]
    RANK = 16
else:
    SHAPES = bench.SHAPE_PRESETS["bert"]
    RANK = 16



def pytest_generate_tests(metafunc):
    # The shapes depend on the device and LORAFAST_BENCH_QUICK, so they are parametrized here.
    if "shape" in metafunc.fixturenames:
        metafunc.parametrize("shape", SHAPES, ids=[s.name for s in SHAPES])


@pytest.fixture(scope="session")
def bench_device():
    """(device, dtype, rank) every benchmark in this directory runs with."""
    return DEVICE, DTYPE, RANK


_inputs_cache = {}


@pytest.fixture
def lora_inputs():
    """``lora_inputs(shape)`` → :class:`lorafast.bench.LoRAInputs`, built once per shape."""

    def get(shape):
        if shape not in _inputs_cache:
            _inputs_cache.clear()  # one shape alive at a time: the Llama shapes are large
            _inputs_cache[shape] = bench.make_inputs(shape, RANK, DTYPE, DEVICE)
        return _inputs_cache[shape]

    return get
