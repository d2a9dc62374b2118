"""Run lorafast's cached-handle launcher against the installed Triton's real launch path, with a recording driver.

Used by tests/test_launch_compat.py in a subprocess (no TRITON_INTERPRET: the real JITFunction, Autotuner and
CompiledKernel classes; the interpreter would replace them). Everything of Triton runs for real — argument binding,
specialisation, the compile for the target (AOT, on the CPU), ``Autotuner.run``, ``JITFunction.run``,
``CompiledKernel.__getitem__`` — except the driver: a stand-in reports a device, a stream and the target, loads no
binary, and its launcher records the arguments instead of launching. The first ``lora_shrink`` goes through the
autotuner (the JIT launches); the second through lorafast's cached handle. Both recorded launches must match.

Usage: ``python tests/support/launch_compat.py cuda:90 hip:gfx942``; prints one JSON line per target.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

LAUNCHES = []


class _Utils:
    def __init__(self, load_returns: int):
        self.load_returns = load_returns

    def load_binary(self, name, kernel, shared, device):
        # (module, function, n_regs, n_spills[, n_max_threads]): triton 3.9 adds the thread limit.
        return (None, 1, 0, 0, 1024)[: self.load_returns]

    def get_device_properties(self, device):
        return {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536, "warpSize": 32,
                "sm_clock_rate": 1, "mem_clock_rate": 1, "mem_bus_width": 1}


class RecordingDriver:
    """A GPU driver that launches nothing: its launcher records (grid, arguments after the launch prefix)."""

    def __init__(self, target: GPUTarget):
        import inspect

        from triton.compiler.compiler import CompiledKernel

        source = inspect.getsource(CompiledKernel._init_handles)
        self.target = target
        self.utils = _Utils(5 if "n_max_threads" in source else 4)

    def is_active(self):
        return True

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        def launch(grid_0, grid_1, grid_2, stream, function, *rest):
            # rest: packed metadata, launch metadata, enter hook, exit hook, then the kernel's arguments.
            LAUNCHES.append({"grid": [grid_0, grid_1, grid_2], "args": [_describe(a) for a in rest[4:]]})

        return launch


def _describe(value):
    if isinstance(value, torch.Tensor):
        return f"tensor@{value.data_ptr()}:{value.dtype}"
    return repr(value)


def main(spec: str) -> dict:
    LAUNCHES.clear()
    backend, arch = spec.split(":")
    target = GPUTarget(backend, int(arch) if arch.isdigit() else arch, 32 if backend == "cuda" else 64)
    driver.set_active(RecordingDriver(target))
    if backend == "hip":
        torch.version.hip = "6.2"  # what lorafast reads to pick the ROCm launch key and tables
    else:
        torch.version.hip = None

    from lorafast.kernels import configs
    from lorafast.kernels.lora_fwd import lora_shrink

    arch_value = target.arch
    # One config, so the real Autotuner does not benchmark (that needs a GPU); the target's first table row.
    configs.configs = lambda kind, a, fp32=False, block_r=16: configs.gpu_configs(kind, arch_value, fp32, block_r)[:1]
    configs.device_arch = lambda device: arch_value
    configs.num_sms = lambda device: 132
    configs.FAST_LAUNCH = True

    x = torch.randn(96, 80, dtype=torch.bfloat16)
    a = torch.randn(8, 80, dtype=torch.bfloat16)
    paths = []
    real_handle_call = configs._Handle.__call__

    def handle_call(self, grid, args):
        paths.append("handle")
        return real_handle_call(self, grid, args)

    configs._Handle.__call__ = handle_call
    for _ in range(2):
        before = len(paths)
        lora_shrink(x, a, None, 0.0)
        if len(paths) == before:
            paths.append("autotuner")
    configs._Handle.__call__ = real_handle_call
    kernel = next(iter(configs._HANDLE_CACHES.values()))[0]
    configs._HANDLE_CACHES.clear()
    return {
        "triton": triton.__version__, "target": spec, "paths": paths, "launches": LAUNCHES,
        "best_config": str(getattr(kernel, "best_config", None)),
    }


if __name__ == "__main__":
    for spec in sys.argv[1:]:
        print(json.dumps(main(spec)), flush=True)
