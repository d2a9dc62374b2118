"""Per-dtype relative-error floors, shared by the tests and `python -m lorafast bench`.

Rule (flash-attention's): a fused result's ‖out−ref‖/‖ref‖ against a float64 reference may be at most
2× the error of the same math done by PyTorch in the low dtype, plus this floor. fp32 runs IEEE dots
(no TF32), so its floor is tight.
"""

import torch

REL_TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
