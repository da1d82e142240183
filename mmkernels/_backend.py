"""Backend choice: ``auto | reference | cpu | triton``.

* ``auto`` (default): ``triton`` for CUDA tensors, ``cpu`` (the C++ kernels)
  for CPU tensors, ``reference`` for CPU tensors when the C++ kernels are not
  built.
* ``MMKERNELS_BACKEND=reference|cpu|triton`` (read at import) or the
  ``mmkernels.backend(name)`` context manager forces one.
* With ``TRITON_INTERPRET=1`` (read at import, as Triton itself does) the
  ``triton`` backend also accepts CPU tensors and runs the same Triton
  kernels through Triton's interpreter.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util

import torch

from . import _ext, _settings

BACKENDS = ("auto", "reference", "cpu", "triton")

TRITON_INTERPRET = _settings.triton_interpret()
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown mmkernels backend {name!r}; choose one of {BACKENDS}")
    return name


_forced = [_checked(_settings.backend())]


@contextlib.contextmanager
def backend(name: str):
    """Force a backend inside a ``with`` block: ``with mmkernels.backend("triton"): ...``."""
    _forced.append(_checked(name))
    try:
        yield
    finally:
        _forced.pop()


def current() -> str:
    """The backend asked for now (``auto`` unless forced)."""
    return _forced[-1]


def available_backends() -> dict:
    """Which backends can run here, and on what: used by ``python -m mmkernels.env``."""
    return {
        "reference": "cpu and cuda tensors",
        "cpu": "cpu tensors" if _ext.available() else f"unavailable ({_ext.LOAD_ERROR})",
        "triton": (
            "unavailable (triton not installed)" if not TRITON_AVAILABLE
            else "cuda tensors, and cpu tensors through the interpreter" if TRITON_INTERPRET
            else "cuda tensors" + ("" if torch.cuda.is_available() else " (no CUDA device here)")
        ),
    }


def resolve(device: torch.device) -> str:
    """The concrete backend (``reference``, ``cpu`` or ``triton``) for tensors on ``device``.

    Raises ``RuntimeError`` when a forced backend cannot serve that device.
    """
    name = _forced[-1]
    if name == "auto":
        if device.type == "cuda":
            if not TRITON_AVAILABLE:
                raise RuntimeError("mmkernels: CUDA tensors need triton (pip install triton), "
                                   "or force the 'reference' backend")
            return "triton"
        if device.type == "cpu":
            return "cpu" if _ext.available() else "reference"
        return "reference"
    if name == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"mmkernels: the 'cpu' backend runs CPU tensors, got {device.type} tensors")
        if not _ext.available():
            raise RuntimeError(f"mmkernels: the 'cpu' backend needs the compiled kernels: {_ext.LOAD_ERROR}")
    if name == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("mmkernels: the 'triton' backend needs triton installed")
        if device.type == "cpu" and not TRITON_INTERPRET:
            raise RuntimeError("mmkernels: the 'triton' backend runs CPU tensors only under "
                               "TRITON_INTERPRET=1 (set before importing mmkernels)")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"mmkernels: the 'triton' backend cannot run {device.type} tensors")
    return name


@functools.lru_cache(maxsize=None)
def cpu_bf16_gemm() -> bool:
    """Whether this CPU has bf16 dot products (AVX512-BF16 or AMX-BF16), where a bf16 GEMM runs
    several times faster than an fp32 one: the CPU paths then multiply bf16 features as given
    (the product rounded to bf16, as eager bf16 code) instead of upcast copies."""
    probe = getattr(torch._C._cpu, "_get_cpu_capability", None)
    if probe is None:
        return False
    try:
        caps = probe()
    except Exception:
        return False
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))
