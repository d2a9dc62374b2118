"""Dtype policy shared by the launchers."""

import torch


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision for operands of ``dtype``.

    fp32 operands follow PyTorch's own matmul setting, so the fused layer matches nn.Linear:
    IEEE fp32 unless the user enabled TF32 (``torch.backends.cuda.matmul.allow_tf32``). For 16-bit
    operands the value is ignored by Triton.
    """
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"
