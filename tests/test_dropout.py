"""Dropout: one hash mask for every CUDA strategy (Triton kernels == torch ops, bit for bit), each
strategy's own mask replayed through the reference (fwd + every grad), the mask's statistics (keep rate,
no correlation between neighbours, rows, columns or seeds), 1/(1−p) scaling, seeding, and gradcheck of
the seeded forward on the aten strategy."""

import math

import pytest
import torch
from conftest import DEVICE
from utils import assert_close, make_inputs

import lorafast
from lorafast import functional, reference
from lorafast.dropout import keep_mask
from lorafast.kernels.dropout import dropout_keep_mask, mask_threshold
from lorafast.strategies import aten

P = 0.25
STRATEGIES = ["fused", "cublas", "aten"]


def replay_mask(strategy, seed, M, K, p):
    """The mask ``strategy`` drew for ``seed``: the shared hash on CUDA (and for the Triton strategies
    everywhere), aten's generator mask on CPU."""
    if strategy == "aten":
        return aten.dropout_keep_mask(seed, M, K, p, torch.float32).bool()
    return keep_mask(seed, M, K, p)


@pytest.mark.parametrize(
    "seed_value", [0, 1, 987654321, 2**32 - 1, 2**32, 2**62 - 1, 0x5DEECE66D << 20], ids=lambda s: f"seed{s}"
)
@pytest.mark.parametrize("M, K, p", [(1, 1, 0.5), (37, 53, 0.1), (67, 130, 0.3), (64, 96, 0.9), (5, 300, 0.01)])
def test_triton_mask_equals_torch_mask(seed_value, M, K, p):
    """The kernels' mask and lorafast.dropout.keep_mask are the same bits (so `aten` on CUDA, `fused` and
    `cublas` drop the same inputs), including seeds using all 62 bits."""
    seed = torch.tensor([seed_value], dtype=torch.int64, device=DEVICE)
    assert torch.equal(dropout_keep_mask(seed, M, K, p), keep_mask(seed, M, K, p))


def test_threshold_resolution():
    assert mask_threshold(0.0) == 0
    assert mask_threshold(0.5) == 2**30
    assert mask_threshold(0.999999999999) == 2**31 - 1  # never overflows int32
    assert abs(mask_threshold(0.1) / 2**31 - 0.1) < 2**-31


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_mask_replay_matches_reference(strategy, dtype):
    """Forward and all grads equal the reference run with the very mask the strategy drew."""
    inp = make_inputs(67, 45, 37, 5, dtype, device=DEVICE)
    torch.manual_seed(1234)
    y = lorafast.lora_linear(*inp.args(), dropout_p=P, training=True, backend=strategy)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(1234)
    seed = functional._dropout_seed(inp.x.device)
    mask = replay_mask(strategy, seed, 67, 45, P)
    ref = inp.to64()
    y_ref = reference.lora_linear(*ref.args(), dropout_p=P, training=True, dropout_mask=mask)
    y_ref.backward(g.double())
    names = ["y", "dx", "dbias", "dA", "dB"]
    outs = [y] + [t.grad for t in inp.leaves()]
    wants = [y_ref] + [r.grad for r in ref.leaves()]
    for name, got, want in zip(names, outs, wants):
        # The per-dtype floor alone (no low-precision yardstick): bf16's floor covers these sizes.
        assert_close(got, want, dtype, what=f"{strategy} {name}")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mask_replay_3d_strided_input(strategy):
    """Dropout on a non-contiguous 3-D x (odd sizes): the mask indexes the logical (row, column) of the
    flattened (M, K) view, so the replayed reference matches forward and every grad."""
    inp = make_inputs(7, 45, 37, 3, torch.float32, device=DEVICE, lead=(3,))
    inp.x = torch.randn(45, 7, 3, device=DEVICE).permute(2, 1, 0).detach().requires_grad_()
    assert not inp.x.is_contiguous()
    torch.manual_seed(4321)
    y = lorafast.lora_linear(*inp.args(), dropout_p=P, training=True, backend=strategy)
    g = torch.randn_like(y)
    y.backward(g)
    torch.manual_seed(4321)
    mask = replay_mask(strategy, functional._dropout_seed(inp.x.device), 21, 45, P).reshape(3, 7, 45)
    ref = inp.to64()
    y_ref = reference.lora_linear(*ref.args(), dropout_p=P, training=True, dropout_mask=mask)
    y_ref.backward(g.double())
    for name, got, want in zip(["y", "dx", "dbias", "dA", "dB"], [y] + [t.grad for t in inp.leaves()],
                               [y_ref] + [r.grad for r in ref.leaves()]):
        assert_close(got, want, torch.float32, what=f"{strategy} {name}")


def test_fused_and_cublas_drop_the_same_inputs():
    """Same seed → same mask in both Triton strategies: outputs agree to fp32 rounding."""
    inp = make_inputs(40, 45, 37, 5, torch.float32, device=DEVICE)
    outs = []
    for strategy in ("fused", "cublas"):
        torch.manual_seed(99)
        outs.append(lorafast.lora_linear(*inp.args(), dropout_p=0.5, training=True, backend=strategy).detach())
    assert_close(outs[0], outs[1].double(), torch.float32, what="fused vs cublas under dropout")


@pytest.mark.parametrize("strategy", ["fused", "aten"])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_keep_rate(strategy, p):
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE)
    M, K = 257, 255
    keep = replay_mask(strategy, seed, M, K, p)
    assert keep.shape == (M, K) and keep.dtype == torch.bool
    rate = keep.float().mean().item()
    sigma = math.sqrt(p * (1 - p) / (M * K))
    assert abs(rate - (1 - p)) < 5 * sigma, (rate, 1 - p, sigma)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_hash_mask_has_no_structure():
    """The hash is per (row key ^ column key): check it leaves no visible structure. 512×512 draws at
    p = 0.5, so a correlation's standard error is ~1/512 ≈ 0.002; the bands are ~5σ."""
    M = K = 512
    seed = torch.tensor([0x12345678_0ABCDEF1], dtype=torch.int64, device=DEVICE)
    keep = keep_mask(seed, M, K, 0.5).float()
    limit = 5 / math.sqrt(M * K)
    assert abs(_corr(keep[:, 1:], keep[:, :-1])) < limit, "adjacent columns"
    assert abs(_corr(keep[1:], keep[:-1])) < limit, "adjacent rows"
    assert abs(_corr(keep[1:, 1:], keep[:-1, :-1])) < limit, "diagonal neighbours"
    other = keep_mask(seed + 1, M, K, 0.5).float()
    assert abs(_corr(keep, other)) < limit, "seed and seed + 1"
    swapped = keep_mask(torch.tensor([0x0ABCDEF1_12345678], device=DEVICE), M, K, 0.5)
    assert abs(_corr(keep, swapped.float())) < limit, "low/high seed words swapped"
    assert abs(_corr(keep, keep.t())) < limit, "transpose"
    # Per-row and per-column keep counts: Binomial(512, 0.5), σ ≈ 11.3; chi-square of the counts ≈ dof.
    for counts in (keep.sum(1), keep.sum(0)):
        chi2 = (((counts - 256.0) ** 2) / 128.0).sum().item()
        assert abs(chi2 - 512) < 5 * math.sqrt(2 * 512), chi2
    # 2×2 patterns are uniform (16 of them, 65k draws): no pair of neighbours favours a pattern.
    quad = (keep[:-1:2, :-1:2] * 8 + keep[:-1:2, 1::2] * 4 + keep[1::2, :-1:2] * 2 + keep[1::2, 1::2]).long()
    counts = torch.bincount(quad.flatten(), minlength=16).double()
    expected = quad.numel() / 16
    chi2 = (((counts - expected) ** 2) / expected).sum().item()
    assert chi2 < 15 + 5 * math.sqrt(30), chi2


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_dropout_scaling_is_unbiased(strategy):
    # With W = 0, b = 0 and A = 1/K, B = 1: E[y] over the mask equals the no-dropout output (1).
    M, K, p = 257, 255, 0.1
    x = torch.ones(M, K, device=DEVICE)
    a = torch.ones(1, K, device=DEVICE) / K
    b = torch.ones(1, 1, device=DEVICE)
    w = torch.zeros(1, K, device=DEVICE)
    torch.manual_seed(5)
    y = lorafast.lora_linear(x, w, None, a, b, 1.0, dropout_p=p, training=True, backend=strategy)
    assert abs(y.mean().item() - 1.0) < 0.01, y.mean().item()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_seeding(strategy):
    inp = make_inputs(31, 40, 20, 4, torch.float32, device=DEVICE)

    def draw(s):
        torch.manual_seed(s)
        return lorafast.lora_linear(*inp.args(), dropout_p=0.5, training=True, backend=strategy).detach()

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    eval_y = lorafast.lora_linear(*inp.args(), dropout_p=0.5, training=False, backend=strategy)
    assert_close(eval_y, reference.lora_linear(*inp.to64().args()), torch.float32, what="eval ignores dropout")


def test_masks_differ_across_seeds_triton():
    a = dropout_keep_mask(torch.tensor([1], device=DEVICE), 64, 64, 0.5)
    b = dropout_keep_mask(torch.tensor([2], device=DEVICE), 64, 64, 0.5)
    assert (a != b).float().mean() > 0.3


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_aten_gradcheck(p):
    """float64 gradcheck of the seeded forward: every input including bias, with and without dropout."""
    inp = make_inputs(6, 5, 4, 3, torch.float64, device="cpu")
    inp.weight.requires_grad_()

    def f(x, w, b, a, bb):
        torch.manual_seed(7)
        return lorafast.lora_linear(x, w, b, a, bb, 0.7, dropout_p=p, training=True, backend="aten")

    assert torch.autograd.gradcheck(f, (inp.x, inp.weight, inp.bias, inp.lora_a, inp.lora_b))


@pytest.mark.gpu
def test_all_strategies_drop_the_same_inputs_on_cuda():
    """On CUDA every strategy (aten included) uses the hash mask: outputs agree within bf16 rounding."""
    inp = make_inputs(300, 256, 192, 16, torch.bfloat16, device="cuda")
    outs = {}
    for strategy in STRATEGIES:
        torch.manual_seed(3)
        outs[strategy] = lorafast.lora_linear(*inp.args(), dropout_p=0.3, training=True, backend=strategy)
    for strategy in ("cublas", "aten"):
        assert_close(outs[strategy], outs["fused"].double(), torch.bfloat16, what=strategy)


def test_cpu_mask_threshold_resolution():
    """The CPU mask realises p to within 2⁻¹⁷ and never overflows its signed 16-bit lanes."""
    for p in (0.0, 0.01, 0.1, 0.25, 1 / 3, 0.9, 0.999999):
        t = aten.cpu_mask_threshold(p)
        assert -(2**15) <= t <= 2**15 - 1
        assert abs((t + 2**15) / 2**16 - p) <= 2**-17 or p > 1 - 2**-16
    assert aten.cpu_mask_threshold(0.0) == -(2**15)  # p = 0 keeps every lane


# Both CPU draws: one bernoulli_ up to aten._BERNOULLI_MAX elements, 16-bit lanes above it.
@pytest.mark.parametrize("M, K", [(1, 1), (3, 5), (4, 8), (7, 130), (17, 130), (40, 61), (64, 64)])
def test_cpu_mask_deterministic_any_width(M, K):
    """Widths not a multiple of four lanes included: a pure function of (seed, M, K, p), in every float
    dtype the same bits, and independent of the thread count."""
    seed = torch.tensor([2**40 + 7])
    ref = aten.cpu_keep_mask(seed, M, K, 0.3)
    assert ref.shape == (M, K) and ref.dtype == torch.float32 and ref.is_contiguous()
    assert set(ref.unique().tolist()) <= {0.0, 1.0}
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(aten.cpu_keep_mask(seed, M, K, 0.3), ref)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(aten.cpu_keep_mask(seed, M, K, 0.3, torch.bfloat16).float(), ref)
    other = aten.cpu_keep_mask(torch.tensor([2**40 + 8]), M, K, 0.3)
    assert M * K < 16 or not torch.equal(other, ref)


@pytest.mark.parametrize("M, K", [(32, 64), (1, 2049), (64, 64)])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_cpu_mask_drop_rate_both_draws(M, K, p):
    """Either side of the bernoulli/lanes switch the mask drops a fraction p (20 seeds: ≥ 40k draws, 5σ ≤ 0.012)."""
    assert (M * K <= aten._BERNOULLI_MAX) == (M * K <= 2048)
    masks = torch.stack([aten.cpu_keep_mask(torch.tensor([s]), M, K, p) for s in range(20)])
    assert abs((1 - masks.mean().item()) - p) < 0.012
    assert (masks[0] != masks[1]).any()
