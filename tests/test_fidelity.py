"""Adapter precision (issue 9): fp32 adapters on a bf16/fp16 base, `fused` and `cublas` (interpreter on CPU).

"fp32" runs the rank-r dots on fp32 operands, as PEFT's fp32 LoRA branch does; "compute" casts adapters,
H and dH to x's dtype. Both must stay within the usual tolerance of the float64 reference, and "fp32"
must be measurably closer to PEFT's own computation (reference.lora_linear on the native dtypes: base
output in x's dtype, the LoRA branch in fp32 on x.float()) for H, dA and dB.
"""

import pytest
import torch
from conftest import DEVICE
from utils import assert_close, make_inputs, rel_err

import lorafast
from lorafast import functional, reference, strategies
from lorafast.kernels import dtypes

TRITON_STRATEGIES = ["fused", "cublas"]
STRATEGIES = [*TRITON_STRATEGIES, "aten"]  # aten follows the same switch (its products in torch ops)
HALF = [torch.bfloat16, torch.float16]
P = 0.25
# "compute" rounds A, B, H or dH to x's dtype: measured here (interpreter, these shapes) 1.6–2.6e-3 from
# PEFT for bf16 and 2.1–3.3e-4 for fp16 on H/dA/dB; "fp32" differs from PEFT by fp32 summation order only
# (1.1–2.7e-7). A 20× gap (the measured one is ≥ 700×) cannot flake, and "fp32" must also stay within a
# few fp32 ulps of PEFT in absolute terms.
CLOSER_BY = 20.0
FP32_FROM_PEFT = 1e-5


@pytest.fixture(autouse=True)
def restore_precision():
    saved = dtypes._adapter_precision
    yield
    dtypes._adapter_precision = saved


def run_lorafast(inp, strategy, precision, g, dropout_p):
    """lorafast fwd+bwd at ``precision``: (y, H, {grad name: grad}). H comes from the strategy's forward
    on the same seed (the public op does not return it)."""
    dtypes.set_adapter_precision(precision)
    for t in inp.leaves():
        t.grad = None
    torch.manual_seed(1234)
    y = lorafast.lora_linear(*inp.args(), dropout_p=dropout_p, training=dropout_p > 0, backend=strategy)
    y.backward(g)
    torch.manual_seed(1234)
    seed = functional._dropout_seed(inp.x.device) if dropout_p > 0 else None
    scale = functional.scale_tensor(inp.scaling, inp.x)
    with torch.no_grad():
        _, h = strategies.get(strategy).forward(inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b, scale, seed,
                                                dropout_p)
    return y, h, grads_of(inp)


def grads_of(inp):
    return {"dx": inp.x.grad, "dbias": inp.bias.grad, "dA": inp.lora_a.grad, "dB": inp.lora_b.grad}


def keep_mask_of(inp, dropout_p, strategy):
    """The mask ``strategy`` drew after torch.manual_seed(1234) (None at p = 0): the hash for the Triton
    strategies (and aten on CUDA), aten's generator mask on CPU."""
    if dropout_p == 0:
        return None
    torch.manual_seed(1234)
    seed = functional._dropout_seed(inp.x.device)
    M, K = inp.x.shape
    if strategy == "aten":
        return strategies.aten.dropout_keep_mask(seed, M, K, dropout_p, torch.float32).bool()
    return lorafast.dropout.keep_mask(seed, M, K, dropout_p)


def run_reference(inp, g, mask, dropout_p, to64):
    """reference.lora_linear fwd+bwd, in float64 (``to64``) or in the inputs' own dtypes (PEFT's math):
    (y, H, grads). H = drop(x in the adapters' dtype)·Aᵀ, unscaled by 1/(1−p) like the kernels' H."""
    ref = inp.to64() if to64 else _clone_leaves(inp)
    y = reference.lora_linear(*ref.args(), dropout_p=dropout_p, training=dropout_p > 0, dropout_mask=mask)
    y.backward(g.double() if to64 else g)
    lora_in = ref.x.detach().to(ref.lora_a.dtype)
    if mask is not None:
        lora_in = lora_in * mask.to(lora_in.dtype)
    h = lora_in @ ref.lora_a.detach().t()
    return y, h, grads_of(ref)


def _clone_leaves(inp):
    def cp(t):
        return t.detach().clone().requires_grad_(t.requires_grad)

    return type(inp)(cp(inp.x), inp.weight, cp(inp.bias), cp(inp.lora_a), cp(inp.lora_b), inp.scaling)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("dropout_p", [0.0, P], ids=["p0", "dropout"])
def test_fp32_precision_is_closer_to_peft(strategy, dtype, dropout_p):
    inp = make_inputs(67, 70, 45, 8, dtype, adapter_dtype=torch.float32, device=DEVICE)
    g = torch.randn(67, 45, device=DEVICE).to(dtype)
    mask = keep_mask_of(inp, dropout_p, strategy)
    exact = run_reference(inp, g, mask, dropout_p, to64=True)
    peft = run_reference(inp, g, mask, dropout_p, to64=False)
    runs = {prec: run_lorafast(inp, strategy, prec, g, dropout_p) for prec in dtypes.ADAPTER_PRECISIONS}
    what = f"{strategy} {dtype} p={dropout_p}"

    for prec, (y, h, grads) in runs.items():
        # Within the existing budget: 2× PEFT's own error vs float64 plus the dtype's floor. H is fp32 in
        # PEFT, so its yardstick is the bf16/fp16 rounding "compute" does (the dtype floor covers it).
        assert_close(y, exact[0], dtype, peft[0], what=f"{what} {prec} y")
        assert_close(h, exact[1], dtype, what=f"{what} {prec} H")
        for name, got in grads.items():
            param = {"dx": inp.x, "dbias": inp.bias, "dA": inp.lora_a, "dB": inp.lora_b}[name]
            assert got.dtype == param.dtype, f"{what} {prec} {name}: {got.dtype} != {param.dtype}"
            assert_close(got, exact[2][name], dtype, peft[2][name], what=f"{what} {prec} {name}")

    for name, pick in (("H", lambda r: r[1]), ("dA", lambda r: r[2]["dA"]), ("dB", lambda r: r[2]["dB"])):
        fp32_err = rel_err(pick(runs["fp32"]), pick(peft))
        compute_err = rel_err(pick(runs["compute"]), pick(peft))
        assert fp32_err <= FP32_FROM_PEFT, f"{what} {name}: fp32 precision {fp32_err:.2e} from PEFT"
        assert fp32_err * CLOSER_BY <= compute_err, (
            f"{what} {name}: fp32 precision {fp32_err:.2e} vs compute {compute_err:.2e} from PEFT"
        )


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_precision_changes_nothing_without_fp32_adapters(strategy):
    """bf16 adapters on bf16 x, and fp32 x with fp32 adapters: the switch leaves results bit-identical."""
    for dtype, adapter_dtype in ((torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)):
        inp = make_inputs(33, 40, 37, 4, dtype, adapter_dtype=adapter_dtype, device=DEVICE)
        g = torch.randn(33, 37, device=DEVICE).to(dtype)
        (y1, h1, g1), (y2, h2, g2) = (run_lorafast(inp, strategy, prec, g, 0.0) for prec in ("fp32", "compute"))
        assert torch.equal(y1, y2) and torch.equal(h1, h2), f"{strategy} {dtype}/{adapter_dtype}"
        for name in g1:
            assert torch.equal(g1[name], g2[name]), f"{strategy} {dtype}/{adapter_dtype} {name}"


def test_lora_dot_rule():
    dtypes.set_adapter_precision("fp32")
    assert dtypes.lora_dot(torch.bfloat16, torch.float32) == (True, "ieee")
    assert dtypes.lora_dot(torch.float16, torch.float32) == (True, "ieee")
    assert dtypes.lora_dot(torch.bfloat16, torch.bfloat16)[0] is False
    assert dtypes.lora_dot(torch.bfloat16, torch.float16)[0] is False
    assert dtypes.lora_dot(torch.float32, torch.float32)[0] is False  # fp32 x: DOT_PRECISION already fp32
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        assert dtypes.lora_dot(torch.bfloat16, torch.float32) == (True, "tf32")  # what PEFT's fp32 matmul runs
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    dtypes.set_adapter_precision("compute")
    assert dtypes.lora_dot(torch.bfloat16, torch.float32)[0] is False


def test_switch_env_var_and_errors(monkeypatch):
    monkeypatch.setenv(dtypes.ENV_VAR, "FP32")
    dtypes._adapter_precision = None  # as in a fresh process
    assert dtypes.adapter_precision() == "fp32"
    monkeypatch.setenv(dtypes.ENV_VAR, "compute")
    assert dtypes.adapter_precision() == "fp32"  # read once, not per launch
    dtypes._adapter_precision = None
    monkeypatch.delenv(dtypes.ENV_VAR)
    assert dtypes.adapter_precision() == dtypes.DEFAULT_ADAPTER_PRECISION
    monkeypatch.setenv(dtypes.ENV_VAR, "tf32")
    dtypes._adapter_precision = None
    with pytest.raises(ValueError, match="LORAFAST_ADAPTER_PRECISION.*'tf32'"):
        dtypes.adapter_precision()
    with pytest.raises(ValueError, match="set_adapter_precision.*'bf16'"):
        dtypes.set_adapter_precision("bf16")
    dtypes.set_adapter_precision("compute")  # the call wins over a bad variable
    assert dtypes.adapter_precision() == "compute"


def _launch_kwargs(monkeypatch, act):
    """{launcher: the constexprs and table flag it passes to `launch`}, from one call of each on meta tensors."""
    from lorafast.kernels import lora_bwd, lora_fwd

    seen = {}

    def capture(fn, kind, device, grid, args, *rest, **kwargs):
        seen[fn.__name__] = kwargs

    for module in (lora_fwd, lora_bwd):
        monkeypatch.setattr(module, "launch", capture)

    def meta(*shape, dtype=act):
        return torch.empty(shape, dtype=dtype, device="meta")

    f32 = torch.float32
    M, K, N, r = 64, 48, 40, 8
    x, w, dy = meta(M, K), meta(N, K), meta(M, N)
    a, b, h = meta(r, K, dtype=f32), meta(N, r, dtype=f32), meta(M, r, dtype=f32)
    seed, scale = meta(1, dtype=torch.int64), meta(dtype=f32)
    lora_fwd.lora_shrink(x, a, seed, 0.1)
    lora_fwd.lora_expand_gemm(x, w, None, h, b, scale)
    lora_fwd.lora_expand_add(dy, h, b, scale)
    lora_bwd.lora_grad_h(dy, b, h, scale, 1.0, True, True)
    lora_bwd.dx_with_lora_epilogue(dy, w, h, a, seed, 0.1)
    lora_bwd.dx_lora_add(x, h, a, seed, 0.1)
    lora_bwd.lora_grad_a(x, h, seed, 0.1, a.dtype)
    return {name.removesuffix("_kernel"): kw for name, kw in seen.items()}


SKINNY_LAUNCHERS = {"lora_shrink", "lora_grad_h", "lora_grad_a"}


@pytest.mark.parametrize("allow_tf32", [False, True], ids=["ieee", "tf32"])
def test_every_launcher_follows_the_switch(monkeypatch, allow_tf32):
    """All seven launchers pass LORA_FP32/LORA_PRECISION from the switch (fp32 adapters, bf16 x), key their
    autotuning on it, and the IEEE skinny passes pick the fp32 config table."""
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    try:
        dtypes.set_adapter_precision("fp32")
        wide = _launch_kwargs(monkeypatch, torch.bfloat16)
        dtypes.set_adapter_precision("compute")
        narrow = _launch_kwargs(monkeypatch, torch.bfloat16)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    assert len(wide) == 7 and wide.keys() == narrow.keys()
    for name, kw in wide.items():
        assert kw["LORA_FP32"] is True and kw["LORA_PRECISION"] == ("tf32" if allow_tf32 else "ieee"), name
        assert narrow[name]["LORA_FP32"] is False, name
        assert "LORA_FP32" in kw["key"], name
        assert kw["fp32"] is (name in SKINNY_LAUNCHERS and not allow_tf32), name
        assert narrow[name]["fp32"] is False, name


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_fp32_precision_holds_under_autocast(strategy):
    """Under torch.autocast the op casts x/W/b like nn.Linear, then runs with autocast off inside, so "fp32"
    precision's rank-r products stay fp32 in every strategy (autocast would recast aten's forward matmuls: H,
    and through it dB, would come out of a bf16 product)."""
    device_type = torch.device(DEVICE).type
    x = torch.randn(33, 40, device=DEVICE)
    w = torch.randn(24, 40, device=DEVICE) / 7
    a = (torch.randn(4, 40, device=DEVICE) / 7).requires_grad_()
    b = torch.randn(24, 4, device=DEVICE).requires_grad_()
    # Exact for the bf16-cast x the op sees, with dY = 1: H = x·Aᵀ, dB = s·dYᵀ·H, dA = s·(dY·B)ᵀ·x.
    x16 = x.to(torch.bfloat16).double()
    ones = torch.ones(33, 24, dtype=torch.float64, device=DEVICE)
    want = {"dA": 0.5 * (ones @ b.detach().double()).t() @ x16, "dB": 0.5 * ones.t() @ (x16 @ a.detach().double().t())}
    errs = {}
    for prec in dtypes.ADAPTER_PRECISIONS:
        dtypes.set_adapter_precision(prec)
        a.grad = b.grad = None
        with torch.autocast(device_type, dtype=torch.bfloat16):
            y = lorafast.lora_linear(x, w, None, a, b, 0.5, backend=strategy)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        errs[prec] = {"dA": rel_err(a.grad, want["dA"]), "dB": rel_err(b.grad, want["dB"])}
    for name in ("dA", "dB"):
        fp32, compute = errs["fp32"][name], errs["compute"][name]
        assert fp32 <= FP32_FROM_PEFT and fp32 * CLOSER_BY <= compute, (name, errs)
