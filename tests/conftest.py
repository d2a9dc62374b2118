"""Test setup: Triton's CPU interpreter when there is no GPU, its shims (old versions, bf16), seeds, markers.

TRITON_INTERPRET must be set before triton is first imported; torch does not import triton at
import time, so checking CUDA first is safe (asserted below).
"""

import os
import sys

import torch

assert "triton" not in sys.modules, "triton was imported before tests/conftest.py could configure it"
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from support.interpreter_shim import install_bf16_dot_shim, install_version_shims  # noqa: E402

install_version_shims()  # old Triton interpreters: tests/reproducers/
install_bf16_dot_shim()

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def op_calls(monkeypatch):
    """Counts the fused op's calls made by lorafast.peft (to tell a fused forward from a fallback): a list that
    gets each call's backend."""
    import lorafast.peft.linear as lfpeft

    calls = []
    real = lfpeft.fused_forward

    def counting(*args, **kwargs):
        calls.append(kwargs.get("backend"))
        return real(*args, **kwargs)

    monkeypatch.setattr(lfpeft, "fused_forward", counting)
    return calls


@pytest.fixture
def fresh_fallback_log(monkeypatch):
    """lorafast.peft's once-per-process fallback warnings and log lines, reset for one test."""
    from lorafast.peft import core

    monkeypatch.setattr(core, "_warned_reasons", set())
    monkeypatch.setattr(core, "_logged_layer_reasons", set())
