"""Registered ops of the attention family (namespace ``mmkernels``).

``mmkernels::attention_fwd(q [B, Hq, Sq, D], k, v [B, Hkv, Sk, D], meta, scale, backend)``
returns ``out [B, Hq, Sq, D]`` (q's dtype) and ``lse [B, Hq, Sq]`` (float32; float64 for
float64 inputs). ``meta`` is :meth:`MultimodalMask.metadata` (nine int tensors), or ``[]`` for
full attention. Rows that see no key give ``out = 0``, ``lse = -inf`` and zero gradient.

Its backward, ``mmkernels::attention_bwd``, recomputes the probabilities from ``lse`` and
returns ``dq, dk, dv``. ``lse`` is an output for inspection only (not differentiable).
``backend`` is ``"cpu"`` (C++ in ``mmkernels/csrc/attention.cpp``) or ``"triton"``.
"""
from __future__ import annotations

import torch

from .. import _ext
from .reference import compute_dtype


def _kernels():
    from . import kernels  # imported lazily: triton is optional
    return kernels


@torch.library.custom_op("mmkernels::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: list[torch.Tensor],
                  scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    if backend == "cpu":
        return tuple(_ext.C.attention_fwd(q, k, v, list(meta), scale))
    if backend == "triton":
        return tuple(_kernels().attention_fwd_triton(q, k, v, list(meta), scale))
    raise ValueError(f"attention_fwd: unknown backend {backend!r}")


@attention_fwd.register_fake
def _(q, k, v, meta, scale, backend):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:3], dtype=compute_dtype(q.dtype))


@torch.library.custom_op("mmkernels::attention_bwd", mutates_args=())
def attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                  dout: torch.Tensor, meta: list[torch.Tensor], scale: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (q, k, v, out, lse, dout, list(meta), scale)
    if backend == "cpu":
        return tuple(_ext.C.attention_bwd(*args))
    if backend == "triton":
        return tuple(_kernels().attention_bwd_triton(*args))
    raise ValueError(f"attention_bwd: unknown backend {backend!r}")


@attention_bwd.register_fake
def _(q, k, v, out, lse, dout, meta, scale, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, meta, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *meta)
    ctx.scale, ctx.backend, ctx.n_meta = scale, backend, len(meta)
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero [B, H, S] gradient filled for lse each backward


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, *meta = ctx.saved_tensors
    if dout is None:  # the output did not reach the loss
        return None, None, None, [None] * ctx.n_meta, None, None
    dq, dk, dv = attention_bwd(q, k, v, out, lse, dout.contiguous(), meta, ctx.scale, ctx.backend)
    return dq, dk, dv, [None] * ctx.n_meta, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
