"""Registered ops of the attention family (namespace ``mmkernels``).

``mmkernels::attention_fwd(q [B, Hq, Sq, D], k, v [B, Hkv, Sk, D], meta, scale, backend)``
returns ``out [B, Hq, Sq, D]`` (q's dtype), ``lse``, ``row_max`` and ``row_sum`` (each
``[B, Hq, Sq]``, float32; float64 for float64 inputs). ``meta`` is
:meth:`MultimodalMask.metadata` (nine int tensors), or ``[]`` for full attention. Rows that see
no key give ``out = 0``, ``lse = -inf``, ``row_sum = 0`` and zero gradient.

``row_max`` is the max of each row's scaled scores in the backend's own score domain (natural
for ``cpu``, base 2 for ``triton``) and ``row_sum`` the sum of ``exp(score - row_max)`` (base 2
for ``triton``); ``lse = row_max + log(row_sum)`` in natural units either way. The backward,
``mmkernels::attention_bwd``, recomputes ``P = exp(score - row_max) / row_sum`` from the two kept
apart: one rounded ``lse`` would make ``ulp(lse)`` a relative error of every ``P`` at large
scores. ``lse`` is an output for inspection only; none of the three is differentiable.
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
                  scale: float, backend: str
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if backend == "cpu":
        return tuple(_ext.C.attention_fwd(q, k, v, list(meta), scale))
    if backend == "triton":
        return tuple(_kernels().attention_fwd_triton(q, k, v, list(meta), scale))
    raise ValueError(f"attention_fwd: unknown backend {backend!r}")


@attention_fwd.register_fake
def _(q, k, v, meta, scale, backend):
    row = q.shape[:3]
    ct = compute_dtype(q.dtype)
    return (torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(row, dtype=ct),
            q.new_empty(row, dtype=ct), q.new_empty(row, dtype=ct))


@torch.library.custom_op("mmkernels::attention_bwd", mutates_args=())
def attention_bwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  row_max: torch.Tensor, row_sum: torch.Tensor, dout: torch.Tensor, meta: list[torch.Tensor],
                  scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (q, k, v, out, row_max, row_sum, dout, list(meta), scale)
    if backend == "cpu":
        return tuple(_ext.C.attention_bwd(*args))
    if backend == "triton":
        return tuple(_kernels().attention_bwd_triton(*args))
    raise ValueError(f"attention_bwd: unknown backend {backend!r}")


@attention_bwd.register_fake
def _(q, k, v, out, row_max, row_sum, dout, meta, scale, backend):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    q, k, v, meta, scale, backend = inputs
    out, lse, row_max, row_sum = output
    ctx.save_for_backward(q, k, v, out, row_max, row_sum, *meta)
    ctx.scale, ctx.backend, ctx.n_meta = scale, backend, len(meta)
    ctx.mark_non_differentiable(lse, row_max, row_sum)
    ctx.set_materialize_grads(False)  # no zero [B, H, S] gradients filled for the row stats each backward


def _backward(ctx, dout, _dlse, _drow_max, _drow_sum):
    q, k, v, out, row_max, row_sum, *meta = ctx.saved_tensors
    if dout is None:  # the output did not reach the loss
        return None, None, None, [None] * ctx.n_meta, None, None
    dq, dk, dv = attention_bwd(q, k, v, out, row_max, row_sum, dout.contiguous(), meta, ctx.scale,
                               ctx.backend)
    return dq, dk, dv, [None] * ctx.n_meta, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
