"""Triton kernels for lorafast, installed as ``lorafast.kernels`` (never as a top-level package)."""

import sys

if __name__ == "kernels":  # pragma: no cover - exercised by a subprocess test
    # Python was started in a lorafast checkout, so the checkout root is on sys.path and this folder
    # shadowed the Hugging Face `kernels` distribution, which transformers probes with
    # `import kernels`. Step aside: hand the importer the real package when it is installed, and
    # otherwise look like an empty namespace package (no __file__, no __version__), which
    # transformers reads as "not installed".
    import importlib as _importlib
    import os as _os

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _self = sys.modules.pop(__name__)
    _saved_path = sys.path[:]
    sys.path[:] = [p for p in _saved_path if _os.path.abspath(p or _os.curdir) != _root]
    try:
        _real = _importlib.import_module(__name__)
    except ImportError:
        _real = None
    finally:
        sys.path[:] = _saved_path
    if _real is None:
        del _self.__file__
        sys.modules[__name__] = _self
