"""kernels/configs.py: the launch device guard (mocked CUDA: the interpreter has no devices), autotune keys,
and the work-split rule. What only a GPU can show (a real launch on cuda:1) is in the gpu-marked test."""

import contextlib
import inspect
import warnings

import pytest
import torch
import triton

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

    def autotuned(fn, kind, arch, fp32, key, reset_to_zero, restore, block_r):
        seen["key"] = key
        seen["block_r"] = block_r
        return _FakeKernel([0])

    monkeypatch.setattr(configs, "_autotuned", autotuned)
    configs.launch(object(), configs.SKINNY, torch.device("cpu"), lambda meta: (1,), (), key=("M_BUCKET", "K"),
                   BLOCK_R=64)
    assert seen["key"] == ("M_BUCKET", "K", "BLOCK_R")
    assert seen["block_r"] == 64  # the config table depends on the rank block too


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


def test_every_family_has_configs_for_every_arch_dtype_and_rank_block():
    # The largest rank block each family runs at: MoE's Triton kernels take rank ≤ 64, and fp32 DoRA above rank
    # block 64 runs `aten` on NVIDIA (lorafast.dora.functional.triton_dora_fallback).
    families = {configs.GEMM: 128, configs.DX: 128, configs.SKINNY: 128, configs.EPILOGUE: 128, configs.TWO_ACC: 128,
                configs.DORA_GEMM: 128, configs.DORA_DX: 128, configs.DORA_SKINNY: 128, configs.MOE_SKINNY: 64,
                configs.MOE_DH: 64, configs.MOE_GEMM: 64, configs.MOE_DX: 64}
    for kind, largest in families.items():
        for arch in (80, 90, "gfx942"):
            for fp32 in (False, True):
                top = 64 if kind == configs.DORA_SKINNY and fp32 and arch != "gfx942" else largest
                for block_r in (16, 32, 64, 128):
                    if block_r <= top:
                        assert configs.gpu_configs(kind, arch, fp32, block_r), (kind, arch, fp32, block_r)
    # A row limited to rank blocks ≤ 64 (it spilled at 128) is not offered at 128.
    labels = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in configs.gpu_configs(configs.GEMM, 90)}
    wide = {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)
            for c in configs.gpu_configs(configs.GEMM, 90, block_r=128)}
    assert (128, 256, 8) in labels and (128, 256, 8) not in wide and wide < labels


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


# ---- cached compiled handles (issue 10): the caching logic with stand-ins for triton's objects ----------

class _Param:
    def __init__(self, name, default=inspect.Parameter.empty):
        self.name, self.default = name, default


class _FakeJit:
    """The parameter list of a kernel(x_ptr, M, M_BUCKET, BLOCK_R, BLOCK_M, PRECISION="ieee")."""

    params = [_Param("x_ptr"), _Param("M"), _Param("M_BUCKET"), _Param("BLOCK_R"), _Param("BLOCK_M"),
              _Param("PRECISION", default="ieee")]


class _FakeCompiled:
    def __init__(self, log, error=None):
        self.log, self.error = log, error

    def __getitem__(self, grid):
        def run(*args):
            if self.error is not None:
                raise self.error
            self.log.append(("handle", grid, args))

        return run


class _FakeAutotuner:
    """Stands in for triton.autotune(...)(jit_fn): `run` is the autotuner path and returns the compiled kernel."""

    def __init__(self, log, compiled):
        self.fn, self.log, self.compiled = _FakeJit(), log, compiled
        self.best_config = None

    def run(self, *args, grid, warmup, **constexprs):
        assert not warmup
        self.best_config = triton.Config({"BLOCK_M": 32}, num_warps=4)
        self.log.append(("autotune", grid({"M": args[1], **constexprs, **self.best_config.kwargs}), args))
        return self.compiled

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.run(*args, grid=grid, warmup=False, **kwargs)


@pytest.fixture
def fake_autotuner(monkeypatch):
    log = []
    kernel = _FakeAutotuner(log, _FakeCompiled(log))
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    monkeypatch.setattr(configs, "device_arch", lambda device: 90)
    monkeypatch.setattr(configs, "FAST_LAUNCH", True)
    monkeypatch.setattr(configs, "_HANDLE_CACHES", {})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(configs, "_autotuned", lambda *a, **k: kernel)
    return kernel, log


def _launch(x, M=64, m_bucket=64, device="cuda:0"):
    configs.launch(object(), configs.SKINNY, torch.device(device), lambda meta: (meta["M"] // meta["BLOCK_M"], 3),
                   (x, M, m_bucket), key=("M_BUCKET",), BLOCK_R=16)


def test_second_launch_goes_through_the_cached_handle(fake_autotuner):
    kernel, log = fake_autotuner
    x = torch.randn(8, 8)
    _launch(x)
    _launch(x)
    _launch(x, M=96)  # same autotune key and specialisation: same handle, grid recomputed for M
    assert [entry[0] for entry in log] == ["autotune", "handle", "handle"]
    # Every parameter in order: the runtime args, then the constexprs (config and default values included).
    assert log[1] == ("handle", (2, 3, 1), (x, 64, 64, 16, 32, "ieee"))
    assert log[2][1] == (3, 3, 1)


class _RuntimeOnlySignature:
    """``compiled.src`` of triton 3.0-3.2: the signature names the runtime parameters only."""

    signature = {"x_ptr": "*fp32", "M": "i32", "M_BUCKET": "i32"}


def test_a_launcher_built_for_runtime_parameters_gets_only_those(fake_autotuner):
    kernel, log = fake_autotuner
    kernel.compiled.src = _RuntimeOnlySignature()
    x = torch.randn(8, 8)
    _launch(x)
    _launch(x)
    assert [entry[0] for entry in log] == ["autotune", "handle"]
    assert log[1] == ("handle", (2, 3, 1), (x, 64, 64))  # no constexpr tail: what JITFunction.run passes on 3.0


@pytest.mark.parametrize("change", ["key", "alignment", "dtype", "unit_int", "device", "constexpr"])
def test_a_new_key_or_specialisation_goes_back_to_the_autotuner(fake_autotuner, monkeypatch, change):
    kernel, log = fake_autotuner
    x = torch.randn(64)
    _launch(x)
    _launch(x)
    assert [entry[0] for entry in log] == ["autotune", "handle"]
    if change == "key":
        _launch(x, m_bucket=128)
    elif change == "alignment":
        _launch(x[1:])  # 4 bytes past a 64-byte-aligned allocation: the JIT drops the divisibility hint
    elif change == "dtype":
        _launch(x.double())
    elif change == "unit_int":
        _launch(x, M=1)  # the JIT specialises an int equal to 1 to a constant
    elif change == "device":
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
        _launch(x, device="cuda")  # the current device is cuda:1 now: its own compiled module
    else:
        configs.launch(object(), configs.SKINNY, torch.device("cuda:0"), lambda meta: (1,), (x, 64, 64),
                       key=("M_BUCKET",), BLOCK_R=32)
    assert log[-1][0] == "autotune", change


def test_a_failing_handle_warns_once_and_falls_back_to_the_autotuner(fake_autotuner):
    kernel, log = fake_autotuner
    kernel.compiled = _FakeCompiled(log, error=TypeError("launcher takes 9 arguments"))
    x = torch.randn(8, 8)
    _launch(x)
    with pytest.warns(RuntimeWarning, match="cached launch .* failed"):
        _launch(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _launch(x)
        _launch(x, m_bucket=128)
    assert [entry[0] for entry in log] == ["autotune"] * 4, "every launch ran once, through the autotuner"


def test_fast_launch_off_and_foreign_kernels_use_the_autotuner_path(fake_autotuner, monkeypatch):
    kernel, log = fake_autotuner
    monkeypatch.setattr(configs, "FAST_LAUNCH", False)
    x = torch.randn(8, 8)
    _launch(x)
    _launch(x)
    assert [entry[0] for entry in log] == ["autotune", "autotune"]
    monkeypatch.setattr(configs, "FAST_LAUNCH", True)
    _launch(x, M=1)
    _launch(x, M=1)
    assert log[-1][0] == "handle"
    # An argument the key cannot describe is never cached.
    configs.launch(object(), configs.SKINNY, torch.device("cuda:0"), lambda meta: (1,), (object(), 64, 64),
                   key=("M_BUCKET",), BLOCK_R=16)
    configs.launch(object(), configs.SKINNY, torch.device("cuda:0"), lambda meta: (1,), (object(), 64, 64),
                   key=("M_BUCKET",), BLOCK_R=16)
    assert [entry[0] for entry in log[-2:]] == ["autotune", "autotune"]
