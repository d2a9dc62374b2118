"""Host cost per call of one PEFT LoRA layer: PEFT's lora.Linear vs the patched layer (aten path, and the
fused Triton path with every Triton launch stubbed to a no-op), plus device-op counts.

Setup (issue 10): 64→64 nn.Linear, r=8, x 16×64 fp32 on CPU, 1 thread, fwd and fwd+bwd, interleaved
medians of both wall time and the thread's CPU time (``time.thread_time``: what the host spends on the
call, much less disturbed by other processes on a loaded machine; torch runs on this one thread).
Run: ``python benchmarks/host_cost.py [--reps 2000]``. With launches stubbed the Triton outputs hold
garbage: fine for timing, never for numbers. Counts: ATen ops recorded by a TorchDispatchMode (each would be
a device launch on CUDA, except views/metadata ops and CPU-side scalar reads, which are excluded) + stubbed
Triton launches, for one fwd+bwd with the grads set to None first (as ``zero_grad(set_to_none=True)``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import lorafast  # noqa: E402

# Ops that launch nothing on a device (views, metadata, empty allocations).
_NO_LAUNCH = {
    "view", "_unsafe_view", "t", "transpose", "permute", "expand", "reshape", "as_strided", "alias", "detach",
    "empty", "empty_like", "new_empty", "empty_strided", "new_empty_strided", "slice", "select", "unsqueeze",
    "squeeze", "_reshape_alias", "lift_fresh", "unbind", "split", "promote_types", "_local_scalar_dense",
}


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _NO_LAUNCH:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x)


def make_layer(p: float, patched: bool, backend: str = "aten") -> torch.nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(_Tiny(), LoraConfig(r=8, lora_alpha=16, lora_dropout=p, target_modules=["lin"]))
    layer = model.base_model.model.lin
    torch.nn.init.normal_(layer.lora_B["default"].weight)
    if patched:
        lorafast.patch(model, backend=backend)
    return layer.train()


class _StubLaunches:
    """Replace every Triton launch of lorafast.kernels with a counter (outputs hold garbage)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        from lorafast.kernels import configs, lora_bwd, lora_fwd

        self._mods = [m for m in (configs, lora_fwd, lora_bwd) if hasattr(m, "launch")]
        self._saved = [m.launch for m in self._mods]

        def launch(*args, **kwargs):
            self.count += 1

        for m in self._mods:
            m.launch = launch
        return self

    def __exit__(self, *exc):
        for m, fn in zip(self._mods, self._saved):
            m.launch = fn


def step(layer, x, backward: bool):
    y = layer(x)
    if backward:
        y.backward(torch.ones_like(y))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    x = torch.randn(16, 64, requires_grad=True)
    g = torch.ones(16, 64)
    print(f"torch {torch.__version__}, 1 thread, load {os.getloadavg()}")
    print(f"{'p':>4} {'impl':<22} {'fwd us':>8} {'fwd+bwd us':>11} {'fwd cpu':>8} {'f+b cpu':>8} {'launches':>9}")
    stub = _StubLaunches()
    for p in (0.0, 0.1):
        impls = {
            "PEFT lora.Linear": (make_layer(p, False), None),
            "patched, aten": (make_layer(p, True, "aten"), None),
            "patched, fused stub": (make_layer(p, True, "fused"), stub),
        }
        times = {(name, bw): [] for name in impls for bw in (False, True)}
        cpu = {(name, bw): [] for name in impls for bw in (False, True)}
        for _ in range(args.rounds):
            for name, (layer, st) in impls.items():
                for bw in (False, True):
                    with st if st is not None else _Null():
                        for _ in range(20):
                            step(layer, x, bw)
                        t0, c0 = time.perf_counter(), time.thread_time()
                        for _ in range(args.reps):
                            y = layer(x)
                            if bw:
                                y.backward(g)
                        times[(name, bw)].append((time.perf_counter() - t0) / args.reps * 1e6)
                        cpu[(name, bw)].append((time.thread_time() - c0) / args.reps * 1e6)
        for name, (layer, st) in impls.items():
            with st if st is not None else _Null():
                for param in [x, *layer.parameters()]:
                    param.grad = None  # as zero_grad(set_to_none=True): no grad accumulation adds counted
                y = layer(x)  # warm (plan made); the counted step follows
                g1 = torch.ones_like(y)
                before = stub.count
                with _Count() as counter:
                    layer(x).backward(g1)
                triton = stub.count - before
            fwd = statistics.median(times[(name, False)])
            both = statistics.median(times[(name, True)])
            fwd_cpu = statistics.median(cpu[(name, False)])
            both_cpu = statistics.median(cpu[(name, True)])
            launches = f"{len(counter.ops)}" + (f"+{triton}T" if st is not None else "")
            print(f"{p:>4} {name:<22} {fwd:>8.1f} {both:>11.1f} {fwd_cpu:>8.1f} {both_cpu:>8.1f} {launches:>9}   "
                  f"{' '.join(counter.ops)}")
    print(f"load after {os.getloadavg()}")


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
