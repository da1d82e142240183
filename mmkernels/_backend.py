"""Backend choice: ``auto | reference | cpu | triton``.

* ``auto`` (default): ``triton`` for CUDA tensors, ``cpu`` (the C++ kernels)
  for CPU tensors, ``reference`` for CPU tensors when the C++ kernels are not
  built.
* ``MMKERNELS_BACKEND=reference|cpu|triton`` (read at import) or the
  ``mmkernels.backend(name)`` context manager forces one. The context manager's choice is
  context-local (a ``contextvars.ContextVar``): it holds for the thread or asyncio task that
  entered the block and nowhere else, so two threads may force different backends at once.
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
from ._context import ContextStack

BACKENDS = ("auto", "reference", "cpu", "triton")

TRITON_INTERPRET = _settings.triton_interpret()
TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None


def _checked(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown mmkernels backend {name!r}; choose one of {BACKENDS}")
    return name


#: The process-wide default: ``MMKERNELS_BACKEND`` as read at import.
DEFAULT = _checked(_settings.backend())

# The backends forced by the open ``backend(...)`` blocks of this thread / asyncio task.
_forced: ContextStack[str] = ContextStack("mmkernels_backend")


@contextlib.contextmanager
def backend(name: str):
    """Force a backend inside a ``with`` block: ``with mmkernels.backend("triton"): ...``.

    Context-local (see ``mmkernels/_context.py``): other threads and asyncio tasks keep their
    own choice, and blocks left out of order leave nothing behind."""
    with _forced.pushed(_checked(name)):
        yield


def current() -> str:
    """The backend asked for now in this thread / task (``MMKERNELS_BACKEND``, default
    ``auto``, unless a ``backend(...)`` block forces one)."""
    return _forced.top(DEFAULT)


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
    name = current()
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
