"""The compiled C++ CPU kernels for tests that call them directly."""
from __future__ import annotations


def kernels():
    """The ``mmkernels._C`` module, built for the running torch if needed.

    Raises ``RuntimeError`` with the build error when the kernels cannot be built or loaded:
    a test tier of the C++ kernels must fail, not skip, where they are missing.
    """
    from mmkernels import _ext

    if _ext.C is None:
        raise RuntimeError(f"the C++ CPU kernels are not available: {_ext.LOAD_ERROR}")
    return _ext.C
