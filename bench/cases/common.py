"""Helpers the families' case modules share: skip reasons for what does not import, an
exception's first line, element sizes for memory estimates, random inputs."""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from bench.harness import Case


def first_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for skip and error reasons."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def missing(module: str, attr: Optional[str] = None) -> Optional[str]:
    """None when ``module`` imports (and has ``attr``, when given); else why a provider skips."""
    try:
        mod = importlib.import_module(module)
    except Exception as exc:
        return f"{module} not importable ({first_line(exc)})"
    if attr is not None and not hasattr(mod, attr):
        return f"{module}.{attr} does not exist yet"
    return None


def elem_size(case: Case) -> int:
    """Bytes per element of the case's dtype."""
    return torch.empty((), dtype=case.torch_dtype).element_size()


def randn(shape, g: torch.Generator, device, scale: float = 1.0) -> torch.Tensor:
    """Standard normal values (never zeros) times ``scale``, in float32."""
    return torch.randn(*shape, generator=g, device=device).mul_(scale)


def trainable(tensors: dict, dtype: torch.dtype) -> dict:
    """The tensors (None stays None) in ``dtype`` as leaves that take a gradient."""
    return {k: (v.to(dtype).requires_grad_() if v is not None else None) for k, v in tensors.items()}
