"""Input checks shared by every op family.

Each raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (wrong
shape, device, value) with a message naming the argument, before any kernel
runs.
"""
from __future__ import annotations

import math

import torch

from . import _backend

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def tensor(x, name: str, ndim: int | None = None) -> torch.Tensor:
    """Check that ``x`` is a tensor of rank ``ndim`` (when given)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def floating(x: torch.Tensor, name: str) -> torch.Tensor:
    """Check that ``x`` has a supported floating dtype (fp32, bf16, fp16, fp64)."""
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    return x


def same_dtype(*named: tuple[str, torch.Tensor]) -> None:
    """Check that all tensors share one dtype."""
    (n0, t0), rest = named[0], named[1:]
    for n, t in rest:
        if t.dtype != t0.dtype:
            raise TypeError(f"{n} has dtype {t.dtype} but {n0} has dtype {t0.dtype}; use one dtype")


def same_device(*named: tuple[str, torch.Tensor]) -> None:
    """Check that all tensors live on one device."""
    (n0, t0), rest = named[0], named[1:]
    for n, t in rest:
        if t.device != t0.device:
            raise ValueError(f"{n} is on {t.device} but {n0} is on {t0.device}; use one device")


def nonempty(x: torch.Tensor, name: str) -> None:
    """Check that no dimension of ``x`` is zero."""
    if x.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)})")


def index_range(idx: torch.Tensor, name: str, upper: int, lower: int = 0) -> None:
    """Check ``lower <= idx < upper`` elementwise without a host synchronisation on CUDA.

    On CPU (eager) this is a ``ValueError``. On CUDA, or while compiling, it is
    an asynchronous device-side assert (``torch._assert_async``), so the op
    stays free of host synchronisation and CUDA-graph safe.
    """
    ok = (idx >= lower) & (idx < upper)
    if idx.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok.all()):
            bad = idx[~ok][0].item()
            raise ValueError(f"{name} must lie in [{lower}, {upper}), found {bad}")
    else:
        torch._assert_async(ok.all(), f"{name} out of range [{lower}, {upper})")


def attention_qkv(q, k, v) -> None:
    """Checks every attention family shares: ``q [B, Hq, Sq, D]``, ``k``/``v [B, Hkv, Sk, D]``
    floating, non-empty, one dtype and device, k and v of one shape, matching batch and head dim."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        tensor(t, name, 4)
        floating(t, name)
        nonempty(t, name)
    same_dtype(("q", q), ("k", k), ("v", v))
    same_device(("q", q), ("k", k), ("v", v))
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape [B, H, Sk, D], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)}")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q has batch size {q.shape[0]} but k/v have {k.shape[0]}")
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q has head dim {q.shape[3]} but k/v have {k.shape[3]}")


def softmax_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``1 / sqrt(head_dim)`` when ``scale`` is None, else ``float(scale)``."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


def backend_for(x: torch.Tensor, what: str = "inputs") -> str:
    """The concrete backend for an op whose main input is ``x`` (see ``_backend.resolve``).

    Raises ``TypeError`` for float64 on the triton backend (the cpu and reference backends
    take it); ``what`` names the input in the message.
    """
    which = _backend.resolve(x.device)
    if which == "triton" and x.dtype == torch.float64:
        raise TypeError(f"the triton backend takes float32, bfloat16 or float16 {what}, got float64 "
                        "(the cpu and reference backends take float64)")
    return which
