"""Loading of the compiled CPU kernels (``mmkernels._C``).

The extension is built by ``setup.py`` against the torch installed at build
time. When it is missing (pure-Python install, or a build against another
torch) ``import mmkernels`` still works: one warning is printed and CPU
tensors are served by the ``reference`` backend.
"""
from __future__ import annotations

import importlib
import warnings

C = None          # the module, or None
LOAD_ERROR = None  # why it failed to load, as text

try:  # pragma: no branch
    C = importlib.import_module("mmkernels._C")
except Exception as exc:  # ImportError, or an undefined-symbol OSError from a torch mismatch
    C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"
    warnings.warn(
        "mmkernels: the C++ CPU kernels (mmkernels._C) are not available "
        f"({LOAD_ERROR}); CPU tensors use the 'reference' backend. Rebuild with "
        "`pip install --no-build-isolation -e .` against the installed torch.",
        RuntimeWarning,
        stacklevel=2,
    )


def available() -> bool:
    """True when the compiled CPU kernels are importable."""
    return C is not None
