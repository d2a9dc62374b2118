"""Test-only helpers: the interpreter bf16 dot shim and toy kernels for the AOT gate."""
