"""QLoRA: PEFT's bitsandbytes 4-bit LoRA layers patched by lorafast (lorafast.qlora) against PEFT's own
``Linear4bit`` on identical quantized weights, and against a float64 reference on the dequantized weight."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from peft.tuners.lora.bnb import Linear4bit as PeftLinear4bit  # noqa: E402
from utils import assert_close, plant_wrong_strategy  # noqa: E402

import lorafast  # noqa: E402
import lorafast.dropout  # noqa: E402
from lorafast import functional, qlora, reference  # noqa: E402
from lorafast.peft import bnb as peft_bnb  # noqa: E402
from lorafast.strategies import aten  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Net(nn.Module):
    """One 4-bit linear (quantized from a random nn.Linear), as transformers' 4-bit loading leaves it."""

    is_loaded_in_4bit = True  # what PEFT reads to dispatch bnb 4-bit LoRA layers

    def __init__(self, K, N, quant_type="nf4", nested=True, compute_dtype=torch.float32, bias=True,
                 weight_dtype=torch.float32, blocksize=64):
        super().__init__()
        linear = nn.Linear(K, N, bias=bias).to(weight_dtype)
        self.proj = bnb.nn.Linear4bit(K, N, bias=bias, compute_dtype=compute_dtype, compress_statistics=nested,
                                      quant_type=quant_type)
        self.proj.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, compress_statistics=nested,
                                             quant_type=quant_type, blocksize=blocksize, module=self.proj)
        if bias:
            self.proj.bias = nn.Parameter(linear.bias.data.clone())
        self.proj.to("cpu")  # quantizes

    def forward(self, x):
        return self.proj(x)


def make_pair(K=100, N=48, r=4, dropout=0.0, bias="none", adapter_dtype=torch.float32, **net_kwargs):
    """(PEFT model, patched deep copy, their two LoRA layers), with nonzero random adapters."""
    peft_model = get_peft_model(Net(K, N, **net_kwargs),
                                LoraConfig(r=r, lora_alpha=2 * r, target_modules=["proj"], lora_dropout=dropout,
                                           bias=bias, init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(adapter_dtype)
    fused_model = copy.deepcopy(peft_model)
    assert lorafast.patch(fused_model, backend="aten") == 1
    layer = fused_model.base_model.model.proj
    assert type(layer) is peft_bnb.FusedLoraLinear4bit
    return peft_model, fused_model, peft_model.base_model.model.proj, layer


def lora_grads(layer):
    grads = [layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad]
    if layer.base_layer.bias is not None and layer.base_layer.bias.requires_grad:
        grads.append(layer.base_layer.bias.grad)
    return grads


def check_fwd_bwd(layer, x, y, y_ref, x64, params64, dtype):
    """Backward of the fused output and of the float64 reference with the same random dY, then y, dx and the
    LoRA (and bias) grads compared within ``dtype``'s tolerance."""
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy.double())
    assert_close(y, y_ref, dtype, what="y")
    assert_close(x.grad, x64.grad, dtype, what="dx")
    for got, p64, what in zip(lora_grads(layer), params64, ("dA", "dB", "dbias")):
        assert_close(got, p64.grad, dtype, what=what)


def float64_reference(layer, x, dropout_p=0.0, mask=None):
    """PEFT's math in float64 on the weight both paths use (dequantized to the compute dtype): y and the grads
    of x and every trainable LoRA-layer parameter."""
    base = layer.base_layer
    compute_dtype = base.compute_dtype or x.dtype
    weight = qlora.dequantize(qlora.read_quant_state(base), compute_dtype, False).double()
    a = layer.lora_A["default"].weight.detach().double().requires_grad_()
    b = layer.lora_B["default"].weight.detach().double().requires_grad_()
    bias = None
    if base.bias is not None:
        bias = base.bias.detach().to(compute_dtype).double().requires_grad_(base.bias.requires_grad)
    x64 = x.detach().double().requires_grad_()
    y = reference.lora_linear(x64, weight, bias, a, b, layer.scaling["default"], dropout_p=dropout_p,
                              training=dropout_p > 0, dropout_mask=mask)
    return y, x64, [a, b] + ([bias] if bias is not None and bias.requires_grad else [])


def check_against_peft(peft_layer, layer, x, dtype, dy=None):
    """Fused output and grads vs float64, within 2× PEFT's own error + the dtype floor."""
    x_peft = x.detach().clone().requires_grad_()
    x_fused = x.detach().clone().requires_grad_()
    y_peft, y_fused = peft_layer(x_peft), layer(x_fused)
    assert y_fused.dtype == y_peft.dtype and y_fused.shape == y_peft.shape
    y_ref, x64, params64 = float64_reference(layer, x)
    dy = torch.randn_like(y_peft) if dy is None else dy
    y_peft.backward(dy)
    y_fused.backward(dy)
    y_ref.backward(dy.double())
    assert_close(y_fused, y_ref, dtype, y_peft, "y")
    assert_close(x_fused.grad, x64.grad, dtype, x_peft.grad, "dx")
    for got, want, lowp, what in zip(lora_grads(layer), [p.grad for p in params64], lora_grads(peft_layer),
                                     ("dA", "dB", "dbias")):
        assert got is not None, what
        assert got.dtype == lowp.dtype, what
        assert_close(got, want, dtype, lowp, what)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "single_quant"])
@pytest.mark.parametrize("bias", ["none", "all"])
def test_matches_peft_fp32(quant_type, nested, bias):
    # K = 100 with blocksize 64: quant blocks span rows (K not a multiple of the block).
    _, _, peft_layer, layer = make_pair(K=100, N=48, quant_type=quant_type, nested=nested, bias=bias)
    check_against_peft(peft_layer, layer, torch.randn(13, 100), torch.float32)


@pytest.mark.parametrize("compute_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("adapter_dtype", [torch.float32, "compute"])
def test_matches_peft_16bit_compute(compute_dtype, adapter_dtype):
    adapter_dtype = compute_dtype if adapter_dtype == "compute" else adapter_dtype
    _, _, peft_layer, layer = make_pair(K=72, N=40, r=3, quant_type="nf4", compute_dtype=compute_dtype,
                                        weight_dtype=compute_dtype, adapter_dtype=adapter_dtype, bias="all",
                                        blocksize=128)
    check_against_peft(peft_layer, layer, torch.randn(11, 72, dtype=compute_dtype), compute_dtype)


def test_fp32_input_bf16_compute():
    # bitsandbytes casts x to the compute dtype and the result back: fp32 in, fp32 out.
    _, _, peft_layer, layer = make_pair(K=64, N=33, compute_dtype=torch.bfloat16, quant_type="fp4")
    x = torch.randn(9, 64)
    check_against_peft(peft_layer, layer, x, torch.bfloat16)
    assert layer(x).dtype == torch.float32


def test_3d_input_and_strided_dy():
    _, _, peft_layer, layer = make_pair(K=50, N=24, bias="all")
    x = torch.randn(3, 7, 50)
    check_against_peft(peft_layer, layer, x, torch.float32, dy=torch.ones(1, 1, 1).expand(3, 7, 24))


def test_dropout_mask_replayed_through_reference():
    P = 0.3
    _, _, _, layer = make_pair(K=60, N=20, dropout=P, bias="all")
    layer.train()
    x = torch.randn(2, 9, 60, requires_grad=True)
    torch.manual_seed(1234)
    y = layer(x)
    torch.manual_seed(1234)
    seed = functional._dropout_seed(x.device)
    mask = aten.dropout_keep_mask(seed, 18, 60, P, torch.float32).bool().reshape(2, 9, 60)
    y_ref, x64, params64 = float64_reference(layer, x, P, mask)
    check_fwd_bwd(layer, x, y, y_ref, x64, params64, torch.float32)
    # A replay with the wrong mask must fail: the check can catch a wrong mask.
    y_wrong, _, _ = float64_reference(layer, x, P, ~mask)
    assert (y.double() - y_wrong).norm() > 1e-3 * y_wrong.norm()


def test_saved_for_backward_has_no_dequantized_weight():
    K, N, M = 96, 80, 5
    _, _, _, layer = make_pair(K=K, N=N, bias="all")
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.numel()))
        return t

    x = torch.randn(M, K, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert saved, "nothing saved: the fused Function did not run"
    assert all(numel < N * K for _, _, numel in saved), saved
    assert ((M, 4), torch.float32, M * 4) in saved  # H
    assert sum(numel for _, dtype, numel in saved if dtype == torch.uint8) <= N * K // 2 + N * K // 64


def test_inference_and_no_grad():
    peft_model, fused_model, peft_layer, layer = make_pair(K=64, N=32)
    x = torch.randn(4, 64)
    with torch.no_grad():
        y_fused = layer(x)
        y_peft = peft_layer(x)
    y_ref, _, _ = float64_reference(layer, x)
    assert_close(y_fused, y_ref.detach(), torch.float32, y_peft)


def test_repr_reads_as_peft():
    peft_model, fused_model, peft_layer, layer = make_pair()
    assert repr(layer) == repr(peft_layer)
    assert repr(layer).startswith("lora.Linear4bit(")


def test_patch_unpatch_and_state_dict():
    peft_model, fused_model, peft_layer, layer = make_pair()
    assert set(fused_model.state_dict()) == set(peft_model.state_dict())
    assert lorafast.patch(fused_model) == 0  # idempotent
    assert lorafast.unpatch(fused_model) == 1
    assert type(fused_model.base_model.model.proj) is PeftLinear4bit
    assert not hasattr(fused_model.base_model.model.proj, "_lorafast_backend")


def test_patch_does_not_warn_about_4bit_layers():
    peft_model, _, _, _ = make_pair()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lorafast.patch(peft_model) == 1


def test_merge_and_unload_as_peft():
    peft_model, fused_model, _, _ = make_pair(K=64, N=32)
    x = torch.randn(5, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT's "merge to 4-bit may differ by rounding"
        merged_peft = peft_model.merge_and_unload()
        merged_fused = fused_model.merge_and_unload()
    assert type(merged_fused.proj) is bnb.nn.Linear4bit
    assert torch.equal(merged_fused.proj.weight.data, merged_peft.proj.weight.data)
    with torch.no_grad():
        assert torch.equal(merged_fused(x), merged_peft(x))


@pytest.mark.parametrize("state", ["disabled", "merged"])
def test_quiet_fallbacks_match_peft(state):
    peft_model, fused_model, peft_layer, layer = make_pair(K=64, N=32)
    x = torch.randn(3, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lay in (peft_layer, layer):
            if state == "disabled":
                lay.enable_adapters(False)
            else:
                lay.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # expected states: no warning
        with torch.no_grad():
            assert torch.equal(layer(x), peft_layer(x))


def test_dora_among_two_active_adapters_falls_back_with_one_warning():
    # One DoRA adapter runs fused (tests/test_peft_dora.py); PEFT applies several active adapters in turn.
    net = Net(64, 32)
    peft_model = get_peft_model(net, LoraConfig(r=4, target_modules=["proj"], use_dora=True))
    peft_model.add_adapter("second", LoraConfig(r=2, target_modules=["proj"]))
    peft_model.base_model.set_adapter(["default", "second"])
    fused_model = copy.deepcopy(peft_model)
    lorafast.patch(fused_model)
    x = torch.randn(3, 64)
    layer, peft_layer = fused_model.base_model.model.proj, peft_model.base_model.model.proj
    with pytest.warns(UserWarning, match="several active adapters with a LoRA variant"):
        y = layer(x)
    assert torch.equal(y, peft_layer(x))


def test_hooked_base_falls_back():
    _, _, peft_layer, layer = make_pair(K=64, N=32)
    layer.base_layer.register_forward_hook(lambda *a: None)
    x = torch.randn(3, 64)
    with pytest.warns(UserWarning, match="hooks"):
        y = layer(x)
    assert torch.equal(y, peft_layer(x))


def test_autocast_falls_back():
    _, _, peft_layer, layer = make_pair(K=64, N=32)
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.warns(UserWarning, match="autocast"):
            y = layer(x)
        assert torch.equal(y, peft_layer(x))


@pytest.mark.parametrize("corrupt,reason", [
    (lambda s: setattr(s, "absmax", s.absmax[:-1]), "wrong absmax length"),
    (lambda s: setattr(s, "quant_type", "int3"), "unknown 4-bit quant_type"),
    (lambda s: setattr(s, "shape", torch.Size((32, 63))), "shape differs"),
    (lambda s: setattr(s.state2, "absmax", s.state2.absmax[:0]), "wrong nested absmax length"),
])
def test_inconsistent_quant_state_is_detected(corrupt, reason):
    _, _, _, layer = make_pair(K=64, N=32)
    state = layer.base_layer.weight.quant_state
    corrupt(state)
    found = qlora.read_quant_state(layer.base_layer)
    assert isinstance(found, tuple) and not isinstance(found, qlora.QuantSnapshot)
    assert reason in found.reason


def test_inconsistent_quant_state_warns_and_runs_peft():
    # PEFT's forward then meets the bad state itself: bitsandbytes raises its own error for an unknown type
    # (for a short absmax its C kernel reads out of bounds, so that case is only checked above).
    _, _, _, layer = make_pair(K=64, N=32)
    layer.base_layer.weight.quant_state.quant_type = "int3"
    with pytest.warns(UserWarning, match="unknown 4-bit quant_type"):
        with pytest.raises((ValueError, RuntimeError, NotImplementedError, AssertionError)):
            layer(torch.randn(2, 64))


def test_missing_quant_state_falls_back():
    _, _, _, layer = make_pair(K=64, N=32)
    layer.base_layer.weight.quant_state = None
    layer.base_layer.quant_state = None
    assert "without a quant state" in qlora.read_quant_state(layer.base_layer).reason


def test_quant_state_read_at_call_time_after_cpu_repack():
    """bitsandbytes' CPU inference forward repacks the weight (packing_format_for_cpu: nibbles interleaved per 32
    rows, absmax reshaped to (K/blocksize, N) in bf16, nesting undone). The patched layer reads the new state on
    its next call and stays fused: its W is the original one with the absmax rounded to bf16, bit for bit."""
    peft_model, fused_model, peft_layer, layer = make_pair(K=128, N=64, bias="all")
    before = qlora.read_quant_state(layer.base_layer)
    absmax_bf16 = qlora._absmax_fp32(before).bfloat16().float()
    w_expected = qlora.dequantize(before._replace(absmax=absmax_bf16, nested_absmax=None, nested_code=None,
                                                  offset=None), torch.float32, False)
    fused_model.eval()
    lorafast.unpatch(fused_model)
    with torch.no_grad():
        fused_model(torch.randn(3, 128))  # PEFT's path: bitsandbytes repacks here (CPUs with AVX512-BF16)
    lorafast.patch(fused_model)
    fused_model.train()
    if not getattr(layer.base_layer.weight.quant_state, "packing_format_for_cpu", False):
        pytest.skip("bitsandbytes did not repack on this CPU (no AVX512-BF16)")
    after = qlora.read_quant_state(layer.base_layer)
    assert isinstance(after, qlora.QuantSnapshot) and after.cpu_packed
    assert torch.equal(qlora.dequantize(after, torch.float32, False), w_expected)
    x = torch.randn(2, 3, 128, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused, no fallback
        y = layer(x)
    y_ref, x64, params64 = float64_reference(layer, x)
    check_fwd_bwd(layer, x, y, y_ref, x64, params64, torch.float32)


def test_inconsistent_cpu_packed_state_falls_back():
    _, _, _, layer = make_pair(K=128, N=64)
    state = layer.base_layer.weight.quant_state
    state.packing_format_for_cpu = True  # flagged, but still the flat layout: shapes do not fit
    found = qlora.read_quant_state(layer.base_layer)
    assert not isinstance(found, qlora.QuantSnapshot) and "CPU-packed" in found.reason


def test_triton_strategies_under_the_interpreter():
    """The CUDA path (Triton dequant + the `cublas` and `fused` LoRA strategies) on CPU through the interpreter."""
    for backend in ("cublas", "fused"):
        _, fused_model, peft_layer, layer = make_pair(K=40, N=24, r=2, bias="all")
        lorafast.patch(fused_model, backend=backend)
        check_against_peft(peft_layer, layer, torch.randn(6, 40), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("nested", [True, False], ids=["double_quant", "single_quant"])
def test_gemm_4bit_strategy_under_the_interpreter(dtype, nested):
    """Strategy (b): W dequantized inside the GEMM's K loop (K = 72 is not a multiple of the 64-block, nor of
    the interpreter's 32-wide K tile), with dropout, against the float64 reference on the dequantized W."""
    P = 0.2
    _, fused_model, peft_layer, layer = make_pair(K=72, N=40, r=3, bias="all", compute_dtype=dtype,
                                                  weight_dtype=dtype, nested=nested, dropout=P, quant_type="fp4")
    layer._lorafast_backend = qlora.GEMM_4BIT  # not a public backend name: set as patch stores one
    layer.train()
    x = torch.randn(2, 5, 72, dtype=dtype, requires_grad=True)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    mask = lorafast.dropout.keep_mask(functional._dropout_seed(x.device), 10, 72, P)
    y_ref, x64, params64 = float64_reference(layer, x, P, mask.reshape(2, 5, 72))
    assert mask.float().mean() < 1.0
    check_fwd_bwd(layer, x, y, y_ref, x64, params64, dtype)


def _tiny_llama_4bit(path, quant_type="nf4"):
    from transformers import BitsAndBytesConfig, LlamaForCausalLM

    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=torch.float32)
    return LlamaForCausalLM.from_pretrained(path, quantization_config=q, device_map="cpu", dtype=torch.float32)


def test_qlora_llama_trains_saves_and_loads_in_vanilla_peft(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    model = get_peft_model(_tiny_llama_4bit(tmp_path / "base"),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1,
                                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                      "up_proj", "down_proj"]))
    assert lorafast.patch(model) == 7
    ids = torch.randint(0, 64, (4, 12))
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    model.train()
    losses = []
    for _ in range(12):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    model.eval()
    for module in model.modules():
        if type(module) is bnb.nn.Linear4bit:
            module.train()  # as for `vanilla` below: no CPU inference repack (no_grad calls run PEFT's forward)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    vanilla = PeftModel.from_pretrained(_tiny_llama_4bit(tmp_path / "base"), tmp_path / "adapter")
    vanilla.eval()
    for module in vanilla.modules():
        if type(module) is bnb.nn.Linear4bit:
            # Kept in training mode so bitsandbytes does not repack the weight for CPU inference (bf16 absmax:
            # other numbers); the 4-bit base layer has no other train/eval behaviour.
            module.train()
    assert not any(type(m) is peft_bnb.FusedLoraLinear4bit for m in vanilla.modules())
    with torch.no_grad():
        logits_vanilla = vanilla(input_ids=ids).logits
    assert_close(logits, logits_vanilla.double(), torch.float32, what="logits")


def test_bitsandbytes_same_from_checkout_root(tmp_path):
    """bitsandbytes probes ``import kernels`` (the Hugging Face package); from the checkout root our kernels/
    folder steps aside, so bitsandbytes computes the same 4-bit results as from elsewhere."""
    script = (
        "import torch, bitsandbytes as bnb, sys\n"
        "torch.manual_seed(0)\n"
        "lin = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32, quant_type='nf4').to('cpu')\n"
        "x = torch.randn(3, 64, requires_grad=True)\n"
        "y = lin(x); y.sum().backward()\n"
        "try:\n"
        "    from kernels import get_kernel  # what bitsandbytes' CPU backend probes\n"
        "    probe = 'hf kernels'\n"
        "except ImportError:\n"
        "    probe = 'no kernels'\n"
        "print(probe, getattr(sys.modules.get('kernels'), '__file__', None))  # never our kernels/\n"
        "print(y.detach().double().sum().item(), x.grad.double().sum().item())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ""
    outs = []
    for cwd in (ROOT, tmp_path):
        done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        outs.append(done.stdout.splitlines())
    assert outs[0] == outs[1], outs


@pytest.mark.gpu
def test_cuda_auto_picks_a_strategy_and_matches_peft():
    _, fused_model, peft_layer, layer = make_pair(K=256, N=192, r=8, bias="all", compute_dtype=torch.bfloat16)
    fused_model.cuda()
    peft_layer.cuda()
    lorafast.patch(fused_model, backend="auto")
    check_against_peft(peft_layer, layer, torch.randn(64, 256, device="cuda", dtype=torch.bfloat16), torch.bfloat16)


@pytest.fixture
def fake_dispatch(tmp_path, monkeypatch):
    """The lead's dispatcher with a fake timer that runs each candidate's step once (under the interpreter on
    CPU) and reports preset milliseconds; a private cache directory."""
    from lorafast import dispatch

    monkeypatch.setenv(dispatch.ENV_CACHE_DIR, str(tmp_path))
    dispatch.clear()
    ran = []

    def install(times):
        def timer(name, run):
            run()
            ran.append(name)
            return times[name]

        dispatch.set_timer(timer)
        return ran

    yield install
    dispatch.clear()
    dispatch.set_timer(None)


def _call_for(layer, x):
    call = layer._fused_call(x, (), {})
    assert isinstance(call, qlora.QLoraCall)
    x2 = call.x.reshape(-1, x.shape[-1])
    return call, x2, functional.scale_tensor(call.scaling, x2)


def test_dispatcher_times_every_candidate_and_caches(fake_dispatch):
    from lorafast import dispatch

    _, _, _, layer = make_pair(K=40, N=24, r=2, bias="all", compute_dtype=torch.float16,
                               weight_dtype=torch.float16)
    x = torch.randn(6, 40, dtype=torch.float16, requires_grad=True)
    call, x2, scale = _call_for(layer, x)
    needs = (True, True, True, True)
    assert qlora.candidates_for(x2, call.snap) == ("fused", "cublas", "aten", qlora.GEMM_4BIT)
    ran = fake_dispatch({"fused": 3.0, "cublas": 2.0, "aten": 4.0, qlora.GEMM_4BIT: 1.0})
    assert qlora.dispatch_strategy(x2, call, scale, needs) == qlora.GEMM_4BIT
    assert sorted(ran) == sorted(["fused", "cublas", "aten", qlora.GEMM_4BIT])  # each step ran, fwd + bwd
    (key,) = [k for k in dispatch.choices() if k.op == "nf4"]
    assert (key.n, key.k, key.needs) == (24, 40, "xabbias")
    assert qlora.dispatch_strategy(x2, call, scale, needs) == qlora.GEMM_4BIT
    assert len(ran) == 4  # cached: no second timing


def test_dispatcher_excludes_a_wrong_candidate(fake_dispatch, monkeypatch):
    """Verification while tuning on a QLoRA key (the dispatcher on a mocked CUDA device: the fake timer, the Triton
    strategies in the interpreter): a candidate whose dA is off is excluded, warned about, recorded, and a new
    process never times it again; the correct candidates are unaffected."""
    import json

    from lorafast import dispatch

    _, _, _, layer = make_pair(K=40, N=24, r=2, bias="all", compute_dtype=torch.float16, weight_dtype=torch.float16)
    x = torch.randn(6, 40, dtype=torch.float16, requires_grad=True)
    call, x2, scale = _call_for(layer, x)
    needs = (True, True, True, True)
    plant_wrong_strategy(monkeypatch, "cublas", "da")  # GEMM_4BIT's backward is cublas's: both are wrong
    ran = fake_dispatch({"cublas": 1.0, qlora.GEMM_4BIT: 1.5, "fused": 2.0, "aten": 4.0})
    with pytest.warns(UserWarning, match="gave wrong results") as record:
        assert qlora.dispatch_strategy(x2, call, scale, needs) == "fused"
    assert len([w for w in record if "wrong results" in str(w.message)]) == 2  # one per candidate
    (key,) = [k for k in dispatch.choices() if k.op == "nf4"]
    assert set(dispatch.rejections()[key.as_string()]) == {"cublas", qlora.GEMM_4BIT}
    path = dispatch.cache_path()
    data = json.loads(path.read_text())
    assert data["choices"][key.as_string()] == "fused"
    data["choices"] = {}  # a new process that has to time this key again
    path.write_text(json.dumps(data))
    dispatch.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert qlora.dispatch_strategy(x2, call, scale, needs) == "fused"
    assert ran[4:] == ["aten", "fused"], "the rejected candidates are never timed again"


def test_dispatcher_candidates_by_dtype_and_m():
    _, _, _, layer = make_pair(K=40, N=24)
    call, x2, _ = _call_for(layer, torch.randn(6, 40))
    assert qlora.candidates_for(x2, call.snap) == ("cublas", "aten")  # fp32: no fused, no 4-bit GEMM
    big = torch.empty(qlora.GEMM_4BIT_MAX_M + 1, 40, dtype=torch.bfloat16)
    assert qlora.GEMM_4BIT not in qlora.candidates_for(big, call.snap)


def _two_adapters(dropout):
    peft_model, fused_model, peft_layer, layer = make_pair(K=48, N=24, dropout=dropout)
    for model in (peft_model, fused_model):
        model.add_adapter("second", LoraConfig(r=2, lora_alpha=3, target_modules=["proj"], lora_dropout=dropout,
                                               init_lora_weights=False))
    torch.manual_seed(3)
    for p_peft, p_fused in zip(peft_layer.lora_B["second"].parameters(), layer.lora_B["second"].parameters()):
        p_fused.data.copy_(p_peft.data.normal_())
    layer.lora_A["second"].weight.data.copy_(peft_layer.lora_A["second"].weight.data)
    lorafast.patch(fused_model)
    for lay in (peft_layer, layer):
        lay.set_adapter(["default", "second"])
        lay.lora_A["second"].weight.requires_grad_(True)
        lay.lora_B["second"].weight.requires_grad_(True)
    return peft_layer, layer


def test_two_active_adapters_fused():
    peft_layer, layer = _two_adapters(0.0)
    x = torch.randn(5, 48)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # fused, no fallback
        y = layer(x)
    assert_close(y, peft_layer(x).double(), torch.float32, what="y")


def test_two_active_adapters_with_dropout_fall_back():
    peft_layer, layer = _two_adapters(0.1)
    layer.train()
    peft_layer.train()
    x = torch.randn(5, 48)
    with pytest.warns(UserWarning, match="several active adapters with dropout"):
        torch.manual_seed(5)
        y = layer(x)
    torch.manual_seed(5)
    assert torch.equal(y, peft_layer(x))


def test_gradient_checkpointing_llama_matches_peft(tmp_path):
    """QLoRA's usual setup (activation checkpointing): the patched model's LoRA grads equal PEFT's."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32)
    LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False)
    grads = []
    ids = torch.randint(0, 64, (2, 10))
    for patched in (False, True):
        torch.manual_seed(0)
        model = get_peft_model(_tiny_llama_4bit(tmp_path / "base"), lora)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
        if patched:
            assert lorafast.patch(model) == 6
        model.train()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name, want in grads[0].items():
        assert_close(grads[1][name], want.double(), torch.float32, what=name)


def test_env_strategy_replaces_auto(monkeypatch):
    _, _, _, layer = make_pair(K=40, N=24)
    call, x2, scale = _call_for(layer, torch.randn(6, 40))
    assert qlora.choose("auto", call, x2, scale, (False,) * 4) == ("aten", False)
    monkeypatch.setenv("LORAFAST_STRATEGY", "cublas")  # under the interpreter on CPU: Triton dequant + cublas
    assert qlora.choose("auto", call, x2, scale, (False,) * 4) == ("cublas", True)
