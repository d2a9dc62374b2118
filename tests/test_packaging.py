"""kernels/ is lorafast.kernels only: run from a checkout (root on sys.path), a top-level
`import kernels` must not pass our folder off as the Hugging Face `kernels` distribution."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_from_checkout(code: str, extra_path: str = "") -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra_path, ROOT) if p)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_lorafast_kernels_is_the_installed_name():
    assert run_from_checkout("import lorafast.kernels.lora_fwd as m; print(m.__name__)") == "lorafast.kernels.lora_fwd"


def test_top_level_kernels_reads_as_not_installed():
    code = """
        import kernels
        print(getattr(kernels, "__file__", None), getattr(kernels, "__version__", None))
        from transformers.utils.import_utils import is_kernels_available
        print(is_kernels_available())
    """
    assert run_from_checkout(code).splitlines() == ["None None", "False"]


def test_real_kernels_distribution_wins(tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("__version__ = '0.18.5'\nREAL = True\n")
    code = f"""
        import sys
        sys.path.insert(0, sys.path.pop(sys.path.index({ROOT!r})))  # checkout root first, as with cwd
        import kernels
        print(getattr(kernels, "REAL", False))
    """
    assert run_from_checkout(code, extra_path=str(tmp_path / "site")) == "True"


def test_cpu_user_without_triton_can_import_and_train():
    """triton is an extra on CPU (setup.py): `import lorafast`, the aten strategy with dropout, LoRALinear and
    lorafast.patch on a PEFT model must work when triton cannot be imported at all."""
    code = """
        import sys
        sys.modules["triton"] = None  # any `import triton` now raises ImportError
        import torch, lorafast
        from peft import LoraConfig, get_peft_model
        layer = lorafast.LoRALinear(16, 8, r=4, lora_dropout=0.1).train()
        layer(torch.randn(5, 16)).sum().backward()
        model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8)), LoraConfig(target_modules=["0"]))
        print(lorafast.patch(model), "triton" in sys.modules and sys.modules["triton"] is not None)
        model(torch.randn(3, 16)).sum().backward()
    """
    assert run_from_checkout(code).splitlines()[-1] == "1 False"
