"""Test setup shared by every test module.

Without a CUDA device the Triton kernels run through Triton's interpreter (``TRITON_INTERPRET``,
set here before triton or mmkernels is imported) and tests marked ``gpu`` are skipped. The quick
tier (``pytest -m quick``) is chosen here: the first case of every test function, and of each
backend for functions parametrised by ``backend``; ``slow``, ``gpu`` and ``QUICK_EXCLUDED`` are
never quick.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tiers that are not about the CPU backends: each test compiles a kernel configuration for
# sm_90 (seconds each, hundreds of configurations), installs into a fresh environment, or
# spawns several processes joined by torch.distributed (tens of seconds per run of the ranks).
QUICK_EXCLUDED = ("sm90", "test_install.py", "test_distributed", "test_itc_distributed")


def _quick_key(item):
    """The group an item belongs to: its function, and its ``backend`` parameter if any."""
    callspec = getattr(item, "callspec", None)
    backend = callspec.params.get("backend") if callspec is not None else None
    return (item.nodeid.split("::", 1)[0], getattr(item, "originalname", item.name), repr(backend))


def _mark_quick(items):
    seen = set()
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("gpu"):
            continue
        if any(part in item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1] for part in QUICK_EXCLUDED):
            continue
        key = _quick_key(item)
        if key not in seen:
            seen.add(key)
            item.add_marker(pytest.mark.quick)


def pytest_collection_modifyitems(config, items):
    _mark_quick(items)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
