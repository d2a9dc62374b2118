"""Triton kernels for lorafast (installed as lorafast.kernels)."""
