"""Test-session setup shared by every test module.

Without a CUDA device the Triton kernels run through Triton's interpreter:
``TRITON_INTERPRET`` must be set before triton or mmkernels is imported.
Tests marked ``gpu`` are skipped without CUDA.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
