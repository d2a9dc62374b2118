"""The Triton NF4/FP4 dequant kernel (lorafast.kernels.dequant) is bit-exact with bitsandbytes'
``dequantize_4bit`` — run through Triton's interpreter on CPU (a GPU runs the same kernel compiled)."""

import pytest
import torch

bnb_functional = pytest.importorskip("bitsandbytes.functional")

from lorafast.kernels.dequant import code_table, dequantize_4bit  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _quantize(shape, dtype, blocksize, quant_type, nested, quant_storage=torch.uint8):
    weight = torch.randn(shape, dtype=dtype, device=DEVICE) * 0.7 + 0.05
    return bnb_functional.quantize_4bit(weight, blocksize=blocksize, compress_statistics=nested,
                                        quant_type=quant_type, quant_storage=quant_storage)


def _ours(packed, state):
    nested = state.nested
    return dequantize_4bit(
        packed, state.absmax, code_table(state.quant_type, state.code), state.blocksize, state.shape, state.dtype,
        state.state2.absmax if nested else None, state.state2.code if nested else None,
        state.state2.blocksize if nested else 256, state.offset if nested else None,
    )


def _zero_sign_differs(quant_type, blocksize):
    # bitsandbytes' own CPU kernel is inconsistent here: for FP4 at blocksize < 64 it returns +0.0 for nibble 8,
    # its other paths (CPU blocksize >= 64, odd K, CUDA) return -0.0 as the kernel does. Only there is the sign of
    # a zero not compared.
    return quant_type == "fp4" and blocksize < 64 and DEVICE == "cpu"


def assert_bit_exact(out, ref, ignore_zero_sign=False):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    bits, ref_bits = out.view(_INT_VIEW[out.dtype]), ref.view(_INT_VIEW[ref.dtype])
    differs = bits != ref_bits
    if ignore_zero_sign:
        differs &= ~((out == 0) & (ref == 0))
    bad = differs.nonzero()
    assert bad.numel() == 0, (
        f"{bad.shape[0]} of {out.numel()} elements differ; first at {bad[0].tolist()}: "
        f"{out[tuple(bad[0])].item()!r} vs bitsandbytes {ref[tuple(bad[0])].item()!r}"
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,blocksize", [((37, 300), 64), ((24, 200), 128), ((5, 100), 256), ((3, 7), 64),
                                             ((64, 96), 32), ((17, 1030), 512)])
def test_bit_exact_with_bitsandbytes(quant_type, nested, dtype, shape, blocksize):
    # K not a multiple of the block in most rows: blocks then span rows, as bitsandbytes lays them out.
    packed, state = _quantize(shape, dtype, blocksize, quant_type, nested)
    assert_bit_exact(_ours(packed, state), bnb_functional.dequantize_4bit(packed, state),
                     _zero_sign_differs(quant_type, blocksize))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_odd_element_count_and_many_nested_blocks(quant_type):
    # 3·333 elements: an odd count (the last byte holds one element) and > 256 absmax blocks at blocksize 32,
    # so the nested absmax has several second-level blocks.
    packed, state = _quantize((3 * 111, 301), torch.bfloat16, 32, quant_type, True)
    assert state.state2.absmax.numel() > 1
    assert_bit_exact(_ours(packed, state), bnb_functional.dequantize_4bit(packed, state),
                     _zero_sign_differs(quant_type, 32))


def test_non_uint8_quant_storage():
    packed, state = _quantize((16, 128), torch.bfloat16, 64, "nf4", True, quant_storage=torch.bfloat16)
    assert packed.dtype == torch.bfloat16
    assert_bit_exact(_ours(packed, state), bnb_functional.dequantize_4bit(packed, state))


def test_fp4_zero_keeps_its_sign():
    # FP4 nibble 8 is -0.0 in bitsandbytes' kernels but +0.0 in QuantState.code: the table must fix it.
    code = torch.linspace(-1, 1, 16)
    table = code_table("fp4", torch.cat([torch.zeros(1), code[1:8].abs(), torch.zeros(1), -code[1:8].abs()]))
    assert torch.signbit(table[8]) and not torch.signbit(table[0])
    assert code_table("nf4", code) is code


def test_bad_arguments_name_the_problem():
    packed, state = _quantize((8, 64), torch.float32, 64, "nf4", False)
    with pytest.raises(ValueError, match="bytes"):
        dequantize_4bit(packed[:-1], state.absmax, state.code, 64, (8, 64), torch.float32)
    with pytest.raises(ValueError, match="dtype"):
        dequantize_4bit(packed, state.absmax, state.code, 64, (8, 64), torch.float64)
    with pytest.raises(ValueError, match="quant_type"):
        code_table("int4", state.code)


def test_aot_entries_match_the_kernel_signature():
    import inspect

    from lorafast.kernels.registry import aot_entries

    for arch in (80, 90):
        entries = [e for e in aot_entries(arch) if "4bit" in e.name]
        assert {e.name for e in entries} == {"dequant_4bit", "dequant_4bit[nested]", "gemm_4bit"}
        for entry in entries:
            assert entry.arch == arch and entry.configs
            assert entry.uses_dot == (entry.name == "gemm_4bit")
            names = set(inspect.signature(getattr(entry.fn, "fn", entry.fn)).parameters)
            for config in entry.configs:
                assert set(entry.signature) | set(entry.constexprs) | set(config.kwargs) == names
