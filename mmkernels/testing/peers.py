"""The peers our drop-ins are proved and measured against, loaded where they are installed.

OpenCLIP's package import needs torchvision (and pulls a CUDA torch beside a CPU one), but its
``open_clip/loss.py`` needs only torch: :func:`open_clip_loss` loads that one file from the
installed package (``pip install --no-deps open_clip_torch``) without importing the package.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

_MODULE = "mmkernels_peer_open_clip_loss"


def open_clip_loss() -> ModuleType | None:
    """``open_clip.loss`` (``ClipLoss``, ``SigLipLoss``, ...), or None when open_clip is not
    installed. A working ``import open_clip.loss`` is used as is."""
    if _MODULE in sys.modules:
        return sys.modules[_MODULE]
    try:
        import open_clip.loss as mod  # noqa: F401  (the whole package, where torchvision is present)
        sys.modules[_MODULE] = mod
        return mod
    except Exception:
        pass
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
    if not path.is_file():
        return None
    file_spec = importlib.util.spec_from_file_location(_MODULE, path)
    mod = importlib.util.module_from_spec(file_spec)
    sys.modules[_MODULE] = mod
    try:
        file_spec.loader.exec_module(mod)
    except Exception:
        del sys.modules[_MODULE]
        return None
    return mod
