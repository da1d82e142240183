"""Every environment variable mmkernels reads, parsed here and nowhere else.

| variable | read | meaning |
| --- | --- | --- |
| ``MMKERNELS_BACKEND`` | at import | force a backend: ``auto`` (default), ``reference``, ``cpu``, ``triton`` |
| ``MMKERNELS_NO_EXT`` | first CPU call | ``1``: never build nor load the C++ CPU kernels |
| ``MMKERNELS_CACHE_DIR`` | first CPU call | where the C++ kernels are built (default ``$XDG_CACHE_HOME/mmkernels``, ``~/.cache/mmkernels``) |
| ``MMKERNELS_TUNING_FILE`` | first launch | a launch-configuration file for :mod:`mmkernels.tuning` to load |
| ``TRITON_INTERPRET`` | at import | Triton's own switch: ``1`` runs the triton backend on CPU tensors |
| ``TRITON_PTXAS_PATH``, ``TRITON_CUOBJDUMP_PATH`` | sm_90 compile tier | Triton's own: the ptxas / cuobjdump to use |
| ``MMKERNELS_PROPERTY_SEED``, ``_CASE``, ``_BUDGET`` | property test tier | read by :mod:`mmkernels.testing.property` only: the run's seed, one case to replay, seconds per test |

Tile sizes and other launch choices are not environment variables: see :mod:`mmkernels.tuning`.
"""
from __future__ import annotations

import os
from pathlib import Path


def _text(name: str) -> str:
    return os.environ.get(name, "").strip()


def _truthy(name: str) -> bool:
    return _text(name).lower() in ("1", "true", "yes", "on")


def backend() -> str:
    """``MMKERNELS_BACKEND`` (``auto`` when unset or empty)."""
    return _text("MMKERNELS_BACKEND") or "auto"


def no_ext() -> bool:
    """``MMKERNELS_NO_EXT``: never build nor load the C++ kernels."""
    return _truthy("MMKERNELS_NO_EXT")


def cache_root() -> Path:
    """The folder holding one C++ build directory per (torch, Python, flags, install)."""
    if _text("MMKERNELS_CACHE_DIR"):
        return Path(_text("MMKERNELS_CACHE_DIR")).expanduser()
    base = _text("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mmkernels"


def tuning_file() -> str | None:
    """``MMKERNELS_TUNING_FILE``: a file of launch configurations, or None."""
    return _text("MMKERNELS_TUNING_FILE") or None


def triton_interpret() -> bool:
    """``TRITON_INTERPRET`` as Triton reads it (any value but empty or ``0``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_tool_path(tool: str) -> str | None:
    """Triton's own override of the path of ``tool`` (``ptxas`` or ``cuobjdump``), or None."""
    return _text(f"TRITON_{tool.upper()}_PATH") or None
