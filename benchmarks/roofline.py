"""Roofline predictions for the bench shapes on H100 / H200: ``python benchmarks/roofline.py [flags]``.

The model lives in :mod:`lorafast.roofline` (inside the package, so ``python -m lorafast bench`` can
print predictions beside GPU measurements from an installed wheel); this script only prints it.
Flags: --device h100 h200, --dtype, --shapes, --rank, --dropout, --no-launch (see --help).
"""

from lorafast.roofline import main

if __name__ == "__main__":
    raise SystemExit(main())
