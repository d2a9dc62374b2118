"""kernels/configs.py: the launch device guard (mocked CUDA: the interpreter has no devices), autotune keys,
and the work-split rule. What only a GPU can show (a real launch on cuda:1) is in the gpu-marked test."""

import contextlib

import pytest
import torch

from lorafast.kernels import configs


class _FakeKernel:
    """Stands in for the autotuned kernel: records the CUDA device current at launch."""

    def __init__(self, current):
        self.current = current
        self.launched_on = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launched_on.append(self.current[0])

        return run


@pytest.fixture
def fake_cuda(monkeypatch):
    """A two-GPU machine in which cuda:0 is current; torch.cuda.device(d) switches it for the block."""
    current = [0]

    @contextlib.contextmanager
    def device(d):
        previous, current[0] = current[0], torch.device(d).index
        try:
            yield
        finally:
            current[0] = previous

    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "device_arch", lambda device: 90)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current[0])
    monkeypatch.setattr(torch.cuda, "device", device)
    kernel = _FakeKernel(current)
    monkeypatch.setattr(configs, "_autotuned", lambda *a, **k: kernel)
    return kernel, current


@pytest.mark.parametrize("target", ["cuda:1", "cuda:0", "cuda"])
def test_launch_runs_on_the_tensors_device(fake_cuda, target):
    kernel, current = fake_cuda
    configs.launch(object(), configs.GEMM, torch.device(target), lambda meta: (1,), ())
    expected = 0 if target != "cuda:1" else 1
    assert kernel.launched_on == [expected]
    assert current[0] == 0, "the previous device is restored after the launch"


def test_launch_without_guard_would_use_the_current_device(fake_cuda, monkeypatch):
    """Control: with the guard disabled the fake records cuda:0 for a cuda:1 tensor — the test can fail."""
    kernel, _ = fake_cuda
    monkeypatch.setattr(configs, "device_guard", lambda device: contextlib.nullcontext())
    configs.launch(object(), configs.GEMM, torch.device("cuda:1"), lambda meta: (1,), ())
    assert kernel.launched_on == [0]


def test_rank_block_is_part_of_the_autotune_key(monkeypatch):
    seen = {}
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "device_arch", lambda device: 90)

    def autotuned(fn, kind, arch, fp32, key, reset_to_zero, restore):
        seen["key"] = key
        return _FakeKernel([0])

    monkeypatch.setattr(configs, "_autotuned", autotuned)
    configs.launch(object(), configs.SKINNY, torch.device("cpu"), lambda meta: (1,), (), key=("M_BUCKET", "K"),
                   BLOCK_R=64)
    assert seen["key"] == ("M_BUCKET", "K", "BLOCK_R")


def test_split_fills_the_machine_and_respects_determinism(monkeypatch):
    monkeypatch.setattr(configs, "num_sms", lambda device: 132)
    dev = torch.device("cuda:0")
    # BERT-base shrink at BLOCK_M = 64: 32 row blocks → split 9 (288 programs ≥ 2 per SM), ≤ the 12 K tiles.
    assert configs.split_for(32, 12, dev) == 9
    assert configs.split_for(32, 4, dev) == 4  # never more programs than tiles to share
    assert configs.split_for(1000, 64, dev) == 1  # enough row blocks already
    torch.use_deterministic_algorithms(True)
    try:
        assert configs.split_for(32, 12, dev) == 1
    finally:
        torch.use_deterministic_algorithms(False)


def test_every_family_has_configs_for_both_arches():
    for kind in (configs.GEMM, configs.DX, configs.SKINNY, configs.EPILOGUE):
        for arch in (80, 90):
            assert configs.gpu_configs(kind, arch)
        assert configs.gpu_configs(kind, 90, fp32=True)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_model_on_second_gpu_without_set_device():
    import lorafast
    from lorafast import reference

    x = torch.randn(64, 96, device="cuda:1", dtype=torch.bfloat16)
    w = torch.randn(80, 96, device="cuda:1", dtype=torch.bfloat16) / 10
    a = torch.randn(8, 96, device="cuda:1", dtype=torch.bfloat16) / 10
    b = torch.randn(80, 8, device="cuda:1", dtype=torch.bfloat16) / 10
    assert torch.cuda.current_device() == 0
    for strategy in ("fused", "cublas"):
        y = lorafast.lora_linear(x, w, None, a, b, 0.5, backend=strategy)
        ref = reference.lora_linear(x.double(), w.double(), None, a.double(), b.double(), 0.5)
        assert (y.double() - ref).norm() / ref.norm() < 2e-2
