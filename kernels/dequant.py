"""bitsandbytes 4-bit (NF4 / FP4) weight dequantization in Triton, bit-exact with
``bitsandbytes.functional.dequantize_4bit``.

Storage (bitsandbytes ``Params4bit`` + ``QuantState``): the N×K weight, flattened row-major, is cut into
blocks of ``blocksize`` consecutive elements (a block may span two rows when K is not a multiple of it);
element i is ``code[nibble_i] · absmax[i // blocksize]``, where byte j holds element 2j in its high nibble
and element 2j+1 in its low nibble, and ``code`` is the 16-entry NF4 or FP4 table (fp32). With double
quantization ("nested", ``compress_statistics=True``) ``absmax`` itself is stored as uint8 codes of an 8-bit
blockwise quantization: absmax[b] = code2[qabsmax[b]] · absmax2[b // blocksize2] + offset.

Bit-exactness: bitsandbytes computes the nested absmax as one fp32 product, then adds the offset in a second
pass, then one fp32 product per element rounded once to the output dtype. The kernel does the same operations
in the same order, and is launched with ``enable_fp_fusion=False`` so the GPU compiler cannot contract the
product and the offset into one FMA (which rounds once instead of twice and would differ in the last bit).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

from lorafast.kernels.configs import EPILOGUE, launch, m_bucket
from lorafast.kernels.dtypes import dot_precision
from lorafast.kernels.lora_fwd import grouped_tile

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_TL_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@triton.jit
def dequant_4bit_kernel(
    packed_ptr, absmax_ptr, code_ptr, nested_code_ptr, nested_absmax_ptr, offset_ptr, out_ptr,
    numel, blocksize, nested_blocksize,
    NESTED: tl.constexpr, OUT_BF16: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[i] = code[nibble(i)] · absmax(i // blocksize) for i < numel (flat), in out's dtype.

    A program owns BLOCK_M·BLOCK_N consecutive elements (the shared EPILOGUE config table names the tile;
    BLOCK_K is unused). The 16-entry code table and the absmax entries are gathered per element: they
    are tiny and stay in L1/L2.
    """
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * (BLOCK_M * BLOCK_N) + tl.arange(0, BLOCK_M * BLOCK_N).to(tl.int64)
    mask = offs < numel
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0).to(tl.float32)
    block = offs // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0).to(tl.float32) * tl.load(
            nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0
        ).to(tl.float32)
        scale = scale + tl.load(offset_ptr).to(tl.float32)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0).to(tl.float32)
    result = value * scale
    if OUT_BF16:
        # Round to nearest even by hand into an int16 view of the bf16 output: Triton's interpreter casts
        # fp32 → bf16 by truncation (off by one ulp against bitsandbytes and torch), the GPU by RNE; this
        # gives RNE on both. No NaN/inf can occur (finite codes times finite absmax).
        bits = result.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        tl.store(out_ptr + offs, bits.to(tl.uint16).to(tl.int16, bitcast=True), mask=mask)
    else:
        tl.store(out_ptr + offs, result.to(out_ptr.dtype.element_ty), mask=mask)


def code_table(quant_type: str, code: torch.Tensor) -> torch.Tensor:
    """The 16-entry fp32 table the kernel gathers from, as bitsandbytes' own dequant kernels use it.

    code: ``QuantState.code``. For FP4 bitsandbytes' kernels compute the value from the sign bit, so
    nibble 8 is −0.0, while ``QuantState.code`` stores +0.0 there: the sign is restored here.
    """
    if quant_type == "nf4":
        return code
    if quant_type == "fp4":
        signs = torch.arange(16, device=code.device) >= 8
        return torch.where(signs, -code.abs(), code)
    raise ValueError(f"code_table: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")


def dequantize_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    shape: Sequence[int],
    dtype: torch.dtype,
    nested_absmax: Optional[torch.Tensor] = None,
    nested_code: Optional[torch.Tensor] = None,
    nested_blocksize: int = 256,
    offset: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Dequantize a bitsandbytes 4-bit weight: a new ``shape`` tensor in ``dtype`` on packed's device.

    packed: the ``Params4bit`` data, any shape/storage dtype, ``ceil(numel/2)`` bytes, contiguous.
    absmax: (ceil(numel/blocksize),) fp32, or uint8 codes when nested. code: (16,) fp32 NF4/FP4 table.
    Nested (double quant): nested_absmax (ceil(len(absmax)/nested_blocksize),) fp32, nested_code (256,) fp32,
    offset: a one-element fp32 tensor. dtype: fp32, fp16 or bf16.
    """
    if dtype not in OUT_DTYPES:
        raise ValueError(f"dequantize_4bit: dtype must be one of {OUT_DTYPES}, got {dtype}")
    numel = 1
    for size in shape:
        numel *= int(size)
    packed_u8 = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    if packed_u8.numel() != (numel + 1) // 2:
        raise ValueError(f"dequantize_4bit: packed has {packed_u8.numel()} bytes, expected {(numel + 1) // 2} "
                         f"for shape {tuple(shape)}")
    out = torch.empty(tuple(shape), dtype=dtype, device=packed.device)
    if numel == 0:
        return out
    out_view = out.view(torch.int16) if dtype == torch.bfloat16 else out
    nested = nested_absmax is not None
    offset_t = offset.reshape(1).float() if nested else absmax  # an unused pointer when not nested
    launch(
        dequant_4bit_kernel, EPILOGUE, packed.device,
        lambda meta: (triton.cdiv(numel, meta["BLOCK_M"] * meta["BLOCK_N"]),),
        (packed_u8, absmax, code, nested_code if nested else absmax, nested_absmax if nested else absmax,
         offset_t, out_view, numel, int(blocksize), int(nested_blocksize)),
        key=("numel",),
        NESTED=nested,
        OUT_BF16=dtype == torch.bfloat16,
        enable_fp_fusion=False,
    )
    return out


@triton.jit
def gemm_4bit_kernel(
    x_ptr, packed_ptr, absmax_ptr, code_ptr, bias_ptr, y_ptr,
    M, N, K, M_BUCKET, blocksize,
    stride_xm, stride_xk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, GROUP_M: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Y[M, N] = X·dequant(W)ᵀ + b with W (N×K, row-major 4-bit, blockwise fp32 absmax) dequantized tile by
    tile inside the K loop: W is read as 0.5 byte per element and never written out.

    The W tile (BLOCK_K × BLOCK_N) is dequantized in fp32 (code · absmax, as bitsandbytes) and rounded to x's
    dtype for the dot, so it equals the dequantize-then-GEMM path's W (on the GPU; the interpreter rounds
    fp32 → bf16 by truncation). Nested absmax is dequantized to fp32 by the caller (N·K/blocksize values).
    """
    tile_m, tile_n = grouped_tile(tl.program_id(0).to(tl.int64), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row_start = offs_n.to(tl.int64) * K  # flat index of W[n, 0]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        mask_k = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=mask_m[:, None] & mask_k[None, :], other=0.0,
        )
        flat = row_start[None, :] + offs_k[:, None]  # (BLOCK_K, BLOCK_N) flat indices of W[n, k]
        mask_w = mask_k[:, None] & mask_n[None, :]
        byte = tl.load(packed_ptr + flat // 2, mask=mask_w, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
        w = tl.load(code_ptr + nibble, mask=mask_w, other=0.0) * tl.load(
            absmax_ptr + flat // blocksize, mask=mask_w, other=0.0
        )
        acc = tl.dot(x, w.to(x.dtype), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn,
        acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :],
    )


def gemm_4bit(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    blocksize: int,
    n: int,
    bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Y = x·dequant(W)ᵀ + b for a 4-bit W (n×K) dequantized inside the GEMM's K loop.

    x: (M, K) fp16/bf16/fp32, any strides. packed: ceil(n·K/2) bytes (uint8, contiguous). absmax:
    (ceil(n·K/blocksize),) fp32 (a nested absmax dequantized first). code: (16,) fp32 (:func:`code_table`).
    bias: (n,) or None. Returns (M, n) in x's dtype.
    """
    M, K = x.shape
    y = torch.empty((M, n), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    packed_u8 = packed.reshape(-1).view(torch.uint8) if packed.dtype != torch.uint8 else packed.reshape(-1)
    # The EPILOGUE table (BLOCK_K 16, 2 stages): with the in-loop dequant the GEMM table's rows spilled and
    # overflowed shared memory on sm_90 (compile gate: 128×256×64 and 64×128×64 at 4 stages), as did one
    # SKINNY row (32×128×128). Short K steps keep the dequantized tile small; their speed is unmeasured.
    launch(
        gemm_4bit_kernel, EPILOGUE, x.device,
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),),
        (x, packed_u8, absmax, code, bias if bias is not None else y, y, M, n, K, m_bucket(M), int(blocksize),
         x.stride(0), x.stride(1), y.stride(0), y.stride(1)),
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype), GROUP_M=8,
        fp32=x.dtype == torch.float32,
    )
    return y
