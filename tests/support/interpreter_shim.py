"""The interpreter shims, from the package (lorafast/interpreter.py, which the doctor uses too)."""

from lorafast.interpreter import (  # noqa: F401
    bf16_bits_to_fp32,
    bf16_cast_rounds_to_nearest_even,
    bf16_dot_is_correct,
    fp32_to_bf16_bits_rtne,
    install_bf16_dot_shim,
    install_scalar_index_shim,
    install_string_constexpr_shim,
    install_version_shims,
    interpreter_active,
    remove_bf16_dot_shim,
    scalar_index_works,
    string_constexpr_works,
)
