"""The cached compiled-handle launcher (kernels/configs.py) against the installed Triton's own launch path.

tests/support/launch_compat.py runs the real JITFunction, Autotuner and CompiledKernel of this Triton (compiling
`lora_shrink` for sm_90 and gfx942 on the CPU) with a driver whose launcher records its arguments; the first launch
goes through the autotuner, the second through lorafast's handle, and the two must pass the launcher the same
grid and arguments. Run with every Triton the project supports (.ci/triton-version VERSION): the argument
convention changed in triton 3.3 (3.0-3.2 pass the runtime parameters only, later versions every parameter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorafast.kernels import configs

SCRIPT = Path(__file__).parent / "support" / "launch_compat.py"


def _normalised(launch: dict) -> dict:
    """Tensors by order of first appearance and dtype (the output buffer is a new allocation each call)."""
    seen: dict = {}
    args = []
    for arg in launch["args"]:
        if arg.startswith("tensor@"):
            pointer, dtype = arg[len("tensor@"):].split(":")
            args.append(f"tensor{seen.setdefault(pointer, len(seen))}:{dtype}")
        else:
            args.append(arg)
    return {"grid": launch["grid"], "args": args}


@pytest.fixture(scope="module")
def recorded():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(SCRIPT), "cuda:90", "hip:gfx942"], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {r["target"]: r for r in map(json.loads, done.stdout.strip().splitlines())}


@pytest.mark.parametrize("target", ["cuda:90", "hip:gfx942"])
def test_the_handle_passes_the_launcher_what_the_jit_passes(recorded, target):
    result = recorded[target]
    assert result["paths"] == ["autotuner", "handle"], result["paths"]
    jit, handle = (_normalised(launch) for launch in result["launches"])
    assert handle == jit, f"triton {result['triton']}, {target}"
    # x, lora_a, h (passed twice: it stands in for the unused seed pointer) then the scalars.
    assert jit["args"][:4] == ["tensor0:torch.bfloat16", "tensor1:torch.bfloat16", "tensor2:torch.float32",
                               "tensor2:torch.float32"]
    assert result["best_config"].startswith("BLOCK_M: "), result["best_config"]  # the autotuner set best_config


class _Storage:
    def __init__(self, nbytes):
        self._nbytes = nbytes

    def nbytes(self):
        return self._nbytes


class _Tensor:
    """What the ROCm key reads of a tensor, with any storage size (a real 2 GiB tensor is not needed)."""

    dtype = torch.bfloat16

    def __init__(self, nbytes):
        self.storage = _Storage(nbytes)

    def data_ptr(self):
        return 1 << 20

    def untyped_storage(self):
        return self.storage


def test_rocm_key_separates_tensors_beyond_2_gib():
    # Triton's AMD backend compiles buffer ops with 32-bit offsets for storage <= 2**31 - 1 bytes.
    small, large = _Tensor(2**31 - 1), _Tensor(2**31)
    assert configs._arg_signature(small) == configs._arg_signature(large)
    assert configs._arg_signature_rocm(small) != configs._arg_signature_rocm(large)
    assert configs._arg_signature_rocm(3) == configs._arg_signature(3)


class _Src:
    def __init__(self, names):
        self.signature = {name: "i32" for name in names}


class _Compiled:
    def __init__(self, names):
        self.src = _Src(names)


def test_launch_parameters_follow_the_compiled_signature():
    names = ["x_ptr", "M", "BLOCK_M"]
    assert configs._launch_parameters(_Compiled(names), names) is None  # triton >= 3.3: every parameter
    assert configs._launch_parameters(_Compiled(["x_ptr", "M"]), names) == {"x_ptr", "M"}  # 3.0-3.2
    assert configs._launch_parameters(object(), names) is None  # unknown: the newer form
