"""Input builders shared by the contrastive tests."""
from __future__ import annotations

import torch

import mmkernels
from mmkernels import _ext
from mmkernels.contrastive import reference

#: backends compared with the float64 reference on CPU tensors
BACKENDS = ["cpu", "triton"]


def features(n: int, d: int, dtype=torch.float32, *, seed: int = 0, normalize: bool = True,
             magnitude: float = 1.0) -> torch.Tensor:
    """Random ``[n, d]`` features (never zeros), rounded to ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if normalize:
        x = torch.nn.functional.normalize(x, dim=-1)
    return (magnitude * x).to(dtype)


def leaf(x: torch.Tensor) -> torch.Tensor:
    """A fresh leaf copy of ``x`` that requires grad."""
    return x.detach().clone().requires_grad_(True)


def run_loss(fn, backend: str, tensors: list, scale, grad_weight: float = 1.0, **kw):
    """Run ``fn(*tensors, scale, **kw)`` on ``backend``; return (loss, [grads of tensors], grad of scale).

    ``tensors`` and a tensor ``scale`` are copied to fresh leaves. The loss is
    multiplied by ``grad_weight`` before ``backward`` so gradients are O(1).
    """
    xs = [leaf(t) for t in tensors]
    s = leaf(scale) if isinstance(scale, torch.Tensor) else scale
    with mmkernels.backend(backend):
        out = fn(*xs, s, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    (loss.sum() * grad_weight).backward()
    gs = s.grad if isinstance(s, torch.Tensor) else None
    return out, [x.grad for x in xs], gs


def have_backend(name: str) -> bool:
    if name == "cpu":
        return _ext.available()
    return mmkernels._backend.TRITON_AVAILABLE and mmkernels._backend.TRITON_INTERPRET


__all__ = ["BACKENDS", "features", "leaf", "run_loss", "have_backend", "reference"]
