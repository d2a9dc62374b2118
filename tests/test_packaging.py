"""Packaging: kernels/ is lorafast.kernels only (run from a checkout, root on sys.path, a top-level
`import kernels` must not pass our folder off as the Hugging Face `kernels` distribution), and no import cycles."""

import os
import subprocess
import sys
import textwrap

import pytest

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


def test_top_level_kernels_is_never_our_folder():
    """From a checkout `import kernels` finds the Hugging Face distribution when it is installed (transformers >= 5.25
    requires it) and nothing when it is not; never our kernels/ folder, and transformers' probe agrees."""
    from importlib import metadata

    try:
        metadata.distribution("kernels")
        installed = True
    except metadata.PackageNotFoundError:
        installed = False
    code = """
        import kernels
        print(getattr(kernels, "__file__", None))
        from transformers.utils.import_utils import is_kernels_available
        print(is_kernels_available())
    """
    found, available = run_from_checkout(code).splitlines()
    ours = os.path.join(ROOT, "kernels") + os.sep
    if installed:
        assert found != "None" and not found.startswith(ours) and available == "True", (found, available)
    else:
        assert (found, available) == ("None", "False")


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


def _module_imports(include_lazy: bool) -> dict:
    """lorafast's modules (kernels/ as lorafast.kernels) → the lorafast modules each imports (top-level only, or
    every import statement, lazy ones in functions included). ``from pkg import sub`` counts as ``pkg.sub``."""
    import ast

    paths = {}
    for folder, prefix in (("lorafast", ""), ("kernels", "lorafast.")):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, name), ROOT)[:-3].replace(os.sep, ".")
                    module = prefix + rel
                    paths[module[: -len(".__init__")] if module.endswith(".__init__") else module] = os.path.join(
                        root, name)
    graph = {}
    for module, path in paths.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        found = set()
        for node in ast.walk(tree) if include_lazy else tree.body:
            if isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name in paths)
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names} & paths.keys()
                found |= subs
                if len(subs) < len(node.names) and node.module in paths:
                    found.add(node.module)
        graph[module] = found - {module}
    return graph


def _cycles(graph: dict) -> list:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("include_lazy", [False, True], ids=["top-level", "with-lazy-imports"])
def test_no_import_cycles(include_lazy):
    """No module of the package imports (even lazily) a module that imports it back: the PEFT glue's core knows
    no layer kind, the strategies registry does not import the dispatcher, kernels do not import the gate."""
    assert _cycles(_module_imports(include_lazy)) == []


def test_cycle_finder_can_fail():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
