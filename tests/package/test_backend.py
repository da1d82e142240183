"""Backend choice and the env report (building the C++ kernels: test_ext_build.py)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import mmkernels
from mmkernels import _backend


def test_auto_picks_cpu_kernels_for_cpu_tensors():
    assert _backend.current() in _backend.BACKENDS
    with mmkernels.backend("auto"):
        assert _backend.resolve(torch.device("cpu")) == "cpu"
        assert _backend.resolve(torch.device("cuda")) == "triton"


def test_context_manager_nests_and_restores():
    before = _backend.current()
    with mmkernels.backend("reference"):
        assert _backend.resolve(torch.device("cpu")) == "reference"
        with mmkernels.backend("triton"):
            assert _backend.current() == "triton"
        assert _backend.current() == "reference"
    assert _backend.current() == before


def test_forced_backend_that_cannot_serve_the_device():
    with mmkernels.backend("cpu"), pytest.raises(RuntimeError, match="CPU tensors"):
        _backend.resolve(torch.device("cuda"))


def _run(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ("MMKERNELS_BACKEND", "TRITON_INTERPRET")}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=300)


def test_env_variable_forces_backend():
    out = _run("import mmkernels, torch; print(mmkernels._backend.resolve(torch.device('cpu')))",
               MMKERNELS_BACKEND="reference")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "reference"
    bad = _run("import mmkernels", MMKERNELS_BACKEND="gpu")
    assert bad.returncode != 0 and "unknown mmkernels backend" in bad.stderr


def test_triton_on_cpu_tensors_needs_interpreter():
    out = _run("import mmkernels, torch\n"
               "with mmkernels.backend('triton'):\n"
               "    mmkernels.contrastive_loss(torch.randn(4, 8), torch.randn(4, 8), 1.0)")
    assert out.returncode != 0 and "TRITON_INTERPRET=1" in out.stderr


def test_env_report():
    out = subprocess.run([sys.executable, "-m", "mmkernels.env"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for key in ("torch:", "triton:", "python:", "mmkernels._C", "backend cpu", "backend triton", "cuda device"):
        assert key in out.stdout
