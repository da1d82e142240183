"""Fail, not skip, a test whose backend's kernels are missing: a build that lost them must not pass."""
from __future__ import annotations

import importlib

import pytest

from mmkernels import _ext


def require_backend(backend: str, what: str, cpu_op: str, triton_module: str | None = None) -> None:
    """``cpu``: the C++ op ``mmkernels._C.<cpu_op>`` is built; ``triton``: ``triton_module`` (when
    given) imports. ``what`` names the kernels in the failure message."""
    if backend == "cpu" and not (_ext.available() and hasattr(_ext.C, cpu_op)):
        pytest.fail(f"the C++ {what} kernels are not built (mmkernels._C.{cpu_op})")
    if backend == "triton" and triton_module is not None:
        try:
            importlib.import_module(triton_module)
        except Exception as exc:  # pragma: no cover - triton missing or kernels broken
            pytest.fail(f"the Triton {what} kernels do not import: {exc}")
